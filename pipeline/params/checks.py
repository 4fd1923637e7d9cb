"""Checks across keys: the grid, the data fit, the losses, the models built on the meta
device (:func:`check_models`), the files params name (:func:`check_paths`), streamed shards
for the ranks (:func:`check_train_shards`), and the warnings about settings that change less
than they seem (:func:`param_warnings`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from kdiga.methods import get_method
from kdiga.options import AUTOATTACK_VERSION_ATTACKS
from pipeline.params.fields import (
    ParamError,
    _one_line,
    _path_exists,
    _regular_file,
    radius_label,
)
from pipeline.params.schema import Shard, Study


@dataclass(frozen=True)
class ParamWarning:
    """A setting that is allowed but changes less than it seems: ``python -m pipeline.params``
    prints it, and the jobs of ``stage`` log it (those of the teacher, student or attack
    ``name`` only, when given)."""

    key: str
    text: str
    stage: str
    name: str | None = None

    def __str__(self) -> str:
        return f"params: {self.key}: {self.text}"


def param_warnings(p: Study) -> list[ParamWarning]:
    """Milestones after the last epoch, an AutoAttack list its version ignores, more
    Proposition 2 samples than the bounds use."""
    out = []
    trained = [
        ("teachers", n, t.train, f"teachers.{n}.train", "teacher")
        for n, t in p.teachers.items()
        if t.source == "train"
    ]
    students = [("students", n, p.train_settings(n), None, "distill") for n in p.students]
    for kind, name, settings, where, stage in [*trained, *students]:
        if not isinstance(settings, dict):
            settings = {k: getattr(settings, k) for k in ("epochs", "milestones")}
        epochs = settings["epochs"]
        late = [m for m in settings["milestones"] if m >= epochs]
        if not late:
            continue
        if where is None:  # a student: its own milestones, else distill's
            own = p.students[name].milestones is not None
            where = f"students.{name}" if own else "distill"
        out.append(
            ParamWarning(
                f"{where}.milestones",
                f"{', '.join(map(str, late))} {'is' if len(late) == 1 else 'are'} not below the "
                f"{epochs} epochs: the learning rate would drop after the last epoch, so no effect "
                f"on {kind[:-1]} {name}'s training",
                stage,
                name,
            )
        )
    aa = p.attack.autoattack
    runs = AUTOATTACK_VERSION_ATTACKS.get(aa.version)
    written = "attacks" in ((p.raw.get("attack") or {}).get("autoattack") or {})  # no default
    if "autoattack" in p.attack.attacks and runs and written and set(aa.attacks) != set(runs):
        out.append(
            ParamWarning(
                "attack.autoattack.attacks",
                f"[{', '.join(aa.attacks)}] is not used: version {aa.version} runs its own "
                f"attacks ({', '.join(runs)}); the list is for version custom",
                "attack",
                "autoattack",
            )
        )
    b, n_test = p.bounds, test_images(p.shard)
    used = b.samples if n_test is None else min(b.samples, n_test)
    if b.check_samples > used:
        why = "bounds.samples" if used == b.samples else f"the {used} test images"
        out.append(
            ParamWarning(
                "bounds.check_samples",
                f"{b.check_samples} is more than the {used} images the bounds use ({why}): "
                f"Proposition 2 is tested on all {used}",
                "bounds",
            )
        )
    return out


def test_images(s: Shard) -> int | None:
    """The images of the test split the shard stage writes; None for an ImageFolder root."""
    if s.info.image_folder:
        return None
    if s.dataset == "synthetic":  # as many as asked
        return s.info.test_images if s.test_samples is None else s.test_samples
    n = s.info.test_images
    return n if s.test_samples is None else min(n, s.test_samples)


def val_fraction_problem(fraction: float, class_counts: list[int] | tuple[int, ...]) -> str | None:
    """Why ``fraction`` leaves the validation or the train split empty, with the fractions
    that work, or None. The cut takes ``round(fraction * n)`` images of each class of ``n``
    (kdiga.data.split_indices): some class must give one, and some class keep one."""
    counts = [int(c) for c in class_counts if c > 0]
    if not counts:
        return "the train split holds no images"
    biggest = max(counts)
    lo = _round_up(0.5 / biggest, lambda f: round(f * biggest) >= 1)
    hi = _round_down(1 - 0.5 / biggest, lambda f: round(f * biggest) < biggest)
    if not any(round(fraction * n) for n in counts):
        side = "validation"
    elif all(round(fraction * n) == n for n in counts):
        side = "train"
    else:
        return None
    return (
        f"it leaves the {side} split empty (at most {biggest} images of a class are cut from "
        f"round(fraction x images)): use a fraction from {lo:g} to {hi:g}"
    )


def _round_up(x: float, ok: Callable[[float], bool]) -> float:
    """The shortest decimal >= ``x`` (2 significant digits) that satisfies ``ok``."""
    step = 10 ** (math.floor(math.log10(x)) - 1)
    f = math.ceil(x / step) * step
    while not ok(round(f, 12)):
        f += step
    return round(f, 12)


def _round_down(x: float, ok: Callable[[float], bool]) -> float:
    """The shortest decimal <= ``x`` (2 significant digits of 1 - x) that satisfies ``ok``."""
    step = 10 ** (math.floor(math.log10(1 - x)) - 1)
    f = math.floor(x / step) * step
    while not ok(round(f, 12)):
        f -= step
    return round(f, 12)


def check_train_shards(p: Study, manifest: Mapping, ranks: int) -> None:
    """Refuse streamed training that cannot give every DataLoader worker of every rank a
    shard of its own (kdiga.stream reads whole shards): the train split's ``manifest`` (the
    shard stage's) for ``ranks`` processes of ``shard.workers`` workers."""
    s = p.shard
    shards = sum(1 for entry in manifest.get("shards", []) if entry.get("count", 0) > 0)
    workers = max(s.workers, 1)
    if shards >= ranks * workers:
        return
    fewer = f"shard.workers: {shards // ranks} or fewer, or " if shards >= ranks else ""
    raise ParamError(
        "shard.workers",
        s.workers,
        f"the train split is {shards} shard(s), fewer than {ranks} rank(s) x {workers} "
        f"worker(s) = {ranks * workers}, and each worker of each rank reads whole shards: use "
        f"{fewer}a smaller shard.max_per_shard (now {s.max_per_shard}) and run the shard stage "
        "again, so that it writes more shards",
    )


def check_study(p: Study) -> None:
    """Checks across sections: the grid, the data fit, the figure's attack (the models:
    :func:`check_models`)."""
    methods = [get_method(m) for m in p.distill.methods]
    needy = [m.name for m in methods if m.needs_teacher]
    if needy and not p.teachers:
        raise ParamError(
            "teachers",
            {},
            f"methods {', '.join(needy)} need a teacher: name at least one under teachers",
        )
    if not p.students:
        raise ParamError("students", {}, "name at least one student under students")
    if p.report.figure_attack not in p.attack.attacks:
        raise ParamError(
            "report.figure_attack",
            p.report.figure_attack,
            f"must be one of attack.attacks: {', '.join(p.attack.attacks)}",
        )
    if p.report.claim_radius is not None and p.report.claim_radius not in p.attack.radii:
        raise ParamError(
            "report.claim_radius",
            p.report.claim_radius,
            f"must be one of attack.radii: {', '.join(map(radius_label, p.attack.radii))}",
        )
    _check_data_fit(p)
    _check_losses(p)
    sig, d = p.signals, p.distill
    if sig.enabled and sig.views > 1:
        if d.augment == "none":
            raise ParamError(
                "signals.views",
                sig.views,
                "distill.augment is none, so every view would be the same image: use views: 1",
            )
        if d.augment == "crop" and d.crop_padding == 0:
            raise ParamError(
                "signals.views",
                sig.views,
                "distill.augment is crop with crop_padding 0 (no augmentation): use views: 1",
            )


#: for each ``distill`` key a method may read that weighs a term of its loss, that weight
_TERM_WEIGHTS = {"ce_weight": "ce_weight", "kl_weight": "kl_weight", "iga": "iga.weight"}
_NO_TERM = ("temperature", "adversarial")  # keys that shape terms without weighing any


def _check_losses(p: Study) -> None:
    """Refuse a method whose every term has weight 0 (kd with ce_weight and kl_weight 0): a
    loss identically zero trains nothing. The method table says which keys each reads; a
    method with other keys (rslad, adaad, iad, igdm) always keeps a term of weight > 0."""
    for m in (get_method(name) for name in p.distill.methods):
        weights = [_TERM_WEIGHTS[k] for k in m.param_keys if k in _TERM_WEIGHTS]
        only = set(m.param_keys) <= {*_TERM_WEIGHTS, *_NO_TERM}
        if weights and only and all(p.value(f"distill.{w}") == 0 for w in weights):
            names = " and ".join(f"distill.{w}" for w in weights)
            raise ParamError(
                f"distill.{weights[0]}",
                p.value(f"distill.{weights[0]}"),
                f"method {m.name}'s loss is weighted by {names}, all 0: it would be "
                "identically zero and train nothing; give one of them a weight > 0",
            )


def _check_data_fit(p: Study) -> None:
    """Checks that need the dataset: crop padding vs image size, normalisation lengths,
    classes, a validation cut that leaves both splits some images."""
    dataset, size = p.shard.dataset, p.shard.image_size
    counts = p.shard.info.train_class_counts
    if counts is not None:
        problem = val_fraction_problem(p.shard.val_fraction, counts)
        if problem:
            raise ParamError("shard.val_fraction", p.shard.val_fraction, f"{dataset}: {problem}")
    classes = p.shard.classes
    sections = [(f"teachers.{n}.train", t.train) for n, t in p.teachers.items()]
    for k, sec in [*sections, ("distill", p.distill)]:
        if sec.augment in ("crop", "crop_flip") and sec.crop_padding >= size:
            raise ParamError(
                f"{k}.crop_padding",
                sec.crop_padding,
                f"with {k}.augment {sec.augment} the padding must be less than "
                f"shard.image_size ({size})",
            )
    _check_normalisation(p)
    n_target = p.attack.autoattack.n_target_classes
    if n_target is not None and n_target > classes - 1:
        raise ParamError(
            "attack.autoattack.n_target_classes",
            n_target,
            f"at most {classes - 1}: {dataset} has {classes} classes",
        )


def _check_normalisation(p: Study) -> None:
    """Each teacher's mean and std: both or neither, each of one value or one per channel of
    the dataset's images, of the same length."""
    dataset, chans = p.shard.dataset, p.shard.info.channels
    lengths = sorted({1, chans})
    allowed = " or ".join(map(str, lengths)) + (" values" if chans > 1 else " value")
    for name, t in p.teachers.items():
        at = f"teachers.{name}"
        for k, given, other in (("mean", t.mean, t.std), ("std", t.std, t.mean)):
            if given is None and other is not None:
                raise ParamError(
                    f"{at}.{k}",
                    None,
                    f"{at}.{'std' if k == 'mean' else 'mean'} is given, so {k} must be too: "
                    f"give both ({allowed} each) or neither",
                )
        if t.mean is not None:
            for k in ("mean", "std"):
                if len(getattr(t, k)) not in lengths:
                    raise ParamError(
                        f"{at}.{k}",
                        getattr(t, k),
                        f"expected {allowed}: {dataset} images have {chans} channel(s)",
                    )
            if len(t.mean) != len(t.std):
                raise ParamError(
                    f"{at}.std",
                    t.std,
                    f"mean and std must have the same length; {at}.mean has {len(t.mean)}",
                )


def check_models(p: Study) -> None:
    """Build every student and every teacher with an arch on PyTorch's meta device, as the
    stages call ``build_model``: a bad ``*kwargs`` stops here, not when the job runs.
    Nothing is allocated or downloaded."""
    dataset = p.shard.dataset
    builds = [
        (
            f"teachers.{n}.arch",
            t.arch,
            f"teachers.{n}.arch_kwargs",
            {"mean": t.mean, "std": t.std},
            t.arch_kwargs,
        )
        for n, t in p.teachers.items()
        if t.arch is not None
    ]
    builds += [
        (f"students.{n}.arch", s.arch, f"students.{n}.kwargs", {}, s.kwargs)
        for n, s in p.students.items()
    ]
    for arch_key, arch, kwargs_key, stats, kwargs in builds:
        problem = _build_problem(arch, stats, p.data, kwargs)
        if problem:  # blame the kwargs when there are any, else the architecture itself
            k, value = (kwargs_key, kwargs) if kwargs else (arch_key, arch)
            raise ParamError(k, value, f"building {arch} for {dataset} fails: {problem}")


def _build_problem(arch: str, stats: dict, data: dict, kwargs: dict) -> str | None:
    """Why ``build_model(arch, **stats, **data, **kwargs)`` fails, or None: on the meta
    device, falling back to the CPU only when the meta device itself may be the problem."""
    # torch only here: validate(build=False), the DAG and the hand-offs load without it
    import torch  # noqa: PLC0415 (torch-free: validate(build=False) runs without torch)
    from torch.overrides import TorchFunctionMode  # noqa: PLC0415 (torch-free: validate(build=False) runs without torch)

    from kdiga.models import build_model  # noqa: PLC0415 (torch-free: validate(build=False) runs without torch)

    def build() -> None:  # a key given twice (in_chans in the kwargs): a TypeError
        build_model(arch, **stats, **data, **kwargs)

    class NoRandomInit(TorchFunctionMode):
        # Random fills of meta tensors are no-ops: torch's meta normal_ alone imports
        # torch._dynamo (about a second).
        def __torch_function__(self, func, types, args=(), kw=None):
            name = getattr(func, "__name__", "")
            if name in _RANDOM_FILLS and args and getattr(args[0], "is_meta", False):
                return args[0]
            return func(*args, **(kw or {}))

    try:
        with torch.device("meta"), NoRandomInit():
            build()
        return None
    except (TypeError, ValueError, AssertionError) as exc:
        return _one_line(exc)
    except RuntimeError:  # perhaps an op the meta device lacks: decide on the CPU
        pass
    try:
        build()
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        return _one_line(exc)
    return None


_RANDOM_FILLS = frozenset({"normal_", "uniform_", "random_", "exponential_", "bernoulli_"})


def check_paths(params: Study, stages: tuple[str, ...] = ("shard", "teacher", "distill")) -> None:
    """Check the files params name exist (a dataset root, a teacher file, a student's init
    checkpoint): before a real run, not at a dry run, so the paper's presets can be
    inspected on a machine without them."""
    s = params.shard
    if "shard" in stages and s.dataset in ("cifar10", "imagenet"):
        layout = {
            "cifar10": "torchvision's CIFAR-10 layout (<root>/cifar-10-batches-py/)",
            "imagenet": "an ImageFolder root (<root>/train/<wnid>/, <root>/val/<wnid>/)",
        }[s.dataset]
        _path_exists("shard.root", s.root, f"directory holding {layout}")
    if "teacher" in stages:
        for name, t in params.teachers.items():
            if t.source.startswith("file:"):
                _regular_file(f"teachers.{name}.source", t.source[5:], "teacher checkpoint file")
    if "distill" in stages:
        for name, st in params.students.items():
            if st.init.startswith("file:"):
                _regular_file(f"students.{name}.init", st.init[5:], "student checkpoint file")
