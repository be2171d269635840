"""The figure: grouped accuracy bars with std error bars, and one panel of learning curves per
pair (mean val top-1 over seeds of each method)."""
from __future__ import annotations

from pathlib import Path

from distill.report.group import Row
from distill.report.render import _column_name, in_column, method_order, pairs, writing

def plot_rows(rows: list[Row], path: str | Path, metric: str = "last",
              option: str = "--plot") -> None:
    """A PNG: top, grouped bars of mean top-1 with std error bars (a group per pair); below,
    one panel per pair with each method's val top-1 curve (mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")   # files only: no display needed
    import matplotlib.pyplot as plt

    columns = [(c, [r for r in rows if in_column(r, c)]) for c in pairs(rows)]
    methods = method_order(rows)
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    per_row = min(3, len(columns))
    curve_rows = -(-len(columns) // per_row)
    fig = plt.figure(figsize=(max(8.0, 4.0 * per_row), 4.0 + 3.5 * curve_rows))
    grid = fig.add_gridspec(1 + curve_rows, per_row, height_ratios=[1.2] + [1] * curve_rows)

    bars = fig.add_subplot(grid[0, :])
    width = 0.8 / max(1, max(len(rs) for _, rs in columns))
    lows = []
    for x, (column, members) in enumerate(columns):
        members = sorted(members, key=lambda r: methods.index(r.method))
        for i, r in enumerate(members):
            mean, std = r.mean(metric), r.std(metric) or 0.0
            lows.append(mean - std)
            bars.bar(x - 0.4 + width * (i + 0.5), mean, width, yerr=std, capsize=3,
                     color=colour[r.method], label=r.method)
    handles = dict(zip(*reversed(bars.get_legend_handles_labels())))   # one entry per method
    bars.legend(handles.values(), handles.keys(), fontsize="small", loc="upper left",
                bbox_to_anchor=(1.0, 1.0))
    several_datasets = len({c[0] for c, _ in columns}) > 1
    bars.set_xticks(range(len(columns)), [(f"{c[0]}: " if several_datasets else "")
                                          + _column_name(c) for c, _ in columns])
    bars.set_ylim(max(0.0, min(lows) - 5), 100)
    bars.set_ylabel(f"{metric} top-1 (%)")
    bars.set_title(f"{metric} top-1, mean ± std over seeds")

    for i, (column, members) in enumerate(columns):
        ax = fig.add_subplot(grid[1 + i // per_row, i % per_row])
        for r in sorted(members, key=lambda r: methods.index(r.method)):
            if r.curve:
                ax.plot(*zip(*r.curve), color=colour[r.method], label=r.method, linewidth=1.2)
        ax.set_title(f"{column[0]}: {_column_name(column)}", fontsize="medium")
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with writing(path, option) as target:
            fig.savefig(target, dpi=100)
    finally:
        plt.close(fig)
