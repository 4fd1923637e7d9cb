"""Radius-sweep reuse vs independent attacks per radius (``kdiga.attacks.robust_sweep``).

With ``reuse=True`` the sweep attacks at radius r_k only the points still robust at
r_(k-1) (an adversarial example found at a smaller radius is valid at every larger one);
with ``reuse=False`` every clean-correct point is attacked at every radius. Both runs use
the same seed and a deterministic PGD (no random start by default), so the attack on a point
at r_k is the same computation in both modes and reuse's robust accuracy must be identical
or lower at every radius.

Cost is counted in per-sample gradient evaluations (one sample through one forward +
backward = 1), as reported by the sweep. With R_0 = the clean-correct points and R_k the
points robust at r_k (reuse), every point reuse attacks at r_k is in R_(k-1) and costs at
most ``steps`` evaluations (early exit), and every survivor in R_k costs exactly ``steps``:

    steps * sum_k |R_k|  <=  reuse grad evals  <=  bound = steps * sum_k |R_(k-1)|

``bound`` is the count the brief calls the lower bound (what a reuse sweep has to spend on
the points it cannot skip, at full PGD length); reuse / bound <= 1.05 is the target. The
tighter floor over the survivors alone is printed too.

Run alone: ``python -m bench.sweep_reuse [--quick] [--from-pipeline]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from bench.common import header, num_threads
from kdiga.attacks import robust_sweep
from kdiga.data import load_dataset, to_float
from kdiga.methods import build_loss
from kdiga.models import build_model, load_model
from kdiga.shards import load_sharded
from kdiga.train import TrainConfig, fit

ROOT = Path(__file__).resolve().parents[1]
RADII = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2)
STEPS = 20
PIPELINE_MODELS = {
    "robust (pipeline teacher, PGD-AT)": "data/models/teacher.safetensors",
    "non-robust (pipeline small_cnn--st)": "data/models/small_cnn--st.safetensors",
}


@dataclass
class RadiusRow:
    """One radius of a reuse-vs-independent comparison (accuracies over all N samples)."""

    radius: float
    robust_reuse: float
    robust_indep: float
    evals_reuse: int
    evals_indep: int
    bound: int  # steps * |robust at r_(k-1)| (reuse's set; r_0: clean-correct)
    floor: int  # steps * |robust at r_k| (reuse's survivors: each costs exactly `steps`)

    @property
    def ok(self) -> bool:
        """Reuse's robust accuracy is identical or lower than the independent one."""
        return self.robust_reuse <= self.robust_indep


@dataclass
class Comparison:
    """A reuse sweep and an independent sweep of the same model, data, radii and seed."""

    n: int
    clean: float
    steps: int
    random_start: bool
    rows: list[RadiusRow]
    seconds_reuse: float
    seconds_indep: float

    @property
    def evals_reuse(self) -> int:
        return sum(r.evals_reuse for r in self.rows)

    @property
    def evals_indep(self) -> int:
        return sum(r.evals_indep for r in self.rows)

    @property
    def bound(self) -> int:
        return sum(r.bound for r in self.rows)

    @property
    def floor(self) -> int:
        return sum(r.floor for r in self.rows)

    @property
    def naive(self) -> int:
        """Full-length PGD on every clean-correct point at every radius (not run: counted)."""
        n_clean = round(self.clean * self.n)
        return self.steps * n_clean * sum(1 for r in self.rows if r.radius > 0)

    @property
    def all_ok(self) -> bool:
        return all(r.ok for r in self.rows)


def compare_sweeps(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    radii: Sequence[float] = RADII,
    *,
    steps: int = STEPS,
    seed: int = 0,
    batch_size: int = 1024,
    random_start: bool = False,
) -> Comparison:
    """Run ``robust_sweep`` with ``reuse=True`` and ``reuse=False`` on x [N, C, H, W] in [0, 1].

    Both sweeps use PGD-``steps`` (L∞, early exit) with generators seeded by ``seed``.
    ``random_start=False`` (default) makes the attack deterministic, which is what guarantees
    reuse's robust set to be a subset of the independent one at every radius.
    """
    x = to_float(x)
    kwargs = dict(steps=steps, seed=seed, batch_size=batch_size, random_start=random_start)
    t0 = time.perf_counter()
    reuse = robust_sweep(model, x, y, radii, reuse=True, **kwargs)
    t1 = time.perf_counter()
    indep = robust_sweep(model, x, y, radii, reuse=False, **kwargs)
    t2 = time.perf_counter()
    n = max(x.shape[0], 1)
    prev = int(reuse.clean_correct.sum())
    rows = []
    for k, r in enumerate(reuse.radii):
        survivors = int(reuse.robust[k].sum())
        rows.append(
            RadiusRow(
                radius=r,
                robust_reuse=survivors / n,
                robust_indep=int(indep.robust[k].sum()) / n,
                evals_reuse=reuse.grad_evals_per_radius[k],
                evals_indep=indep.grad_evals_per_radius[k],
                bound=steps * prev if r > 0 else 0,
                floor=steps * survivors if r > 0 else 0,
            )
        )
        prev = survivors
    return Comparison(
        n=x.shape[0],
        clean=reuse.clean_correct.sum().item() / n,
        steps=steps,
        random_start=random_start,
        rows=rows,
        seconds_reuse=t1 - t0,
        seconds_indep=t2 - t1,
    )


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def format_comparison(title: str, c: Comparison) -> str:
    """A per-radius table of one comparison, with checks and totals."""
    lines = [
        f"-- {title}: n={c.n}, clean acc {c.clean:.3f}, PGD-{c.steps} linf early-exit, "
        f"random_start={c.random_start}",
        f"{'radius':>7} {'rob reuse':>9} {'rob indep':>9} {'chk':>4} {'evals reuse':>11} "
        f"{'evals indep':>11} {'bound':>9} {'floor':>9} {'reuse/bound':>11} {'reuse/indep':>11}",
    ]
    for r in c.rows:
        lines.append(
            f"{r.radius:>7.3f} {r.robust_reuse:>9.3f} {r.robust_indep:>9.3f} "
            f"{'✓' if r.ok else 'FAIL':>4} {r.evals_reuse:>11d} {r.evals_indep:>11d} "
            f"{r.bound:>9d} {r.floor:>9d} {_ratio(r.evals_reuse, r.bound):>11} "
            f"{_ratio(r.evals_reuse, r.evals_indep):>11}"
        )
    within = c.evals_reuse <= 1.05 * c.bound
    lines += [
        f"{'total':>7} {'':>9} {'':>9} {'✓' if c.all_ok else 'FAIL':>4} {c.evals_reuse:>11d} "
        f"{c.evals_indep:>11d} {c.bound:>9d} {c.floor:>9d} {_ratio(c.evals_reuse, c.bound):>11} "
        f"{_ratio(c.evals_reuse, c.evals_indep):>11}",
        f"   reuse robust acc <= independent at every radius: {'✓' if c.all_ok else 'FAIL'}; "
        f"reuse/bound {_ratio(c.evals_reuse, c.bound)} (target <= 1.05: "
        f"{'✓' if within else 'FAIL'}); cost reuse/independent "
        f"{_ratio(c.evals_reuse, c.evals_indep)} in grad evals, "
        f"{_ratio(c.seconds_reuse, c.seconds_indep)} in wall time "
        f"({c.seconds_reuse:.1f} s vs {c.seconds_indep:.1f} s)",
        f"   for scale: without early exit or reuse, {c.steps} steps x clean-correct x radii = "
        f"{c.naive} grad evals (counted, not run); reuse/that {_ratio(c.evals_reuse, c.naive)}, "
        f"independent/that {_ratio(c.evals_indep, c.naive)}",
    ]
    return "\n".join(lines)


def train_students(quick: bool) -> tuple[dict[str, nn.Module], str]:
    """A PGD-AT and a standard-trained small_cnn on digits 16x16; (models, description).

    Quick: width 16, PGD-AT at eps 0.05 with 3 steps for 4 epochs (it converges fast);
    full: width 32 (the default study's student), PGD-AT at eps 0.1 with 5 steps, 15 epochs.
    """
    x, y = load_dataset("digits", "train", image_size=16)
    width = 16 if quick else 32
    at_eps, at_steps, at_epochs, st_epochs = (0.05, 3, 4, 3) if quick else (0.1, 5, 15, 10)
    students, notes = {}, []
    for method, epochs, cfg, label in [
        ("at", at_epochs, {"eps": at_eps, "steps": at_steps}, "robust: PGD-AT"),
        ("st", st_epochs, {}, "non-robust: standard training"),
    ]:
        model = build_model("small_cnn", 10, in_chans=1, image_size=16, width=width)
        t0 = time.perf_counter()
        cfg_train = TrainConfig(epochs=epochs, batch_size=32, lr=0.05, seed=0)
        fit(model, build_loss(method, **cfg), x, y, cfg_train)
        notes.append(f"{method} {epochs} epochs in {time.perf_counter() - t0:.1f} s")
        detail = f"eps={at_eps}, {at_steps} steps, " if method == "at" else ""
        students[f"{label} ({detail}{epochs} epochs, small_cnn width {width})"] = model.eval()
    return students, "trained here on digits train (1198 images): " + "; ".join(notes)


def pipeline_students() -> tuple[dict[str, nn.Module], str]:
    """The finished default study's teacher (robust) and ST student (non-robust)."""
    missing = [p for p in PIPELINE_MODELS.values() if not (ROOT / p).exists()]
    if missing:
        raise FileNotFoundError(f"--from-pipeline needs {missing}: run the study (`make run`)")
    models = {name: load_model(ROOT / p)[0].eval() for name, p in PIPELINE_MODELS.items()}
    return models, "models from the pipeline: " + ", ".join(PIPELINE_MODELS.values())


def _test_data(model: nn.Module, n: int | None, from_pipeline: bool) -> tuple[Tensor, Tensor, str]:
    """The study's test shards for pipeline models (if there), else the digits test split."""
    manifest = ROOT / "data/shards/test.json"
    if from_pipeline and manifest.exists():
        x, y, _ = load_sharded(manifest)
        where = str(manifest.relative_to(ROOT))
    else:
        size, chans = int(model.image_size), int(model.in_chans)
        x, y = load_dataset("digits", "test", image_size=size, channels=chans)
        where = "digits test split"
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y, where


def run(
    quick: bool = False,
    from_pipeline: bool = False,
    random_start: bool = False,
    threads: int | None = None,
) -> str:
    """Compare reuse and independent sweeps on a robust and a non-robust digits model.

    Quick: 100 test images, small models trained briefly, one torch thread (a smoke test on
    a shared CPU); otherwise the whole test split. ``threads``: torch intra-op threads
    (None: 1 when quick, else torch's own).
    """
    with num_threads(threads if threads is not None else (1 if quick else None)):
        torch.manual_seed(0)
        students, origin = pipeline_students() if from_pipeline else train_students(quick)
        n = 100 if quick else None
        out = [
            "== radius sweep: reuse vs independent attacks per radius ==",
            origin,
            f"radii {list(RADII)}; torch threads {torch.get_num_threads()}; "
            "expected cost reuse/independent: ~0.2 non-robust, ~0.85 robust",
        ]
        for name, model in students.items():
            x, y, where = _test_data(model, n, from_pipeline)
            out.append(f"data: {where}, {x.shape[0]} images")
            c = compare_sweeps(model, x, y, RADII, steps=STEPS, random_start=random_start)
            out.append(format_comparison(name, c))
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small, fast")
    parser.add_argument(
        "--from-pipeline",
        action="store_true",
        help="use data/models/teacher.safetensors and data/models/small_cnn--st.safetensors "
        "of a finished study",
    )
    parser.add_argument(
        "--random-start",
        action="store_true",
        help="PGD from a random start (then reuse <= independent is no longer guaranteed)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = parser.parse_args(argv)
    print(header())
    print(
        run(
            quick=args.quick,
            from_pipeline=args.from_pipeline,
            random_start=args.random_start,
            threads=args.threads,
        )
    )


if __name__ == "__main__":
    main()
