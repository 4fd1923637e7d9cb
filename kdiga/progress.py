"""Progress of the long loops (training steps, attack batches, ascents, signals, shards).

A long function takes an optional callback ``progress(event)`` and calls it with a
:class:`Progress` as its work advances: at the start (``done`` may be > 0 on a resumed run)
and after each unit of work. The library only counts; whoever passes the callback decides
what to show and how often (``pipeline.progress`` draws a bar on a terminal, writes a log
line about once a minute elsewhere, and keeps a small JSON file beside the job's log).

A function may report several tasks, one nested in another: ``robust_sweep`` counts its
attacks (batches x radii) under the task ``"<attack> sweep"`` while AutoAttack counts the
samples of each of its stages under ``"autoattack <stage>"``. A task that starts again
(AutoAttack's stages on the next batch) reports ``done`` from 0 again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    """``done`` of ``total`` units of ``task`` (e.g. "train", 120 of 1400 "steps");
    ``detail`` says where inside it (e.g. "epoch 1/100, step 8/14")."""

    task: str
    done: int
    total: int
    unit: str = "it"
    detail: str = ""


ProgressFn = Callable[[Progress], None]


class Tracker:
    """Counts one task of a loop and reports it to ``progress`` (nothing when it is None).

    ``Tracker(progress, "signals", total=views * n, unit="images")``, then ``at(done)`` or
    ``advance(k)`` as the loop goes.
    """

    def __init__(self, progress: ProgressFn | None, task: str, total: int, unit: str) -> None:
        self.progress, self.task, self.total, self.unit = progress, task, int(total), unit
        self.done = 0

    def at(self, done: int, detail: str = "") -> None:
        """Report that ``done`` units are finished."""
        self.done = int(done)
        if self.progress is not None:
            self.progress(Progress(self.task, self.done, self.total, self.unit, detail))

    def advance(self, n: int = 1, detail: str = "") -> None:
        """Report ``n`` more units finished."""
        self.at(self.done + n, detail)
