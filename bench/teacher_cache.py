"""Teacher signals paid once (``kdiga.signals``): speed of a cached KDIGA epoch, effect of K.

(a) Speed. A KDIGA epoch (eq. 5) with the teacher's logits and input gradients read from a
``SignalCache`` of K augmented views, against the same epoch computing them live (fresh
crop+flip), for the WRN-34-10 -> MobileNetV2 pair at reduced widths (WRN-34-3 ->
MobileNetV2 x0.2) that keeps the full pair's MAC ratio (~73x at widths 10 and 1.0); the MAC
ratio is measured with forward hooks (``bench.common.count_macs``). The candidates run
interleaved (``bench.common.compare``), median of the repeats. Also timed: the one-time cost
of computing the views, per view, and from it the break-even number of training jobs
(methods x students) for K = 1, 4, 16 and E = 1 or 200 epochs per job (200: the paper's
CIFAR-10 schedule); the cost per view is extrapolated linearly in K from the views timed.

(b) Accuracy. The embedded digits study: a small_cnn student distilled with kdiga from the
pipeline's teacher (``data/models/teacher.safetensors``; else one trained here by PGD-AT) with
cached signals for K = 1, 4, 16 views (one set of 16 computed, its first K views taken: views do not
depend on K) and with live signals (fresh random crops each epoch), same epochs, seed and
schedule. Clean and PGD-20 (L∞, radius 0.1, random start) accuracy on the digits test split.
K = 1 is view 0 only, i.e. no augmentation at all.

Timed with ONE intra-op thread by default (``--threads``): on the shared 2-core machine a
second thread waiting for a busy core made a small_cnn KDIGA step 40x slower (1.36 s vs
0.033 s), which measures the scheduler, not the code.

Run alone: ``python -m bench.teacher_cache [--quick] [--threads N]``. ``--quick`` is a smoke
run (smaller images and N, fewer epochs and test images); record the final numbers without it.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.common import compare, count_macs, fmt_table, header
from kdiga.attacks import pgd
from kdiga.data import load_dataset, to_float
from kdiga.files import sha256_file
from kdiga.methods import build_loss
from kdiga.models import build_model, load_model
from kdiga.signals import SignalCache, compute_signals
from kdiga.train import TrainConfig, evaluate, fit, predict

ROOT = Path(__file__).resolve().parents[1]
TEACHER_PATH = ROOT / "data" / "models" / "teacher.safetensors"
PAPER_EPOCHS = 200
RADIUS, PGD_STEPS = 0.1, 20


@dataclass(frozen=True)
class SpeedSetup:
    image_size: int
    n: int
    batch_size: int
    views_timed: int
    repeats: int


#: (label, student builder kwargs): the asked pair and a control with the same MAC ratio and
#: no grouped convolution (MobileNetV2's depthwise layers make its double backward costly
#: for its MACs, even as GroupedConv2d).
STUDENTS = (
    ("mobilenet_v2(width_mult=0.2)", dict(name="mobilenet_v2", width_mult=0.2)),
    ("resnet18(width=8), control", dict(name="resnet18", width=8)),
)


def _teacher(image_size: int) -> nn.Module:
    torch.manual_seed(0)
    return build_model("wrn_34_10", 10, image_size=image_size, widen_factor=3)


def _student(image_size: int, name: str, **kwargs: float) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, 10, image_size=image_size, **kwargs)


def _full_ratio() -> float:
    """MAC ratio of the full-width pair (wrn_34_10 -> mobilenet_v2) at 32 px (meta device)."""
    with torch.device("meta"):
        teacher = build_model("wrn_34_10", 10, image_size=32)
        student = build_model("mobilenet_v2", 10, image_size=32)
    return count_macs(teacher, (3, 32, 32)) / count_macs(student, (3, 32, 32))


def _speed_pair(
    s: SpeedSetup,
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    y: Tensor,
    cache: SignalCache,
) -> dict[str, float]:
    """Seconds of a live and a cached KDIGA epoch (medians), and the larger spread."""
    pad = s.image_size // 8
    loss = build_loss("kdiga")
    init = copy.deepcopy(student.state_dict())
    live_cfg = TrainConfig(epochs=1, batch_size=s.batch_size, augment="crop_flip", crop_padding=pad)
    cached_cfg = TrainConfig(epochs=1, batch_size=s.batch_size)

    def fresh() -> nn.Module:
        student.load_state_dict(init)
        return student

    fns = {
        "live": lambda: fit(fresh(), loss, x, y, live_cfg, teacher=teacher),
        "cached": lambda: fit(fresh(), loss, x, y, cached_cfg, batch_source=cache),
    }
    t = compare(fns, repeats=s.repeats, warmup=1)
    spread = max(t["live"].spread, t["cached"].spread)
    return {"live": t["live"].median, "cached": t["cached"].median, "spread": spread}


def bench_speed(quick: bool) -> str:
    """Part (a): cached vs live KDIGA epoch, one-time cost of the views, break-even jobs."""
    s = SpeedSetup(16, 64, 32, 1, 2) if quick else SpeedSetup(32, 128, 64, 2, 3)
    shape = (3, s.image_size, s.image_size)
    teacher = _teacher(s.image_size)
    t_macs = count_macs(teacher, shape)
    x, y = load_dataset("synthetic", "train", image_size=s.image_size, n=s.n, seed=1)
    pad = s.image_size // 8
    t0 = time.perf_counter()
    sigset = compute_signals(
        teacher, x, y, views=s.views_timed, augment="crop_flip", crop_padding=pad, batch_size=128
    )
    per_view = (time.perf_counter() - t0) / s.views_timed
    cache = SignalCache(sigset, x, y)
    rows, be_rows = [], []
    for label, kwargs in STUDENTS:
        student = _student(s.image_size, **kwargs)
        ratio = t_macs / count_macs(student, shape)
        r = _speed_pair(s, teacher, student, x, y, cache)
        saving = r["live"] - r["cached"]
        spread = f"{r['spread']:.0%}" if s.repeats > 1 else "-"
        rows.append(
            [label, f"{ratio:.1f}x", r["live"], r["cached"], r["cached"] / r["live"], spread]
        )
        for k in (1, 4, 16):
            epochs = k * per_view / saving if saving > 0 else math.inf
            be_rows.append([label, k, k * per_view, epochs, epochs / PAPER_EPOCHS])
    return "\n".join(
        [
            "== (a) KDIGA epoch: cached teacher signals vs live ==",
            f"teacher wrn_34_10(widen_factor=3), {t_macs / 1e6:.1f}M MACs/image at "
            f"{s.image_size}px (full-width pair wrn_34_10 -> mobilenet_v2 at 32px: "
            f"{_full_ratio():.1f}x); N={s.n}, batch {s.batch_size}; live = fresh crop+flip and "
            "the teacher's signals each step; cached = SignalCache views",
            fmt_table(
                rows, ["student", "MAC ratio", "live s", "cached s", "cached/live", "spread"]
            ),
            f"target cached/live <= 0.5. One-time cost: {per_view:.2f} s per view of the N "
            f"images (compute_signals, batch 128, {s.views_timed} timed; linear in K and N).",
            "break-even = K views' one-time cost / saving per student epoch (live - cached);",
            f"in jobs of E={PAPER_EPOCHS} epochs (the paper's CIFAR-10 schedule): that / E",
            fmt_table(
                be_rows,
                [
                    "student",
                    "K",
                    "one-time s",
                    "break-even student-epochs",
                    f"jobs (E={PAPER_EPOCHS})",
                ],
            ),
        ]
    )


def _digits_teacher(quick: bool) -> tuple[nn.Module, str]:
    if TEACHER_PATH.is_file():
        teacher, _ = load_model(TEACHER_PATH)
        sha = sha256_file(TEACHER_PATH)[:12]
        return teacher, f"teacher: {TEACHER_PATH.relative_to(ROOT)} (the pipeline's, sha256 {sha})"
    torch.manual_seed(0)
    teacher = build_model("small_cnn", 10, in_chans=1, image_size=16)
    x, y = load_dataset("digits", "train", image_size=16)
    epochs = 6 if quick else 20
    cfg = TrainConfig(
        epochs=epochs,
        batch_size=64,
        lr=0.05,
        milestones=(max(1, epochs * 3 // 4),),
        augment="crop",
        crop_padding=2,
    )
    fit(teacher, build_loss("at", eps=RADIUS, steps=5), x, y, cfg)
    return teacher, f"teacher: small_cnn PGD-AT trained here ({epochs} epochs; no {TEACHER_PATH})"


def robust_accuracy(model: nn.Module, x: Tensor, y: Tensor, seed: int = 0) -> float:
    """PGD-20 (L∞, radius 0.1, random start) accuracy on x [N, C, H, W] in [0, 1]: a sample
    counts only if it is classified correctly both clean and under the attack."""
    gen = torch.Generator().manual_seed(seed)
    x_adv = pgd(model, x, y, eps=RADIUS, steps=PGD_STEPS, generator=gen)
    ok = (predict(model, x).argmax(1) == y) & (predict(model, x_adv).argmax(1) == y)
    return ok.float().mean().item()


@dataclass(frozen=True)
class StudySetup:
    n_train: int | None  # None: the whole digits train split
    n_test: int | None
    epochs: int
    milestones: tuple[int, ...]
    seeds: tuple[int, ...]
    student_width: int
    fp16: bool


def bench_accuracy(quick: bool) -> str:
    """Part (b): clean and PGD-20 accuracy of kdiga students for K = 1, 4, 16 and live."""
    s = (
        StudySetup(None, 300, 4, (), (0,), 16, False)
        if quick
        else StudySetup(None, None, 20, (15,), (0, 1, 2), 32, True)
    )
    teacher, origin = _digits_teacher(quick)
    x, y = load_dataset("digits", "train", image_size=16, n=s.n_train)
    x_test, y_test = load_dataset("digits", "test", image_size=16, n=s.n_test)
    xt = to_float(x_test)
    common = dict(epochs=s.epochs, batch_size=64, lr=0.05, milestones=s.milestones)
    loss = build_loss("kdiga", iga_weight=1.0)
    t0 = time.perf_counter()
    sets = {"float32": compute_signals(teacher, x, y, views=16, augment="crop", crop_padding=2)}
    sig_s = time.perf_counter() - t0
    variants: list[tuple[str, int | None, str]] = [
        ("K=1 (no augmentation)", 1, "float32"),
        ("K=4", 4, "float32"),
        ("K=16", 16, "float32"),
    ]
    if s.fp16:
        sets["float16"] = compute_signals(
            teacher, x, y, views=16, augment="crop", crop_padding=2, grad_dtype="float16"
        )
        variants.append(("K=16, float16 gradients", 16, "float16"))
    variants.append(("live (fresh crops)", None, ""))
    rows = []
    for name, k, dtype in variants:
        clean, robust, secs = [], [], []
        for seed in s.seeds:
            torch.manual_seed(seed)
            student = build_model("small_cnn", 10, in_chans=1, image_size=16, width=s.student_width)
            t1 = time.perf_counter()
            if k is None:
                cfg = TrainConfig(**common, seed=seed, augment="crop", crop_padding=2)
                fit(student, loss, x, y, cfg, teacher=teacher)
            else:
                cache = SignalCache(sets[dtype].take_views(k), x, y, seed=seed)
                fit(student, loss, x, y, TrainConfig(**common, seed=seed), batch_source=cache)
            secs.append(time.perf_counter() - t1)
            clean.append(evaluate(student, x_test, y_test))
            robust.append(robust_accuracy(student, xt, y_test, seed))
        rows.append([name, _mean_sd(clean), _mean_sd(robust), statistics.mean(secs)])
    t_clean = evaluate(teacher, x_test, y_test)
    t_rob = "skipped in --quick" if quick else f"{robust_accuracy(teacher, xt, y_test):.3f}"
    return "\n".join(
        [
            "== (b) accuracy effect of K (digits, kdiga, small_cnn student) ==",
            f"{origin}; clean {t_clean:.3f}, PGD-{PGD_STEPS}@{RADIUS} {t_rob}",
            f"train {x.shape[0]} images, test {x_test.shape[0]}; student small_cnn(width="
            f"{s.student_width}); {s.epochs} epochs, batch 64, lr 0.05, milestones "
            f"{list(s.milestones)}, iga_weight 1.0, crop padding 2; seeds {list(s.seeds)}"
            f"{' (mean +- sd (per seed))' if len(s.seeds) > 1 else ''}",
            f"16 views computed once in {sig_s:.1f} s (K=1, 4: its first views)",
            fmt_table(
                rows,
                ["signals", "clean acc", f"PGD-{PGD_STEPS} acc @ {RADIUS}", "train s / run"],
            ),
        ]
    )


def _mean_sd(values: Sequence[float]) -> str:
    """ "0.912" for one value; "mean +- sd (each value)" for several."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    each = ", ".join(f"{v:.3f}" for v in values)
    return f"{statistics.mean(values):.3f} +- {statistics.stdev(values):.3f} ({each})"


def run(quick: bool = False, threads: int | None = 1) -> str:
    """Both parts; returns the report text. ``threads``: torch intra-op threads (None: keep)."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    parts = [
        "== teacher-signal cache (kdiga.signals) ==",
        header(),
        bench_speed(quick),
        bench_accuracy(quick),
    ]
    parts.append(f"total {time.perf_counter() - t0:.0f} s{' (--quick smoke run)' if quick else ''}")
    return "\n".join(parts)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small, fast")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)"
    )
    args = parser.parse_args(argv)
    print(run(quick=args.quick, threads=args.threads or None))


if __name__ == "__main__":
    main()
