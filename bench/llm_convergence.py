"""Does the LLM maximiser converge? γ of Table 4 (`kdiga.bounds.local_linearity`) under the
study's earlier settings, the new defaults and a long budget, and Proposition 2 checked at
PGD points.

A teacher (PGD-AT) and KD and KDIGA students (small_cnn) are trained here on scikit-learn's
digits (16x16, [0, 1] pixels; offline). On test images, per model and L∞ radius (0.05, 0.1):

- old: the plain ascent the study used (10 steps x 1 random start, fixed step 2.5·r/10, on |r|);
- new: `local_linearity`'s defaults, the study's settings (the adaptive ascent, at most 20
  steps per run, stopped per sample on a plateau; 3 runs: from the FGSM corner, the
  opposite corner and a random point);
- single: one run of that ascent from the FGSM corner, at most 14 steps (the settings of
  the study before these);
- long: the adaptive ascent at 200 steps x 5 restarts, and an independent plain ascent
  (50 steps x 3 random starts, step r/4, climbing r). The reference of the ratios is, per
  sample, the largest γ any of these found (every γ is the |r| of a point evaluated, so a
  valid lower bound of the maximum); `ind/ref` shows how far the independent one got.

Ratios are of means over the samples: new/ref is mean γ_new / mean γ_ref. Times: old and
new interleaved (`bench.common.compare`, median of the repeats; single: one call), one torch
thread by default (on the shared 2-core machine a second thread waiting for a busy core measures the
scheduler). Proposition 2 (`kdiga.bounds.proposition2_violations`) is checked for each
student against the teacher, with γs and γt from each setting, at the student's and the
teacher's PGD-20 adversarial examples (the same points for both settings) and at the
ascents' own points: the fraction of samples where the bound fails there.

Run alone: ``python -m bench.llm_convergence [--quick] [--threads N]``; ``--quick``: width
16, fewer epochs and test images (a smoke run).

``--study DIR``: the same question on a finished study's own models (every teacher and
student in DIR/data/models, its bounds samples and its `bounds` settings), as the issue's
target is stated. Per model and radius: γ with the study's settings (for a student the very
γ its bounds stage reports: `table4` with the stage's generator) against the long budget
(200 x 5). Per bounds job: the stage's computation before (Table 4 with the old settings,
nothing else, as the stage was) and after (`table4` with the study's settings and the
Proposition 2 check on `bounds.check_samples` samples), interleaved, median of the
repeats; and the check's violation rates per kind of point.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from bench.common import compare, fmt_table, header, num_threads, time_call
from kdiga.attacks import pgd
from kdiga.bounds import (
    VIOLATION_KINDS,
    AscentSettings,
    llm_key,
    local_linearity,
    prop2_key,
    proposition2_violations,
    sample_indices,
    table4,
)
from kdiga.data import load_dataset, to_float
from kdiga.methods import build_loss
from kdiga.models import build_model
from kdiga.train import TrainConfig, fit
from pipeline import dag
from pipeline.params import load_params, radius_label
from pipeline.stages.common import load_split, load_stage_model

RADII = (0.05, 0.1)
PGD_STEPS = 20
SETTINGS: dict[str, AscentSettings] = {
    "old": AscentSettings(
        steps=10, restarts=1, ascent="fixed", signs="abs", corners=False, patience=0
    ),
    "new": AscentSettings(),
    "single": AscentSettings(steps=14, restarts=1),
    "long": AscentSettings(steps=200, restarts=5),
}
TARGET_RATIO, TARGET_TIME = 0.97, 1.5


@dataclass(frozen=True)
class Size:
    width: int
    epochs: int
    n_test: int
    repeats: int


QUICK, FULL = Size(16, 5, 100, 2), Size(32, 12, 200, 3)


def independent(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """γ from a plain ascent unlike the new one: 50 steps x 3 random starts, step eps/4."""
    gen = torch.Generator().manual_seed(7)
    plain = AscentSettings(
        steps=50,
        restarts=3,
        step_size=eps / 4,
        ascent="fixed",
        signs="positive",
        corners=False,
        patience=0,
    )
    return local_linearity(model, x, y, eps, settings=plain, generator=gen).gamma


def train_models(size: Size) -> tuple[dict[str, nn.Module], str]:
    """Teacher (PGD-AT, eps 0.1, 3 steps), KD and KDIGA students; (models, description)."""
    x, y = load_dataset("digits", "train", image_size=16)
    milestones = (size.epochs * 2 // 3,)
    cfg = TrainConfig(
        size.epochs, 64, 0.05, milestones=milestones, augment="crop", crop_padding=2, seed=0
    )
    models, notes = {}, []
    torch.manual_seed(0)
    recipes = [
        ("teacher", "at", {"eps": 0.1, "steps": 3}),
        ("kd", "kd", {}),
        ("kdiga", "kdiga", {}),
    ]
    for name, method, kw in recipes:
        model = build_model("small_cnn", 10, in_chans=1, image_size=16, width=size.width)
        start = time.perf_counter()
        fit(model, build_loss(method, **kw), x, y, cfg, teacher=models.get("teacher"))
        models[name] = model.eval()
        notes.append(f"{name} {time.perf_counter() - start:.0f} s")
    desc = (
        f"small_cnn width {size.width}, {size.epochs} epochs (crop, lr 0.05, milestone "
        f"{size.epochs * 2 // 3}) on digits train (1198 images): " + ", ".join(notes)
    )
    return models, desc


def _timed_gammas(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, repeats: int
) -> tuple[dict[str, object], dict[str, float]]:
    """Results of old, new and thorough (fresh generator per call) and their times: old and
    new interleaved (median of `repeats`), thorough once."""
    results: dict[str, object] = {}

    def call(name: str):
        def fn() -> None:
            gen = torch.Generator().manual_seed(0)
            results[name] = local_linearity(
                model, x, y, eps, settings=SETTINGS[name], generator=gen
            )

        return fn

    timing = compare({k: call(k) for k in ("old", "new")}, repeats=repeats)
    times = {k: t.median for k, t in timing.items()}
    times["single"] = time_call(call("single"))
    return results, times


def _violations(
    student: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, eps: float
) -> dict[str, float]:
    """Fraction of samples where Proposition 2 fails at PGD-20 points or the ascent points,
    for the old and the new settings (the same PGD points)."""
    adv = {}
    for who, m in (("student", student), ("teacher", teacher)):
        gen = torch.Generator().manual_seed(1)
        adv[f"x_adv_{who}"] = pgd(m, x, y, eps=eps, steps=PGD_STEPS, generator=gen)
    out = {}
    for name in ("old", "new"):
        gen = torch.Generator().manual_seed(0)
        check = proposition2_violations(
            student,
            teacher,
            x,
            y,
            eps,
            settings=SETTINGS[name],
            random_points=0,
            generator=gen,
            **adv,
        )
        pgd_rate = torch.stack([check.violated["pgd_student"], check.violated["pgd_teacher"]])
        out[name] = pgd_rate.any(dim=0).double().mean().item()
        out[f"{name}_all"] = check.rate["all"]
    return out


def measure(
    name: str, model: nn.Module, teacher: nn.Module, x: Tensor, y: Tensor, eps: float, size: Size
) -> dict[str, object]:
    """One row: γ under each setting, ratios to the per-sample reference, times, violations."""
    res, times = _timed_gammas(model, x, y, eps, size.repeats)
    gen = torch.Generator().manual_seed(0)
    long = local_linearity(model, x, y, eps, settings=SETTINGS["long"], generator=gen).gamma
    ind = independent(model, x, y, eps)
    gammas = {k: r.gamma for k, r in res.items()} | {"long": long, "ind": ind}
    ref = torch.stack(list(gammas.values())).amax(dim=0).mean().item()
    new = res["new"]
    row = {
        "model": name,
        "radius": eps,
        "ref": ref,
        **{f"{k}/ref": g.mean().item() / ref for k, g in gammas.items()},
        **{f"t {k}": v for k, v in times.items()},
        "steps new": new.steps_used.double().mean().item(),
        "conv new": new.converged.double().mean().item(),
        "half new": new.gamma_half.mean().item() / max(new.gamma.mean().item(), 1e-30),
    }
    if name != "teacher":
        row |= {f"viol {k}": v for k, v in _violations(model, teacher, x, y, eps).items()}
    return row


COLUMNS: list[tuple[str, str]] = [  # (header, row key); "a|b" is the ratio of two keys
    ("model", "model"),
    ("r", "radius"),
    ("γ ref", "ref"),
    ("old/ref", "old/ref"),
    ("new/ref", "new/ref"),
    ("single/ref", "single/ref"),
    ("long/ref", "long/ref"),
    ("ind/ref", "ind/ref"),
    ("t old s", "t old"),
    ("t new s", "t new"),
    ("t new/old", "t new|t old"),
    ("t single/old", "t single|t old"),
    ("steps new", "steps new"),
    ("conv new", "conv new"),
    ("half/full new", "half new"),
    ("viol PGD old", "viol old"),
    ("viol PGD new", "viol new"),
    ("viol all old", "viol old_all"),
    ("viol all new", "viol new_all"),
]


def _cell(row: dict[str, object], key: str) -> object:
    if "|" in key:
        num, den = key.split("|")
        return row[num] / row[den]
    value = row.get(key, "—")
    return f"{value:g}" if key == "radius" else value


def _table(rows: list[dict[str, object]]) -> str:
    body = [[_cell(r, key) for _, key in COLUMNS] for r in rows]
    return fmt_table(body, [h for h, _ in COLUMNS])


def _verdict(rows: list[dict[str, object]]) -> str:
    ratio = min(r["new/ref"] for r in rows)
    worst_t = max(r["t new"] / r["t old"] for r in rows)
    single = min(r["single/ref"] for r in rows)
    single_t = max(r["t single"] / r["t old"] for r in rows)
    viol = max(r.get("viol new", 0.0) for r in rows)
    ok = "✓" if ratio >= TARGET_RATIO else "FAIL"
    ok_t = "✓" if worst_t <= TARGET_TIME else "FAIL"
    lines = [
        f"new/ref >= {TARGET_RATIO} on every model and radius: {ok} (lowest {ratio:.3f}); "
        f"time new/old <= {TARGET_TIME}: {ok_t} (highest {worst_t:.2f})",
        f"single (one run of 14 steps): lowest ratio {single:.3f} at up to {single_t:.2f}x the "
        "old time",
        f"Proposition 2 at PGD-20 points with the new γ: highest violation rate {viol:.3f}",
    ]
    return "\n".join(lines)


def run(quick: bool = False, threads: int | None = 1) -> str:
    """Train the three models, then one table row per model and radius (see the module doc)."""
    size = QUICK if quick else FULL
    with num_threads(threads):
        models, desc = train_models(size)
        x, y = load_dataset("digits", "test", image_size=16)
        x, y = to_float(x[: size.n_test]), y[: size.n_test]
        rows = [
            measure(name, m, models["teacher"], x, y, eps, size)
            for eps in RADII
            for name, m in models.items()
        ]
    settings = ", ".join(f"{k}: {_changed(v) or 'the defaults'}" for k, v in SETTINGS.items())
    lines = [
        "== LLM maximiser: old vs new settings against a long budget ==",
        desc,
        f"{len(y)} digits test images, L∞, radii {list(RADII)}; torch threads "
        f"{threads or torch.get_num_threads()}; median of {size.repeats} interleaved runs",
        f"settings: {settings}; ind: plain ascent 50 x 3, step r/4",
        "ratios: mean γ over mean γ_ref, γ_ref = per-sample max over old, new, single, long and "
        "ind; viol: fraction of samples where Proposition 2 fails (PGD: at the student's or the "
        "teacher's PGD-20 point; all: also at the ascents' points)",
        _table(rows),
        _verdict(rows),
    ]
    return "\n".join(lines)


def _changed(settings: AscentSettings) -> dict[str, Any]:
    """The fields of `settings` that differ from the defaults."""
    default = AscentSettings()
    return {
        f.name: getattr(settings, f.name)
        for f in dataclasses.fields(settings)
        if getattr(settings, f.name) != getattr(default, f.name)
    }


def study(root: str, repeats: int = 2, threads: int | None = 1) -> str:
    """The module doc's ``--study``: a finished study's models, samples and settings."""
    os.chdir(root)
    params = load_params("params.yaml")
    b = params.bounds
    images, labels, _ = load_split("test")
    n = min(b.samples, len(labels))
    idx = sample_indices(len(labels), n, params.shard.seed)
    x, y = to_float(images[idx]), labels[idx]
    now = AscentSettings(steps=b.steps, restarts=b.restarts, tol=b.tol, patience=b.patience)
    pairs = [(sid, dag.bounds_teacher(params, sid, t)) for sid, t in dag.bounds_pairs(params)]
    names = [*params.teachers, *dict.fromkeys(sid for sid, _ in pairs)]
    with num_threads(threads):
        models = {name: load_stage_model(params, name)[0].eval() for name in names}
        jobs, gammas = _study_jobs(models, pairs, x, y, params, now, repeats)
        rows = _study_gammas(models, gammas, x, y, params, now)
    job_rows = _job_rows(jobs, b.radii)
    worst = min(r[-1] for r in rows)
    slowest = max(r[3] for r in job_rows)
    total = sum(r[2] for r in job_rows) / sum(r[1] for r in job_rows)
    settings = ", ".join(f"{k} {getattr(now, k)}" for k in ("steps", "restarts", "tol", "patience"))
    lines = [
        "== LLM maximiser on a study's models: the study's settings against a long budget ==",
        f"study {root}: {len(models)} models, {n} test images (bounds.samples), radii "
        f"{b.radii}; settings {settings}, check_samples {b.check_samples}; long: 200 x 5; "
        f"torch threads {threads or torch.get_num_threads()}",
        fmt_table(rows, ["model", "r", "γ long", "γ study", "study/long"]),
        f"study/long >= {TARGET_RATIO} on every model and radius: "
        f"{'✓' if worst >= TARGET_RATIO else 'FAIL'} (lowest {worst:.3f})",
        "",
        f"bounds stage computation per job, before (Table 4, old settings: 10 x 1 plain ascent) "
        f"and after (Table 4 at the study's settings + Proposition 2 check), median of {repeats} "
        "interleaved runs; Proposition 2 violation rate per radius of the after run (samples "
        "where the bound fails at some tested point; the kinds of point where it failed)",
        fmt_table(job_rows, ["job", "before s", "after s", "after/before", "violations"]),
        f"after/before <= {TARGET_TIME}: {'✓' if slowest <= TARGET_TIME else 'FAIL'} "
        f"(highest {slowest:.2f}; all jobs together {total:.2f})",
    ]
    return "\n".join(lines)


def _seeded(params: Any) -> torch.Generator:
    return torch.Generator().manual_seed(params.shard.seed)


def _study_jobs(
    models: dict[str, nn.Module],
    pairs: list[tuple[str, str]],
    x: Tensor,
    y: Tensor,
    params: Any,
    now: AscentSettings,
    repeats: int,
) -> tuple[list[dict[str, Any]], dict[tuple[str, float], Tensor]]:
    """Each bounds job timed before (old settings) and after (the study's, with the check),
    interleaved: its row, and the γ of each student at each radius."""
    b = params.bounds
    kw = dict(radii=b.radii, batch_size=b.batch_size)
    jobs, gammas = [], {}
    for sid, teacher in pairs:
        s, t, res = models[sid], models[teacher], {}

        def before(s=s, t=t, res=res) -> None:
            old = SETTINGS["old"]
            res["before"] = table4(s, t, x, y, settings=old, generator=_seeded(params), **kw)

        def after(s=s, t=t, res=res) -> None:
            res["after"] = table4(
                s,
                t,
                x,
                y,
                settings=now,
                generator=_seeded(params),
                check_samples=b.check_samples,
                **kw,
            )

        timing = compare({"before": before, "after": after}, repeats=repeats, warmup=0)
        row: dict[str, Any] = {"job": f"{sid} (vs {teacher})"}
        row |= {f"t {k}": v.median for k, v in timing.items()}
        for r in b.radii:
            gammas[sid, r] = torch.tensor(res["after"][llm_key(r, "samples")])
            check = res["after"].get(prop2_key(r)) or {}
            row[f"viol {radius_label(r)}"] = {k: v["rate"] for k, v in check.items()}
        jobs.append(row)
    return jobs, gammas


def _study_gammas(
    models: dict[str, nn.Module],
    gammas: dict[tuple[str, float], Tensor],
    x: Tensor,
    y: Tensor,
    params: Any,
    now: AscentSettings,
) -> list[list[Any]]:
    """Per model and radius: γ of a long budget, γ at the study's settings, their ratio."""
    rows = []
    for name, model in models.items():
        for r in params.bounds.radii:
            if (name, r) not in gammas:  # a teacher
                gen = _seeded(params)
                gammas[name, r] = local_linearity(model, x, y, r, settings=now, generator=gen).gamma
            long = local_linearity(
                model, x, y, r, settings=SETTINGS["long"], generator=_seeded(params)
            ).gamma
            g = gammas[name, r].double()
            rows.append(
                [
                    name,
                    f"{r:g}",
                    long.mean().item(),
                    g.mean().item(),
                    g.mean().item() / long.double().mean().item(),
                ]
            )
    return rows


def _job_rows(jobs: list[dict[str, Any]], radii: Sequence[float]) -> list[list[Any]]:
    """The timing table's rows: times, their ratio, the violation rates per radius."""
    job_rows = []
    for j in jobs:
        rates = []
        for r in radii:
            v = j[f"viol {radius_label(r)}"]
            if v.get("all") is None:
                rates.append(f"{r:g}: not tested")
                continue
            cells = [f"{k} {100 * v[k]:.1f}%" for k in VIOLATION_KINDS if v.get(k)]
            rates.append(f"{r:g}: {100 * v['all']:.1f}%" + (f" ({', '.join(cells)})" * bool(cells)))
        job_rows.append(
            [j["job"], j["t before"], j["t after"], j["t after"] / j["t before"], "; ".join(rates)]
        )
    return job_rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small, fast")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--study", default=None, help="a finished study's directory")
    parser.add_argument("--repeats", type=int, default=2, help="--study: timed rounds per job")
    args = parser.parse_args(argv)
    print(header())
    if args.study:
        print(study(args.study, repeats=args.repeats, threads=args.threads))
    else:
        print(run(quick=args.quick, threads=args.threads))


if __name__ == "__main__":
    main()
