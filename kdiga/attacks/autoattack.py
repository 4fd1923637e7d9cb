"""The one adapter for AutoAttack (Croce & Hein, 2020) through the ``pyautoattack`` package.

``pyautoattack`` ships fra31/auto-attack's attack code under another import name, with
keyword-only arguments: ``AutoAttack(model, *, attacks, device, eps, norm, seed, version)``
and ``run_standard_evaluation(x, y, /, *, batch_size, state_path) -> (x_adv, y_adv)``.
Its gradient-masking checks (``pyautoattack.checks``: randomised output, probabilities
instead of logits, dynamic defence, zero gradients, Square beating the white-box attacks,
too many target classes) log warnings on the ``"auto-attack"`` logger; this adapter
captures them into ``AutoAttackResult.flags`` so reports keep them.

Side effects of ``pyautoattack`` that the adapter contains: it reseeds torch's global RNG
(kept private here with ``torch.random.fork_rng``), and its dynamic-defence check keeps a
module-level call counter that is never reset (reset here before each run).
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pyautoattack import AutoAttack, checks
from torch import Tensor, nn

from kdiga.attacks.checks import check_gradients, check_perturbation
from kdiga.attacks.pgd import check_eps
from kdiga.options import AUTOATTACK_ATTACKS as ATTACKS
from kdiga.options import AUTOATTACK_VERSIONS as VERSIONS
from kdiga.options import MEASURE_NORMS
from kdiga.progress import ProgressFn, Tracker
from kdiga.utils import eval_mode

logger = logging.getLogger(__name__)

#: AutoAttack's spelling of each norm (``"Linf"``, ``"L2"``, ``"L1"``)
AA_NORMS = {norm: norm[0].upper() + norm[1:] for norm in MEASURE_NORMS}
# Smallest number of classes each loss can use (the DLR losses read the 3rd / 4th logit).
_MIN_CLASSES = {"apgd-dlr": 3, "apgd-t": 4, "fab-t": 2, "fab": 2, "apgd-ce": 2, "square": 2}


@dataclass
class AutoAttackResult:
    """Outcome of one AutoAttack run on N samples.

    ``robust`` [N] bool: correct clean and no attack of the list found an adversarial
    example. ``clean_correct`` [N] bool. ``x_adv`` [N, C, H, W] (the clean input where no
    attack succeeded). ``y_adv`` [N]: predicted label at ``x_adv``. ``flags``: AutoAttack's
    gradient-masking warnings plus the adapter's own checks, one string each.
    ``grad_evals``: per-sample backward passes through the model; ``forward_evals``:
    per-sample forward passes without an input gradient.
    """

    robust: Tensor
    clean_correct: Tensor
    x_adv: Tensor
    y_adv: Tensor
    eps: float
    norm: str
    version: str
    attacks: list[str]
    flags: list[str] = field(default_factory=list)
    grad_evals: int = 0
    forward_evals: int = 0

    def accuracy(self) -> dict[str, float]:
        """``{"clean": float, "robust": float}`` over the N samples."""
        n = max(len(self.robust), 1)
        return {
            "clean": self.clean_correct.sum().item() / n,
            "robust": self.robust.sum().item() / n,
        }


class _CountBackward(torch.autograd.Function):
    """Identity whose backward adds the batch size to a counter (one per backward pass)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, counter: list[int]) -> Tensor:
        ctx.counter = counter
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.counter[0] += grad.shape[0]
        return grad, None


class _Counted(nn.Module):
    """Wraps a model and counts per-sample forward and backward passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.backwards = [0]
        self.forwards = 0

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            x = _CountBackward.apply(x, self.backwards)
        else:
            self.forwards += x.shape[0]
        return self.model(x)


class _FlagHandler(logging.Handler):
    def __init__(self, sink: list[str]) -> None:
        super().__init__(level=logging.WARNING)
        self.sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        self.sink.append(record.getMessage())


@contextlib.contextmanager
def _capture_flags(sink: list[str]) -> Iterator[None]:
    """Collect pyautoattack's check warnings (logger or ``warnings.warn``) into ``sink``."""
    aa_logger = logging.getLogger("auto-attack")
    handler = _FlagHandler(sink)
    aa_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
        sink.extend(str(w.message) for w in caught if "pyautoattack" in (w.filename or ""))
    finally:
        aa_logger.removeHandler(handler)


def canonical_aa_norm(norm: str) -> str:
    """Return "Linf", "L2" or "L1" for any capitalisation of them; ValueError otherwise."""
    key = norm.lower() if isinstance(norm, str) else None
    if key not in AA_NORMS:
        raise ValueError(f"norm must be one of {tuple(AA_NORMS.values())} (any case), got {norm!r}")
    return AA_NORMS[key]


def _validate_attacks(version: str, attacks: Sequence[str] | None) -> tuple[str, list[str] | None]:
    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    if attacks is None:
        if version == "custom":
            raise ValueError(f"version='custom' needs a list of attacks from {ATTACKS}")
        return version, None
    if version != "custom":
        raise ValueError(
            f"attacks={list(attacks)!r} needs version='custom' (version {version!r} fixes its "
            "own attack list)"
        )
    if isinstance(attacks, str):
        raise ValueError(
            f"attacks must be a list of names from {ATTACKS}, got the string {attacks!r}"
        )
    bad = [a for a in attacks if a not in ATTACKS]
    if bad or not attacks:
        raise ValueError(f"unknown or empty attack list {list(attacks)!r}; allowed: {ATTACKS}")
    return version, list(dict.fromkeys(attacks))


@dataclass(frozen=True)
class _Spec:
    """What AutoAttack is run with, checked: the radius ``eps``, the ``norm`` in AutoAttack's
    spelling, the ``version`` and its ``attacks`` (None: the version's own list)."""

    eps: float
    norm: str
    version: str
    attacks: list[str] | None

    @classmethod
    def checked(cls, eps: float, norm: str, version: str, attacks: Sequence[str] | None) -> _Spec:
        """The spec of ``autoattack``'s arguments; ValueError for a bad one."""
        eps = check_eps(eps)
        aa_norm = canonical_aa_norm(norm)
        version, attack_list = _validate_attacks(version, attacks)
        return cls(eps, aa_norm, version, attack_list)

    def adversary(self, model: nn.Module, seed: int | None, device: torch.device) -> Any:
        """pyautoattack's ``AutoAttack`` on ``model`` with this spec."""
        return AutoAttack(
            model,
            attacks=self.attacks,
            device=device,
            eps=self.eps,
            norm=self.norm,
            seed=seed,
            version=self.version,
        )


def _model_device(model: nn.Module) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Predicted labels [N] (on the CPU) for ``x`` [N, ...], in batches."""
    preds = [
        model(x[i : i + batch_size].to(device)).argmax(1).cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _configure(
    adversary: Any,
    n_classes: int,
    n_iter: int | None,
    n_queries: int | None,
    n_restarts: int | None = None,
    n_target_classes: int | None = None,
) -> None:
    """Fit target-class counts to the number of classes; apply the overrides."""
    for a in adversary.attacks_to_run:
        if n_classes < _MIN_CLASSES[a]:
            raise ValueError(
                f"attack {a!r} needs at least {_MIN_CLASSES[a]} classes, the model has {n_classes}"
            )
    targets = min(9 if n_target_classes is None else n_target_classes, n_classes - 1)
    if n_target_classes is not None or adversary.apgd_targeted.n_target_classes > targets:
        logger.info("AutoAttack: target classes reduced to %d (%d classes)", targets, n_classes)
        adversary.apgd_targeted.n_target_classes = targets
        adversary.fab.n_target_classes = targets
    if n_iter is not None:
        for attack in (adversary.apgd, adversary.apgd_targeted, adversary.fab):
            attack.n_iter = n_iter
        for attack in (adversary.apgd, adversary.apgd_targeted):
            attack.n_iter_orig = n_iter
            attack.n_iter_2 = max(int(0.22 * n_iter), 1)
            attack.n_iter_min = max(int(0.06 * n_iter), 1)
            attack.size_decr = max(int(0.03 * n_iter), 1)
    if n_queries is not None:
        adversary.square.n_queries = n_queries
    if n_restarts is not None:
        adversary.apgd.n_restarts = n_restarts
        adversary.fab.n_restarts = n_restarts


# The adversary's attack objects, and the stage each runs as (from its settings at the call).
_STAGES: dict[str, Callable[[Any], str]] = {
    "apgd": lambda a: "apgd-ce" if a.loss == "ce" else "apgd-dlr",
    "apgd_targeted": lambda a: "apgd-t",
    "fab": lambda a: "fab-t" if a.targeted else "fab",
    "square": lambda a: "square",
}


class _StageProgress:
    """Reports each AutoAttack stage (APGD-CE, APGD-T, FAB-T, Square, ...) as the task
    "autoattack <stage>": samples attacked of those still robust when the stage began.

    It wraps the ``perturb`` method of the adversary's four attack objects (one call per
    attack batch); the stage's name is read from the object's settings at the call, as
    ``run_standard_evaluation`` sets them. The points still robust are counted with one extra
    forward of each attacked batch through the uncounted model.
    """

    def __init__(
        self, adversary: Any, model: nn.Module, robust: int, eps: float, progress: ProgressFn
    ) -> None:
        self.model, self.left, self.eps, self.progress = model, robust, eps, progress
        self.track: Tracker | None = None
        for attr, name in _STAGES.items():
            attack = getattr(adversary, attr)
            attack.perturb = self._wrap(attack, name, attack.perturb)

    def _wrap(self, attack: Any, name: Callable[[Any], str], perturb: Callable) -> Callable:
        def counted(x: Tensor, y: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            task = f"autoattack {name(attack)}"
            if self.track is None or self.track.task != task:
                self.track = Tracker(self.progress, task, self.left, "samples")
                self.track.at(0, f"eps {self.eps:g}")
            x_adv = perturb(x, y, *args, **kwargs)
            with torch.no_grad():
                self.left -= int((self.model(x_adv).argmax(1) != y).sum())
            self.track.advance(len(y), f"eps {self.eps:g}")
            return x_adv

        return counted


def _check_positive_int(value: Any, name: str, allow_none: bool = False) -> None:
    if allow_none and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def _check_counts(
    batch_size: int,
    n_iter: int | None,
    n_queries: int | None,
    n_restarts: int | None,
    n_target_classes: int | None,
) -> None:
    """ValueError unless the batch size, and each override given, is an int >= 1."""
    _check_positive_int(batch_size, "batch_size")
    _check_positive_int(n_iter, "n_iter", allow_none=True)
    _check_positive_int(n_queries, "n_queries", allow_none=True)
    _check_positive_int(n_restarts, "n_restarts", allow_none=True)
    _check_positive_int(n_target_classes, "n_target_classes", allow_none=True)


def _check_images(x: Any, y: Any) -> None:
    """ValueError unless ``x`` is [N, C, H, W] in [0, 1] and ``y`` its [N] labels."""
    if not isinstance(x, Tensor) or x.dim() < 2 or y.shape != x.shape[:1]:
        raise ValueError("x must be a tensor [N, C, H, W] and y a label tensor [N]")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError("x must lie in [0, 1]; normalisation belongs inside the model wrapper")


def _reset_checks() -> None:
    """Zero pyautoattack's check counters before a run."""
    for k in checks.funcs:  # the dynamic-defence check's counter is never reset
        checks.funcs[k] = 0


def _outcome(
    y: Tensor, y_adv: Tensor, clean_pred: Tensor, adv_pred: Tensor, flags: list[str]
) -> tuple[Tensor, Tensor]:
    """(robust [N], clean_correct [N]) on the CPU, from AutoAttack's labels ``y_adv``; a flag
    is added when a re-evaluation's predictions ``adv_pred`` disagree with them."""
    y_cpu = y.detach().cpu()
    clean_correct = clean_pred == y_cpu
    robust = (y_adv.detach().cpu() == y_cpu) & clean_correct
    if not torch.equal(robust, (adv_pred == y_cpu) & clean_correct):
        flags.append(
            "the model's predictions at x_adv changed between AutoAttack and a re-evaluation: "
            "randomised or non-deterministic model?"
        )
    return robust, clean_correct


def _final_flags(flags: list[str], x: Tensor, x_adv: Tensor, spec: _Spec) -> list[str]:
    """``flags`` and those of the perturbation check of ``x_adv``, without repeats, each logged
    as a warning."""
    flags = flags + check_perturbation(x.detach().cpu(), x_adv.detach().cpu(), spec.eps, spec.norm)
    for f in dict.fromkeys(flags):
        logger.warning("AutoAttack check (eps=%g): %s", spec.eps, f)
    return list(dict.fromkeys(flags))


def autoattack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    version: str = "standard",
    attacks: Sequence[str] | None = None,
    batch_size: int = 256,
    seed: int | None = 0,
    device: torch.device | str | None = None,
    n_iter: int | None = None,
    n_queries: int | None = None,
    n_restarts: int | None = None,
    n_target_classes: int | None = None,
    progress: ProgressFn | None = None,
) -> AutoAttackResult:
    """Run AutoAttack on images ``x`` [N, C, H, W] in [0, 1] with labels ``y`` [N].

    Args:
        model: logits model on [0, 1] images; run in eval mode, previous mode restored.
        eps: radius ε > 0 in [0, 1] pixel space. norm: "Linf", "L2" or "L1" (any case).
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square), "plus", "rand" or "custom".
        attacks: with version "custom", a list from ``ATTACKS``, e.g. ["apgd-ce", "apgd-t"].
        batch_size: samples per attack batch. seed: AutoAttack's seed (None: time-based).
        device: where the attack runs (default: the model's device).
        n_iter: override the iterations of APGD, APGD-T and FAB (default 100; fewer is
            a weaker, cheaper evaluation). n_queries: override Square's queries (5000).
        n_restarts: override the restarts of untargeted APGD and FAB. The "standard"
            version uses 1; "custom" keeps AutoAttack's constructor default of 5.
        n_target_classes: override APGD-T's and FAB-T's target classes (min(9, classes - 1)).
        progress: called with a :class:`kdiga.progress.Progress` of each stage, the task
            "autoattack <stage>" (e.g. "autoattack apgd-t"), counting the samples attacked
            of those still robust when the stage began, after each attack batch. It costs
            one forward of each attacked batch (not counted in ``forward_evals``).

    Returns:
        ``AutoAttackResult``; ``flags`` holds pyautoattack's gradient-masking warnings.
    """
    spec = _Spec.checked(eps, norm, version, attacks)
    _check_counts(batch_size, n_iter, n_queries, n_restarts, n_target_classes)
    _check_images(x, y)
    device = torch.device(device) if device is not None else _model_device(model)
    counted = _Counted(model)
    flags: list[str] = []
    x_adv, y_adv = x.detach().clone(), y.detach().clone()
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with eval_mode(model), torch.random.fork_rng(devices=rng_devices), torch.no_grad():
        clean_pred = adv_pred = _predict(model, x, batch_size, device)
        adversary = spec.adversary(counted, seed, device)
        if len(x):
            flags += check_gradients(model, x[:batch_size].to(device), y[:batch_size].to(device))
            n_classes = model(x[:1].to(device)).shape[-1]
            _configure(adversary, n_classes, n_iter, n_queries, n_restarts, n_target_classes)
            _reset_checks()
            if progress is not None:
                robust = int((clean_pred == y.cpu()).sum())
                _StageProgress(adversary, model, robust, spec.eps, progress)
            with _capture_flags(flags):
                x_adv, y_adv = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
            adv_pred = _predict(model, x_adv, batch_size, device)
    robust, clean_correct = _outcome(y, y_adv, clean_pred, adv_pred, flags)
    flags = _final_flags(flags, x, x_adv, spec)
    return AutoAttackResult(
        robust=robust,
        clean_correct=clean_correct,
        x_adv=x_adv.detach(),
        y_adv=y_adv.detach(),
        eps=spec.eps,
        norm=spec.norm,
        version=spec.version,
        attacks=list(adversary.attacks_to_run),
        flags=flags,
        grad_evals=counted.backwards[0],
        forward_evals=counted.forwards,
    )
