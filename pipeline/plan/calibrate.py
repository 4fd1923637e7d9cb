"""Short timings on this machine's device, each measured once and kept: a training step as
the stages run it (``kdiga.train.fit`` with the method's loss), a model's forward and forward
+ backward to the input, and writing shards. See :mod:`pipeline.plan` for what each covers.

torch, and the kdiga modules that import it, are imported inside the methods that time:
``pipeline.status`` imports this package (for :class:`~pipeline.plan.records.Plan`) on any
node of a study, and a plan's own start should not pay for torch before it is needed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import itertools
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from kdiga.losses import TeacherSignals
from kdiga.methods import build_loss
from kdiga.shards import write_shards
from kdiga.train import fit
from pipeline.plan.records import Cost
from pipeline.plan.study import ModelSpec

log = logging.getLogger("kdiga.pipeline.plan")

#: seconds a timed call may take: a longer one is timed once, at a smaller batch if allowed
STEP_BUDGET_S = {"cpu": 1.0, "cuda": 10.0}
SHARD_PROBE = 64  # images written to time the shard stage


class _Enough(Exception):
    """Stops a timing run of ``fit`` once its steps are timed."""


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def _saved_bytes(models: list) -> Iterator[dict[int, int]]:
    """The storages autograd saves for a backward (activations), by address, parameters and
    buffers left out: what a step holds beyond its model, for the CPU's memory estimate."""
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
            torch.cuda.synchronize()

    @property
    def clock(self) -> str:
        """What is timed: wall time, or on the CPU with one torch thread the process's CPU
        time, which leaves out the waits for a core of a machine shared with other work."""
        one_core = not self.cuda and torch.get_num_threads() == 1
        return "process CPU time" if one_core else "wall time"

    def _clock(self) -> float:
        return time.process_time() if self.clock == "process CPU time" else time.perf_counter()

    def _model(self, spec: ModelSpec):
        if spec not in self._models:
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
        forward, grad, held, forward_held = (
            statistics.median(t[i] for t in timed) / b for i in range(4)
        )
        return Cost(
            f"passes of {spec.label}",
            "pass",
            forward,
            grad,
            b,
            full,
            _param_bytes(model),
            held,
            self.cuda,
            forward_held,
        )

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
        key = (
            "step",
            spec,
            loss,
            json.dumps(settings, sort_keys=True),
            teacher,
            given_signals,
            cfg.batch_size,
            aug,
            cfg.crop_padding,
            self.device,
            self.steps,
            self.budget,
        )
        cfg = dataclasses.replace(cfg, augment=aug, epochs=1, drop_last=True, seed=0)
        return self._measure(
            key, what, lambda: self._step(what, spec, loss, settings, cfg, teacher, given_signals)
        )

    def _step(self, what, spec, loss, settings, cfg, teacher, given_signals) -> Cost:
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
            fit(
                student,
                build_loss(loss, **settings),
                images,
                labels,
                cfg,
                teacher=teacher_model,
                device=self.device,
                on_batch=on_batch,
                **extra,
            )
        return stamps, found["peak"], found["wider"]

    # -- the shard stage --------------------------------------------------------------------

    def shard(self, shape: tuple[int, int, int]) -> Cost:
        """Writing WebDataset shards (``kdiga.shards.write_shards``), per image."""
        key = ("write", shape)
        what = f"shard writing of {'x'.join(map(str, shape))} images"
        return self._measure(key, what, lambda: self._shard(what, shape))

    def _shard(self, what: str, shape: tuple[int, int, int]) -> Cost:
        gen = torch.Generator().manual_seed(0)
        x = torch.randint(0, 256, (SHARD_PROBE, *shape), generator=gen, dtype=torch.uint8)
        y = torch.arange(SHARD_PROBE) % 10
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            write_shards(x, y, tmp, prefix="probe")
            seconds = (time.perf_counter() - start) / SHARD_PROBE
        item = x[0].numel() * x.element_size()
        return Cost(what, "write", seconds, 0.0, SHARD_PROBE, SHARD_PROBE, 0, item, False)
