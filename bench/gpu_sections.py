"""The sections of the prepared GPU check (``bench.gpu_check``): what each measures, at the
sizes of a run (real ones on a GPU, tiny ones for ``--dry``), within a shared clock and budget.

Each section takes the run's :class:`Context` and returns a JSON-able dict. The epoch's floor
counts the teacher's FLOPs (``torch.utils.flop_counter``'s formulas) and the bytes the
student's operators write, through dispatch modes (:func:`counted_flops`, :func:`written_bytes`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from bench import common
from bench.authors_step import authors_kdiga_loss
from bench.pairs import METHOD_CFG, NUM_CLASSES, SHAPE, Pair, Setup, build_setup, native_bn_setup
from kdiga.attacks import pgd
from kdiga.data import load_dataset
from kdiga.losses import DistillLoss, teacher_signals
from kdiga.methods import build_loss
from kdiga.models import build_model
from kdiga.train import TrainConfig, fit, maybe_compile_teacher

EPOCH_IMAGES = 50_000
#: the issue's estimate of the 50k-image epoch's floor on an H100/H200, seconds
ISSUE_FLOOR_S = 3.1
PGD_EPS = 8 / 255


@dataclass(frozen=True)
class Sizes:
    """What one run measures at: real sizes on a GPU, tiny ones for ``--dry``."""

    pairs: tuple[Pair, ...]
    repeats: int
    warmup: int
    epoch_images: int
    epoch_batch: int
    pgd_batch: int
    pgd_steps: int
    matmul_n: int
    copy_mib: int
    pytest_paths: tuple[str, ...]
    #: estimated seconds per section (what the budget check compares against)
    estimates: dict[str, float] = field(default_factory=dict)


def sizes(dry: bool) -> Sizes:
    """Real sizes (B = 125, full widths, 50,000 images) or the ``--dry`` ones."""
    if dry:
        teacher_70x = {"depth": 10, "widen_factor": 1}
        return Sizes(
            pairs=(
                # width 8: at width 4 a channels_last train step crashed in oneDNN (torch 2.14)
                Pair("~4x", "resnet50", "resnet18", 2, {"width": 8}, {"width": 8}),
                Pair("~70x", "wrn_34_10", "mobilenet_v2", 2, teacher_70x, {"width_mult": 0.1}),
            ),
            repeats=1,
            warmup=0,
            epoch_images=16,
            epoch_batch=4,
            pgd_batch=4,
            pgd_steps=2,
            matmul_n=256,
            copy_mib=16,
            pytest_paths=("tests/test_layers.py",),
            estimates={
                "gpu_tests": 30,
                "step_cost": 10,
                "epoch": 8,
                "memory": 4,
                "pgd": 3,
                "compile_teacher": 3,
            },
        )
    return Sizes(
        pairs=(
            Pair("~4x", "resnet50", "resnet18", 125, {"width": 64}, {"width": 48}),
            Pair("~70x", "wrn_34_10", "mobilenet_v2", 125, {}, {"width_mult": 1.0}),
        ),
        repeats=5,
        warmup=2,
        epoch_images=EPOCH_IMAGES,
        epoch_batch=125,
        pgd_batch=500,
        pgd_steps=20,
        matmul_n=8192,
        copy_mib=2048,
        pytest_paths=("tests",),
        estimates={
            "gpu_tests": 60,
            "step_cost": 50,
            "epoch": 60,
            "memory": 20,
            "pgd": 70,
            "compile_teacher": 100,
        },
    )


@dataclass
class Context:
    """Shared by the sections: device, sizes, clock and budget."""

    dev: torch.device
    sizes: Sizes
    budget_s: float
    start: float = field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


# --- helpers --------------------------------------------------------------------------------


def _pair(ctx: Context, name: str) -> Pair:
    return next(p for p in ctx.sizes.pairs if p.name == name)


def _amp(dev: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, as ``fit`` trains with ``amp=True`` (off on the CPU, as there)."""
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


def _precision(dev: torch.device) -> str:
    return "bf16" if dev.type == "cuda" else "fp32"


def _setup(pair: Pair, dev: torch.device, *, channels_last: bool, bn: bool) -> Setup:
    """``bench.step_cost.build_setup`` with the layout and BatchNorm conversion asked for."""
    s = build_setup(pair, dev)
    if not bn:
        s = native_bn_setup(s) or s
    if channels_last:
        for model in (s.student, s.teacher):
            model.to(memory_format=torch.channels_last)
        s.x = s.x.contiguous(memory_format=torch.channels_last)
    return s


def _step(kind: str, s: Setup, dev: torch.device) -> Callable[[], None]:
    """One training step (loss under :func:`_amp`, backward and SGD outside, as in ``fit``):
    ``kind`` is a method of ``METHOD_CFG`` or ``"authors"`` (the authors' KDIGA)."""
    loss_fn: DistillLoss | None = None
    if kind != "authors":
        loss_fn = build_loss(kind, **METHOD_CFG[kind])

    def step() -> None:
        s.opt.zero_grad(set_to_none=True)
        with _amp(dev):
            if loss_fn is None:
                loss = authors_kdiga_loss(s.student, s.teacher, s.x, s.y)
            else:
                loss = loss_fn(s.student, s.teacher, s.x, s.y)["loss"]
        loss.backward()
        s.opt.step()

    return step


class _Flops(TorchDispatchMode):
    """FLOPs of matmuls and convolutions (forward and backward) by
    ``torch.utils.flop_counter``'s formulas; unlike its ``FlopCounterMode`` no module hooks,
    which ``autograd.grad(..., inputs=x)`` does not allow."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


class _WrittenBytes(TorchDispatchMode):
    """Bytes of the new tensors every operator returns (views and in-place results, which
    share an input's storage, are not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, Tensor)
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.total += t.numel() * t.element_size()
        return out


def written_bytes(fn: Callable[[], Any]) -> int:
    """Bytes of new tensors the operators of ``fn()`` write (see :class:`_WrittenBytes`)."""
    with _WrittenBytes() as mode:
        fn()
    return mode.total


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of ``fn()``'s matmuls and convolutions, forward and backward, as
    ``torch.utils.flop_counter`` counts them."""
    with _Flops() as mode:
        fn()
    return mode.total


def machine_peaks(ctx: Context) -> dict[str, float]:
    """Measured ceilings: bf16 matmul FLOP/s (n x n x n) and copy bandwidth (read + write)."""
    n, dev = ctx.sizes.matmul_n, ctx.dev
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    src = torch.empty(ctx.sizes.copy_mib * 2**20 // 2, device=dev, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t = common.compare(
        {"matmul": lambda: a @ b, "copy": lambda: dst.copy_(src)}, repeats=5, warmup=2, dev=dev
    )
    return {
        "matmul_flops_per_s": 2 * n**3 / min(t["matmul"].times),
        "copy_bytes_per_s": 2 * src.numel() * src.element_size() / min(t["copy"].times),
    }


# --- sections -------------------------------------------------------------------------------


def _step_row(t: dict[str, common.Timing], batch: int, cl: bool, bn: bool) -> dict[str, Any]:
    m = {k: t[f"{k} cl={int(cl)} bn={int(bn)}"].median for k in ("kd", "kdiga", "authors")}
    return {
        "channels_last": cl,
        "bn_conversion": bn,
        **{f"{k}_s": v for k, v in m.items()},
        "kdiga_over_kd": m["kdiga"] / m["kd"],
        "ours_over_authors": m["kdiga"] / m["authors"],
        "kdiga_images_per_s": batch / m["kdiga"],
    }


def section_step_cost(ctx: Context) -> dict[str, Any]:
    """Per pair: KD, KDIGA and the authors' KDIGA steps for channels_last off/on x BatchNorm
    conversion off/on, bf16, all 12 candidates interleaved; medians in seconds."""
    out: dict[str, Any] = {}
    for pair in ctx.sizes.pairs:
        fns: dict[str, Callable[[], None]] = {}
        for cl in (False, True):
            for bn in (False, True):
                s = _setup(pair, ctx.dev, channels_last=cl, bn=bn)
                for kind in ("kd", "kdiga", "authors"):
                    fns[f"{kind} cl={int(cl)} bn={int(bn)}"] = _step(kind, s, ctx.dev)
        t = common.compare(fns, repeats=ctx.sizes.repeats, warmup=ctx.sizes.warmup, dev=ctx.dev)
        rows = [_step_row(t, pair.batch, cl, bn) for cl in (False, True) for bn in (False, True)]
        out[pair.name] = {"pair": pair.describe(), "batch": pair.batch, "rows": rows}
    return out


def section_epoch(ctx: Context) -> dict[str, Any]:
    """A KDIGA epoch over ``epoch_images`` synthetic images via ``fit``, and its floor."""
    pair, dev = _pair(ctx, "~70x"), ctx.dev
    batch = ctx.sizes.epoch_batch
    peaks = machine_peaks(ctx)
    s = _setup(dataclasses.replace(pair, batch=batch), dev, channels_last=True, bn=True)
    with _amp(dev):
        flops = counted_flops(lambda: teacher_signals(s.teacher, s.x, s.y))
    signals = teacher_signals(s.teacher, s.x, s.y)
    loss_fn = build_loss("kdiga")

    def student_step() -> None:
        s.opt.zero_grad(set_to_none=True)
        with _amp(dev):
            loss = loss_fn(s.student, s.teacher, s.x, s.y, teacher_out=signals)["loss"]
        loss.backward()
        s.opt.step()

    student_step()  # momentum buffers exist before counting
    written = written_bytes(student_step)
    steps = math.ceil(ctx.sizes.epoch_images / batch)
    teacher_floor = steps * flops / peaks["matmul_flops_per_s"]
    student_floor = steps * 2 * written / peaks["copy_bytes_per_s"]
    x, y = load_dataset("synthetic", "train", image_size=SHAPE[1], n=ctx.sizes.epoch_images, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=batch, augment="crop_flip", lr=0.01)
    short = TrainConfig(epochs=1, batch_size=batch, lr=0.01)
    fit(s.student, loss_fn, x[: 2 * batch], y[: 2 * batch], short, teacher=s.teacher, device=dev)
    common.sync(dev)
    t0 = time.perf_counter()
    fit(s.student, loss_fn, x, y, cfg, teacher=s.teacher, device=dev)
    common.sync(dev)
    epoch_s = time.perf_counter() - t0
    floor = teacher_floor + student_floor
    return {
        "pair": pair.describe(),
        "images": ctx.sizes.epoch_images,
        "batch": batch,
        "epoch_s": epoch_s,
        "images_per_s": ctx.sizes.epoch_images / epoch_s,
        **peaks,
        "teacher_flops_per_step": flops,
        "student_written_bytes_per_step": written,
        "floor_teacher_s": teacher_floor,
        "floor_student_s": student_floor,
        "floor_s": floor,
        "epoch_over_floor": epoch_s / floor,
        "issue_floor_s": ISSUE_FLOOR_S,
        "epoch_over_issue_floor": epoch_s / ISSUE_FLOOR_S,
    }


def section_memory(ctx: Context) -> dict[str, Any]:
    """Peak memory of one KD and one KDIGA step (after a warm-up step), bf16, channels_last,
    BatchNorm conversion off and on."""
    out: dict[str, Any] = {}
    for pair in ctx.sizes.pairs:
        rows = []
        for bn in (False, True):
            peak = {}
            for kind in ("kd", "kdiga"):
                s = _setup(pair, ctx.dev, channels_last=True, bn=bn)
                step = _step(kind, s, ctx.dev)
                step()
                s.opt.zero_grad(set_to_none=True)
                peak[kind] = common.peak_bytes(step, ctx.dev)
                del s, step
                if ctx.dev.type == "cuda":
                    torch.cuda.empty_cache()
            ratio = peak["kdiga"] / peak["kd"] if peak["kd"] else None
            rows.append(
                {
                    "bn_conversion": bn,
                    "kd_bytes": peak["kd"],
                    "kdiga_bytes": peak["kdiga"],
                    "kdiga_over_kd": ratio,
                }
            )
        out[pair.name] = {"pair": pair.describe(), "batch": pair.batch, "rows": rows}
    out["how"] = (
        "torch.cuda.max_memory_allocated above the allocation before the step"
        if ctx.dev.type == "cuda"
        else "CPU: peak RSS over the step above the RSS before it"
    )
    return out


def section_pgd(ctx: Context) -> dict[str, Any]:
    """PGD images/s on the student in eval mode, eager and compiled (``compile_model``)."""
    pair, dev = _pair(ctx, "~70x"), ctx.dev
    torch.manual_seed(0)
    model = build_model(pair.student, NUM_CLASSES, **pair.student_kw).to(dev).eval()
    model.to(memory_format=torch.channels_last)
    n, steps = ctx.sizes.pgd_batch, ctx.sizes.pgd_steps
    x = torch.rand(n, *SHAPE, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (n,), device=dev)

    def attack(compiled: bool) -> Tensor:
        gen = torch.Generator(device=dev).manual_seed(0)
        with _amp(dev):
            return pgd(model, x, y, eps=PGD_EPS, steps=steps, generator=gen, compile_model=compiled)

    eager_first = common.time_call(lambda: attack(False), dev)
    compiled_first = common.time_call(lambda: attack(True), dev)
    t = common.compare(
        {"eager": lambda: attack(False), "compiled": lambda: attack(True)},
        repeats=ctx.sizes.repeats,
        warmup=1,
        dev=dev,
    )
    eager, comp = t["eager"].median, t["compiled"].median
    diff = (attack(False) - attack(True)).abs().max().item()
    return _compile_result(
        what=f"PGD-{steps} on {pair.describe().split(' -> ')[1]}, B={n}, eval, {_precision(dev)}",
        eager_s=eager,
        compiled_s=comp,
        first_s=compiled_first,
        eager_first_s=eager_first,
        per_unit=10_000 / n,
        unit="10k-image PGD evaluation",
        extra={
            "eager_images_per_s": n / eager,
            "compiled_images_per_s": n / comp,
            "x_adv_max_abs_diff": diff,
            "compiled": dev.type == "cuda",
        },
    )


def _compile_result(
    *,
    what: str,
    eager_s: float,
    compiled_s: float,
    first_s: float,
    eager_first_s: float,
    per_unit: float,
    unit: str,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Compile time (the compiled path's first call less an eager first call) against the
    time saved per ``unit`` (``per_unit`` calls); the break-even number of units."""
    compile_s = max(0.0, first_s - eager_first_s)
    saving = (eager_s - compiled_s) * per_unit
    return {
        "what": what,
        "eager_s": eager_s,
        "compiled_s": compiled_s,
        "speedup": eager_s / compiled_s,
        "compile_s": compile_s,
        "unit": unit,
        "saving_per_unit_s": saving,
        "break_even_units": compile_s / saving if saving > 0 else None,
        **extra,
    }


def section_compile_teacher(ctx: Context) -> dict[str, Any]:
    """``teacher_signals`` eager vs ``maybe_compile_teacher`` (bf16, channels_last)."""
    pair, dev = _pair(ctx, "~70x"), ctx.dev
    s = _setup(
        dataclasses.replace(pair, batch=ctx.sizes.epoch_batch), dev, channels_last=True, bn=True
    )
    eager_t = s.teacher
    compiled_t = maybe_compile_teacher(copy.deepcopy(s.teacher), True, dev)

    def signals(teacher: nn.Module) -> Callable[[], Any]:
        def call() -> Any:
            with _amp(dev):
                return teacher_signals(teacher, s.x, s.y)

        return call

    eager_first = common.time_call(signals(eager_t), dev)
    first = common.time_call(signals(compiled_t), dev)
    t = common.compare(
        {"eager": signals(eager_t), "compiled": signals(compiled_t)},
        repeats=2 * ctx.sizes.repeats,
        warmup=1,
        dev=dev,
    )
    g_e, g_c = signals(eager_t)().input_grad.float(), signals(compiled_t)().input_grad.float()
    rel = ((g_c - g_e).abs().max() / g_e.abs().max().clamp_min(1e-30)).item()
    return _compile_result(
        what=f"teacher_signals of {pair.describe().split(' -> ')[0]}, B={ctx.sizes.epoch_batch}, "
        f"{_precision(dev)}, channels_last",
        eager_s=t["eager"].median,
        compiled_s=t["compiled"].median,
        first_s=first,
        eager_first_s=eager_first,
        per_unit=math.ceil(EPOCH_IMAGES / ctx.sizes.epoch_batch),
        unit="50k-image epoch",
        extra={"input_grad_max_rel_diff": rel, "compiled": dev.type == "cuda"},
    )


_COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)")


def section_gpu_tests(ctx: Context) -> dict[str, Any]:
    """``pytest -m gpu`` in a subprocess (time-limited by what is left of the budget)."""
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        *ctx.sizes.pytest_paths,
    ]
    timeout = max(10.0, min(ctx.left(), 3 * ctx.sizes.estimates["gpu_tests"]))
    proc = subprocess.run(
        cmd, cwd=common.REPO_ROOT, capture_output=True, text=True, timeout=timeout, check=False
    )
    lines = proc.stdout.strip().splitlines()
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0, "deselected": 0}
    for number, what in _COUNT.findall(lines[-1] if lines else ""):
        key = "errors" if what.startswith("error") else what
        counts[key] = counts.get(key, 0) + int(number)
    failures = [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))]
    return {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        **counts,
        "failures": failures,
        "tail": "\n".join(lines[-15:]) if proc.returncode not in (0, 5) else "",
    }
