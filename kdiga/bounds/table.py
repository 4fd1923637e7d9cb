"""Table 4 (paper section 4.4): per sample and averaged LLM of a student at each radius, its
clean CE and ‖gs − gt‖₂ to its teacher, with Proposition 2 tested on the first samples.

What depends on the teacher alone (its clean CE and input gradient, its own ascent on the
checked samples with every point it evaluated, its PGD points) is a `TeacherShare`, the same
for every student of that teacher: `teacher_share` computes it, `save_teacher_share` and
`load_teacher_share` keep it in a file, and `table4(share=...)` runs only what needs the
student.

`table4`'s Proposition 2 check is `proposition2_violations`'s with the student's γ taken from
the very ascent whose γ it reports: the teacher's own ascent runs on the tested samples only,
the teacher is evaluated at the student's ascent points and the student at the teacher's, then
each model's PGD point (`pgd_steps`) and `random_points` random points."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdiga.artifacts import load_tensors, save_tensors
from kdiga.attacks import perturbation_norm
from kdiga.bounds.ascent import own_ascent
from kdiga.bounds.llm import DEFAULT
from kdiga.bounds.primitives import check_batch, frozen, input_gradient, plain
from kdiga.bounds.prop2 import GapMax, TeacherCheck, check_points, phi, teacher_check
from kdiga.bounds.settings import (
    PGD_STEPS,
    RANDOM_POINTS,
    VIOLATION_KINDS,
    Ascent,
    AscentSettings,
    check_eps,
    check_int,
)
from kdiga.data import seeded_subset
from kdiga.files import ArtifactError
from kdiga.progress import ProgressFn, Tracker

logger = logging.getLogger(__name__)

TABLE4_PARTS = (
    "samples",
    "half",
    "half_ratio",
    "converged",
    "steps",
    "samples_converged",
    "samples_steps",
)
_KINDS = (*VIOLATION_KINDS, "all")
SHARE_FORMAT = "kdiga-bounds-teacher/1"


def llm_key(radius: float, part: str | None = None) -> str:
    """Key of the LLM column at `radius` in `table4`'s dict: f"llm@{radius:g}"; with `part`
    (one of TABLE4_PARTS) the key of that detail: f"llm@{radius:g}/{part}"."""
    if part is None:
        return f"llm@{radius:g}"
    if part not in TABLE4_PARTS:
        raise ValueError(f"part must be one of {TABLE4_PARTS} or None, got {part!r:.40}")
    return f"llm@{radius:g}/{part}"


def sample_indices(n_total: int, n: int, seed: int) -> Tensor:
    """`n` distinct random indices into range(n_total), sorted, int64 [n], fixed by `seed`
    (Table 4 uses 1000 random test samples): :func:`kdiga.data.seeded_subset`."""
    return seeded_subset(n_total, n, seed)


def prop2_key(radius: float) -> str:
    """Key of the Proposition 2 check at `radius` in `table4`'s dict: f"prop2@{radius:g}"."""
    return f"prop2@{radius:g}"


# --------------------------------------------------------------------------- the teacher's share


@dataclass
class TeacherShare:
    """The teacher's part of `table4` on N samples, the same for every student: its clean CE
    ce [N] and input gradient grad [N, C, H, W], and at each of `radii` the `TeacherCheck` of
    the first `checked` samples (none for checked = 0); made with `settings` and `pgd_steps`."""

    ce: Tensor
    grad: Tensor
    radii: tuple[float, ...]
    checks: list[TeacherCheck]
    checked: int
    settings: AscentSettings
    pgd_steps: int

    def describe(self) -> dict[str, Any]:
        """What the share was made for (plain JSON): compared with a `table4` call."""
        return _made_for(len(self.ce), self.radii, self.checked, self.settings, self.pgd_steps)

    def require(self, *made_for: Any) -> None:
        """ValueError naming the first setting in which this share differs from a call's
        (`_made_for`'s arguments)."""
        have = self.describe()
        for key, value in _made_for(*made_for).items():
            if have[key] != value:
                raise ValueError(
                    f"the teacher share was made for {key}={have[key]!r:.80}, this table for "
                    f"{value!r:.80}: make the share again with this table's settings"
                )


def _made_for(
    n: int, radii: Sequence[float], checked: int, settings: AscentSettings, pgd_steps: int
) -> dict[str, Any]:
    return {
        "n": n,
        "radii": [float(r) for r in radii],
        "checked": checked,
        "settings": dataclasses.asdict(settings),
        "pgd_steps": pgd_steps,
    }


def teacher_share(
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    radii: Sequence[float] = (4 / 255, 8 / 255),
    settings: AscentSettings = DEFAULT,
    check_samples: int = 0,
    pgd_steps: int = PGD_STEPS,
    batch_size: int = 250,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TeacherShare:
    """The teacher's share of `table4` for the samples x [N, C, H, W], y [N] (arguments as
    in `table4`): its CE and input gradient on every sample, then at each radius its own
    ascent on the first `check_samples` samples (batches of `batch_size`, every point kept)
    and its PGD point there, in that order from `generator`. Tensors on the CPU."""
    _check_table4_args(x, y, radii, batch_size, check_samples, pgd_steps, 0)
    if device is None:
        device = next((p.device for p in teacher.parameters()), x.device)
    n_check = min(check_samples, len(x))
    ces, grads = [], []
    parts: dict[float, list[TeacherCheck]] = {r: [] for r in radii}
    with frozen(teacher):
        for start in range(0, len(x), batch_size):
            xb = plain(x[start : start + batch_size].to(device))
            yb = plain(y[start : start + batch_size].to(device))
            ce_t, g_t = input_gradient(teacher, xb, yb)
            ces.append(ce_t.cpu())
            grads.append(g_t.cpu())
            k = min(max(n_check - start, 0), len(xb))
            for r in radii if k else ():
                check = teacher_check(
                    teacher,
                    xb[:k],
                    yb[:k],
                    settings.at(r),
                    generator,
                    ce_t[:k],
                    g_t[:k],
                    pgd_steps,
                )
                parts[r].append(_on_cpu(check, start))
    checks = [_join(parts[r]) for r in radii] if n_check else []
    return TeacherShare(
        torch.cat(ces), torch.cat(grads), tuple(radii), checks, n_check, settings, pgd_steps
    )


def _on_cpu(check: TeacherCheck, offset: int) -> TeacherCheck:
    x_adv = None if check.x_adv is None else check.x_adv.cpu()
    return TeacherCheck(
        check.gamma.cpu(), check.rows.cpu() + offset, check.e.cpu(), check.ce.cpu(), x_adv
    )


def _join(checks: list[TeacherCheck]) -> TeacherCheck:
    x_adv = None if checks[0].x_adv is None else torch.cat([c.x_adv for c in checks])
    cat = [torch.cat([getattr(c, f) for c in checks]) for f in ("gamma", "rows", "e", "ce")]
    return TeacherCheck(*cat, x_adv)


def save_teacher_share(
    share: TeacherShare, path: str | os.PathLike, meta: dict[str, Any] | None = None
) -> None:
    """Write `share` to a safetensors file (the same bytes for the same share), with `meta`
    (plain JSON, e.g. provenance) beside its own description."""
    tensors = {"ce": share.ce, "grad": share.grad}
    for i, check in enumerate(share.checks):
        tensors |= {f"{i}/{f}": getattr(check, f) for f in ("gamma", "rows", "e", "ce")}
        if check.x_adv is not None:
            tensors[f"{i}/x_adv"] = check.x_adv
    save_tensors(tensors, path, meta={**(meta or {}), "format": SHARE_FORMAT, **share.describe()})


def load_teacher_share(path: str | os.PathLike) -> TeacherShare:
    """The `TeacherShare` a `save_teacher_share` file holds; ArtifactError for another file."""
    tensors, meta = load_tensors(path)
    if meta.get("format") != SHARE_FORMAT:
        raise ArtifactError(f"{path} is not a teacher share file ({SHARE_FORMAT})")
    checks = []
    for i in range(len(meta["radii"]) if meta["checked"] else 0):
        fields = [tensors[f"{i}/{f}"] for f in ("gamma", "rows", "e", "ce")]
        checks.append(TeacherCheck(*fields, tensors.get(f"{i}/x_adv")))
    return TeacherShare(
        tensors["ce"],
        tensors["grad"],
        tuple(meta["radii"]),
        checks,
        meta["checked"],
        AscentSettings(**meta["settings"]),
        meta["pgd_steps"],
    )


# --------------------------------------------------------------------------- Table 4


def _check_table4_args(
    x: Tensor,
    y: Tensor,
    radii: Sequence[float],
    batch_size: int,
    check_samples: int,
    pgd_steps: int,
    random_points: int,
) -> None:
    for r in radii:
        check_eps(r, "radius")
    keys = [llm_key(r) for r in radii]
    if len(set(keys)) != len(keys) or not keys:
        raise ValueError(f"radii must be non-empty and distinct at 6 significant digits: {radii}")
    check_int(batch_size, "batch_size", 1)
    check_int(check_samples, "check_samples", 0)
    check_int(pgd_steps, "pgd_steps", 0)
    check_int(random_points, "random_points", 0)
    check_batch(x, y)
    if len(x) == 0:
        raise ValueError("table4 needs at least one sample")


@dataclass
class _Tally:
    """Per-sample values of each key, and per radius the samples failed and points tested
    of each kind of the Proposition 2 check."""

    radii: Sequence[float]
    parts: dict[str, list[Tensor]] = dataclasses.field(default_factory=dict)
    failed: dict[float, dict[str, int]] = dataclasses.field(default_factory=dict)
    tested: dict[float, dict[str, int]] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.failed = {r: dict.fromkeys(_KINDS, 0) for r in self.radii}
        self.tested = {r: dict.fromkeys(_KINDS, 0) for r in self.radii}

    def add(self, key: str, value: Tensor) -> None:
        self.parts.setdefault(key, []).append(value.detach().double().cpu())

    def summary(self, n_check: int) -> dict[str, Any]:
        per = {k: torch.cat(v) for k, v in self.parts.items()}
        out: dict[str, Any] = {}
        for r in self.radii:
            gamma, half = per[llm_key(r)], per[llm_key(r, "half")]
            mean, half_mean = gamma.mean().item(), half.mean().item()
            out[llm_key(r)] = mean
            out[llm_key(r, "samples")] = gamma.tolist()
            out[llm_key(r, "half")] = half_mean
            out[llm_key(r, "half_ratio")] = half_mean / mean if mean > 0 else 1.0
            out[llm_key(r, "converged")] = per[llm_key(r, "converged")].mean().item()
            out[llm_key(r, "steps")] = per[llm_key(r, "steps")].mean().item()
            out[llm_key(r, "samples_converged")] = per[llm_key(r, "converged")].bool().tolist()
            out[llm_key(r, "samples_steps")] = per[llm_key(r, "steps")].long().tolist()
            if n_check:
                out[prop2_key(r)] = {
                    kind: {
                        "rate": self.failed[r][kind] / n_check if self.tested[r][kind] else None,
                        "points": self.tested[r][kind],
                    }
                    for kind in _KINDS
                }
        if n_check:
            out["prop2/n"] = n_check
        for key in ("ce", "grad_gap_l2"):
            out[key] = per[key].mean().item()
            out[f"{key}/samples"] = per[key].tolist()
        return out


def table4(
    student: nn.Module,
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    radii: Sequence[float] = (4 / 255, 8 / 255),
    settings: AscentSettings = DEFAULT,
    batch_size: int = 250,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    check_samples: int = 0,
    pgd_steps: int = PGD_STEPS,
    random_points: int = RANDOM_POINTS,
    rtol: float = 1e-5,
    share: TeacherShare | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, Any]:
    """Table 4's columns for `student` on the samples x [N, C, H, W], y [N], per sample and
    averaged, with what shows whether the LLM's ascent converged, and Proposition 2 tested
    on the first `check_samples` samples.

    Keys (eq. 10, in the ball of `settings.norm`, L∞ by default; the ascent follows
    `settings`, as in `local_linearity`):
      - `llm_key(r)`: mean LLM γ of the student at radius r;
      - `llm_key(r, "samples")`: the N per-sample γ (for confidence intervals, or to pair
        models image by image);
      - `llm_key(r, "half")`: mean γ at half the step budget; `llm_key(r, "half_ratio")`:
        that over the mean γ (1 where both are 0): near 1, the second half gained little;
      - `llm_key(r, "converged")`: the fraction of samples whose every run converged;
      - `llm_key(r, "steps")`: the mean number of gradient steps per sample;
      - `llm_key(r, "samples_converged")` and `llm_key(r, "samples_steps")`: per sample,
        whether every run converged (bools) and the gradient steps it took (ints);
      - "ce" and "ce/samples": the student's clean CE, mean and per sample;
      - "grad_gap_l2" and "grad_gap_l2/samples": ‖gs − gt‖₂ with `teacher`, mean and per sample;
      - with `check_samples` > 0, "prop2/n" (the samples tested) and `prop2_key(r)`: for each
        kind of point of `proposition2_violations` (VIOLATION_KINDS and "all"),
        {"rate": the fraction of tested samples where the bound fails at a point of that
        kind (None where none was tested), "points": the (sample, point) pairs tested}.
    How Proposition 2 is checked: see the module docstring.

    The teacher's part comes from `share` (`teacher_share` with the same samples and settings, else
    ValueError) or is computed first, from `generator`; the student's draws follow. Means are
    floats, per-sample values lists of N floats in the order of x. The caller picks the samples
    (`sample_indices`). Batches of `batch_size` are moved to `device` (default: the student's
    parameters' device); the models must already be there. `progress` is called with a
    `kdiga.progress.Progress` of the task "bounds", counting the student's ascents (batches x radii,
    each with its Proposition 2 check), at the start and after each.
    """
    _check_table4_args(x, y, radii, batch_size, check_samples, pgd_steps, random_points)
    device = next((p.device for p in student.parameters()), x.device) if device is None else device
    n_check = min(check_samples, len(x))
    if share is None:
        share = teacher_share(
            teacher,
            x,
            y,
            radii=radii,
            settings=settings,
            check_samples=check_samples,
            pgd_steps=pgd_steps,
            batch_size=batch_size,
            generator=generator,
            device=device,
        )
    share.require(len(x), radii, n_check, settings, pgd_steps)
    limits = (pgd_steps, random_points, rtol, batch_size)
    part = _StudentPart((student, teacher), share, settings, generator, _Tally(radii), limits)
    n_batches = math.ceil(len(x) / batch_size)
    track = Tracker(progress, "bounds", n_batches * len(radii), "ascents")
    track.at(0, f"batch 0/{n_batches}")
    with frozen(student, teacher):
        for start in range(0, len(x), batch_size):
            stop = min(start + batch_size, len(x))
            xb, yb = plain(x[start:stop].to(device)), plain(y[start:stop].to(device))
            k = min(max(n_check - start, 0), len(xb))  # the tested samples of this batch
            for r in part.batch(xb, yb, start, k):
                track.advance(1, f"batch {start // batch_size + 1}/{n_batches}, radius {r:g}")
            logger.debug("table4: %d/%d samples", stop, len(x))
    return part.tally.summary(n_check)


@dataclass
class _StudentPart:
    """The student's part of one `table4` call: models = (student, teacher), the teacher's
    `share`, the ascent `settings` and `generator`, the `tally` the values go to, and limits =
    (pgd_steps, random_points, rtol, chunk) of the Proposition 2 check."""

    models: tuple[nn.Module, nn.Module]
    share: TeacherShare
    settings: AscentSettings
    generator: torch.Generator | None
    tally: _Tally
    limits: tuple[int, int, float, int]

    def batch(self, xb: Tensor, yb: Tensor, start: int, k: int) -> Iterator[float]:
        """The batch of samples x[start : start + len(xb)]: its clean terms, then at each radius
        the student's ascent, with the Proposition 2 check of its first `k` samples; yields
        each radius once it is done. Inside `frozen`."""
        rows = slice(start, start + len(xb))
        clean = _clean_terms(self.models[0], self.share, xb, yb, rows, self.tally)
        for i, r in enumerate(self.tally.radii):
            share_rows = self.share.checks[i].rows_in(start, start + k) if k else None
            _student_batch(
                self.models,
                xb,
                yb,
                clean,
                self.settings.at(r),
                self.generator,
                share_rows,
                self.tally,
                self.limits,
            )
            yield r


def _clean_terms(
    student: nn.Module, share: TeacherShare, xb: Tensor, yb: Tensor, rows: slice, tally: _Tally
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(ce_s, g_s, ce_t, g_t): the student's clean CE and input gradient on the batch and the
    teacher's from ``share`` (its ``rows``); the CE and ‖gs − gt‖₂ go to ``tally``."""
    ce_s, g_s = input_gradient(student, xb, yb)
    ce_t, g_t = (t[rows].to(xb.device, g_s.dtype) for t in (share.ce, share.grad))
    tally.add("ce", ce_s)
    tally.add("grad_gap_l2", perturbation_norm(g_s - g_t, "l2"))
    return ce_s, g_s, ce_t, g_t


def _student_batch(
    models: tuple[nn.Module, nn.Module],
    xb: Tensor,
    yb: Tensor,
    clean: tuple[Tensor, Tensor, Tensor, Tensor],
    s: Ascent,
    generator: torch.Generator | None,
    share: TeacherCheck | None,
    tally: _Tally,
    check: tuple[int, int, float, int],
) -> None:
    """The student's ascent on a batch at one radius, and with the teacher's `share` of its
    first K samples their Proposition 2 check: clean = (ce_s, g_s, ce_t, g_t) of the batch,
    check = (pgd_steps, random_points, rtol, chunk). Inside `frozen`."""
    student, teacher = models
    ce_s, g_s, ce_t, g_t = clean
    k = 0 if share is None else len(share.gamma)
    seen = GapMax(xb, yb, k)
    hook = seen.hook(teacher) if k else None
    st, _ = own_ascent(student, xb, yb, s, generator, ce_s, g_s, on_points=hook)
    r = s.eps
    tally.add(llm_key(r), st.gamma)
    tally.add(llm_key(r, "half"), st.gamma_half)
    tally.add(llm_key(r, "converged"), st.converged)
    tally.add(llm_key(r, "steps"), st.steps_used)
    if share is None:
        return
    pgd_steps, random_points, rtol, chunk = check
    terms = phi(ce_s[:k], ce_t[:k], g_s[:k], g_t[:k], r, s.norm)
    result = check_points(
        models,
        xb[:k],
        yb[:k],
        s,
        generator,
        st.gamma[:k],
        share,
        terms,
        seen,
        None,
        pgd_steps,
        random_points,
        rtol,
        chunk,
    )
    for kind in _KINDS:
        tally.failed[r][kind] += int(result.violated[kind].sum())
        tally.tested[r][kind] += result.points[kind]
