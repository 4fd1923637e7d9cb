"""A cost plan before launch: ``python -m pipeline.plan [--params FILE] [--calibrate-steps K]
[--json]``.

One line per job of the study's DAG (:func:`pipeline.dag.jobs`, every stage) with its estimated
device-hours and peak memory, and their total. The hours come from a short calibration on
this machine's device: CUDA when there is one, else the CPU with ``$KDIGA_THREADS`` torch
threads, as the stages run (:func:`pipeline.common.set_cpu_threads`); with one thread the
process's CPU time is timed, which leaves out the waits for a core of a shared machine.

- A training step (a distillation, a ``train`` teacher's PGD-AT or TRADES) is timed as the
  stages run it: ``kdiga.train.fit`` with the method's own loss (``kdiga.methods`` settings,
  ``kdiga.methods.build_loss``) on random images, the model built by ``kdiga.models.build_model``
  without pretrained weights (nothing is downloaded). One warm-up step, then K timed steps (at
  most one when a step exceeds :data:`STEP_BUDGET_S`), at the params' batch, or at a smaller
  batch scaled linearly when a step at the full batch would exceed that budget (the plan says
  so). A method that takes the teacher only at the clean input is timed with given teacher
  signals and its teacher's forward (KD, ARD, RSLAD) or forward and input gradient (the IGA
  methods) added per image, unless ``signals.enabled`` serves it (bench/step_cost.py item 2:
  a KDIGA step costs its teacher part plus its student part).
- Per model, a forward and a forward + backward to the input, per image: evaluations, the
  attacks, the bounds, the signals, and teachers that are fetched (file, url, timm): those
  cost only their evaluation's forward passes.
- The shard stage: writing shards of random images, per image (reading the dataset is not
  counted). The report: a nominal minute.

Counts come from the params and the split sizes (the shard manifests when they match, else
:data:`DATASET_IMAGES`): steps per epoch = train images // batch, a validation pass per epoch.
Attacks and bounds are upper bounds: every point attacked at every radius for every step,
restart and AutoAttack attack (their sweeps skip points already broken). Each calibration is
measured once per (model, method and its settings, image size, batch, device) and kept in
memory.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed calls; on the CPU an
ESTIMATE from parameter sizes (with gradients and momentum when training) and the bytes
autograd saves for the backward (the activations), labelled so. Either is scaled linearly
from the timed batch, and a training job on in-memory data adds its training split, which
``fit`` holds on the device (a streamed dataset, ImageNet, holds only its batches).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import inspect
import itertools
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline import dag
from pipeline.params import (
    DATASET_CLASSES,
    ParamError,
    Study,
    load_params,
    params_file,
    parse_student_id,
)

log = logging.getLogger("kdiga.pipeline.plan")

#: (train, test) images of each dataset before the validation cut (``kdiga.data``'s loaders).
DATASET_IMAGES = {
    "digits": (1_198, 599),
    "cifar10": (50_000, 10_000),
    "imagenet": (1_281_167, 50_000),
    "synthetic": (512, 512),
}
#: seconds a timed call may take: a longer one is timed once, at a smaller batch if allowed
STEP_BUDGET_S = {"cpu": 1.0, "cuda": 10.0}
#: the report stage is not calibrated: a nominal minute and half a GiB on the CPU
REPORT_S, REPORT_BYTES = 60.0, 2**29
SHARD_PROBE = 64  # images written to time the shard stage
MEMORY_BASIS = {
    True: "torch.cuda.max_memory_allocated over the timed calls",
    False: "ESTIMATED from parameter sizes and the activations autograd saves (not measured "
    "on the CPU)",
}
STAGES_ON_CPU = ("shard", "report")


def _default(fn: Callable[..., Any], name: str) -> Any:
    """The default of ``fn``'s parameter ``name``: the stages call these with their defaults."""
    return inspect.signature(fn).parameters[name].default


# -- what the study holds -------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Images in each split, and where the numbers come from."""

    train: int
    val: int
    test: int
    source: str


def split_sizes(params: Study, shards: str | Path = dag.SHARDS) -> Sizes:
    """The splits' sizes: the shard manifests' when they were written for this dataset and
    image size, else from :data:`DATASET_IMAGES` (the validation cut rounded as a whole)."""
    s = params.shard
    counts = {}
    for split in ("train", "val", "test"):
        try:
            m = json.loads((Path(shards) / f"{split}.json").read_text())
        except (OSError, ValueError):
            break
        if m.get("dataset") != s.dataset or m.get("image_size") != s.image_size:
            break
        counts[split] = int(m["num_samples"])
    if len(counts) == 3:
        return Sizes(**counts, source="the shard manifests")
    total, test = DATASET_IMAGES[s.dataset]
    val = round(s.val_fraction * total)
    test = test if s.test_samples is None else min(test, s.test_samples)
    return Sizes(total - val, val, test, f"the size of {s.dataset}")


@dataclass(frozen=True)
class ModelSpec:
    """An architecture as the stages build it (options as JSON, so the spec is a key)."""

    arch: str
    kwargs: str
    num_classes: int
    in_chans: int
    image_size: int

    def build(self):
        from kdiga.models import build_model

        return build_model(self.arch, self.num_classes, in_chans=self.in_chans,
                           image_size=self.image_size, **json.loads(self.kwargs))  # fmt: skip

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.in_chans, self.image_size, self.image_size)

    @property
    def label(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in json.loads(self.kwargs).items())
        return f"{self.arch}({opts})" if opts else self.arch


def model_spec(params: Study, model_id: str) -> ModelSpec:
    """The architecture of a teacher (its name) or a student id, for the study's data."""
    if model_id in params.teachers:
        t = params.teachers[model_id]
        arch, kwargs = t.arch or f"timm:{t.source.removeprefix('timm:')}", t.arch_kwargs
    else:
        s = params.students[parse_student_id(params, model_id).student]
        arch, kwargs = s.arch, s.kwargs
    d = params.data
    return ModelSpec(arch, json.dumps(kwargs, sort_keys=True), d["num_classes"], d["in_chans"],
                     d["image_size"])  # fmt: skip


# -- calibration ----------------------------------------------------------------------------


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


class _Enough(Exception):
    """Stops a timing run of ``fit`` once its steps are timed."""


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def _saved_bytes(models: list) -> Iterator[dict[int, int]]:
    """The storages autograd saves for a backward (activations), by address, parameters and
    buffers left out: what a step holds beyond its model, for the CPU's memory estimate."""
    import torch

    own = {t.untyped_storage().data_ptr() for m in models for t in (*m.parameters(), *m.buffers())}
    saved: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor):
            storage = t.untyped_storage()
            if storage.data_ptr() not in own:
                saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


class Calibrator:
    """Short timings on ``device`` (default CUDA when available, else the CPU), each measured
    once and kept (:attr:`costs`); ``steps`` timed calls after one warm-up; a call longer
    than ``budget_s`` (default :data:`STEP_BUDGET_S`) is timed at a smaller batch, once."""

    def __init__(
        self, device: str | None = None, steps: int = 2, budget_s: float | None = None
    ) -> None:
        import torch

        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.steps = steps
        self.budget = budget_s or STEP_BUDGET_S["cuda" if self.cuda else "cpu"]
        self.costs: dict[tuple, Cost] = {}
        self.seconds = 0.0  # spent measuring
        self._models: dict[ModelSpec, Any] = {}

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    @property
    def clock(self) -> str:
        """What is timed: wall time, or on the CPU with one torch thread the process's CPU
        time, which leaves out the waits for a core of a machine shared with other work."""
        import torch

        one_core = not self.cuda and torch.get_num_threads() == 1
        return "process CPU time" if one_core else "wall time"

    def _clock(self) -> float:
        return time.process_time() if self.clock == "process CPU time" else time.perf_counter()

    def _model(self, spec: ModelSpec):
        if spec not in self._models:
            import torch

            torch.manual_seed(0)
            self._models[spec] = spec.build().to(self.device)
        return self._models[spec]

    def release(self) -> None:
        """Drop the models built for timing (the costs stay)."""
        self._models.clear()

    def _measure(self, key: tuple, what: str, run: Callable[[], Cost]) -> Cost:
        if key not in self.costs:
            log.info("calibrating %s on %s", what, self.device)
            start = time.perf_counter()
            self.costs[key] = run()
            self.seconds += time.perf_counter() - start
        return self.costs[key]

    def _batch_for(self, seconds: float, batch: int, full: int) -> int:
        """The largest batch up to ``full`` whose call fits the budget, timed ``seconds`` at
        ``batch``; at least ``batch``."""
        fits = math.floor(self.budget * batch / max(seconds, 1e-9))
        return min(full, max(batch, fits))

    # -- forward and forward + backward to the input --------------------------------------

    def passes(self, spec: ModelSpec, batch: int) -> Cost:
        """A forward and a forward + backward to the input of ``spec`` in eval mode, per
        image, for batches of up to ``batch``."""
        key = ("pass", spec, batch, self.device, self.steps, self.budget)
        return self._measure(key, f"passes of {spec.label}", lambda: self._passes(spec, batch))

    def _one_pass(self, model, spec: ModelSpec, b: int) -> tuple[float, float, int, int]:
        """(inference forward s, forward + backward to the input s, bytes each held above the
        model) of one call of each at batch ``b``."""
        import torch
        import torch.nn.functional as F

        gen = torch.Generator().manual_seed(0)
        x = torch.rand(b, *spec.shape, generator=gen).to(self.device)
        y = torch.randint(0, spec.num_classes, (b,), generator=gen).to(self.device)
        with self._held([model], outputs=True) as held, torch.inference_mode():
            start = self._clock()
            model(x)
            self._sync()
            forward = self._clock() - start
        forward_held = held()
        x.requires_grad_(True)
        with self._held([model]) as held:
            start = self._clock()
            logits = model(x)
            torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), x)
            self._sync()
            total = self._clock() - start
        inputs = x.numel() * x.element_size()  # the input (and its gradient) beside
        return forward, total, held() + 2 * inputs, forward_held + inputs

    @contextlib.contextmanager
    def _held(self, models: list, outputs: bool = False) -> Iterator[Callable[..., int]]:
        """Yields ``held(reset=False)``, the bytes the calls so far held above their models
        (``reset``: start counting afresh): on CUDA the peak allocation above the one before;
        on the CPU an estimate, the activations autograd saves or, with ``outputs`` (a forward
        alone), twice the widest module output."""
        import torch

        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            self._sync()
            yield lambda reset=False: torch.cuda.max_memory_allocated() - base
        elif outputs:
            widest = [0]

            def hook(_module, _inputs, out) -> None:
                if isinstance(out, torch.Tensor):
                    widest[0] = max(widest[0], out.numel() * out.element_size())

            handles = [m.register_forward_hook(hook) for model in models for m in model.modules()]
            try:
                yield lambda reset=False: 2 * widest[0]
            finally:
                for h in handles:
                    h.remove()
        else:
            with _saved_bytes(models) as saved:

                def held(reset: bool = False) -> int:
                    total = sum(saved.values())
                    if reset:
                        saved.clear()
                    return total

                yield held

    def _passes(self, spec: ModelSpec, full: int) -> Cost:
        import torch

        model = self._model(spec).eval().requires_grad_(False)
        b = 1
        total = self._one_pass(model, spec, b)[1]  # warm-up
        wider = self._batch_for(total, b, full)
        while wider > b:
            try:
                total = self._one_pass(model, spec, wider)[1]  # warm-up at that batch
                b = wider
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                wider //= 2
        timed = [self._one_pass(model, spec, b)]
        while len(timed) < self.steps and total <= self.budget:
            timed.append(self._one_pass(model, spec, b))
        forward, grad, held, forward_held = (statistics.median(t[i] for t in timed) / b
                                             for i in range(4))  # fmt: skip
        return Cost(f"passes of {spec.label}", "pass", forward, grad, b, full, _param_bytes(model),
                    held, self.cuda, forward_held)  # fmt: skip

    # -- training steps ---------------------------------------------------------------------

    def step(
        self,
        spec: ModelSpec,
        loss: str,
        settings: dict,
        cfg,
        *,
        teacher: ModelSpec | None = None,
        given_signals: bool = False,
    ) -> Cost:
        """One ``fit`` step of ``spec`` with ``build_loss(loss, **settings)`` at ``cfg``'s
        batch and augmentation; with the live ``teacher``, or with ``given_signals`` (teacher
        signals handed to the loss, as from a cache), or with neither."""
        what = f"{loss} steps of {spec.label}"
        if teacher is not None:
            what += f" with teacher {teacher.label}"
        elif given_signals:
            what += " (given teacher signals)"
        aug = "none" if given_signals else cfg.augment
        key = ("step", spec, loss, json.dumps(settings, sort_keys=True), teacher, given_signals,
               cfg.batch_size, aug, cfg.crop_padding, self.device, self.steps,
               self.budget)  # fmt: skip
        cfg = dataclasses.replace(cfg, augment=aug, epochs=1, drop_last=True, seed=0)
        return self._measure(key, what, lambda: self._step(what, spec, loss, settings, cfg,
                                                           teacher, given_signals))  # fmt: skip

    def _step(self, what, spec, loss, settings, cfg, teacher, given_signals) -> Cost:
        import torch

        full, b = cfg.batch_size, 1
        run = functools.partial(self._fit, spec, loss, settings, cfg, teacher, given_signals)
        try:
            stamps, held, wider = run(b, full)
        except ValueError:  # e.g. train-mode BatchNorm of one value per channel
            b = min(full, 2)
            stamps, held, wider = run(b, full)
        while wider:  # the probe at b found that a wider batch fits the budget
            try:
                stamps, held, _ = run(wider)
                b, wider = wider, 0
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                wider = wider // 2 if wider // 2 > b else 0
        seconds = statistics.median(y - x for x, y in itertools.pairwise(stamps)) * full / b
        weights = _param_bytes(self._model(spec))
        fixed = 3 * weights  # weights, gradients, momentum
        if teacher is not None:
            fixed += _param_bytes(self._model(teacher))
        # CUDA: above what was allocated before fit (the models), less gradients and momentum;
        # CPU: the saved activations, the input, its gradient and (given) the teacher's
        inputs = 3 * 4 * math.prod(spec.shape)
        item = (held - 2 * weights) / b if self.cuda else held / b + inputs
        return Cost(what, "step", seconds, 0.0, b, full, fixed, max(item, 0.0), self.cuda)

    def _fit(self, spec, loss, settings, cfg, teacher, given_signals, b, probe_for=0):
        """Time steps of ``fit`` at batch ``b``: the on-batch time stamps (the first after the
        warm-up step), the bytes held (CUDA: peak above the allocation before; CPU: the most
        a step saved for its backward) and, with ``probe_for`` (the full batch), a wider
        batch that fits the budget after one timed step (0: none)."""
        import torch

        from kdiga.losses import TeacherSignals
        from kdiga.methods import build_loss
        from kdiga.train import fit

        gen = torch.Generator().manual_seed(0)
        n, cfg = b * (self.steps + 1), dataclasses.replace(cfg, batch_size=b)
        images = torch.randint(0, 256, (n, *spec.shape), generator=gen, dtype=torch.uint8)
        labels = torch.arange(n) % spec.num_classes
        student = copy.deepcopy(self._model(spec)).train().requires_grad_(True)
        teacher_model = None if teacher is None else self._model(teacher)
        extra = {}
        if given_signals:
            sig = TeacherSignals(
                logits=torch.randn(b, spec.num_classes, generator=gen).to(self.device),
                input_grad=1e-3 * torch.randn(b, *spec.shape, generator=gen).to(self.device),
            )
            extra["teacher_cache"] = lambda idx: sig
        stamps: list[float] = []
        found = {"peak": 0, "wider": 0}

        def on_batch(_record: dict) -> None:
            self._sync()
            stamps.append(self._clock())
            found["peak"] = max(found["peak"], held(reset=True))
            timed = len(stamps) - 1
            if timed == 1 and probe_for > b:
                wider = self._batch_for(stamps[1] - stamps[0], b, probe_for)
                found["wider"] = wider if wider > b else 0
            slow = timed >= 1 and stamps[-1] - stamps[-2] > self.budget
            if timed >= self.steps or slow or found["wider"]:
                raise _Enough

        models = [student] + ([teacher_model] if teacher_model is not None else [])
        with self._held(models) as held, contextlib.suppress(_Enough):
            fit(student, build_loss(loss, **settings), images, labels, cfg, teacher=teacher_model,
                device=self.device, on_batch=on_batch, **extra)  # fmt: skip
        return stamps, found["peak"], found["wider"]

    # -- the shard stage --------------------------------------------------------------------

    def shard(self, shape: tuple[int, int, int]) -> Cost:
        """Writing WebDataset shards (``kdiga.shards.write_shards``), per image."""
        key = ("write", shape)
        what = f"shard writing of {'x'.join(map(str, shape))} images"
        return self._measure(key, what, lambda: self._shard(what, shape))

    def _shard(self, what: str, shape: tuple[int, int, int]) -> Cost:
        import torch

        from kdiga.shards import write_shards

        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (SHARD_PROBE, *shape), generator=gen, dtype=torch.uint8)
        y = torch.arange(SHARD_PROBE) % 10
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_shards(x, y, tmp, prefix="probe")
            seconds = (time.perf_counter() - start) / SHARD_PROBE
        item = x[0].numel() * x.element_size()
        return Cost(what, "write", seconds, 0.0, SHARD_PROBE, SHARD_PROBE, 0, item, False)


# -- the plan -------------------------------------------------------------------------------


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
    """The cost plan of a params file (:func:`make_plan`)."""

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


def _fmt_s(seconds: float) -> str:
    """A duration in a unit a person reads: ms, s, min, h or d."""
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= size:
            value = seconds / size
            return f"{value:,.0f} {unit}" if value >= 1000 else f"{value:.3g} {unit}"
    return f"{seconds * 1e3:.3g} ms"


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:.0f} B"


def _at(c: Cost) -> str:
    return f" [timed at batch {c.batch}, scaled x{c.full / c.batch:.3g}]" if c.scaled else ""


class _Estimator:
    """The rows of one study: one method per stage, reading the params and the calibrator."""

    def __init__(self, params: Study, cal: Calibrator, sizes: Sizes) -> None:
        self.p, self.cal, self.sizes = params, cal, sizes
        a, b, s = params.attack, params.bounds, params.signals
        self.pass_batch = max(a.batch_size, b.batch_size, s.batch_size)
        self.eval_batch = _predict_batch()
        self.notes: list[str] = []
        d = params.data
        self.image_bytes = d["in_chans"] * d["image_size"] ** 2  # uint8 pixels
        self.memory = "measured" if cal.cuda else "estimate"

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def row(self, job: dag.Job) -> Row:
        seconds, peak, basis = getattr(self, job.stage)(job)
        on = "cpu" if job.stage in STAGES_ON_CPU else self.cal.device
        memory = "nominal" if job.stage == "report" else (
            "estimate" if job.stage == "shard" else self.memory)  # fmt: skip
        return Row(job.name, job.stage, on, seconds / 3600, int(peak), memory, basis)

    @property
    def held_train(self) -> float:
        """Bytes of the training split a training job holds: all of it in memory, none when
        it streams from shards (ImageNet)."""
        return 0.0 if self.p.shard.streamed else self.sizes.train * self.image_bytes

    def passes(self, model_id: str) -> Cost:
        return self.cal.passes(model_spec(self.p, model_id), self.pass_batch)

    # -- one method per stage ---------------------------------------------------------------

    def shard(self, job: dag.Job) -> tuple[float, float, str]:
        z = self.sizes
        total = z.train + z.val + z.test
        d = self.p.data
        c = self.cal.shard((d["in_chans"], d["image_size"], d["image_size"]))
        peak = (2 * (z.train + z.val) + z.test) * self.image_bytes  # loaded, then split
        if self.p.shard.streamed:  # image files copied into shards, one at a time
            peak = 2 * self.image_bytes
        if peak > 2**35:
            self.note(f"the shard stage holds every split in memory: about {_fmt_bytes(peak)}")
        basis = (f"{total:,} images written x {_fmt_s(c.seconds)} (reading the dataset not "
                 "counted)")  # fmt: skip
        return total * c.seconds, peak, basis

    def teacher(self, job: dag.Job) -> tuple[float, float, str]:
        from pipeline.common import train_config

        name, z = job.key, self.sizes
        t, spec, p = self.p.teachers[name], model_spec(self.p, name), self.passes(name)
        evals = (z.val + z.test) * p.seconds
        if t.source != "train":
            basis = f"{t.source.split(':')[0]}: forward over {z.val + z.test:,} val and test images"
            return evals, p.forward_peak(self.eval_batch), basis
        tr = t.train
        settings = {"eps": tr.eps, "steps": tr.steps, "step_size": tr.step_size}
        if tr.method == "trades":
            settings["trades_beta"] = tr.trades_beta
        cfg = train_config(tr, tr.seed)
        c = self.cal.step(spec, tr.method, settings, cfg)
        spe = max(1, z.train // cfg.batch_size)
        seconds = tr.epochs * (spe * c.seconds + z.val * p.seconds) + evals
        peak = c.peak(cfg.batch_size) + self.held_train
        basis = (f"{tr.epochs} epochs x {spe:,} steps x {_fmt_s(c.seconds)} ({tr.method}, "
                 f"batch {cfg.batch_size}){_at(c)}")  # fmt: skip
        return seconds, peak, basis

    def signals(self, job: dag.Job) -> tuple[float, float, str]:
        from kdiga.signals import signals_nbytes

        sig, n, p = self.p.signals, self.sizes.train, self.passes(job.key)
        d = self.p.data
        shape = (d["in_chans"], d["image_size"], d["image_size"])
        nbytes = signals_nbytes(sig.views, n, shape, d["num_classes"], sig.grad_dtype)
        if nbytes / 1e9 > sig.max_gb:
            self.note(f"{job.name} would be refused: its file of {nbytes / 1e9:,.1f} GB is over "
                      f"signals.max_gb ({sig.max_gb:g})")  # fmt: skip
        basis = (f"{sig.views} views x {n:,} images x fwd+bwd {_fmt_s(p.grad_seconds)}; file and "
                 f"host memory {nbytes / 1e9:,.2f} GB")  # fmt: skip
        return sig.views * n * p.grad_seconds, p.peak(sig.batch_size), basis

    def distill(self, job: dag.Job) -> tuple[float, float, str]:
        from kdiga.methods import get_method
        from pipeline.common import train_config

        sj, z = parse_student_id(self.p, job.key), self.sizes
        m = get_method(sj.method)
        settings = m.settings(self.p.value("distill"))
        cfg = train_config(self.p.train_settings(sj.student), sj.seed)
        spec, batch = model_spec(self.p, job.key), cfg.batch_size
        cached = dag.uses_signals(self.p, m.name)
        live = m.needs_teacher and not m.cacheable  # the teacher at x + delta: timed in the step
        t_spec = model_spec(self.p, sj.teacher) if live else None
        c = self.cal.step(spec, m.name, settings, cfg, teacher=t_spec,
                          given_signals=m.needs_teacher and not live)  # fmt: skip
        per_step, extra, held = c.seconds, "", c.peak(batch)
        if m.needs_teacher and not live and not cached:
            tp = self.passes(sj.teacher)
            per_image = tp.grad_seconds if m.iga else tp.seconds
            per_step += batch * per_image
            extra = f" + teacher {'fwd+bwd' if m.iga else 'forward'} {_fmt_s(batch * per_image)}"
            held = c.fixed_bytes + tp.fixed_bytes + max(c.item_bytes, tp.item_bytes) * batch
        elif cached:
            extra = " (cached teacher signals)"
        spe = max(1, z.train // batch)
        evals = z.val * self.passes(job.key).seconds
        seconds = cfg.epochs * (spe * per_step + evals)
        peak = held + self.held_train
        basis = (f"{cfg.epochs} epochs x {spe:,} steps x {_fmt_s(c.seconds)}{extra} "
                 f"(batch {batch}){_at(c)}")  # fmt: skip
        return seconds, peak, basis

    def attack(self, job: dag.Job) -> tuple[float, float, str]:
        a, model, name = self.p.attack, job.args["model"], job.args["attack"]
        n = self.sizes.test if a.split == "test" else self.sizes.val
        radii, p = len(a.radii), self.passes(model)
        if name == "pgd":
            grads = n * radii * a.pgd.restarts * a.pgd.steps
            forwards = n * (1 + radii * (a.pgd.restarts + 1))
        else:
            g, f = autoattack_passes(self.p)
            grads, forwards = n * radii * g, n * (1 + radii * (f + 3))  # + clean predictions
        seconds = grads * p.grad_seconds + forwards * p.seconds
        basis = f"at most {grads:,} fwd+bwd and {forwards:,} forward passes of one image"
        return seconds, p.peak(a.batch_size), basis

    def bounds(self, job: dag.Job) -> tuple[float, float, str]:
        from kdiga.bounds import table4

        b, sid = self.p.bounds, job.args["model"]
        teacher = dag.bounds_teacher(self.p, sid, job.args.get("teacher"))
        n = min(b.samples, self.sizes.test)
        checked, radii = min(b.check_samples, n), len(b.radii)
        steps = b.restarts * b.steps  # gradient steps of one model's ascent, at most
        evals = b.restarts * (b.steps + 1)  # the points it evaluates, at most
        pgd = _default(table4, "pgd_steps")
        tested = 2 + _default(table4, "random_points")  # PGD points of both models, random ones
        # the student's ascent on every sample, the teacher's on the checked ones (each model
        # evaluated at the other's ascent points there), PGD of both, both at the tested points
        s_grads = n * (1 + radii * steps) + checked * radii * pgd
        t_grads = n + checked * radii * (steps + pgd)
        s_fwd = n * radii * b.restarts + checked * radii * (evals + tested)
        t_fwd = checked * radii * (b.restarts + evals + tested)
        forwards = s_fwd + t_fwd
        ps, pt = self.passes(sid), self.passes(teacher)
        seconds = s_grads * ps.grad_seconds + t_grads * pt.grad_seconds
        seconds += s_fwd * ps.seconds + t_fwd * pt.seconds
        peak = ps.fixed_bytes + pt.fixed_bytes + max(ps.item_bytes, pt.item_bytes) * b.batch_size
        basis = (f"at most {s_grads:,} student and {t_grads:,} teacher fwd+bwd, "
                 f"{forwards:,} forward passes of one image")  # fmt: skip
        return seconds, peak, basis

    def report(self, job: dag.Job) -> tuple[float, float, str]:
        return REPORT_S, REPORT_BYTES, "nominal: reads the results, draws one figure"


def _predict_batch() -> int:
    from kdiga.train import predict

    return _default(predict, "batch_size")


def autoattack_passes(params: Study) -> tuple[int, int]:
    """(forward + backward, forward) passes per image and radius of the params' AutoAttack,
    when every point survives every attack: its attacks as ``kdiga.attacks.autoattack``
    configures them (version, restarts, iterations, target classes, Square's queries)."""
    import torch
    from pyautoattack import AutoAttack

    from kdiga.attacks.autoattack import _configure, canonical_aa_norm
    from pipeline.attack import autoattack_settings

    kw = autoattack_settings(params.attack.autoattack)
    classes = DATASET_CLASSES[params.shard.dataset]
    adv = AutoAttack(torch.nn.Identity(), attacks=kw.get("attacks"), device="cpu", eps=0.1,
                     norm=canonical_aa_norm(params.attack.norm), seed=0,
                     version=kw["version"])  # fmt: skip
    _configure(adv, classes, kw.get("n_iter"), None, kw.get("n_restarts"),
               kw.get("n_target_classes"))  # fmt: skip
    apgd, apgd_t, fab, square = adv.apgd, adv.apgd_targeted, adv.fab, adv.square
    grads = {
        "apgd-ce": apgd.n_restarts * apgd.n_iter * apgd.eot_iter,
        "apgd-dlr": apgd.n_restarts * apgd.n_iter * apgd.eot_iter,
        "apgd-t": apgd_t.n_target_classes * apgd_t.n_restarts * apgd_t.n_iter * apgd_t.eot_iter,
        "fab": fab.n_restarts * fab.n_iter * classes,  # a backward per class per iteration
        "fab-t": fab.n_target_classes * fab.n_iter,
        "square": 0,
    }
    forwards = {"square": square.n_queries * square.n_restarts}
    run = adv.attacks_to_run
    return sum(grads[a] for a in run), sum(forwards.get(a, 0) for a in run)


def make_plan(params: Study, cal: Calibrator, path: str = "params.yaml") -> Plan:
    """The cost plan of validated ``params``: one row per job of :func:`pipeline.dag.jobs`."""
    import torch

    sizes = split_sizes(params)
    est = _Estimator(params, cal, sizes)
    start = cal.seconds
    rows = [est.row(job) for job in dag.jobs(params)]
    notes = est.notes
    if any(c.scaled for c in cal.costs.values()):
        notes.append("[timed at batch b, scaled xk]: a step at the full batch would exceed "
                     f"{cal.budget:g} s here, so a smaller batch was timed and its time "
                     "multiplied by k")  # fmt: skip
    notes += [
        f"split sizes from {sizes.source}: {sizes.train:,} train, {sizes.val:,} val, "
        f"{sizes.test:,} test images",
        "attack and bounds rows are upper bounds: every point attacked at every radius, "
        "for every step and restart",
        f"peak memory: {MEMORY_BASIS[cal.cuda]}; "
        + (
            "training streams its batches from the shards"
            if params.shard.streamed
            else "training jobs include their training split, held on the device"
        ),
    ]
    return Plan(
        params=path,
        device=cal.device,
        threads=torch.get_num_threads(),
        clock=cal.clock,
        calibrate_steps=cal.steps,
        calibration_s=cal.seconds - start,
        sizes=dataclasses.asdict(sizes),
        rows=rows,
        costs=list(cal.costs.values()),
        notes=notes,
    )


def _cells(job: str, hours: float, on: str = "", *rest: str) -> list[str]:
    """A table line: job, where, device-hours, the same in a readable unit, then ``rest``."""
    rest = rest or ("", "", "")
    return [job, on, f"{hours:,.4f}", _fmt_s(hours * 3600), *rest]


def render(plan: Plan) -> str:
    """The plan as a fixed-width table, a total and notes."""
    on = plan.device if plan.device != "cpu" else f"cpu, {plan.threads} torch thread(s)"
    head = [
        f"Cost plan of {plan.params}: {len(plan.rows)} jobs, calibrated on {on} in "
        f"{plan.calibration_s:.1f} s ({plan.calibrate_steps} timed step(s) after a warm-up, "
        f"{plan.clock})",
        "",
    ]
    cols = ["job", "on", "device-h", "about", "peak mem", "mem", "how"]
    cells = [_cells(r.job, r.hours, r.on, _fmt_bytes(r.peak_bytes), r.memory, r.basis)
             for r in plan.rows]  # fmt: skip
    total = plan.total_hours
    cells.append(_cells("total", total))
    widths = [max(len(c[i]) for c in [cols, *cells]) for i in range(len(cols) - 1)]
    right = {2, 3, 4}

    def line(c: list[str]) -> str:
        parts = [v.rjust(w) if i in right else v.ljust(w) for i, (v, w) in
                 enumerate(zip(c, widths, strict=False))]  # fmt: skip
        return "  ".join([*parts, c[-1]]).rstrip()

    rule = "-" * (sum(widths) + 2 * len(widths) + len("how"))
    body = [line(cols), rule, *(line(c) for c in cells[:-1]), rule, line(cells[-1])]
    by_stage: dict[str, float] = {}
    for r in plan.rows:
        by_stage[r.stage] = by_stage.get(r.stage, 0.0) + r.hours
    split = ", ".join(f"{s} {_fmt_s(h * 3600)}" for s, h in by_stage.items())
    tail = ["", f"by stage: {split}", "", "notes:", *(f"- {n}" for n in plan.notes)]
    return "\n".join([*head, *body, *tail])


def main(argv: list[str] | None = None, calibrator: Calibrator | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.plan",
        description="Estimate every job's device-hours and peak memory from a short calibration.",
    )
    ap.add_argument("--params", default=None, help="default: $KDIGA_PARAMS or params.yaml")
    ap.add_argument("--calibrate-steps", type=int, default=2, metavar="K",
                    help="timed steps (or passes) per calibration, after a warm-up")  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    if args.calibrate_steps < 1:
        ap.error(f"--calibrate-steps must be >= 1, got {args.calibrate_steps}")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # progress on stderr
    log.setLevel(logging.INFO)
    path = args.params or params_file()
    try:
        params = load_params(path)
        from pipeline.common import set_cpu_threads

        set_cpu_threads()  # the threads a job gets: the calibration measures with them
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cal = calibrator or Calibrator(steps=args.calibrate_steps)
    plan = make_plan(params, cal, path)
    cal.release()
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render(plan))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
