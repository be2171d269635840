#!/usr/bin/env python
"""Benchmark tables from run directories and sweep folders (markdown on stdout).

    python tools/report.py multirun/table-a multirun/table-b --csv docs/table.csv --plot docs/table.png

Runs are grouped by everything in their config that changes the result (not seed, run_dir, tag,
logging, workers, ... : distill/report/group.py IGNORED_KEYS) and by their teachers' weights
digests, and averaged over seeds. Unfinished runs are listed under the tables and never
averaged in.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distill.errors import ConfigError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR",
                        help="run directories or sweep folders (searched for .hydra/config.yaml)")
    parser.add_argument("--metric", choices=("best", "last"), default="last",
                        help="top-1 in the tables, bars and gains (default: last). 'last' is the "
                             "model you keep after the final epoch; 'best' is the maximum over "
                             "epochs of the same test set it is reported on (there is no separate "
                             "validation split), so it is selected on the test set and optimistic. "
                             "The detail table and the CSV hold both.")
    parser.add_argument("--csv", type=Path, metavar="FILE", help="write the long-form table here")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="write accuracy bars and learning curves here")
    args = parser.parse_args(argv)

    from distill import report

    # every file is written before anything is printed: on an error, stdout stays empty
    try:
        runs, unfinished = report.load_runs(args.dirs)
        for option, path in (("--csv", args.csv), ("--plot", args.plot)):
            if path is not None:
                report.check_writable(path, option)   # both, before either is written
        rows = report.summarize(report.group_runs(runs))
        text = report.render_markdown(rows, unfinished, args.metric)
        if args.csv:
            report.write_csv(rows, args.csv)
        if args.plot and rows:
            report.plot_rows(rows, args.plot, args.metric)
    except ConfigError as exc:
        print(f"error: {exc.render()}", file=sys.stderr)
        return 2
    print("```\npython tools/report.py " + " ".join(sys.argv[1:] if argv is None else argv)
          + "\n```\n")
    if not rows:
        print("No finished runs.\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
