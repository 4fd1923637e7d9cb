"""Robust accuracy over increasing radii, attacking only the points still robust; resumable.

A sample is robust at radius r only if it is classified correctly clean and no attack
found an adversarial example within r. An adversarial example found at a smaller radius
is valid at every larger one, so with ``reuse=True`` a point broken at r_(k-1) counts as
broken at r_k and is not attacked again: the robust set at r_k is (robust at r_(k-1)) ∩
(survives the attack at r_k). With ``reuse=False`` every radius attacks every clean-correct
point (the baseline). For a deterministic attack (PGD with ``random_start=False``) the
attack on a point at r_k is the same computation in both modes, so the reuse robust set is
a subset of the independent one at every radius (up to floating-point effects of batch
composition).

The sweep processes the data in batches; with ``state_path`` it saves its progress and
the RNG state atomically after each batch, and a re-run with the same arguments skips the
batches already done and ends with the same result as an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdiga.attacks.autoattack import autoattack, canonical_aa_norm
from kdiga.attacks.checks import check_gradients
from kdiga.attacks.pgd import canonical_norm, check_eps, perturbation_norm, pgd
from kdiga.options import SWEEP_ATTACKS
from kdiga.progress import ProgressFn, Tracker
from kdiga.utils import atomic_torch_save, eval_mode

logger = logging.getLogger(__name__)

_STATE_VERSION = 1

# attack(x [n, ...], y [n], radius) -> (x_adv [n, ...], per-sample gradient evals, flags)
AttackFn = Callable[[Tensor, Tensor, float], tuple[Tensor, int, list[str]]]


@dataclass
class SweepResult:
    """Per-sample outcome of a robust-accuracy sweep over N samples and R radii.

    ``radii``: sorted increasing. ``clean_correct`` [N] bool. ``robust`` [R, N] bool.
    ``grad_evals``: per-sample gradient evaluations spent in all (``grad_evals_per_radius``
    per radius). ``max_perturbation`` [R]: the largest ``norm`` distance of an adversarial
    input tried at each radius (0 where no point was attacked); ``in_range`` [R]: whether
    every adversarial input lay in [0, 1]. ``flags``: gradient-masking warnings.
    """

    radii: list[float]
    clean_correct: Tensor
    robust: Tensor
    grad_evals: int
    grad_evals_per_radius: list[int]
    max_perturbation: list[float]
    in_range: list[bool]
    attack: str = "pgd"
    norm: str = "linf"
    reuse: bool = True
    flags: list[str] = field(default_factory=list)

    def accuracy(self) -> dict[str, Any]:
        """``{"clean": float, "robust": {radius: float}}`` over the N samples."""
        n = max(self.clean_correct.numel(), 1)
        return {
            "clean": self.clean_correct.sum().item() / n,
            "robust": {
                r: row.sum().item() / n for r, row in zip(self.radii, self.robust, strict=True)
            },
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly summary: accuracies, costs, checks and the per-sample outcome.

        The per-sample outcome is written as strings of "0"/"1", one character per sample in
        the order of the evaluated split (the same images for every model of a study), so
        models can be bootstrapped and paired image by image: ``"clean_correct"`` (N chars)
        and ``"robust_correct"`` (one string of N chars per radius, in the order of
        ``"radii"``). Every radius has its own row: with ``reuse=False`` the rows need not
        be nested. :func:`per_sample_correct` decodes them.
        """
        acc = self.accuracy()
        return {
            "attack": self.attack,
            "norm": self.norm,
            "reuse": self.reuse,
            "n": int(self.clean_correct.numel()),
            "radii": list(self.radii),
            "clean": acc["clean"],
            "robust": [acc["robust"][r] for r in self.radii],
            "clean_correct": _encode_bits(self.clean_correct),
            "robust_correct": [_encode_bits(row) for row in self.robust],
            "grad_evals": self.grad_evals,
            "grad_evals_per_radius": list(self.grad_evals_per_radius),
            "max_perturbation": list(self.max_perturbation),
            "in_range": list(self.in_range),
            "flags": list(self.flags),
        }


def _encode_bits(mask: Tensor) -> str:
    """A bool vector [N] as a string of N "0"/"1" characters."""
    return "".join("1" if v else "0" for v in mask.bool().tolist())


def _decode_bits(text: Any, n: int, name: str) -> Tensor:
    if not isinstance(text, str) or len(text) != n or set(text) - {"0", "1"}:
        shown = text if not isinstance(text, str) or len(text) <= 20 else f"{text[:20]}..."
        raise ValueError(f"{name} must be a string of n={n} '0'/'1' characters, got {shown!r}")
    return torch.tensor(list(text.encode()), dtype=torch.uint8).reshape(n) == ord("1")


def per_sample_correct(d: dict[str, Any]) -> tuple[Tensor, Tensor]:
    """The per-sample outcome of a ``SweepResult.to_dict()``: (clean [N] bool, robust [R, N]
    bool), samples in the order of the evaluated split, rows in the order of ``d["radii"]``.

    Their means reproduce ``d["clean"]`` and ``d["robust"]`` exactly. ValueError if the
    dict has no per-sample outcome (written before it was recorded) or it is malformed.
    """
    missing = [k for k in ("n", "radii", "clean_correct", "robust_correct") if k not in d]
    if missing:
        raise ValueError(
            f"sweep result lacks {missing}: it was written without the per-sample outcome; "
            "re-run the attack stage"
        )
    n, rows = d["n"], d["robust_correct"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    if not isinstance(rows, list) or len(rows) != len(d["radii"]):
        raise ValueError(
            f"robust_correct must be a list of one string per radius ({len(d['radii'])}), "
            f"got {type(rows).__name__} of length {len(rows) if isinstance(rows, list) else '-'}"
        )
    clean = _decode_bits(d["clean_correct"], n, "clean_correct")
    robust = [_decode_bits(r, n, f"robust_correct[{k}]") for k, r in enumerate(rows)]
    return clean, torch.stack(robust) if robust else torch.zeros(0, n, dtype=torch.bool)


def _check_radii(radii: Sequence[float]) -> list[float]:
    """Radii as sorted floats: each finite and >= 0 (0 = clean), no duplicates."""
    if isinstance(radii, str | bytes) or not isinstance(radii, Sequence) or not radii:
        raise ValueError(f"radii must be a non-empty sequence of numbers >= 0, got {radii!r}")
    values = [0.0 if r == 0 else check_eps(r, "each radius") for r in radii]
    if len(set(values)) != len(values):
        raise ValueError(f"radii must be distinct, got {list(radii)!r}")
    return sorted(values)


def _check_int(value: Any, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _hash_tensors(items: Sequence[tuple[str, Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _pgd_attack(
    model: nn.Module,
    *,
    steps: int,
    step_size: float | None,
    norm: str,
    restarts: int,
    random_start: bool,
    generator: torch.Generator,
    compile_model: bool = False,
) -> AttackFn:
    def run(x: Tensor, y: Tensor, radius: float) -> tuple[Tensor, int, list[str]]:
        x_adv, stats = pgd(
            model,
            x,
            y,
            eps=radius,
            steps=steps,
            step_size=step_size,
            norm=norm,
            restarts=restarts,
            random_start=random_start,
            generator=generator,
            early_stop=True,
            return_stats=True,
            compile_model=compile_model,
        )
        return x_adv, stats["grad_evals"], []

    return run


def _autoattack_attack(
    model: nn.Module,
    *,
    norm: str,
    batch_size: int,
    seed: int,
    device: torch.device,
    kwargs: dict[str, Any],
    progress: ProgressFn | None = None,
) -> AttackFn:
    def run(x: Tensor, y: Tensor, radius: float) -> tuple[Tensor, int, list[str]]:
        res = autoattack(
            model,
            x,
            y,
            eps=radius,
            norm=norm,
            batch_size=batch_size,
            seed=seed,
            device=device,
            progress=progress,
            **kwargs,
        )
        return res.x_adv, res.grad_evals, res.flags

    return run


def _attack_batch(
    model: nn.Module,
    attack: AttackFn,
    x: Tensor,
    y: Tensor,
    radii: list[float],
    norm: str,
    reuse: bool,
    on_radius: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Clean correctness [b] and robustness [R, b] of one batch, with costs and checks;
    ``on_radius(k, r)`` after the k-th radius r is done."""
    with eval_mode(model), torch.no_grad():
        clean = model(x).argmax(dim=1) == y
    still = clean.clone()
    rows, evals, max_pert, in_range, flags = [], [], [], [], []
    for k, r in enumerate(radii):
        targets = still if reuse else clean
        robust = targets.clone()
        idx = targets.nonzero().squeeze(1)
        n_evals, pert, ok = 0, 0.0, True
        if r > 0 and idx.numel():
            x_adv, n_evals, new_flags = attack(x[idx], y[idx], r)
            with eval_mode(model), torch.no_grad():
                broken = model(x_adv).argmax(dim=1) != y[idx]
            robust[idx[broken]] = False
            pert = perturbation_norm(x_adv - x[idx], norm).max().item()
            ok = bool(x_adv.min() >= 0 and x_adv.max() <= 1)
            flags += new_flags
        rows.append(robust)
        evals.append(n_evals)
        max_pert.append(pert)
        in_range.append(ok)
        if reuse:
            still = robust
        if on_radius is not None:
            on_radius(k, r)
    return {
        "clean": clean.cpu(),
        "robust": torch.stack(rows).cpu(),
        "grad_evals": evals,
        "max_perturbation": max_pert,
        "in_range": in_range,
        "flags": flags,
    }


def _fresh_state(n: int, n_radii: int, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": _STATE_VERSION,
        "fingerprint": fingerprint,
        "batches_done": 0,
        "clean": torch.zeros(n, dtype=torch.bool),
        "robust": torch.zeros(n_radii, n, dtype=torch.bool),
        "grad_evals": [0] * n_radii,
        "max_perturbation": [0.0] * n_radii,
        "in_range": [True] * n_radii,
        "flags": [],
        "generator_state": None,
    }


def _load_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"sweep state file {path} does not load ({err}); delete it") from err
    if state.get("version") != _STATE_VERSION or state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"sweep state file {path} was written by a sweep with other arguments, model or "
            "data; delete it or pass another state_path"
        )
    return state


def _open_state(
    path: Path | None,
    fingerprint: dict[str, Any],
    n: int,
    n_radii: int,
    n_batches: int,
    generator: torch.Generator,
) -> dict[str, Any]:
    """The saved progress at ``path`` (generator restored to its saved state), or a new one."""
    state = _load_state(path, fingerprint) if path is not None else None
    if state is None:
        return _fresh_state(n, n_radii, fingerprint)
    logger.info(
        "resuming sweep from %s: %d/%d batches done", path, state["batches_done"], n_batches
    )
    if state["generator_state"] is not None:
        generator.set_state(state["generator_state"])
    return state


def _merge(state: dict[str, Any], part: dict[str, Any], sl: slice) -> None:
    state["clean"][sl] = part["clean"]
    state["robust"][:, sl] = part["robust"]
    k = len(state["grad_evals"])
    for i in range(k):
        state["grad_evals"][i] += part["grad_evals"][i]
        state["max_perturbation"][i] = max(
            state["max_perturbation"][i], part["max_perturbation"][i]
        )
        state["in_range"][i] = state["in_range"][i] and part["in_range"][i]
    state["flags"] = list(dict.fromkeys(state["flags"] + part["flags"]))


def _check_attack(attack: str, norm: str) -> str:
    """``norm`` in lower case; ValueError for an unknown ``attack`` or a norm it does not take."""
    if attack not in SWEEP_ATTACKS:
        raise ValueError(f"attack must be one of {SWEEP_ATTACKS}, got {attack!r}")
    return canonical_norm(norm) if attack == "pgd" else canonical_aa_norm(norm).lower()


def _check_sizes(x: Tensor, y: Tensor, batch_size: int, steps: int, restarts: int) -> None:
    """ValueError unless the batch size, steps and restarts are ints in range and ``x``, ``y``
    are [N, C, H, W] images in [0, 1] with [N] labels."""
    _check_int(batch_size, "batch_size", 1)
    _check_int(steps, "steps", 0)
    _check_int(restarts, "restarts", 1)
    if not isinstance(x, Tensor) or x.dim() < 2 or not isinstance(y, Tensor):
        raise ValueError("x must be a tensor [N, C, H, W] and y a label tensor [N]")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape [{x.shape[0]}], got {tuple(y.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must lie in [0, 1]; normalisation belongs inside the model wrapper")


@dataclass
class _Sweep:
    """One ``robust_sweep`` call: its model and data, and its checked settings."""

    model: nn.Module
    x: Tensor
    y: Tensor
    device: torch.device
    generator: torch.Generator
    attack: str
    norm: str
    radii: list[float]
    steps: int
    step_size: float | None
    restarts: int
    random_start: bool
    batch_size: int
    reuse: bool
    seed: int
    aa_kwargs: dict[str, Any]
    compile_model: bool
    progress: ProgressFn | None

    def attack_fn(self) -> AttackFn:
        """The attack that every batch and radius runs: PGD or the AutoAttack adapter."""
        if self.attack == "pgd":
            return _pgd_attack(
                self.model,
                steps=self.steps,
                step_size=self.step_size,
                norm=self.norm,
                restarts=self.restarts,
                random_start=self.random_start,
                generator=self.generator,
                compile_model=self.compile_model,
            )
        return _autoattack_attack(
            self.model,
            norm=self.norm,
            batch_size=self.batch_size,
            seed=self.seed,
            device=self.device,
            kwargs=self.aa_kwargs,
            progress=self.progress,
        )

    def fingerprint(self) -> dict[str, Any]:
        """What a saved state must have been made with: the settings, the generator's state
        and hashes of the data and the model's weights."""
        return {
            "attack": self.attack,
            "norm": self.norm,
            "radii": self.radii,
            "steps": self.steps,
            "step_size": self.step_size,
            "restarts": self.restarts,
            "random_start": self.random_start,
            "batch_size": self.batch_size,
            "reuse": self.reuse,
            "seed": self.seed,
            "generator": _hash_tensors([("g", self.generator.get_state())]),
            "autoattack_kwargs": repr(sorted(self.aa_kwargs.items())),
            "data": _hash_tensors([("x", self.x), ("y", self.y)]),
            "model": _hash_tensors(list(self.model.state_dict().items())),
        }

    def gradient_flags(self) -> list[str]:
        """Gradient-masking warnings from the clean-correct points of the first batch."""
        model, x, y, device = self.model, self.x, self.y, self.device
        head = slice(0, self.batch_size)
        with eval_mode(model), torch.no_grad():
            correct = model(x[head].to(device)).argmax(1) == y[head].to(device)
        return check_gradients(
            model, x[head][correct.cpu()].to(device), y[head][correct.cpu()].to(device)
        )

    def run_batches(self, run: AttackFn, state: dict[str, Any], path: Path | None) -> None:
        """Attack the batches not yet done in ``state``, merging each into it (and saving it
        to ``path`` when given) as soon as it is done."""
        x, y, radii, batch_size, device = self.x, self.y, self.radii, self.batch_size, self.device
        n, n_batches = x.shape[0], math.ceil(x.shape[0] / batch_size)
        track = Tracker(self.progress, f"{self.attack} sweep", n_batches * len(radii), "attacks")
        track.at(state["batches_done"] * len(radii), f"batch {state['batches_done']}/{n_batches}")
        for b in range(state["batches_done"], n_batches):
            sl = slice(b * batch_size, min((b + 1) * batch_size, n))

            def on_radius(k: int, r: float, b: int = b) -> None:
                track.at(b * len(radii) + k + 1, f"batch {b + 1}/{n_batches}, radius {r:g}")

            part = _attack_batch(
                self.model,
                run,
                x[sl].to(device),
                y[sl].to(device),
                radii,
                self.norm,
                self.reuse,
                on_radius,
            )
            _merge(state, part, sl)
            state["batches_done"] = b + 1
            state["generator_state"] = self.generator.get_state()
            if path is not None:
                atomic_torch_save(state, path)
            logger.debug("sweep batch %d/%d done", b + 1, n_batches)

    def run(self, state_path: str | Path | None) -> SweepResult:
        """The sweep's result, resumed from the progress saved at ``state_path`` if there is
        any, and saving its progress there after each batch (when given)."""
        run = self.attack_fn()
        n, n_batches = self.x.shape[0], math.ceil(self.x.shape[0] / self.batch_size)
        path = Path(state_path) if state_path is not None else None
        fingerprint = self.fingerprint() if path is not None else {}
        state = _open_state(path, fingerprint, n, len(self.radii), n_batches, self.generator)
        if state["batches_done"] == 0 and n:
            state["flags"] += self.gradient_flags()
        self.run_batches(run, state, path)
        result = self.result(state)
        logger.info(
            "sweep (%s, %s, reuse=%s): %s", self.attack, self.norm, self.reuse, result.accuracy()
        )
        return result

    def result(self, state: dict[str, Any]) -> SweepResult:
        """The ``SweepResult`` of a finished ``state``."""
        return SweepResult(
            radii=self.radii,
            clean_correct=state["clean"],
            robust=state["robust"],
            grad_evals=sum(state["grad_evals"]),
            grad_evals_per_radius=list(state["grad_evals"]),
            max_perturbation=list(state["max_perturbation"]),
            in_range=list(state["in_range"]),
            attack=self.attack,
            norm=self.norm,
            reuse=self.reuse,
            flags=list(state["flags"]),
        )


def robust_sweep(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    radii: Sequence[float],
    *,
    attack: str = "pgd",
    steps: int = 20,
    step_size: float | None = None,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    batch_size: int = 256,
    reuse: bool = True,
    generator: torch.Generator | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    autoattack_kwargs: dict[str, Any] | None = None,
    state_path: str | Path | None = None,
    compile_model: bool = False,
    progress: ProgressFn | None = None,
) -> SweepResult:
    """Per-sample robust accuracy of ``model`` on ``x`` [N, C, H, W] in [0, 1], ``y`` [N].

    Args:
        radii: attack radii in [0, 1] pixel space, >= 0 and distinct; they are sorted
            increasing and the result's rows follow the sorted order (0 means clean).
        attack: "pgd" (early-exit PGD: a point stops being attacked once misclassified) or
            "autoattack" (the ``kdiga.attacks.autoattack`` adapter per radius).
        steps, step_size, restarts, random_start: PGD settings; ``step_size`` None means
            2.5·r/steps at each radius r, a number is used at every radius.
        norm: "linf" or "l2" ("l1" too with AutoAttack), any case.
        batch_size: samples per batch (and AutoAttack's batch size).
        reuse: attack at r_k only the points still robust at r_(k-1) (default); False
            attacks every clean-correct point at every radius (the baseline).
        generator: RNG for PGD's random starts; default ``torch.Generator().manual_seed(seed)``.
            seed: that seed, and AutoAttack's.
        device: where batches go (default: the model's device); the model is not moved.
        autoattack_kwargs: extra arguments for ``autoattack`` (version, attacks, n_iter, ...).
        compile_model: PGD's steps through ``torch.compile`` (CUDA only; see ``pgd``).
        state_path: save progress after each batch and resume from it on a re-run with
            the same arguments, model and data (ValueError if they differ).
        progress: called with a :class:`kdiga.progress.Progress` of the task
            "<attack> sweep", counting attacks (batches x radii, a resumed sweep from its
            saved batches) at the start and after each radius of each batch; AutoAttack
            also reports its stages (:func:`kdiga.attacks.autoattack.autoattack`).

    Returns:
        ``SweepResult`` (tensors on the CPU).
    """
    norm = _check_attack(attack, norm)
    radii = _check_radii(radii)
    _check_sizes(x, y, batch_size, steps, restarts)
    device = torch.device(device) if device is not None else _model_device(model)
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    sweep = _Sweep(
        model=model,
        x=x,
        y=y,
        device=device,
        generator=generator,
        attack=attack,
        norm=norm,
        radii=radii,
        steps=steps,
        step_size=step_size,
        restarts=restarts,
        random_start=random_start,
        batch_size=batch_size,
        reuse=reuse,
        seed=seed,
        aa_kwargs=dict(autoattack_kwargs or {}),
        compile_model=compile_model,
        progress=progress,
    )
    return sweep.run(state_path)
