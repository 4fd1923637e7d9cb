"""What a KDIGA training step costs, against the authors' formulation and against KD / ARD.

Every number is a RATIO of medians measured side by side in one process (candidates
interleaved, :func:`bench.common.compare`); absolute times are printed for context only.

1. Ours vs the authors' formulation. Ours: ``build_loss("kdiga")`` + backward + SGD step: one
   student forward reused for CE, KL and gs (double backprop), one teacher forward + backward
   to x with no parameter gradients (``teacher_signals``). The authors'
   (RulinShao/AdversariallyRobustDistillation ``main.py``, reimplemented in
   :mod:`bench.authors_step`, in the variant whose IGA term trains): teacher forward on an
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench import common
from bench.authors_step import authors_kdiga_step, loss_agreement
from bench.pairs import (
    BN_OFF,
    IGA_CFG,
    KD_CFG,
    METHOD_CFG,
    NUM_CLASSES,
    SHAPE,
    Pair,
    Setup,
    build_setup,
    native_bn_setup,
    ours_step,
    plain_convs_setup,
    revert_layers,
)
from bench.step_cost_tables import report, verdict
from kdiga.data import load_dataset
from kdiga.losses import teacher_signals
from kdiga.methods import build_loss
from kdiga.models import build_model
from kdiga.models.batchnorm import IGABatchNorm2d
from kdiga.signals import SignalCache, compute_signals
from kdiga.train import TrainConfig, fit

#: torch threads on CPU (see :func:`run`).
CPU_THREADS = 1


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


# --- the candidates -------------------------------------------------------------------------


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


# --- the benchmark --------------------------------------------------------------------------


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
    timed, cpu = common.with_cpu_time(fns, warmup)
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
    Returns wall times and process CPU times (:func:`bench.common.with_cpu_time`).
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
    timed, cpu = common.with_cpu_time(fns, warmup=1)
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
        row = [label, f"{live:.3f}", f"{cached:.3f}", cached / live, verdict(cached / live, 0.5)]
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
        common.progress("step_cost", f"timing {pair.name}: {pair.describe()}, B={pair.batch}")
        results.append(time_pair(pair, dev, repeats=repeats, warmup=warmup))
    sizes = epoch_sizes(cuda, quick)
    common.progress("step_cost", f"cached vs live epoch: {sizes.describe()}, N={sizes.n}")
    epoch, epoch_cpu = time_cached_epoch(sizes, dev)
    common.progress("step_cost", "memory")
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
