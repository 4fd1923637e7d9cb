"""The plan as a person reads it: a fixed-width table, a total, the hours by stage, notes."""

from __future__ import annotations

from pipeline.plan.records import Plan


def fmt_s(seconds: float) -> str:
    """A duration in a unit a person reads: ms, s, min, h or d."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            value = seconds / size
            return f"{value:,.0f} {unit}" if value >= 1000 else f"{value:.3g} {unit}"
    return f"{seconds * 1e3:.3g} ms"


def fmt_bytes(n: float) -> str:
    """A size in a binary unit: B, KiB, MiB, GiB or TiB."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


def _cells(job: str, hours: float, on: str = "", *rest: str) -> list[str]:
    """A table line: job, where, device-hours, the same in a readable unit, then ``rest``."""
    rest = rest or ("", "", "")
    return [job, on, f"{hours:,.4f}", fmt_s(hours * 3600), *rest]


def _table(plan: Plan) -> list[str]:
    """The column heads, one line per job and the total, aligned (the last column free)."""
    cols = ["job", "on", "device-h", "about", "peak mem", "mem", "how"]
    cells = [
        _cells(r.job, r.hours, r.on, fmt_bytes(r.peak_bytes), r.memory, r.basis) for r in plan.rows
    ]
    cells.append(_cells("total", plan.total_hours))
    widths = [max(len(c[i]) for c in [cols, *cells]) for i in range(len(cols) - 1)]
    right = {2, 3, 4}

    def line(c: list[str]) -> str:
        parts = [
            v.rjust(w) if i in right else v.ljust(w)
            for i, (v, w) in enumerate(zip(c, widths, strict=False))
        ]
        return "  ".join([*parts, c[-1]]).rstrip()

    rule = "-" * (sum(widths) + 2 * len(widths) + len("how"))
    return [line(cols), rule, *(line(c) for c in cells[:-1]), rule, line(cells[-1])]


def render(plan: Plan) -> str:
    """The plan as a fixed-width table, a total and notes."""
    on = plan.device if plan.device != "cpu" else f"cpu, {plan.threads} torch thread(s)"
    head = [
        f"Cost plan of {plan.params}: {len(plan.rows)} jobs, calibrated on {on} in "
        f"{plan.calibration_s:.1f} s ({plan.calibrate_steps} timed step(s) after a warm-up, "
        f"{plan.clock})",
        "",
    ]
    by_stage: dict[str, float] = {}
    for r in plan.rows:
        by_stage[r.stage] = by_stage.get(r.stage, 0.0) + r.hours
    split = ", ".join(f"{s} {fmt_s(h * 3600)}" for s, h in by_stage.items())
    tail = ["", f"by stage: {split}", "", "notes:", *(f"- {n}" for n in plan.notes)]
    return "\n".join([*head, *_table(plan), *tail])
