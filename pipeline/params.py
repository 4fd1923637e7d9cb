"""The one schema for ``params.yaml``: every Snakemake and DVC run validates through it.

``load_params()`` reads the file, checks every key before any work starts, and returns the
validated sections with radii parsed to floats. A bad value raises :class:`ParamError`
naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("digits", "cifar10", "imagenet", "synthetic")
METHODS = ("st", "kd", "ard", "kdiga", "kdiga_ardc", "kdiga_arda")
TEACHER_METHODS = ("at", "trades")
ATTACKS = ("pgd", "autoattack")
NORMS = ("linf", "l2")
AUGMENTS = ("none", "crop", "crop_flip")
IGA_REDUCTIONS = ("per_sample_mean", "batch_frobenius")
GRAD_DTYPES = ("float32", "float16", "bfloat16")
SCHEDULES = ("cycle", "random")
GRAD_MODES = ("train", "eval")
AA_VERSIONS = ("standard", "plus", "rand", "custom")
AA_ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
TEACHER_SCHEMES = ("train", "file:", "url:", "timm:")
ID_SEP = "--"

# What the shard stage writes for each dataset (kdiga.data's defaults): the models are built for it.
DATASET_CHANNELS = {"digits": 1, "cifar10": 3, "imagenet": 3, "synthetic": 3}
DATASET_CLASSES = {"digits": 10, "cifar10": 10, "imagenet": 1000, "synthetic": 10}

# Upper bounds where a huge value would only waste a run (or overflow later).
SEED_MAX = 2**63 - 1
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000
MAX_RESTARTS = 1_000
MAX_BATCH = 2**20
MAX_VIEWS = 1_024
MAX_IMAGE_SIZE = 4_096


class ParamError(ValueError):
    """A value in params.yaml that is not allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"params: {key} = {value!r} is not allowed; {allowed}")


# -- leaf checks -------------------------------------------------------------------------


def _int(key: str, v: Any, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        top = "" if hi is None else f" and <= {'2**63 - 1' if hi == SEED_MAX else hi}"
        hint = ""
        if isinstance(v, float) and math.isfinite(v):
            hint = f" ({v!r} is a float, not an integer)"
        elif isinstance(v, str) and re.fullmatch(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*", v):
            hint = f" (YAML reads {v} as text, not a number: write the digits)"
        raise ParamError(key, v, f"expected an integer >= {lo}{top}{hint}")
    return v


def _float(key: str, v: Any, lo: float = 0.0, *, strict: bool = False) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < lo or (strict and v == lo):
        raise ParamError(key, v, f"expected a finite number {'>' if strict else '>='} {lo}")
    return float(v)


def _choice(key: str, v: Any, allowed: tuple[str, ...]) -> str:
    if v not in allowed:
        raise ParamError(key, v, f"allowed: {', '.join(allowed)}")
    return v


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ParamError(key, v, "expected true or false")
    return v


def _optional(check: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(key: str, v: Any, *args: Any, **kw: Any) -> Any:
        return None if v is None else check(key, v, *args, **kw)

    return wrapped


def parse_radius(key: str, v: Any) -> float:
    """A radius in [0, 1] pixel units: a number or a fraction string such as ``"8/255"``."""
    if isinstance(v, str) and re.fullmatch(r"\s*\d+(\.\d*)?\s*/\s*\d+(\.\d*)?\s*", v):
        num, den = (float(p) for p in v.split("/"))
        if den == 0:
            raise ParamError(key, v, "a fraction's denominator must not be 0")
        r = num / den
    elif isinstance(v, int | float) and not isinstance(v, bool):
        r = float(v)
    else:
        raise ParamError(
            key, v, "expected a radius in (0, 1] for [0, 1] images, e.g. 0.03 or 8/255"
        )
    if not math.isfinite(r) or r <= 0:
        raise ParamError(key, v, "a radius must be in (0, 1] for [0, 1] images")
    if r > 1:
        hint = f"; did you mean {v}/255?" if r <= 255 else ""
        raise ParamError(key, v, f"a radius must be in (0, 1] for [0, 1] images{hint}")
    return r


def radius_label(r: float) -> str:
    """A short, stable text for a radius: ``8/255`` when it is one, else ``0.1``."""
    frac = Fraction(r).limit_denominator(255)
    if frac.denominator == 255 and abs(float(frac) - r) < 1e-12:
        return f"{frac.numerator}/255"
    return f"{r:g}"


def _list(key: str, v: Any, item: Callable[[str, Any], Any], *, unique: bool = True) -> list:
    if not isinstance(v, list) or not v:
        raise ParamError(key, v, "expected a non-empty list")
    out = [item(f"{key}[{i}]", x) for i, x in enumerate(v)]
    if unique and len(set(map(str, out))) != len(out):
        raise ParamError(key, v, "list entries must be unique")
    return out


def _mapping(key: str, v: Any) -> dict:
    if not isinstance(v, Mapping):
        raise ParamError(key, v, "expected a mapping")
    return dict(v)


def _keys(key: str, section: Any, allowed: tuple[str, ...]) -> dict:
    section = _mapping(key, section)
    unknown = sorted(set(section) - set(allowed))
    if unknown:
        raise ParamError(
            f"{key}.{unknown[0]}", section[unknown[0]], f"known keys: {', '.join(allowed)}"
        )
    missing = [k for k in allowed if k not in section]
    if missing:
        raise ParamError(f"{key}.{missing[0]}", None, "this key is required")
    return section


def _student(key: str, v: Any) -> str:
    from kdiga.models import list_models

    names = tuple(list_models())
    if not isinstance(v, str) or not (v in names or v.startswith(("timm:", "torchvision:"))):
        raise ParamError(key, v, f"allowed: {', '.join(names)}, timm:<name>, torchvision:<name>")
    if ID_SEP in v or "/" in v:
        raise ParamError(key, v, f"a student name must not contain '{ID_SEP}' or '/'")
    return v


def _norm_stats(key: str, v: Any, *, positive: bool = False) -> list[float] | None:
    if v is None:
        return None

    def std_entry(k: str, x: Any) -> float:
        ok = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
        if not ok or x <= 0:
            raise ParamError(
                k, x, "std entries must be finite numbers > 0 (inputs are divided by them)"
            )
        return float(x)

    return _list(key, v, std_entry if positive else lambda k, x: _float(k, x), unique=False)


def _model_kwargs(key: str, v: Any) -> dict:
    kwargs = _mapping(key, v)
    for bad in ("pretrained", "weights"):
        if bad in kwargs:
            raise ParamError(
                f"{key}.{bad}",
                kwargs[bad],
                "pretrained weights are not a build option here (nothing is downloaded while "
                "building): use teacher.source timm:<name>, url:https://... or file:<path>",
            )
    return kwargs


def _teacher_source(src: Any) -> str:
    if not isinstance(src, str) or not (src == "train" or src.startswith(TEACHER_SCHEMES[1:])):
        raise ParamError("teacher.source", src, f"allowed: {', '.join(TEACHER_SCHEMES)}<...>")
    if src.startswith("url:"):
        url = src[4:]
        if url.lower().startswith("http://"):
            raise ParamError(
                "teacher.source",
                src,
                "plain http is not allowed: use url:https://..., or download the file and "
                "use file:<path>",
            )
        if not re.fullmatch(r"(?i:https://|file://)\S+", url):
            raise ParamError(
                "teacher.source", src, "allowed: url:https://<host>/<file> or url:file://<path>"
            )
    return src


def _path_exists(key: str, v: Any, what: str) -> str:
    if not isinstance(v, str) or not Path(v).exists():
        raise ParamError(key, v, f"{what} does not exist; give the path to an existing {what}")
    return v


# -- sections ----------------------------------------------------------------------------

TRAIN_KEYS = (
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "milestones",
    "augment",
    "crop_padding",
)


def _train_common(key: str, s: dict) -> dict:
    out = {
        "epochs": _int(f"{key}.epochs", s["epochs"], 0, MAX_EPOCHS),
        "batch_size": _int(f"{key}.batch_size", s["batch_size"], 1, MAX_BATCH),
        "lr": _float(f"{key}.lr", s["lr"], strict=True),
        "momentum": _float(f"{key}.momentum", s["momentum"]),
        "weight_decay": _float(f"{key}.weight_decay", s["weight_decay"]),
        "augment": _choice(f"{key}.augment", s["augment"], AUGMENTS),
        "crop_padding": _int(f"{key}.crop_padding", s["crop_padding"], 0),
    }
    ms = s["milestones"]
    if not isinstance(ms, list) or any(isinstance(m, bool) or not isinstance(m, int) for m in ms):
        raise ParamError(f"{key}.milestones", ms, "expected a list of epoch numbers")
    if ms != sorted(set(ms)) or any(m < 1 for m in ms):
        raise ParamError(f"{key}.milestones", ms, "milestones must be increasing epochs >= 1")
    out["milestones"] = ms
    if out["momentum"] >= 1:
        raise ParamError(
            f"{key}.momentum",
            s["momentum"],
            "momentum must be in [0, 1), e.g. 0.9 (1 or more diverges)",
        )
    return out


def _val_fraction(v: Any) -> float:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or not 0 < v < 1:
        raise ParamError(
            "shard.val_fraction",
            v,
            "expected a fraction in (0, 1), e.g. 0.1: the validation split cut from train is "
            "needed (each epoch's and the teacher's validation accuracy, attack.split: val, "
            "python -m pipeline.tune)",
        )
    return float(v)


def _shard(s: Any) -> dict:
    keys = ("dataset", "root", "image_size", "val_fraction", "test_samples", "max_per_shard")
    s = _keys("shard", s, keys)
    out = {
        "dataset": _choice("shard.dataset", s["dataset"], DATASETS),
        "root": s["root"],
        "image_size": _int("shard.image_size", s["image_size"], 4, MAX_IMAGE_SIZE),
        "val_fraction": _val_fraction(s["val_fraction"]),
        "test_samples": _optional(_int)("shard.test_samples", s["test_samples"], 1),
        "max_per_shard": _int("shard.max_per_shard", s["max_per_shard"], 1),
    }
    if out["dataset"] in ("cifar10", "imagenet") and out["root"] is None:
        raise ParamError(
            "shard.root", None, f"dataset {out['dataset']} needs the path to its local root"
        )
    return out


def _teacher(s: Any) -> dict:
    s = _keys("teacher", s, ("source", "arch", "arch_kwargs", "sha256", "mean", "std", "train"))
    src = _teacher_source(s["source"])
    sha = s["sha256"]
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ParamError("teacher.sha256", sha, "expected 64 lowercase hex digits or null")
    if src.startswith("url:") and sha is None:
        raise ParamError("teacher.sha256", sha, "a url: teacher needs its expected sha256")
    out = {
        "source": src,
        "arch": _student("teacher.arch", s["arch"]) if s["arch"] is not None else None,
        "arch_kwargs": _model_kwargs("teacher.arch_kwargs", s["arch_kwargs"]),
        "sha256": sha,
        "mean": _norm_stats("teacher.mean", s["mean"]),
        "std": _norm_stats("teacher.std", s["std"], positive=True),
    }
    if (src == "train" or src.startswith(("file:", "url:"))) and out["arch"] is None:
        raise ParamError("teacher.arch", None, f"a {src.split(':')[0]} teacher needs its arch")
    t = _keys(
        "teacher.train",
        s["train"],
        ("method", "eps", "steps", "step_size", "trades_beta", *TRAIN_KEYS),
    )
    out["train"] = {
        "method": _choice("teacher.train.method", t["method"], TEACHER_METHODS),
        "eps": parse_radius("teacher.train.eps", t["eps"]),
        "steps": _int("teacher.train.steps", t["steps"], 1, MAX_STEPS),
        "step_size": _optional(parse_radius)("teacher.train.step_size", t["step_size"]),
        "trades_beta": _float("teacher.train.trades_beta", t["trades_beta"]),
        **_train_common("teacher.train", t),
    }
    return out


def _distill(s: Any) -> dict:
    keys = (
        "students",
        "methods",
        "student_kwargs",
        *TRAIN_KEYS,
        "ce_weight",
        "kl_weight",
        "temperature",
        "iga",
        "adversarial",
    )
    s = _keys("distill", s, keys)
    iga = _keys("distill.iga", s["iga"], ("weight", "reduction", "grad_mode"))
    adv = _keys("distill.adversarial", s["adversarial"], ("eps", "steps", "step_size"))
    return {
        "students": _list("distill.students", s["students"], _student),
        "methods": _list("distill.methods", s["methods"], lambda k, v: _choice(k, v, METHODS)),
        "student_kwargs": _model_kwargs("distill.student_kwargs", s["student_kwargs"]),
        **_train_common("distill", s),
        "ce_weight": _float("distill.ce_weight", s["ce_weight"]),
        "kl_weight": _float("distill.kl_weight", s["kl_weight"]),
        "temperature": _float("distill.temperature", s["temperature"], strict=True),
        "iga": {
            "weight": _float("distill.iga.weight", iga["weight"]),
            "reduction": _choice("distill.iga.reduction", iga["reduction"], IGA_REDUCTIONS),
            "grad_mode": _choice("distill.iga.grad_mode", iga["grad_mode"], GRAD_MODES),
        },
        "adversarial": {
            "eps": parse_radius("distill.adversarial.eps", adv["eps"]),
            "steps": _int("distill.adversarial.steps", adv["steps"], 1, MAX_STEPS),
            "step_size": _optional(parse_radius)("distill.adversarial.step_size", adv["step_size"]),
        },
    }


def _attack(s: Any) -> dict:
    s = _keys("attack", s, ("split", "attacks", "radii", "norm", "batch_size", "pgd", "autoattack"))
    pgd = _keys("attack.pgd", s["pgd"], ("steps", "restarts", "step_size"))
    aa = _keys(
        "attack.autoattack",
        s["autoattack"],
        ("version", "attacks", "n_restarts", "n_iter", "n_target_classes"),
    )
    radii = _list("attack.radii", s["radii"], parse_radius)
    if radii != sorted(radii):
        raise ParamError("attack.radii", s["radii"], "radii must be listed in increasing order")
    version = _choice("attack.autoattack.version", aa["version"], AA_VERSIONS)
    return {
        "split": _choice("attack.split", s["split"], ("test", "val")),
        "attacks": _list("attack.attacks", s["attacks"], lambda k, v: _choice(k, v, ATTACKS)),
        "radii": radii,
        "norm": _choice("attack.norm", s["norm"], NORMS),
        "batch_size": _int("attack.batch_size", s["batch_size"], 1, MAX_BATCH),
        "pgd": {
            "steps": _int("attack.pgd.steps", pgd["steps"], 1, MAX_STEPS),
            "restarts": _int("attack.pgd.restarts", pgd["restarts"], 1, MAX_RESTARTS),
            "step_size": _optional(parse_radius)("attack.pgd.step_size", pgd["step_size"]),
        },
        "autoattack": {
            "version": version,
            "attacks": _list(
                "attack.autoattack.attacks", aa["attacks"], lambda k, v: _choice(k, v, AA_ATTACKS)
            ),
            **{
                k: _optional(_int)(f"attack.autoattack.{k}", aa[k], 1, hi)
                for k, hi in (
                    ("n_restarts", MAX_RESTARTS),
                    ("n_iter", MAX_STEPS),
                    ("n_target_classes", max(DATASET_CLASSES.values()) - 1),
                )
            },
        },
    }


def _bounds(s: Any) -> dict:
    s = _keys("bounds", s, ("radii", "samples", "steps", "restarts", "batch_size"))
    return {
        "radii": _list("bounds.radii", s["radii"], parse_radius),
        "samples": _int("bounds.samples", s["samples"], 1),
        "steps": _int("bounds.steps", s["steps"], 0, MAX_STEPS),
        "restarts": _int("bounds.restarts", s["restarts"], 1, MAX_RESTARTS),
        "batch_size": _int("bounds.batch_size", s["batch_size"], 1, MAX_BATCH),
    }


def _signals(s: Any) -> dict:
    s = _keys("signals", s, ("enabled", "views", "grad_dtype", "schedule", "batch_size"))
    return {
        "enabled": _bool("signals.enabled", s["enabled"]),
        "views": _int("signals.views", s["views"], 1, MAX_VIEWS),
        "grad_dtype": _choice("signals.grad_dtype", s["grad_dtype"], GRAD_DTYPES),
        "schedule": _choice("signals.schedule", s["schedule"], SCHEDULES),
        "batch_size": _int("signals.batch_size", s["batch_size"], 1, MAX_BATCH),
    }


def _report(s: Any) -> dict:
    s = _keys("report", s, ("figure_attack",))
    return {"figure_attack": _choice("report.figure_attack", s["figure_attack"], ATTACKS)}


SECTIONS: dict[str, Callable[[Any], dict]] = {
    "shard": _shard,
    "teacher": _teacher,
    "distill": _distill,
    "signals": _signals,
    "attack": _attack,
    "bounds": _bounds,
    "report": _report,
}


def validate(raw: Any) -> dict:
    """Check a whole params mapping; return it with radii parsed and defaults made explicit."""
    raw = _keys("params", raw, ("seed", *SECTIONS))
    out: dict[str, Any] = {"seed": _int("seed", raw["seed"], 0, SEED_MAX)}
    for name, check in SECTIONS.items():
        out[name] = check(raw[name])
    if out["report"]["figure_attack"] not in out["attack"]["attacks"]:
        raise ParamError(
            "report.figure_attack",
            out["report"]["figure_attack"],
            f"must be one of attack.attacks: {', '.join(out['attack']['attacks'])}",
        )
    _check_data_fit(out)
    sig, d = out["signals"], out["distill"]
    if sig["enabled"] and sig["views"] > 1:
        if d["augment"] == "none":
            raise ParamError(
                "signals.views",
                sig["views"],
                "distill.augment is none, so every view would be the same image: use views: 1",
            )
        if d["augment"] == "crop" and d["crop_padding"] == 0:
            raise ParamError(
                "signals.views",
                sig["views"],
                "distill.augment is crop with crop_padding 0 (no augmentation): use views: 1",
            )
    _check_models(out)
    return out


def _check_data_fit(p: dict) -> None:
    """Checks that need the dataset: crop padding vs image size, normalisation lengths, classes."""
    dataset, size = p["shard"]["dataset"], p["shard"]["image_size"]
    chans, classes = DATASET_CHANNELS[dataset], DATASET_CLASSES[dataset]
    for key, sec in (("teacher.train", p["teacher"]["train"]), ("distill", p["distill"])):
        if sec["augment"] in ("crop", "crop_flip") and sec["crop_padding"] >= size:
            raise ParamError(
                f"{key}.crop_padding",
                sec["crop_padding"],
                f"with {key}.augment {sec['augment']} the padding must be less than "
                f"shard.image_size ({size})",
            )
    t = p["teacher"]
    lengths = sorted({1, chans})
    allowed = " or ".join(map(str, lengths)) + (" values" if chans > 1 else " value")
    for key, given, other in (("mean", t["mean"], t["std"]), ("std", t["std"], t["mean"])):
        if given is None and other is not None:
            raise ParamError(
                f"teacher.{key}",
                None,
                f"teacher.{'std' if key == 'mean' else 'mean'} is given, so {key} must be too: "
                f"give both ({allowed} each) or neither",
            )
    if t["mean"] is not None:
        for key in ("mean", "std"):
            if len(t[key]) not in lengths:
                raise ParamError(
                    f"teacher.{key}",
                    t[key],
                    f"expected {allowed}: {dataset} images have {chans} channel(s)",
                )
        if len(t["mean"]) != len(t["std"]):
            raise ParamError(
                "teacher.std",
                t["std"],
                f"mean and std must have the same length; teacher.mean has {len(t['mean'])}",
            )
    n_target = p["attack"]["autoattack"]["n_target_classes"]
    if n_target is not None and n_target > classes - 1:
        raise ParamError(
            "attack.autoattack.n_target_classes",
            n_target,
            f"at most {classes - 1}: {dataset} has {classes} classes",
        )


def _check_models(p: dict) -> None:
    """Build every student (and a teacher.arch) on PyTorch's meta device, as the stages call
    ``build_model``: a bad ``*_kwargs`` stops here, not when the job runs. Nothing is
    allocated or downloaded."""
    dataset = p["shard"]["dataset"]
    data = {
        "num_classes": DATASET_CLASSES[dataset],
        "in_chans": DATASET_CHANNELS[dataset],
        "image_size": p["shard"]["image_size"],
    }
    t, d = p["teacher"], p["distill"]
    builds = [
        (f"distill.students[{i}]", s, "distill.student_kwargs", {}, d["student_kwargs"])
        for i, s in enumerate(d["students"])
    ]
    if t["arch"] is not None:  # as pipeline/teacher.py builds it
        stats = {"mean": t["mean"], "std": t["std"]}
        builds.insert(
            0, ("teacher.arch", t["arch"], "teacher.arch_kwargs", stats, t["arch_kwargs"])
        )
    for arch_key, arch, kwargs_key, stats, kwargs in builds:
        problem = _build_problem(arch, stats, data, kwargs)
        if problem:  # blame the kwargs when there are any, else the architecture itself
            key, value = (kwargs_key, kwargs) if kwargs else (arch_key, arch)
            raise ParamError(key, value, f"building {arch} for {dataset} fails: {problem}")


def _build_problem(arch: str, stats: dict, data: dict, kwargs: dict) -> str | None:
    """Why ``build_model(arch, **stats, **data, **kwargs)`` fails, or None: on the meta
    device, falling back to the CPU only when the meta device itself may be the problem."""
    import torch
    from torch.overrides import TorchFunctionMode

    from kdiga.models import build_model

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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def check_paths(params: dict, stages: tuple[str, ...] = ("shard", "teacher")) -> None:
    """Check the files params name exist (a dataset root, a teacher file): before a real run,
    not at a dry run, so the paper's presets can be inspected on a machine without them."""
    s, t = params["shard"], params["teacher"]
    if "shard" in stages and s["dataset"] in ("cifar10", "imagenet"):
        layout = {
            "cifar10": "torchvision's CIFAR-10 layout (<root>/cifar-10-batches-py/)",
            "imagenet": "an ImageFolder root (<root>/train/<wnid>/, <root>/val/<wnid>/)",
        }[s["dataset"]]
        _path_exists("shard.root", s["root"], f"directory holding {layout}")
    if "teacher" in stages and t["source"].startswith("file:"):
        _path_exists("teacher.source", t["source"][5:], "teacher checkpoint file")


def params_file() -> str:
    """The params file: $KDIGA_PARAMS when set (e.g. a preset), else params.yaml."""
    import os

    return os.environ.get("KDIGA_PARAMS", "params.yaml")


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping key given twice (plain YAML keeps the last)."""

    def construct_document(self, node: yaml.Node) -> Any:
        self._checked: set[int] = set()
        self._where: dict[int, str] = {}
        self._pairs: dict[int, list] = {}  # as written: flatten_mapping rewrites merged nodes
        todo = [(node, "")]
        while todo:  # where each mapping sits, for the message ("in distill.iga")
            n, at = todo.pop()
            if id(n) in self._where:
                continue  # an alias
            self._where[id(n)] = at
            if isinstance(n, yaml.MappingNode):
                self._pairs[id(n)] = list(n.value)
                for k, v in n.value:
                    name = k.value if isinstance(k, yaml.ScalarNode) else "?"
                    todo.append((v, f"{at}.{name}" if at else name))
            elif isinstance(n, yaml.SequenceNode):
                todo.extend((v, f"{at}[{i}]") for i, v in enumerate(n.value))
        return super().construct_document(node)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        if isinstance(node, yaml.MappingNode) and id(node) not in self._checked:
            self._checked.add(id(node))  # before flatten_mapping adds merged (<<) keys
            lines: dict[Any, int] = {}
            for k, _ in self._pairs.get(id(node), node.value):
                if k.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(k, deep=True), k.start_mark.line + 1
                try:
                    first = lines.get(key)
                except TypeError:
                    continue  # an unhashable key: the base class says so
                if first is not None:
                    at = self._where.get(id(node))
                    raise _DuplicateKeyError(
                        f"key {key!r} is given twice "
                        + (f"(lines {first} and {line}) " if first != line else f"(line {line}) ")
                        + (f"in {at}" if at else "at the top level")
                    )
                lines[key] = line
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError, text: str) -> str:
    """A YAML error on one line: what and where, without PyYAML's source excerpts."""
    if isinstance(err, yaml.reader.ReaderError):
        line = text.count("\n", 0, err.position) + 1
        return f"character #x{err.character:04x} on line {line}: {err.reason}"
    if not isinstance(err, yaml.MarkedYAMLError):
        return _one_line(err)
    parts = []
    for what, mark in ((err.context, err.context_mark), (err.problem, err.problem_mark)):
        if what:
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            parts.append(f"{what}{at}")
    return ": ".join(parts) or _one_line(err)


def read_yaml(path: str | Path) -> Any:
    """The YAML file at ``path``; a ParamError naming the file for a missing file, bytes that
    are not UTF-8, invalid YAML or a mapping key given twice."""
    path = Path(path)
    if not path.exists():
        raise ParamError("params file", str(path), "the file does not exist")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ParamError("params file", str(path), f"it cannot be read ({err.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ParamError(
            "params file",
            str(path),
            f"byte {err.start} (line {line}, 0x{data[err.start]:02x}) is not UTF-8: "
            "the file must be UTF-8 text",
        ) from None
    try:
        loader = _UniqueKeyLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except _DuplicateKeyError as err:
        raise ParamError("params file", str(path), str(err)) from None
    except yaml.YAMLError as err:
        raise ParamError(
            "params file", str(path), f"it is not valid YAML ({_yaml_problem(err, text)})"
        ) from None


def load_params(path: str | Path | None = None) -> dict:
    """Read and validate ``params.yaml``; raises :class:`ParamError` on the first bad value."""
    return validate(read_yaml(params_file() if path is None else path))


# -- model ids shared by the DAG and the stages ------------------------------------------


def student_slug(student: str) -> str:
    """A file-name-safe form of a student name (``timm:vit_small`` -> ``timm+vit_small``)."""
    return student.replace(":", "+")


def student_ids(params: dict) -> list[str]:
    """``<student>--<method>`` for every distillation job, in params order."""
    d = params["distill"]
    return [f"{student_slug(s)}{ID_SEP}{m}" for s in d["students"] for m in d["methods"]]


def parse_student_id(params: dict, model_id: str) -> tuple[str, str]:
    """The (student name, method) of a student id; a clear error for an unknown id."""
    d = params["distill"]
    for s in d["students"]:
        for m in d["methods"]:
            if f"{student_slug(s)}{ID_SEP}{m}" == model_id:
                return s, m
    raise ParamError("--model", model_id, f"known students: {', '.join(student_ids(params))}")


def model_ids(params: dict) -> list[str]:
    """Every model the attack stage evaluates: the teacher, then each student."""
    return ["teacher", *student_ids(params)]
