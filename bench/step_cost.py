"""What a KDIGA training step costs, against the authors' formulation and against KD / ARD.

Every number is a RATIO of medians measured side by side in one process (candidates
interleaved, :func:`bench.common.compare`); absolute times are printed for context only.

1. Ours vs the authors' formulation. Ours: ``build_loss("kdiga")`` + backward + SGD step: one
   student forward reused for CE, KL and gs (double backprop), one teacher forward + backward
   to x with no parameter gradients (``teacher_signals``). The authors'
   (RulinShao/AdversariallyRobustDistillation ``main.py``, reimplemented here as
   :func:`authors_kdiga_step`, in the variant whose IGA term trains): teacher forward on an
   input that requires grad, batch-mean CE, ``autograd.grad`` -> t_grad; student forward,
   batch-mean CE, ``autograd.grad(create_graph=True)`` -> s_grad; then a SECOND student
   forward and a SECOND teacher forward for the KL term (two student and two teacher forwards
   per step). The loss value is made equal to ours (``batch_frobenius``, weight 1000 <->
   ``gama = 1000 / B`` on the gradients of the batch-mean CE; KL ``batchmean``) and checked.
   Target: ours / authors <= 0.75.
2. Ours vs the sum of its necessary parts timed alone: (a) ``teacher_signals`` and (b) a
   hand-written student part (forward, CE + KL, gs with ``create_graph``, IGA against the
   precomputed teacher signals, backward to the parameters, SGD step). Target <= 1.1.
3. Step-time ratios KDIGA/KD, ARD/KD, KDIGA-ARDC/KD and KDIGA/ARD (ARD and ARDC with PGD-10,
   ε = 8/255, step 2/255, the paper's CIFAR setting) for two teacher -> student pairs: about
   4x the student's MACs (ResNet-50 -> ResNet-18 shape) and about 70x (WRN-34-10 ->
   MobileNetV2 shape). The MAC ratio actually used is counted and printed.
3b. Every method of :mod:`kdiga.methods` (the table's entries when this module is imported:
   ST, the paper's, RSLAD, AdaAD, IAD, IGDM) timed in the same interleaved rounds, its step
   against KD's; inner maximisations at PGD-10, ε = 8/255, each method's other settings at
   its authors' defaults, an epoch-scheduled weight at its last epoch's value.
2b. (with a student that has grouped convolutions, e.g. MobileNetV2) the same KDIGA step with
   the student's :class:`~kdiga.models.GroupedConv2d` layers turned back into ``nn.Conv2d``:
   what the per-group double backward of PyTorch costs.
2c. BatchNorm double backward off vs on: our KDIGA step, the authors' formulation and the
   student part (b) with the student's :class:`~kdiga.models.batchnorm.IGABatchNorm2d` layers
   turned back into ``nn.BatchNorm2d`` (PyTorch's generic double backward, "off") against the
   converted student ("on"), all interleaved in the same run: item 1's ratio before and after.
4. A KDIGA epoch with cached teacher signals (``kdiga.signals.SignalCache``) against a live
   one (fresh crop+flip, the teacher's signals each step), WRN-34-10 -> MobileNetV2 shape,
   BatchNorm conversion off and on, four candidates interleaved. Target cached/live <= 0.5.
8. Peak memory of a KDIGA step against a KD step (CUDA: ``max_memory_allocated``; CPU: peak
   RSS of a fresh process per measurement, see :mod:`bench.common`).

On CPU the widths (and batch sizes) are reduced so a step stays short; the run says which.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import common
from kdiga.data import load_dataset
from kdiga.losses import DistillLoss, teacher_signals
from kdiga.methods import build_loss, get_method, method_names
from kdiga.models import GroupedConv2d, build_model
from kdiga.models.batchnorm import IGABatchNorm2d
from kdiga.signals import SignalCache, compute_signals
from kdiga.train import TrainConfig, fit

NUM_CLASSES = 10
SHAPE = (3, 32, 32)
#: The distill params section every comparison uses: KDIGA with the authors' scaling (gama =
#: 1000 / B on the gradients of the batch-mean CE) so that their formulation gives the same
#: loss value; the inner maximisation at the paper's CIFAR setting (step size 2.5 * eps /
#: steps = 2/255); the later methods at their authors' defaults. Each method's build_loss
#: settings come from the method table.
DISTILL: dict[str, Any] = {
    "ce_weight": 0.5,
    "kl_weight": 0.5,
    "temperature": 1.0,
    "iga": {"weight": 1000.0, "reduction": "batch_frobenius", "grad_mode": "train"},
    "adversarial": {"eps": 8 / 255, "steps": 10, "step_size": None},
    "rslad": {"adv_weight": 5 / 6},
    "adaad": {"alpha": 1.0},
    "iad": {"alpha": 1.0, "beta": 0.1, "warmup": 0.3, "weight_teacher": False},
    "igdm": {"weight": 1.0},
}
#: Every registered method's settings (item 3b times each one's step beside KD's).
METHOD_CFG: dict[str, dict[str, Any]] = {m: get_method(m).settings(DISTILL) for m in method_names()}
KD_CFG, IGA_CFG = METHOD_CFG["kd"], METHOD_CFG["kdiga"]
LR = 1e-3
#: suffix of the candidates whose student keeps nn.BatchNorm2d ("BN conversion off")
BN_OFF = "[nn.BatchNorm2d]"
#: torch threads on CPU (see :func:`run`).
CPU_THREADS = 1


@dataclass(frozen=True)
class Pair:
    """A teacher -> student size pair and the batch size it is timed at."""

    name: str
    teacher: str
    student: str
    batch: int
    teacher_kw: dict[str, Any] = field(default_factory=dict)
    student_kw: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        def one(arch: str, kw: dict[str, Any]) -> str:
            opts = ", ".join(f"{k}={v}" for k, v in kw.items())
            return f"{arch}({opts})" if opts else arch

        return f"{one(self.teacher, self.teacher_kw)} -> {one(self.student, self.student_kw)}"


def make_pairs(cuda: bool, quick: bool) -> list[Pair]:
    """The two pairs: full widths, B=125 on CUDA; reduced widths and batches on CPU."""
    if cuda:
        b = 32 if quick else 125
        return [
            Pair("~4x", "resnet50", "resnet18", b, {"width": 64}, {"width": 48}),
            Pair("~70x", "wrn_34_10", "mobilenet_v2", b, {}, {"width_mult": 1.0}),
        ]
    b4, b70 = (8, 2) if quick else (125, 16)
    return [
        Pair("~4x", "resnet50", "resnet18", b4, {"width": 11}, {"width": 8}),
        Pair("~70x", "wrn_34_10", "mobilenet_v2", b70, {"widen_factor": 3}, {"width_mult": 0.2}),
    ]


@dataclass
class Setup:
    """Models, optimiser and one batch for a pair: student in train mode, teacher frozen."""

    student: nn.Module
    teacher: nn.Module
    opt: torch.optim.Optimizer
    x: Tensor
    y: Tensor
    mac_ratio: float


def build_setup(pair: Pair, dev: torch.device, seed: int = 0) -> Setup:
    """Build the pair on ``dev`` with a random CIFAR-shaped batch ``x`` [B, 3, 32, 32] in [0, 1].

    The teacher is in eval mode with its parameters frozen, as in the authors' script (so
    freezing is no part of the difference measured in item 1).
    """
    torch.manual_seed(seed)
    teacher = build_model(pair.teacher, NUM_CLASSES, **pair.teacher_kw).to(dev).eval()
    student = build_model(pair.student, NUM_CLASSES, **pair.student_kw).to(dev).train()
    teacher.requires_grad_(False)
    macs = common.count_macs(teacher, SHAPE) / common.count_macs(student, SHAPE)
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    x = torch.rand(pair.batch, *SHAPE, device=dev)
    y = torch.randint(0, NUM_CLASSES, (pair.batch,), device=dev)
    return Setup(student, teacher, opt, x, y, macs)


# --- the candidates -------------------------------------------------------------------------


def ours_step(loss_fn: DistillLoss, s: Setup) -> Callable[[], None]:
    """One training step with our loss: zero_grad, loss, backward, SGD step."""

    def step() -> None:
        s.opt.zero_grad(set_to_none=True)
        loss_fn(s.student, s.teacher, s.x, s.y)["loss"].backward()
        s.opt.step()

    return step


def authors_kdiga_loss(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    ce_weight: float = KD_CFG["ce_weight"],
    kl_weight: float = KD_CFG["kl_weight"],
    temperature: float = KD_CFG["temperature"],
    gamma: float = IGA_CFG["iga_weight"],
) -> Tensor:
    """The authors' KDIGA loss formulation, two student and two teacher forwards (scalar).

    ``x`` [B, C, H, W], ``y`` [B]; student in train mode, teacher in eval mode with frozen
    parameters. t_grad and s_grad are gradients of the batch-MEAN CE, the IGA term is
    ``(gamma / B) * ‖s_grad − t_grad‖_F`` with s_grad's graph kept (so the term trains), and
    the KL term comes from a second forward of each model. The KL is ``batchmean`` (theirs is
    ``nn.KLDivLoss()``'s element mean) so the value equals ``build_loss("kdiga",
    iga_reduction="batch_frobenius", iga_weight=gamma)``; the cost is the same either way.
    """
    batch = x.shape[0]
    x_in = x.detach().clone().requires_grad_(True)
    t_logits = teacher(x_in)
    t_loss = F.cross_entropy(t_logits, y)
    t_grad = torch.autograd.grad(t_loss, x_in)[0].detach()
    s_logits = student(x_in)
    hard_loss = F.cross_entropy(s_logits, y)
    s_grad = torch.autograd.grad(hard_loss, x_in, create_graph=True)[0]
    x_kl = x.detach()
    s_logits_kl = student(x_kl)
    t_logits_kl = teacher(x_kl)
    kl = F.kl_div(
        F.log_softmax(s_logits_kl / temperature, dim=1),
        F.softmax(t_logits_kl / temperature, dim=1),
        reduction="batchmean",
    )
    iga = (gamma / batch) * (s_grad - t_grad).norm(2)
    return ce_weight * hard_loss + kl_weight * temperature**2 * kl + iga


def authors_kdiga_step(s: Setup) -> Callable[[], None]:
    """One training step with :func:`authors_kdiga_loss`."""

    def step() -> None:
        s.opt.zero_grad(set_to_none=True)
        authors_kdiga_loss(s.student, s.teacher, s.x, s.y).backward()
        s.opt.step()

    return step


def teacher_part(s: Setup) -> Callable[[], None]:
    """Part (a): the teacher's logits and input gradient, no parameter gradients."""
    return lambda: teacher_signals(s.teacher, s.x, s.y)


def student_part_step(s: Setup) -> Callable[[], None]:
    """Part (b), hand-written: everything of a KDIGA step that is not the teacher.

    Student forward at x, CE + KL against precomputed teacher logits, gs by ``autograd.grad``
    with ``create_graph``, the batch-Frobenius IGA against the precomputed teacher gradient,
    backward to the parameters and the SGD step.
    """
    sig = teacher_signals(s.teacher, s.x, s.y)
    t_log_p = F.log_softmax(sig.logits / KD_CFG["temperature"], dim=1)
    batch = s.x.shape[0]

    def step() -> None:
        s.opt.zero_grad(set_to_none=True)
        x_in = s.x.detach().requires_grad_(True)
        logits = s.student(x_in)
        ce_sum = F.cross_entropy(logits, s.y, reduction="sum")
        (gs,) = torch.autograd.grad(ce_sum, x_in, create_graph=True)
        log_p = F.log_softmax(logits / KD_CFG["temperature"], dim=1)
        kl = F.kl_div(log_p, t_log_p, reduction="batchmean", log_target=True)
        iga = (gs - sig.input_grad).pow(2).sum().sqrt() / batch**2
        loss = (
            KD_CFG["ce_weight"] * ce_sum / batch
            + KD_CFG["kl_weight"] * KD_CFG["temperature"] ** 2 * kl
            + IGA_CFG["iga_weight"] * iga
        )
        loss.backward()
        s.opt.step()

    return step


def loss_agreement(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    cfg: dict[str, Any] | None = None,
) -> dict[str, float]:
    """Our KDIGA loss and the authors' formulation on the same models and batch, no step.

    ``cfg``: ``ce_weight``, ``kl_weight``, ``temperature``, ``iga_weight`` (default
    ``METHOD_CFG["kdiga"]``); the IGA reduction is always ``batch_frobenius``.

    Returns ``ours``, ``authors``, ``rel`` (|ours − authors| / |ours|) and ``grad_rel``
    (‖g_ours − g_authors‖ / ‖g_ours‖ over all the student's parameter gradients at once; per
    tensor it would be dominated by rounding in gradients that are zero in exact arithmetic,
    e.g. a BatchNorm bias followed by a convolution and another train-mode BatchNorm).
    Copies of the student are used so BatchNorm running stats of ``student`` are untouched.
    """
    cfg = {**METHOD_CFG["kdiga"], **(cfg or {}), "iga_reduction": "batch_frobenius"}
    theirs = {k: cfg[k] for k in ("ce_weight", "kl_weight", "temperature")}
    results = {}
    grads = {}
    for name in ("ours", "authors"):
        s = copy.deepcopy(student).train()
        if name == "ours":
            loss = build_loss("kdiga", **cfg)(s, teacher, x, y)["loss"]
        else:
            loss = authors_kdiga_loss(s, teacher, x, y, **theirs, gamma=cfg["iga_weight"])
        loss.backward()
        results[name] = loss.item()
        grads[name] = [
            torch.zeros_like(p).flatten() if p.grad is None else p.grad.detach().flatten()
            for p in s.parameters()
        ]
    rel = abs(results["ours"] - results["authors"]) / max(abs(results["ours"]), 1e-30)
    g_ours, g_authors = torch.cat(grads["ours"]), torch.cat(grads["authors"])
    grad_rel = ((g_ours - g_authors).norm() / g_ours.norm().clamp_min(1e-30)).item()
    return {**results, "rel": rel, "grad_rel": grad_rel}


# --- the benchmark --------------------------------------------------------------------------


def revert_layers(model: nn.Module, cls: type[nn.Module], base: type[nn.Module]) -> int:
    """Turn ``model``'s layers of exactly type ``cls`` back into ``base`` in place (the layers
    kdiga's ``build_model`` converts: same weights, PyTorch's own derivatives); the count."""
    found = [m for m in model.modules() if type(m) is cls]
    for m in found:
        m.__class__ = base
    return len(found)


def _reverted_setup(s: Setup, cls: type[nn.Module], base: type[nn.Module]) -> Setup | None:
    """A copy of the student (same weights, own optimiser) with ``cls`` layers turned back
    into ``base``; None when it has none."""
    student = copy.deepcopy(s.student)
    if not revert_layers(student, cls, base):
        return None
    opt = torch.optim.SGD(student.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)
    return Setup(student, s.teacher, opt, s.x, s.y, s.mac_ratio)


def plain_convs_setup(s: Setup) -> Setup | None:
    """The student with plain ``nn.Conv2d`` for its GroupedConv2d layers (PyTorch's per-group
    double backward); None when it has none."""
    return _reverted_setup(s, GroupedConv2d, nn.Conv2d)


def native_bn_setup(s: Setup) -> Setup | None:
    """The student with plain ``nn.BatchNorm2d`` for its IGABatchNorm2d layers (PyTorch's
    generic BatchNorm double backward: "BN conversion off"); None when it has none."""
    return _reverted_setup(s, IGABatchNorm2d, nn.BatchNorm2d)


def _log(msg: str) -> None:
    print(f"[step_cost] {msg}", file=sys.stderr, flush=True)


def with_cpu_time(
    fns: dict[str, Callable[[], Any]], warmup: int
) -> tuple[dict[str, Callable[[], Any]], Callable[[], dict[str, common.Timing]]]:
    """The candidates wrapped to also record the process CPU time of each call, and a
    function returning those times (the ``warmup`` first calls dropped) as Timings.

    On a machine whose cores are shared with other work, wall times include waiting for a
    core; CPU time does not, so its ratios stay close to the quiet machine's wall-time ratios
    (on CPU; on CUDA it measures only the host side).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}

    def wrap(name: str, fn: Callable[[], Any]) -> Callable[[], Any]:
        def call() -> Any:
            start = time.process_time()
            out = fn()
            times[name].append(time.process_time() - start)
            return out

        return call

    def timings() -> dict[str, common.Timing]:
        return {name: common.Timing(name, t[warmup:]) for name, t in times.items()}

    return {name: wrap(name, fn) for name, fn in fns.items()}, timings


def time_pair(pair: Pair, dev: torch.device, *, repeats: int, warmup: int) -> dict[str, Any]:
    """Time every candidate of one pair, interleaved; medians in seconds plus the checks."""
    s = build_setup(pair, dev)
    agree = loss_agreement(s.student, s.teacher, s.x, s.y)
    fns = {m: ours_step(build_loss(m, **cfg), s) for m, cfg in METHOD_CFG.items()}
    fns["kdiga (authors)"] = authors_kdiga_step(s)
    fns["(a) teacher"] = teacher_part(s)
    fns["(b) student"] = student_part_step(s)
    plain = plain_convs_setup(s)
    if plain is not None:
        fns["kdiga (plain convs)"] = ours_step(build_loss("kdiga", **METHOD_CFG["kdiga"]), plain)
    bn_off = native_bn_setup(s)
    if bn_off is not None:
        fns[f"kdiga {BN_OFF}"] = ours_step(build_loss("kdiga", **METHOD_CFG["kdiga"]), bn_off)
        fns[f"kdiga (authors) {BN_OFF}"] = authors_kdiga_step(bn_off)
        fns[f"(b) student {BN_OFF}"] = student_part_step(bn_off)
    timed, cpu = with_cpu_time(fns, warmup)
    timings = common.compare(timed, repeats=repeats, warmup=warmup, dev=dev)
    return {"pair": pair, "macs": s.mac_ratio, "agree": agree, "t": timings, "cpu": cpu()}


@dataclass(frozen=True)
class EpochSizes:
    """Item 4's sizes: N synthetic CIFAR-shaped images, batch, repeats, model widths."""

    n: int
    batch: int
    repeats: int
    teacher_kw: dict[str, Any]
    student_kw: dict[str, Any]

    def describe(self) -> str:
        pair = Pair("", "wrn_34_10", "mobilenet_v2", self.batch, self.teacher_kw, self.student_kw)
        return pair.describe()


def epoch_sizes(cuda: bool, quick: bool) -> EpochSizes:
    """Full widths on CUDA; on CPU bench.teacher_cache's reduced pair (N=128, batch 64)."""
    if cuda:
        return EpochSizes(1000 if quick else 5000, 125, 2 if quick else 3, {}, {"width_mult": 1.0})
    n, batch, repeats = (32, 16, 1) if quick else (128, 64, 5)
    return EpochSizes(n, batch, repeats, {"widen_factor": 3}, {"width_mult": 0.2})


def time_cached_epoch(
    sizes: EpochSizes, dev: torch.device
) -> tuple[dict[str, common.Timing], dict[str, common.Timing]]:
    """Item 4: one KDIGA epoch (``kdiga.train.fit``) live and from cached signals, with the
    student's BatchNorm conversion off and on; four candidates interleaved.

    Live: fresh crop+flip and the teacher's signals every step. Cached: a ``SignalCache`` of
    2 crop+flip views computed once beforehand (not timed). Each call starts the student from
    the same weights. Keys: ``live``, ``cached``, each also with the ``BN_OFF`` suffix.
    Returns wall times and process CPU times (:func:`with_cpu_time`).
    """
    pad = SHAPE[1] // 8
    torch.manual_seed(0)
    teacher = build_model("wrn_34_10", NUM_CLASSES, **sizes.teacher_kw)
    student = build_model("mobilenet_v2", NUM_CLASSES, **sizes.student_kw)
    x, y = load_dataset("synthetic", "train", image_size=SHAPE[1], n=sizes.n, seed=1)
    sig = compute_signals(
        teacher, x, y, views=2, augment="crop_flip", crop_padding=pad, batch_size=128, device=dev
    )
    cache = SignalCache(sig, x, y, device=dev)
    loss = build_loss("kdiga")
    live_cfg = TrainConfig(epochs=1, batch_size=sizes.batch, augment="crop_flip", crop_padding=pad)
    cached_cfg = TrainConfig(epochs=1, batch_size=sizes.batch)
    bn_off = copy.deepcopy(student)
    revert_layers(bn_off, IGABatchNorm2d, nn.BatchNorm2d)
    fns: dict[str, Callable[[], Any]] = {}
    for suffix, model in (("", student), (f" {BN_OFF}", bn_off)):
        init = copy.deepcopy(model.state_dict())

        def fresh(model: nn.Module = model, init: dict[str, Tensor] = init) -> nn.Module:
            model.load_state_dict(init)
            return model

        fns[f"live{suffix}"] = lambda fresh=fresh: fit(
            fresh(), loss, x, y, live_cfg, teacher=teacher, device=dev
        )
        fns[f"cached{suffix}"] = lambda fresh=fresh: fit(
            fresh(), loss, x, y, cached_cfg, batch_source=cache, device=dev
        )
    timed, cpu = with_cpu_time(fns, warmup=1)
    return common.compare(timed, repeats=sizes.repeats, warmup=1, dev=dev), cpu()


def memory(pairs: list[Pair], dev: torch.device) -> dict[str, dict[str, dict[str, Any]]]:
    """Peak memory of a KD and a KDIGA step per pair: CUDA in process, CPU in fresh processes.

    Returns pair name -> method -> measurement (``peak`` on CUDA; ``peak_rss``,
    ``rss_before``, ``reset`` on CPU).
    """
    methods = ("kd", "kdiga")
    if dev.type != "cuda":
        specs = [
            {"pair": p.__dict__, "method": m, "threads": torch.get_num_threads()}
            for p in pairs
            for m in methods
        ]
        found = iter(common.rss_peak_probes("bench.step_cost", specs))
        return {p.name: {m: next(found) for m in methods} for p in pairs}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for pair in pairs:
        out[pair.name] = {}
        for method in methods:
            s = build_setup(pair, dev)
            step = ours_step(build_loss(method, **METHOD_CFG[method]), s)
            step()  # momentum buffers and kernels exist before the measured step
            s.opt.zero_grad(set_to_none=True)
            out[pair.name][method] = {"peak": common.cuda_peak_bytes(step)}
            del s, step
            torch.cuda.empty_cache()
    return out


def mem_probe(spec: dict[str, Any]) -> dict[str, int]:
    """In a fresh process: one CPU step of ``spec["method"]``; peak RSS and RSS before it.

    A first step on a batch of 2 loads code and kernels (and creates the momentum buffers)
    at little memory; RSS is then read and its high-water mark reset just before the
    full-batch step.
    """
    torch.set_num_threads(spec["threads"])
    pair = Pair(**spec["pair"])
    s = build_setup(pair, torch.device("cpu"))
    loss_fn = build_loss(spec["method"], **METHOD_CFG[spec["method"]])
    small = Setup(s.student, s.teacher, s.opt, s.x[:2], s.y[:2], s.mac_ratio)
    ours_step(loss_fn, small)()
    s.opt.zero_grad(set_to_none=True)
    gc.collect()
    before = common.current_rss_bytes()
    reset = common.reset_peak_rss()
    ours_step(loss_fn, s)()
    return {"peak_rss": common.peak_rss_bytes(), "rss_before": before, "reset": reset}


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _verdict(value: float, target: float) -> str:
    return f"<= {target} {'yes' if value <= target else 'NO'}"


def bn_report(results: list[dict[str, Any]], key: str = "t") -> list[str]:
    """Table 2c: BatchNorm conversion off (nn.BatchNorm2d) vs on (IGABatchNorm2d), from the
    wall times (``key="t"``) or the process CPU times (``key="cpu"``, table 2d)."""
    ms = 1e3
    rows = []
    for r in results:
        t = {k: v.median for k, v in r[key].items()}
        if f"kdiga {BN_OFF}" not in t:
            continue
        off = t[f"kdiga {BN_OFF}"] / t[f"kdiga (authors) {BN_OFF}"]
        on = t["kdiga"] / t["kdiga (authors)"]
        rows.append(
            [
                r["pair"].name,
                f"{t[f'kdiga {BN_OFF}'] * ms:.1f}",
                f"{t['kdiga'] * ms:.1f}",
                t[f"kdiga {BN_OFF}"] / t["kdiga"],
                f"{t[f'(b) student {BN_OFF}'] * ms:.1f}",
                f"{t['(b) student'] * ms:.1f}",
                t[f"(b) student {BN_OFF}"] / t["(b) student"],
                off,
                on,
                _verdict(on, 0.75),
            ]
        )
    if not rows:
        return []
    heads = ["pair", "KDIGA ms off", "on", "off/on", "(b) ms off", "on", "off/on"]
    heads += ["ours/authors off", "ours/authors on", "target (on)"]
    if key == "t":
        title = (
            "2c. BatchNorm double backward: the student's BatchNorm as nn.BatchNorm2d (PyTorch's "
            "generic double backward, 'off') against IGABatchNorm2d ('on'); the authors' "
            "formulation timed on the same student each way"
        )
    else:
        title = (
            "2d. Table 2c from the same calls' process CPU time (medians; not counting time "
            "spent waiting for a core on a shared machine)"
        )
        heads = [h.replace(" ms", " CPU ms") for h in heads]
    return [title, common.fmt_table(rows, heads), ""]


def epoch_report(
    sizes: EpochSizes, t: dict[str, common.Timing], cpu: dict[str, common.Timing] | None
) -> list[str]:
    """Table 4: cached vs live KDIGA epoch, BatchNorm conversion off and on; with ``cpu``
    also the ratio of the same calls' process CPU times."""
    m = {k: v.median for k, v in t.items()}
    rows = []
    for label, suffix in (("off (nn.BatchNorm2d)", f" {BN_OFF}"), ("on (IGABatchNorm2d)", "")):
        live, cached = m[f"live{suffix}"], m[f"cached{suffix}"]
        spread = max(t[f"cached{suffix}"].spread, t[f"live{suffix}"].spread)
        row = [label, f"{live:.3f}", f"{cached:.3f}", cached / live, _verdict(cached / live, 0.5)]
        row.append(f"{spread:.0%}" if sizes.repeats > 1 else "-")
        if cpu is not None:
            row.append(cpu[f"cached{suffix}"].median / cpu[f"live{suffix}"].median)
        rows.append(row)
    heads = ["BatchNorm", "live s", "cached s", "cached/live", "target", "spread"]
    heads += ["cached/live (CPU time)"] if cpu is not None else []
    return [
        f"4. KDIGA epoch, cached teacher signals vs live: {sizes.describe()}, N={sizes.n}, "
        f"batch {sizes.batch}, repeats={sizes.repeats}; BatchNorm conversion off vs on",
        common.fmt_table(rows, heads),
        "",
    ]


def report(results: list[dict[str, Any]], mem: dict[str, Any], dev: torch.device) -> str:
    """The printed tables."""
    ms = 1e3
    out = []
    rows = []
    for r in results:
        t, a = r["t"], r["agree"]
        ratio = t["kdiga"].median / t["kdiga (authors)"].median
        rows.append(
            [
                r["pair"].name,
                f"{t['kdiga'].median * ms:.1f}",
                f"{t['kdiga (authors)'].median * ms:.1f}",
                ratio,
                _verdict(ratio, 0.75),
                f"{a['ours']:.6g}",
                f"{a['authors']:.6g}",
                f"{a['rel']:.1e} {'ok' if a['rel'] <= 1e-4 else 'MISMATCH'}",
                f"{a['grad_rel']:.1e}",
            ]
        )
    out += [
        "1. KDIGA step, ours vs the authors' formulation (2 student + 2 teacher forwards)",
        common.fmt_table(
            rows,
            [
                "pair",
                "ours ms",
                "authors ms",
                "ours/authors",
                "target",
                "loss ours",
                "loss authors",
                "rel diff (<=1e-4)",
                "grad rel diff",
            ],
        ),
        "",
    ]
    rows = []
    for r in results:
        t = r["t"]
        parts = t["(a) teacher"].median + t["(b) student"].median
        ratio = t["kdiga"].median / parts
        rows.append(
            [
                r["pair"].name,
                f"{t['kdiga'].median * ms:.1f}",
                f"{t['(a) teacher'].median * ms:.1f}",
                f"{t['(b) student'].median * ms:.1f}",
                ratio,
                _verdict(ratio, 1.1),
            ]
        )
    out += [
        "2. KDIGA step vs its necessary parts timed alone: (a) teacher_signals, "
        "(b) student fwd + CE/KL + gs(create_graph) + backward + SGD step",
        common.fmt_table(rows, ["pair", "ours ms", "(a) ms", "(b) ms", "ours/(a+b)", "target"]),
        "",
    ]
    rows = [
        [
            r["pair"].name,
            f"{r['t']['kdiga (plain convs)'].median * ms:.1f}",
            f"{r['t']['kdiga'].median * ms:.1f}",
            r["t"]["kdiga (plain convs)"].median / r["t"]["kdiga"].median,
        ]
        for r in results
        if "kdiga (plain convs)" in r["t"]
    ]
    if rows:
        out += [
            "2b. The same KDIGA step with the student's grouped convolutions as plain nn.Conv2d "
            "(PyTorch's double backward, one call per group) against GroupedConv2d (ours)",
            common.fmt_table(rows, ["pair", "nn.Conv2d ms", "GroupedConv2d ms", "nn/ours"]),
            "",
        ]
    out += bn_report(results)
    if dev.type == "cpu":
        out += bn_report(results, "cpu")
    rows = []
    for r in results:
        t = {k: v.median for k, v in r["t"].items()}
        rows.append(
            [
                r["pair"].name,
                r["pair"].describe(),
                f"{r['macs']:.1f}x",
                r["pair"].batch,
                f"{t['kd'] * ms:.1f}",
                t["kdiga"] / t["kd"],
                t["ard"] / t["kd"],
                t["kdiga_ardc"] / t["kd"],
                t["kdiga"] / t["ard"],
            ]
        )
    out += [
        "3. Step-time ratios (ARD / ARDC: PGD-10, eps 8/255, step 2/255)",
        common.fmt_table(
            rows,
            [
                "pair",
                "teacher -> student",
                "teacher/student MACs",
                "B",
                "KD ms",
                "KDIGA/KD",
                "ARD/KD",
                "KDIGA-ARDC/KD",
                "KDIGA/ARD",
            ],
        ),
        "",
    ]
    rows = [
        [
            r["pair"].name,
            get_method(m).label,
            f"{r['t'][m].median * ms:.1f}",
            r["t"][m].median / r["t"]["kd"].median,
        ]
        for r in results
        for m in METHOD_CFG
    ]
    out += [
        "3b. Every registered method's step against KD's, timed in the same interleaved rounds "
        "(inner maximisations: PGD-10, eps 8/255, step 2/255)",
        common.fmt_table(rows, ["pair", "method", "step ms", "step / KD"]),
        "",
    ]
    rows = []
    for name, m in mem.items():
        if dev.type == "cuda":
            kd, kdiga = m["kd"]["peak"], m["kdiga"]["peak"]
            rows.append([name, _mib(kd), _mib(kdiga), kdiga / kd])
        else:
            kd_d = m["kd"]["peak_rss"] - m["kd"]["rss_before"]
            ki_d = m["kdiga"]["peak_rss"] - m["kdiga"]["rss_before"]
            rows.append(
                [
                    name,
                    _mib(m["kd"]["peak_rss"]),
                    _mib(m["kdiga"]["peak_rss"]),
                    m["kdiga"]["peak_rss"] / m["kd"]["peak_rss"],
                    _mib(kd_d),
                    _mib(ki_d),
                    ki_d / kd_d if kd_d > 0 else float("nan"),
                ]
            )
    if dev.type == "cuda":
        what = "torch.cuda.max_memory_allocated over one step, above what was allocated before"
        heads = ["pair", "KD peak", "KDIGA peak", "KDIGA/KD"]
    else:
        what = (
            "CPU, one fresh process per cell. 'process' = peak RSS of the whole process during "
            "the step (high-water mark reset just before it); 'step' = that minus the RSS just "
            "before the step (the step's own peak, give or take memory the C allocator held)"
        )
        if not all(m[k].get("reset") for m in mem.values() for k in ("kd", "kdiga")):
            what += (
                ". WARNING: the high-water mark could not be reset here, so 'process' "
                "includes earlier peaks (e.g. at import) and 'step' may be masked by them"
            )
        heads = [
            "pair",
            "KD process",
            "KDIGA process",
            "KDIGA/KD (process)",
            "KD step",
            "KDIGA step",
            "KDIGA/KD (step)",
        ]
    out += [f"8. Peak memory of one step: {what}", common.fmt_table(rows, heads), ""]
    rows = [
        [r["pair"].name, name, f"{v.median * ms:.1f}", f"{v.spread:.2f}", len(v.times)]
        for r in results
        for name, v in r["t"].items()
    ]
    out += [
        "Raw medians (spread = (max - min) / median over the repeats)",
        common.fmt_table(rows, ["pair", "candidate", "median ms", "spread", "n"]),
    ]
    return "\n".join(out)


def run(quick: bool) -> str:
    """Run the benchmark; return the printed text (progress goes to stderr).

    On CPU it runs with ONE torch thread (restored afterwards): on the shared 2-core machine
    two threads made these small convolutions about 10x slower and far noisier.
    """
    dev = common.device()
    with common.num_threads(None if dev.type == "cuda" else CPU_THREADS):
        return _run(quick, dev)


def _run(quick: bool, dev: torch.device) -> str:
    cuda = dev.type == "cuda"
    pairs = make_pairs(cuda, quick)
    desc = "; ".join(f"{p.name}: {p.describe()}, B={p.batch}" for p in pairs)
    if cuda:
        repeats, warmup = (3, 1) if quick else (10, 3)
        lines = [f"CUDA ({torch.cuda.get_device_name()}), fp32: {desc}"]
    else:
        repeats, warmup = (2, 1) if quick else (5, 1)
        lines = [
            f"*** CPU, reduced widths and batches: {desc}; "
            f"{torch.get_num_threads()} torch thread(s) ***"
        ]
    lines.append(f"repeats={repeats} (median), warm-up rounds={warmup}, candidates interleaved")
    lines.append("")
    results = []
    for pair in pairs:
        _log(f"timing {pair.name}: {pair.describe()}, B={pair.batch}")
        results.append(time_pair(pair, dev, repeats=repeats, warmup=warmup))
    sizes = epoch_sizes(cuda, quick)
    _log(f"cached vs live epoch: {sizes.describe()}, N={sizes.n}")
    epoch, epoch_cpu = time_cached_epoch(sizes, dev)
    _log("memory")
    lines.append(report(results, memory(pairs, dev), dev))
    lines += ["", *epoch_report(sizes, epoch, epoch_cpu if not cuda else None)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.step_cost [--quick]``; ``--mem-probe JSON`` is the memory subprocess."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mem-probe", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.mem_probe:
        print(json.dumps(mem_probe(json.loads(args.mem_probe))))
        return
    print(common.header())
    print(run(args.quick))


if __name__ == "__main__":
    main()
