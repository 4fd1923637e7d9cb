"""The plan's records: a calibration (:class:`Cost`), a job's line (:class:`Row`) and the
:class:`Plan`, which round-trips through JSON (``pipeline.status`` reads one)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Cost:
    """One calibration. ``kind`` "step": ``seconds`` of a training step at batch ``full``;
    "pass": ``seconds`` of an inference forward and ``grad_seconds`` of a forward + backward
    to the input, per image; "write": ``seconds`` per image. Timed at batch ``batch`` (scaled
    when below ``full``). Memory at batch B: ``fixed_bytes + item_bytes * B`` (a pass's
    forward alone: ``forward_item_bytes``), ``measured`` on CUDA, else an estimate."""

    what: str
    kind: str
    seconds: float
    grad_seconds: float
    batch: int
    full: int
    fixed_bytes: int
    item_bytes: float
    measured: bool
    forward_item_bytes: float = 0.0

    def peak(self, batch: int) -> int:
        return int(self.fixed_bytes + self.item_bytes * batch)

    def forward_peak(self, batch: int) -> int:
        return int(self.fixed_bytes + self.forward_item_bytes * batch)

    @property
    def scaled(self) -> bool:
        return self.batch < self.full


@dataclass
class Row:
    """One job: its DVC stage name, where it runs, hours, peak memory and how they came."""

    job: str
    stage: str
    on: str
    hours: float
    peak_bytes: int
    memory: str  # "measured", "estimate" or "nominal"
    basis: str


@dataclass
class Plan:
    """The cost plan of a params file (:func:`pipeline.plan.make_plan`)."""

    params: str
    device: str
    threads: int
    clock: str
    calibrate_steps: int
    calibration_s: float
    sizes: dict
    rows: list[Row]
    costs: list[Cost] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def total_hours(self) -> float:
        return sum(r.hours for r in self.rows)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["total_hours"] = self.total_hours
        return out

    @classmethod
    def from_dict(cls, d: dict) -> Plan:
        fields = {k: v for k, v in d.items() if k != "total_hours"}
        fields["rows"] = [Row(**r) for r in d["rows"]]
        fields["costs"] = [Cost(**c) for c in d["costs"]]
        return cls(**fields)
