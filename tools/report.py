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

from distill import cli_args, report  # noqa: E402
from distill.errors import ConfigError  # noqa: E402


def build_parser() -> cli_args.ArgumentParser:
    parser = cli_args.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", type=cli_args.existing_dir,
                        help="run directories or sweep folders (searched for .hydra/config.yaml)")
    parser.add_argument("--metric", choices=report.METRICS, default="last",
                        help="top-1 in the tables, bars and gains (default: last). 'last' is the "
                             "model you keep after the final epoch; 'best' is the maximum over "
                             "epochs of the same test set it is reported on (there is no separate "
                             "validation split), so it is selected on the test set and optimistic. "
                             "The detail table and the CSV hold both.")
    parser.add_argument("--csv", type=cli_args.output_file([".csv"]), metavar="FILE.csv",
                        help="write the long-form table here")
    parser.add_argument("--plot", type=cli_args.figure_file, metavar="FILE.png",
                        help="write accuracy bars and learning curves here (any file type "
                             "matplotlib writes: .png, .pdf, .svg, ...)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Every flag converted and checked (output paths too, creating nothing); a bad one exits 2
    with one error screen."""
    return build_parser().parse_checked(argv)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:   # a refused flag (its error is printed) or --help
        return exc.code

    # every file is written before anything is printed: on an error, stdout stays empty
    try:
        runs, unfinished = report.load_runs(args.dirs)
        rows = report.summarize(report.group_runs(runs))
        text = report.render_markdown(rows, unfinished, args.metric)
        if args.csv:
            report.write_csv(rows, args.csv)
        if args.plot and rows:
            report.plot_rows(rows, args.plot, args.metric)
    except ConfigError as exc:
        return cli_args.error(exc.render())
    print("```\npython tools/report.py " + " ".join(sys.argv[1:] if argv is None else argv)
          + "\n```\n")
    if not rows:
        print("No finished runs.\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
