"""The Figure-1-style plot (accuracy against radius with 95% CI bands) and its CSV."""

from __future__ import annotations

import polars as pl

from kdiga.files import atomic_path
from pipeline.params import Study, model_ids
from pipeline.stages.report.numbers import Numbers, accuracy_estimate, cells, label


def figure(params: Study, numbers: Numbers, attack: str, path: str) -> list[dict]:
    """Clean and robust accuracy against radius, one panel per teacher, one line per method
    (the mean over seeds) with its 95% CI as a band; returns the CSV rows (per model id)."""
    # matplotlib is heavy and only the figure draws: imported when it is drawn
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 (after choosing the Agg backend)

    groups = cells(params)
    fig, axes = plt.subplots(
        1, len(groups), figsize=(5.2 * len(groups), 4.2), dpi=110, squeeze=False
    )
    radii = [0.0, *numbers.radii]
    for ax, (teacher, group) in zip(axes[0], groups.items(), strict=True):
        for cell in group:
            est = [
                accuracy_estimate(numbers.accuracy(cell, attack, r))
                for r in [None, *range(len(numbers.radii))]
            ]
            mean = [100 * e.mean for e in est]
            if cell.method is None:
                name, style = f"teacher {teacher}", {"color": "black", "linestyle": "--"}
            else:
                name, style = label(cell.method), {}
                if len(params.students) > 1:
                    name += f" ({cell.student})"
            (line,) = ax.plot(radii, mean, marker="o", markersize=3, label=name, **style)
            if all(e.lo is not None for e in est):
                ax.fill_between(
                    radii,
                    [100 * e.lo for e in est],
                    [100 * e.hi for e in est],
                    color=line.get_color(),
                    alpha=0.15,
                    linewidth=0,
                )
        ax.set_xlabel(f"{attack.upper()} radius ({params.attack.norm}, [0, 1] pixels)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title(f"Teacher {teacher}" if teacher else "Students")
    fig.suptitle("Clean (radius 0) and robust accuracy, mean and 95% CI", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    table = [{"radius": r} for r in radii]
    for mid in model_ids(params):
        e = numbers.evals[(mid, attack)]
        for row, a in zip(table, [e["clean"], *e["robust"]], strict=True):
            row[mid] = a
    return table


def write_csv(rows: list[dict], path: str) -> None:
    with atomic_path(path) as tmp:
        pl.DataFrame(rows).write_csv(tmp)
