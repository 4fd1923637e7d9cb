"""The one schema for ``params.yaml``: every Snakemake and DVC run validates through it.

Each key is declared once, as a field of a frozen dataclass, with its check, its default and a
one-line description (:func:`key`). ``load_params()`` reads the file, checks every key before
any work starts and returns a :class:`Study`: typed settings with radii parsed to floats and
every omitted key at its default. A bad value raises :class:`ParamError` naming the key, the
value and what is allowed. ``python -m pipeline.params --describe`` prints every key.

A study is a grid: named ``teachers``, named ``students``, ``distill.methods`` and ``seeds``.
Each (teacher, method, student, seed) is one distillation job, id
``<teacher>--<method>--<student>--s<seed>``; a method without a teacher (``st``) gives
``st--<student>--s<seed>``. Teachers are models of the study too: their id is their name.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import functools
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

# The library's tables, without torch (validating params imports none; see validate's build).
from kdiga.errors import KdigaError
from kdiga.loss_config import IGA_REDUCTIONS, STUDENT_GRAD_MODES
from kdiga.methods import TEACHER_METHODS, get_method, method_names
from kdiga.models.catalog import BUILTIN as BUILTIN_MODELS
from kdiga.options import (
    AUGMENTATIONS,
    AUTOATTACK_ATTACKS,
    AUTOATTACK_VERSION_ATTACKS,
    AUTOATTACK_VERSIONS,
    DATASET_INFO,
    DATASETS,
    GRAD_DTYPES,
    NORMS,
    SCHEDULES,
    SWEEP_ATTACKS,
    DatasetInfo,
)

TEACHER_SCHEMES = ("train", "file:", "url:", "timm:")
STUDENT_INITS = ("scratch", "pretrained", "file:")
ID_SEP = "--"
BOUNDS_SEP = "vs"  # a bounds job of a student without a teacher: <id>--vs--<teacher>
MAX_NAME = 64  # characters of a teacher's or student's name: ids and file names stay short
NAME_RE = r"[A-Za-z0-9]([A-Za-z0-9_-]*[A-Za-z0-9_])?"

MAX_CLASSES = 100_000

# Upper bounds where a huge value would only waste a run (or overflow later).
#: seeds are mixed with epoch and view numbers into torch's 64-bit generator seeds
#: (``seed * 1000003 + epoch``, kdiga.train, kdiga.signals, kdiga.data): 32 bits keep that exact
SEED_MAX = 2**32 - 1
MAX_EPOCHS = 10_000
MAX_STEPS = 100_000
MAX_RESTARTS = 1_000
MAX_BATCH = 2**20
MAX_VIEWS = 1_024
MAX_IMAGE_SIZE = 4_096
MAX_GPUS = 1_024  # devices one student trains on (pipeline.gpu.MAX_SLOTS)


MAX_SHOWN = 200  # characters of a value (or key) an error message shows at most


class ParamError(KdigaError, ValueError):
    """A value in params.yaml that is not allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        what = f"{shown(key, repr_=False)} = {shown(value)}"
        super().__init__(f"params: {what} is not allowed; {allowed}")


def shown(value: Any, limit: int = MAX_SHOWN, *, repr_: bool = True) -> str:
    """``repr(value)`` (``str`` with ``repr_=False``) cut at ``limit`` characters, built lazily:
    a value of any size (a YAML alias bomb, a 100,000-digit integer) costs ``limit``."""
    parts = _repr_parts(value, 0) if repr_ else iter([str(value)[: limit + 1]])
    text, size = [], 0
    for part in parts:
        text.append(part)
        size += len(part)
        if size > limit:
            return "".join(text)[:limit] + "..."
    return "".join(text)


def _repr_parts(v: Any, depth: int) -> Iterator[str]:
    if isinstance(v, dict | list | tuple | set | frozenset):
        if depth > 20:
            yield "..."
            return
        opening, closing = {dict: "{}", list: "[]", tuple: "()"}.get(type(v), "{}")
        yield opening
        for i, item in enumerate(v.items() if isinstance(v, dict) else v):
            yield ", " if i else ""
            if isinstance(v, dict):
                yield from _repr_parts(item[0], depth + 1)
                yield ": "
                item = item[1]
            yield from _repr_parts(item, depth + 1)
        yield closing
    elif isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 512:
        yield f"<an integer of {v.bit_length()} bits>"
    elif isinstance(v, str | bytes) and len(v) > MAX_SHOWN:
        yield repr(v[: MAX_SHOWN + 1])
    else:
        yield repr(v)


# -- leaf checks -------------------------------------------------------------------------


#: a number as YAML 1.1 may leave it as text: ``1e-5`` (no dot) and ``1_000`` are strings there
NUMBER_TEXT = re.compile(r"\s*[-+]?(\d[\d_]*\.?[\d_]*|\.\d[\d_]*)([eE][-+]?\d+)?\s*")


def as_number(v: Any) -> float | None:
    """``v`` as a float: a YAML number, or text that reads as one (``"1e-5"``, which YAML 1.1
    leaves as text); None for anything else. Every real-valued key reads its value with this
    (radii also take fractions, ``"8/255"``); ``inf`` or ``nan`` come back as they are."""
    if isinstance(v, str):
        if len(v) > 64 or not NUMBER_TEXT.fullmatch(v):
            return None
        return float(v.replace("_", ""))  # 1e999 reads as inf
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    try:
        return float(v)
    except OverflowError:  # an integer beyond a float's range
        return math.inf


def _int(key: str, v: Any, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        top = "" if hi is None else f" and <= {'2**32 - 1' if hi == SEED_MAX else hi}"
        hint = ""
        if isinstance(v, float) and math.isfinite(v):
            hint = f" ({v!r} is a float, not an integer)"
        elif isinstance(v, str) and len(v) <= 64 and NUMBER_TEXT.fullmatch(v):
            hint = f" (YAML reads {v} as text, not a number: write the digits)"
        raise ParamError(key, v, f"expected an integer >= {lo}{top}{hint}")
    return v


def _float(key: str, v: Any, lo: float = 0.0, *, strict: bool = False) -> float:
    x = as_number(v)
    if x is None or not math.isfinite(x) or x < lo or (strict and x == lo):
        raise ParamError(key, v, f"expected a finite number {'>' if strict else '>='} {lo}")
    return x


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
    fraction = r"\s*\d{1,20}(\.\d{0,20})?\s*/\s*\d{1,20}(\.\d{0,20})?\s*"
    if isinstance(v, str) and re.fullmatch(fraction, v):
        num, den = (float(p) for p in v.split("/"))
        if den == 0:
            raise ParamError(key, v, "a fraction's denominator must not be 0")
        r = num / den
    elif as_number(v) is not None:
        r = as_number(v)
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


def _arch(key: str, v: Any) -> str:
    names = tuple(sorted(BUILTIN_MODELS))
    if not isinstance(v, str) or not (v in names or v.startswith(("timm:", "torchvision:"))):
        raise ParamError(key, v, f"allowed: {', '.join(names)}, timm:<name>, torchvision:<name>")
    if v in ("timm:", "torchvision:"):
        raise ParamError(key, v, f"name the model: {v}<model name>")
    return v


def _norm_stats(key: str, v: Any, *, positive: bool = False) -> list[float] | None:
    if v is None:
        return None

    def std_entry(k: str, x: Any) -> float:
        number = as_number(x)
        if number is None or not math.isfinite(number) or number <= 0:
            raise ParamError(
                k, x, "std entries must be finite numbers > 0 (inputs are divided by them)"
            )
        return number

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


def _text(key: str, v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ParamError(key, v, "expected a path, as text")
    return v


def _path_exists(key: str, v: Any, what: str) -> str:
    if not isinstance(v, str) or not Path(v).exists():
        raise ParamError(key, v, f"{what} does not exist; give the path to an existing {what}")
    return v


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISSOCK, "a socket"))  # fmt: skip


def _regular_file(key: str, v: Any, what: str) -> str:
    """``v`` names an existing regular file (a symlink: its target), else ParamError saying
    what it is (a directory, a device, ...)."""
    _path_exists(key, v, what)
    mode = Path(v).stat().st_mode
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")
        raise ParamError(key, v, f"it is {kind}, not a file: give the path to the {what}")
    return v


# -- the declarative schema ----------------------------------------------------------------

_REQUIRED = dataclasses.MISSING
Check = Callable[[str, Any], Any]


def key(
    default: Any = _REQUIRED, check: Check | None = None, doc: str = "", *, results: bool = True
) -> Any:
    """One params key: its default (omit it for a required key), its check ``(key, value) ->
    parsed value`` raising :class:`ParamError`, and a one-line description. ``results=False``:
    outputs do not depend on it (how often to checkpoint), so it is left out of
    :meth:`Study.value` and of the params views that decide what is current."""
    meta = {"check": check, "doc": doc, "results": results}
    if default is _REQUIRED:
        return field(metadata=meta)
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str = "") -> Any:
    """A nested mapping of keys declared by the dataclass ``cls`` (every key may default)."""
    return field(default_factory=lambda: _parse(cls, "", {}), metadata={"section": cls, "doc": doc})


def entries(cls: type, doc: str = "", *, default: dict | None = None) -> Any:
    """A mapping of user-chosen names to entries declared by ``cls`` (teachers, students)."""
    meta = {"entries": cls, "doc": doc}
    if default is None:
        return field(metadata=meta)
    return field(default_factory=lambda: dict(default), metadata=meta)


def _name(key: str, v: Any) -> str:
    ok = isinstance(v, str) and len(v) <= MAX_NAME and re.fullmatch(NAME_RE, v) is not None
    if not ok or ID_SEP in v:
        raise ParamError(
            key,
            v,
            f"a name is up to {MAX_NAME} letters, digits, '_' and single '-' (starting with a "
            "letter or digit): it is part of file names, model ids and DVC stage names",
        )
    if v in method_names() or v == BOUNDS_SEP or re.fullmatch(r"s\d+", v):
        raise ParamError(
            key,
            v,
            "a teacher or student may not be named after a method ("
            f"{', '.join(method_names())}), '{BOUNDS_SEP}' or a seed (s<digits>): ids such as "
            "<teacher>--<method>--<student>--s<seed> would read alike",
        )
    return v


def _parse(cls: type, prefix: str, raw: Any) -> Any:
    """``raw`` checked against the keys ``cls`` declares: unknown keys refused, omitted keys
    at their defaults, then the section's own cross-key check (``cls.check``)."""
    where = prefix or "params"
    raw = _mapping(where, raw)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ParamError(
            f"{prefix}.{unknown[0]}" if prefix else str(unknown[0]),
            raw[unknown[0]],
            f"known keys: {', '.join(fields)}",
        )
    values: dict[str, Any] = {}
    for name, f in fields.items():
        dotted = f"{prefix}.{name}" if prefix else name
        if name not in raw:
            if "section" in f.metadata:  # every key at its default, errors named in full
                values[name] = _parse(f.metadata["section"], dotted, {})
                continue
            if f.default is _REQUIRED and f.default_factory is _REQUIRED:
                raise ParamError(dotted, None, f"this key is required ({f.metadata['doc']})")
            continue
        v = raw[name]
        if "section" in f.metadata:
            values[name] = _parse(f.metadata["section"], dotted, v)
        elif "entries" in f.metadata:
            named = _mapping(dotted, v)
            values[name] = {
                _name(f"{dotted}.{n}", n): _parse(f.metadata["entries"], f"{dotted}.{n}", e)
                for n, e in named.items()
            }
        else:
            check = f.metadata.get("check")
            values[name] = check(dotted, v) if check else v
    out = cls(**values)
    if hasattr(out, "check"):
        out.check(prefix)
    return out


def describe(cls: type | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, description) of every key, in declaration order: the reference of
    ``params.yaml`` (``python -m pipeline.params --describe``)."""
    cls = cls or Study
    rows = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        doc = f.metadata.get("doc", "")
        if "section" in f.metadata:
            rows.append((dotted, "", doc))
            rows += describe(f.metadata["section"], dotted)
        elif "entries" in f.metadata:
            rows.append((f"{dotted}.<name>", "", doc))
            rows += describe(f.metadata["entries"], f"{dotted}.<name>")
        else:
            if f.default is not _REQUIRED:
                default = f.default
            elif f.default_factory is not _REQUIRED:
                default = f.default_factory()
            else:
                default = "(required)"
            rows.append((dotted, json_text(default), doc))
    return rows


def json_text(v: Any) -> str:
    import json

    return v if v == "(required)" else json.dumps(v)


# -- check factories -------------------------------------------------------------------------


def integer(lo: int = 0, hi: int | None = None) -> Check:
    return lambda k, v: _int(k, v, lo, hi)


def number(lo: float = 0.0, *, strict: bool = False) -> Check:
    return lambda k, v: _float(k, v, lo, strict=strict)


def choice(*allowed: str) -> Check:
    return lambda k, v: _choice(k, v, allowed)


def flag(k: str, v: Any) -> bool:
    return _bool(k, v)


def optional(check: Check) -> Check:
    return lambda k, v: None if v is None else check(k, v)


def listing(item: Check, *, unique: bool = True) -> Check:
    return lambda k, v: _list(k, v, item, unique=unique)


def _epochs(k: str, v: Any) -> int:
    if v == 0 and isinstance(v, int) and not isinstance(v, bool):
        raise ParamError(
            k, v, f"expected an integer >= 1 and <= {MAX_EPOCHS}: 0 epochs leaves the model "
            "untrained, and the report would show it under its method's name",
        )  # fmt: skip
    return _int(k, v, 1, MAX_EPOCHS)


def _milestones(k: str, ms: Any) -> list[int]:
    if not isinstance(ms, list) or any(isinstance(m, bool) or not isinstance(m, int) for m in ms):
        raise ParamError(k, ms, "expected a list of epoch numbers")
    if ms != sorted(set(ms)) or any(m < 1 for m in ms):
        raise ParamError(k, ms, "milestones must be increasing epochs >= 1")
    return ms


def _momentum(k: str, v: Any) -> float:
    m = _float(k, v)
    if m >= 1:
        raise ParamError(k, v, "momentum must be in [0, 1), e.g. 0.9 (1 or more diverges)")
    return m


def _radii(k: str, v: Any) -> list[float]:
    radii = _list(k, v, parse_radius)
    if radii != sorted(radii):
        raise ParamError(k, v, "radii must be listed in increasing order")
    return radii


def _fraction(k: str, v: Any) -> float:
    w = _float(k, v)
    if w > 1:
        raise ParamError(k, v, "expected a weight in [0, 1]")
    return w


def _sha256(k: str, v: Any) -> str | None:
    if v is not None and not (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)):
        raise ParamError(k, v, "expected 64 lowercase hex digits or null")
    return v


def _val_fraction(k: str, v: Any) -> float:
    f = as_number(v)
    if f is None or not 0 < f < 1:
        raise ParamError(
            k,
            v,
            "expected a fraction in (0, 1), e.g. 0.1: the validation split cut from train is "
            "needed (each epoch's and the teacher's validation accuracy, attack.split: val, "
            "python -m pipeline.tune)",
        )
    return f


def _teacher_source(k: str, src: Any) -> str:
    if not isinstance(src, str) or not (src == "train" or src.startswith(TEACHER_SCHEMES[1:])):
        raise ParamError(k, src, f"allowed: {', '.join(TEACHER_SCHEMES)}<...>")
    if src in ("file:", "timm:"):
        what = {"file:": "the checkpoint's path: file:<path>", "timm:": "a model: timm:<name>"}
        raise ParamError(k, src, f"name {what[src]}")
    if src.startswith("url:"):
        url = src[4:]
        if url.lower().startswith("http://"):
            raise ParamError(
                k,
                src,
                "plain http is not allowed: use url:https://..., or download the file and "
                "use file:<path>",
            )
        if not re.fullmatch(r"(?i:https://|file://)\S+", url):
            raise ParamError(k, src, "allowed: url:https://<host>/<file> or url:file://<path>")
    return src


def _student_init(k: str, v: Any) -> str:
    if not isinstance(v, str) or not (v in ("scratch", "pretrained") or v.startswith("file:")):
        raise ParamError(k, v, "allowed: scratch, pretrained (timm or torchvision weights), "
                         "file:<checkpoint>")  # fmt: skip
    if v == "file:":
        raise ParamError(k, v, "name the checkpoint's path: file:<path>")
    return v


def _methods(k: str, v: Any) -> list[str]:
    names = method_names()
    return _list(k, v, lambda kk, x: _choice(kk, x, names))


def _seeds(k: str, v: Any) -> list[int]:
    return _list(k, v, lambda kk, x: _int(kk, x, 0, SEED_MAX))


# -- sections --------------------------------------------------------------------------------

#: the optimiser settings a student may override (the paper fine-tunes ViT-S at lr 1e-5)
OPTIMISER_KEYS = ("epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones")
#: every training setting shared by a teacher's training and the students'
TRAIN_KEYS = (*OPTIMISER_KEYS, "augment", "crop_padding")


@dataclass(frozen=True, kw_only=True)
class Shard:
    dataset: str = key("digits", choice(*DATASETS), "the dataset: digits, cifar10, imagenet, "
                       "synthetic")  # fmt: skip
    root: str | None = key(None, optional(_text), "dataset root (cifar10: torchvision layout; "
                           "imagenet: ImageFolder)")  # fmt: skip
    image_size: int = key(16, integer(4, MAX_IMAGE_SIZE), "images are resized to this side")
    val_fraction: float = key(0.2, _val_fraction, "held out of train for tuning; the test split "
                              "is never used to tune")  # fmt: skip
    test_samples: int | None = key(300, optional(integer(1)), "evaluate on this many random "
                                   "test images (null: all)")  # fmt: skip
    max_per_shard: int = key(10000, integer(1), "images per WebDataset shard")
    num_classes: int | None = key(None, optional(integer(2, MAX_CLASSES)), "null: the dataset's "
                                  "own (imagenet 1000); an ImageFolder root with another number "
                                  "of class folders sets it")  # fmt: skip
    resize_short: int | None = key(None, optional(integer(1, MAX_IMAGE_SIZE)), "imagenet: store "
                                   "images whose short side is longer shrunk to this side "
                                   "(null: the original JPEG bytes)")  # fmt: skip
    workers: int = key(2, integer(0, 256), "imagenet: DataLoader workers that decode and "
                       "augment streamed shards (the batch order depends on it)")  # fmt: skip
    shuffle_buffer: int = key(1000, integer(0, 10_000_000), "imagenet: samples in each "
                              "worker's shuffle buffer while training")  # fmt: skip
    max_gb: float = key(16.0, number(strict=True), "the shard stage refuses data whose images "
                        "held in memory would be larger (GB: images x channels x image_size^2 "
                        "bytes; every stage holds them)", results=False)  # fmt: skip
    seed: int = key(
        0,
        integer(0, SEED_MAX),
        "draws the validation split, the test subset, the "
        "attacks' random starts and the bounds' samples (the same for every model)",
    )

    def check(self, prefix: str) -> None:
        if self.dataset in ("cifar10", "imagenet") and self.root is None:
            raise ParamError(
                f"{prefix}.root", None, f"dataset {self.dataset} needs the path to its local root"
            )
        if self.num_classes is not None and self.dataset != "imagenet":
            raise ParamError(
                f"{prefix}.num_classes",
                self.num_classes,
                f"only an imagenet (ImageFolder) root may set its number of classes; "
                f"{self.dataset} has {self.info.classes}: use null",
            )

    @property
    def streamed(self) -> bool:
        """The training split streams from shards of image files (ImageNet, any ImageFolder)."""
        return self.info.image_folder

    @property
    def info(self) -> DatasetInfo:
        """The dataset's facts (kdiga.options.DATASET_INFO): channels, classes, sizes."""
        return DATASET_INFO[self.dataset]

    @property
    def classes(self) -> int:
        """The number of classes: ``num_classes``, or the dataset's own."""
        return self.num_classes or self.info.classes


@dataclass(frozen=True, kw_only=True)
class Training:
    """The training settings a teacher's training and the students' share (TRAIN_KEYS)."""

    epochs: int = key(15, _epochs, "training epochs")
    batch_size: int = key(64, integer(1, MAX_BATCH), "training batch size")
    lr: float = key(0.05, number(strict=True), "SGD learning rate")
    momentum: float = key(0.9, _momentum, "SGD momentum, in [0, 1)")
    weight_decay: float = key(5.0e-4, number(), "SGD weight decay")
    milestones: list = key([10], _milestones, "epochs at which the lr is divided by 10")
    augment: str = key("crop", choice(*AUGMENTATIONS), "none, crop or crop_flip (in-memory data; "
                       "streamed imagenet trains on RandomResizedCrop + flip)")  # fmt: skip
    crop_padding: int = key(2, integer(0), "pixels of padding of the random crop")
    # not in TRAIN_KEYS nor in any params view: the weights do not depend on it
    checkpoint_every: int = key(0, integer(0, MAX_STEPS), "also checkpoint every that many "
                                "steps within an epoch, to resume mid-epoch (0: at the end of "
                                "each epoch only); results do not depend on it",
                                results=False)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TeacherTrain(Training):
    method: str = key("at", choice(*TEACHER_METHODS), "at (PGD-AT) or trades")
    seed: int = key(0, integer(0, SEED_MAX), "the teacher's training seed")
    eps: float = key(0.1, parse_radius, "the training attack's radius ([0, 1] pixels)")
    steps: int = key(3, integer(1, MAX_STEPS), "PGD steps of the training attack")
    step_size: float | None = key(None, optional(parse_radius), "null: 2.5 * eps / steps")
    trades_beta: float = key(6.0, number(), "TRADES' beta")


@dataclass(frozen=True, kw_only=True)
class Teacher:
    source: str = key("train", _teacher_source, "train | file:<path> | url:<https://...> | "
                      "timm:<name>")  # fmt: skip
    arch: str | None = key(None, optional(_arch), "architecture (required unless timm:)")
    arch_kwargs: dict = key({}, lambda k, v: _model_kwargs(k, v), "architecture options")
    sha256: str | None = key(None, _sha256, "required for url:, checked for file:")
    mean: list | None = key(None, lambda k, v: _norm_stats(k, v), "input normalisation inside "
                            "the model (null: identity or the checkpoint's own)")  # fmt: skip
    std: list | None = key(None, lambda k, v: _norm_stats(k, v, positive=True), "see mean")
    max_mb: float = key(2048.0, number(strict=True), "url: a download larger than this (MB) "
                        "stops, and nothing is kept", results=False)  # fmt: skip
    train: TeacherTrain = section(TeacherTrain, "how a `train` teacher is trained")

    def check(self, prefix: str) -> None:
        if self.source == "train" and self.sha256 is not None:
            raise ParamError(
                f"{prefix}.sha256",
                self.sha256,
                "a sha256 checks a teacher's file: a train teacher reads none; use sha256: null",
            )
        if self.source.startswith("url:") and self.sha256 is None:
            raise ParamError(f"{prefix}.sha256", None, "a url: teacher needs its expected sha256")
        if (self.source == "train" or self.source.startswith(("file:", "url:"))) and (
            self.arch is None
        ):
            raise ParamError(
                f"{prefix}.arch", None, f"a {self.source.split(':')[0]} teacher needs its arch"
            )

    @property
    def kind(self) -> str:
        """How the report names it: PGD-AT, TRADES, or the source's scheme."""
        if self.source == "train":
            return {"at": "PGD-AT", "trades": "TRADES"}[self.train.method]
        return self.source.split(":", 1)[0]


@dataclass(frozen=True, kw_only=True)
class Student:
    arch: str = key(check=_arch, doc="architecture: a kdiga model, timm:<name> or "
                    "torchvision:<name>")  # fmt: skip
    init: str = key("scratch", _student_init, "scratch | pretrained (timm or torchvision "
                    "weights) | file:<checkpoint>")  # fmt: skip
    sha256: str | None = key(None, _sha256, "checked for a file: init")
    kwargs: dict = key({}, lambda k, v: _model_kwargs(k, v), "architecture options")
    epochs: int | None = key(None, optional(_epochs), "null: distill.epochs")
    batch_size: int | None = key(None, optional(integer(1, MAX_BATCH)), "null: distill's")
    lr: float | None = key(None, optional(number(strict=True)), "null: distill.lr (the paper "
                           "fine-tunes ViT-S/16 at 1e-5)")  # fmt: skip
    momentum: float | None = key(None, optional(_momentum), "null: distill.momentum")
    weight_decay: float | None = key(None, optional(number()), "null: distill.weight_decay")
    milestones: list | None = key(None, optional(_milestones), "null: distill.milestones")

    def check(self, prefix: str) -> None:
        if self.sha256 is not None and not self.init.startswith("file:"):
            raise ParamError(
                f"{prefix}.sha256",
                self.sha256,
                f"a sha256 checks an init file: {prefix}.init is {self.init}, which reads no "
                "file; use init: file:<path>, or sha256: null",
            )
        if self.init == "pretrained" and not self.arch.startswith(("timm:", "torchvision:")):
            raise ParamError(
                f"{prefix}.init",
                self.init,
                f"pretrained weights come from timm or torchvision: arch {self.arch!r} has "
                "none; use a timm:<name> or torchvision:<name> arch, or init file:<checkpoint>",
            )


@dataclass(frozen=True, kw_only=True)
class Iga:
    weight: float = key(1.0, number(), "lambda_IGA")
    reduction: str = key(
        "per_sample_mean",
        choice(*IGA_REDUCTIONS),
        "per_sample_mean | batch_frobenius (the authors' code)",
    )
    grad_mode: str = key(
        "train",
        choice(*STUDENT_GRAD_MODES),
        "the student's BatchNorm mode for its input gradient: train (the authors' code) | eval",
    )


@dataclass(frozen=True, kw_only=True)
class Adversarial:
    eps: float = key(0.1, parse_radius, "radius of the inner maximisation (ard, kdiga_ardc, "
                     "kdiga_arda, rslad, adaad, iad, igdm)")  # fmt: skip
    steps: int = key(3, integer(1, MAX_STEPS), "its PGD steps")
    step_size: float | None = key(None, optional(parse_radius), "null: 2.5 * eps / steps")


@dataclass(frozen=True, kw_only=True)
class Rslad:
    adv_weight: float = key(
        5 / 6,
        _fraction,
        "alpha: the weight of KL(T(x) || S(x+delta)); "
        "1 - alpha weighs KL(T(x) || S(x)) (Zi et al. 2021: 5/6)",
    )


def _epoch_fraction(k: str, v: Any) -> float:
    f = _float(k, v)
    if f > 1:
        raise ParamError(k, v, "expected a fraction of the epochs in [0, 1]")
    return f


@dataclass(frozen=True, kw_only=True)
class Adaad:
    alpha: float = key(1.0, _fraction, "weight of KL(T(x+delta) || S(x+delta)); 1 - alpha "
                       "weighs KL(T(x) || S(x)) (Huang et al. 2023: 1)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Iad:
    alpha: float = key(1.0, _fraction, "weight of the distillation terms; 1 - alpha weighs "
                       "CE(S(x), y) (Zhu et al. 2022: 1)")  # fmt: skip
    beta: float = key(0.1, number(), "the teacher's reliability at x+delta is "
                      "P_T(y | x+delta) ** beta (0.1)")  # fmt: skip
    warmup: float = key(0.3, _epoch_fraction, "fraction of the epochs trained as ARD before "
                        "the introspection term (0.3: epoch 60 of 200)")  # fmt: skip
    weight_teacher: bool = key(False, flag, "true: the reliability also weighs the teacher's "
                               "KL (their IAD-II); false: full weight (their IAD-I)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Igdm:
    weight: float = key(1.0, number(), "gamma: the IGDM term's weight at the last epoch, "
                        "gamma * epoch / epochs before (Lee et al. 2024: 1)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Distill(Training):
    methods: list = key(check=_methods, doc="distillation methods (kdiga.methods.METHODS)")
    ce_weight: float = key(0.5, number(), "lambda_CE of KD's loss")
    kl_weight: float = key(0.5, number(), "lambda_KL of KD's loss")
    temperature: float = key(1.0, number(strict=True), "KD temperature")
    iga: Iga = section(Iga, "the input gradient alignment term (kdiga, kdiga_ardc, kdiga_arda)")
    adversarial: Adversarial = section(Adversarial, "the inner maximisation")
    rslad: Rslad = section(Rslad, "RSLAD's loss weights")
    adaad: Adaad = section(Adaad, "AdaAD's loss weights")
    iad: Iad = section(Iad, "IAD's loss weights and warm-up")
    igdm: Igdm = section(Igdm, "IGDM's weight and its ramp")
    compile_teacher: bool = key(False, flag, "the teacher's forward and input gradient "
                                "through torch.compile (CUDA only; a compile of tens of "
                                "seconds per job against a saving per step)")  # fmt: skip
    gpus_per_job: int = key(1, integer(1, MAX_GPUS), "GPUs that train one student together: "
                            "> 1 runs it as one torchrun/DDP job holding that many devices "
                            "(the global batch is split between them)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Signals:
    enabled: bool = key(False, flag, "true: students of cacheable methods train from the "
                        "teacher's cached logits and input gradients")  # fmt: skip
    views: int = key(16, integer(1, MAX_VIEWS), "K augmented views per image (view 0 is the "
                     "image itself)")  # fmt: skip
    grad_dtype: str = key("float16", choice(*GRAD_DTYPES), "storage of the input gradients")
    schedule: str = key("cycle", choice(*SCHEDULES), "cycle: each view once per K epochs | "
                        "random")  # fmt: skip
    batch_size: int = key(256, integer(1, MAX_BATCH), "images per teacher call")
    max_gb: float = key(20.0, number(strict=True), "the stage refuses to compute a signals file "
                        "larger than this (GB: views x images x C x H x W x bytes, plus "
                        "logits)", results=False)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Pgd:
    steps: int = key(20, integer(1, MAX_STEPS), "PGD steps")
    restarts: int = key(1, integer(1, MAX_RESTARTS), "random restarts")
    step_size: float | None = key(None, optional(parse_radius), "null: 2.5 * radius / steps")


def _aa_targets(k: str, v: Any) -> int | None:
    return optional(integer(1, max(d.classes for d in DATASET_INFO.values()) - 1))(k, v)


@dataclass(frozen=True, kw_only=True)
class AutoAttackSettings:
    version: str = key("custom", choice(*AUTOATTACK_VERSIONS), "standard | plus | rand | custom")
    attacks: list = key(["apgd-ce", "apgd-dlr"], listing(choice(*AUTOATTACK_ATTACKS)),
                        "the attacks of the custom version")  # fmt: skip
    n_restarts: int | None = key(1, optional(integer(1, MAX_RESTARTS)), "APGD-CE / FAB "
                                 "restarts (null: AutoAttack's default)")  # fmt: skip
    n_iter: int | None = key(25, optional(integer(1, MAX_STEPS)), "APGD / FAB iterations "
                             "(null: 100)")  # fmt: skip
    n_target_classes: int | None = key(None, _aa_targets, "APGD-T / FAB-T targets (null: 9, or "
                                       "classes - 1)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Attack:
    split: str = key("test", choice("test", "val"), "test | val (tune on val)")
    attacks: list = key(["pgd", "autoattack"], listing(choice(*SWEEP_ATTACKS)),
                        "pgd, autoattack")  # fmt: skip
    radii: list = key([0.02, 0.05, 0.1, 0.15, 0.2], _radii, "increasing radii in [0, 1] pixel "
                      "units (write 8/255 as \"8/255\")")  # fmt: skip
    norm: str = key("linf", choice(*NORMS), "linf | l2")
    batch_size: int = key(500, integer(1, MAX_BATCH), "images per attack batch")
    compile: bool = key(False, flag, "PGD's steps through torch.compile (CUDA only)")
    pgd: Pgd = section(Pgd, "PGD-k")
    autoattack: AutoAttackSettings = section(AutoAttackSettings, "AutoAttack")


@dataclass(frozen=True, kw_only=True)
class Bounds:
    radii: list = key([0.05, 0.1], listing(parse_radius), "radii of the LLM (Table 4)")
    samples: int = key(1000, integer(1), "random test samples (the paper: 1000)")
    steps: int = key(20, integer(0, MAX_STEPS), "ascent steps of each run of the LLM "
                     "maximisation, at most")  # fmt: skip
    restarts: int = key(3, integer(1, MAX_RESTARTS), "its runs: from the FGSM corner, the "
                        "opposite corner, then random points")  # fmt: skip
    tol: float = key(3e-3, number(), "a sample stops when its relative gain over `patience` "
                     "steps is below this")  # fmt: skip
    patience: int = key(3, integer(1, MAX_STEPS), "steps over which the gain is measured")
    check_samples: int = key(200, integer(0), "samples on which Proposition 2 is tested at PGD, "
                             "random and ascent points (0: not tested)")  # fmt: skip
    batch_size: int = key(500, integer(1, MAX_BATCH), "images per batch")


@dataclass(frozen=True, kw_only=True)
class Report:
    figure_attack: str = key("pgd", choice(*SWEEP_ATTACKS), "the attack drawn in the figure")
    claim_radius: float | None = key(None, optional(parse_radius), "the radius at which the "
                                     "claims table compares robust accuracy (null: the attack "
                                     "radius nearest distill.adversarial.eps)")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class Study:
    seeds: list = key([0], _seeds, "each (teacher, method, student) is trained once per seed")
    shard: Shard = section(Shard, "data -> WebDataset shards")
    teachers: dict = entries(Teacher, "named teachers")
    students: dict = entries(Student, "named students")
    distill: Distill = section(Distill, "distillation: methods and training settings")
    signals: Signals = section(Signals, "teacher signals paid once per teacher (optional)")
    attack: Attack = section(Attack, "attack evaluation of every model")
    bounds: Bounds = section(Bounds, "local-linearity bound terms of every student (Table 4)")
    report: Report = section(Report, "the report")
    raw: dict = field(default_factory=dict, repr=False, compare=False, init=False)
    #: settings that are allowed but change less than they seem (:func:`param_warnings`)
    warnings: tuple = field(default=(), repr=False, compare=False, init=False)

    def check(self, prefix: str) -> None:
        _check_study(self)

    @functools.cached_property
    def seed_set(self) -> frozenset[int]:
        """``seeds`` as a set, for lookups."""
        return frozenset(self.seeds)

    # -- typed access ----------------------------------------------------------------------

    def value(self, dotted: str) -> Any:
        """The validated value at a dotted key (``distill.iga``, ``teachers.pgdat``), as
        plain JSON-able data."""
        node: Any = self
        for part in dotted.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        return _plain(node)

    def train_settings(self, student: str) -> dict:
        """The training settings of ``student``: distill's, with the student's overrides."""
        s, d = self.students[student], self.distill
        out = {k: getattr(d, k) for k in TRAIN_KEYS}
        out |= {k: getattr(s, k) for k in OPTIMISER_KEYS if getattr(s, k) is not None}
        return out | {"checkpoint_every": d.checkpoint_every}

    @property
    def data(self) -> dict:
        """num_classes, in_chans and image_size the models are built for."""
        return {
            "num_classes": self.shard.classes,
            "in_chans": self.shard.info.channels,
            "image_size": self.shard.image_size,
        }


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return {
            f.name: _plain(getattr(v, f.name))
            for f in dataclasses.fields(v)
            if f.init and f.metadata.get("results", True)
        }
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    return v


def validate(raw: Any, *, build: bool = True) -> Study:
    """Check a whole params mapping; the :class:`Study` it describes (defaults filled in).

    ``build``: also build every model on PyTorch's meta device (:func:`check_models`), so a
    bad ``kwargs`` stops here. That imports torch (about 2 s): the DAG and the hand-offs,
    which build no model, pass False, and the Snakefile checks the models at the start of a
    real run instead; every stage job checks them (it imports torch anyway).
    """
    check_plain(raw)
    study = _parse(Study, "", raw)
    object.__setattr__(study, "raw", copy.deepcopy(dict(raw)))
    object.__setattr__(study, "warnings", tuple(param_warnings(study)))
    if build:
        check_models(study)
    return study


#: values in a params file, counting each use of a YAML alias (the presets hold about 500)
MAX_VALUES = 100_000
#: what YAML's types other than text, numbers, booleans, null, lists and mappings are called
_YAML_TYPES = {
    datetime.datetime: "a YAML timestamp",
    datetime.date: "a YAML date",
    bytes: "YAML binary data (!!binary)",
    set: "a YAML set (!!set)",
    frozenset: "a YAML set (!!set)",
    tuple: "YAML pairs (!!omap or !!pairs)",
}


def check_plain(raw: Any) -> None:
    """Refuse, naming the key, a value that is not plain YAML (text, a number, true/false,
    null, a list, a mapping with text keys), and a document of more than :data:`MAX_VALUES`
    values, counting each use of a YAML alias: every later step (the checks, the provenance
    hashes, Snakemake's JSON, DVC) reads plain data of a bounded size."""
    todo: list[tuple[Any, str]] = [(raw, "")]
    seen = 0
    while todo:
        v, at = todo.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise ParamError(
                at or "params", v, f"the file holds more than {MAX_VALUES:,} values (counting "
                "each use of a YAML alias): a params file needs far fewer; write them out",
            )  # fmt: skip
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    where = f"{at}.{shown(k, repr_=False)}" if at else shown(k, repr_=False)
                    raise ParamError(where, x, f"a key must be text, not {type(k).__name__}: "
                                     "quote it")  # fmt: skip
                todo.append((x, f"{at}.{k}" if at else k))
        elif isinstance(v, list):
            todo.extend((x, f"{at}[{i}]") for i, x in enumerate(v))
        elif v is not None and not isinstance(v, str | int | float | bool):
            kind = next((n for t, n in _YAML_TYPES.items() if isinstance(v, t)), None)
            kind = kind or f"a {type(v).__name__}"
            raise ParamError(
                at or "params", v, f"{kind} is not a plain value: params take text, numbers, "
                "true/false, null, lists and mappings (quote a date or a path to give text)",
            )  # fmt: skip


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
        out.append(ParamWarning(
            f"{where}.milestones",
            f"{', '.join(map(str, late))} {'is' if len(late) == 1 else 'are'} not below the "
            f"{epochs} epochs: the learning rate would drop after the last epoch, so no effect "
            f"on {kind[:-1]} {name}'s training",
            stage, name,
        ))  # fmt: skip
    aa = p.attack.autoattack
    runs = AUTOATTACK_VERSION_ATTACKS.get(aa.version)
    written = "attacks" in ((p.raw.get("attack") or {}).get("autoattack") or {})  # no default
    if "autoattack" in p.attack.attacks and runs and written and set(aa.attacks) != set(runs):
        out.append(ParamWarning(
            "attack.autoattack.attacks",
            f"[{', '.join(aa.attacks)}] is not used: version {aa.version} runs its own "
            f"attacks ({', '.join(runs)}); the list is for version custom",
            "attack", "autoattack",
        ))  # fmt: skip
    b, n_test = p.bounds, test_images(p.shard)
    used = b.samples if n_test is None else min(b.samples, n_test)
    if b.check_samples > used:
        why = "bounds.samples" if used == b.samples else f"the {used} test images"
        out.append(ParamWarning(
            "bounds.check_samples",
            f"{b.check_samples} is more than the {used} images the bounds use ({why}): "
            f"Proposition 2 is tested on all {used}",
            "bounds",
        ))  # fmt: skip
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


def _check_study(p: Study) -> None:
    """Checks across sections: the grid, the data fit, the figure's attack (the models:
    :func:`check_models`)."""
    methods = [get_method(m) for m in p.distill.methods]
    needy = [m.name for m in methods if m.needs_teacher]
    if needy and not p.teachers:
        raise ParamError(
            "teachers", {},
            f"methods {', '.join(needy)} need a teacher: name at least one under teachers",
        )  # fmt: skip
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
    chans, classes = p.shard.info.channels, p.shard.classes
    sections = [(f"teachers.{n}.train", t.train) for n, t in p.teachers.items()]
    for k, sec in [*sections, ("distill", p.distill)]:
        if sec.augment in ("crop", "crop_flip") and sec.crop_padding >= size:
            raise ParamError(
                f"{k}.crop_padding",
                sec.crop_padding,
                f"with {k}.augment {sec.augment} the padding must be less than "
                f"shard.image_size ({size})",
            )
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
    n_target = p.attack.autoattack.n_target_classes
    if n_target is not None and n_target > classes - 1:
        raise ParamError(
            "attack.autoattack.n_target_classes",
            n_target,
            f"at most {classes - 1}: {dataset} has {classes} classes",
        )


def check_models(p: Study) -> None:
    """Build every student and every teacher with an arch on PyTorch's meta device, as the
    stages call ``build_model``: a bad ``*kwargs`` stops here, not when the job runs.
    Nothing is allocated or downloaded."""
    dataset = p.shard.dataset
    builds = [
        (f"teachers.{n}.arch", t.arch, f"teachers.{n}.arch_kwargs",
         {"mean": t.mean, "std": t.std}, t.arch_kwargs)
        for n, t in p.teachers.items()
        if t.arch is not None
    ]  # fmt: skip
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


def params_file() -> str:
    """The params file: $KDIGA_PARAMS when set (e.g. a preset), else params.yaml."""
    import os

    return os.environ.get("KDIGA_PARAMS", "params.yaml")


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _TooLargeError(yaml.YAMLError):
    """A document beyond what a params file needs (aliases expanding, a huge number)."""


MAX_PARAMS_BYTES = 2**20  # a params file is a few KB
MAX_DEPTH = 64  # nested lists and mappings (the schema's deepest key is 4 levels down)
MAX_DIGITS = 64  # characters of one number (a seed has at most 10 digits)
#: characters of text a params file's values stand for, counting each use of an alias: without
#: aliases they are at most the file's size
MAX_EXPANDED_CHARS = 4 * MAX_PARAMS_BYTES


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a mapping key given twice (plain YAML keeps the last)."""

    def construct_document(self, node: yaml.Node) -> Any:
        values, chars = _expanded_size(node)  # before anything is built: merges (<<) copy keys
        for count, what, cap in [
            (values, "values", MAX_VALUES),
            (chars, "characters of text", MAX_EXPANDED_CHARS),
        ]:
            if count > cap:
                amount = f"{count:,}" if count < 10**18 else "more than 10**18"
                raise _TooLargeError(
                    f"its aliases (*name) expand it to {amount} {what}; a params file holds "
                    f"at most {cap:,}: write the values out"
                )
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

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        if len(node.value) > MAX_DIGITS:  # Python refuses more than 4,300 digits deep inside
            raise _TooLargeError(
                f"the number at line {node.start_mark.line + 1} has {len(node.value):,} "
                f"characters; a params number has at most {MAX_DIGITS}"
            )
        return super().construct_yaml_int(node)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def _expanded_size(root: yaml.Node) -> tuple[int, int]:
    """(values, characters of text) that ``root`` stands for, each alias counted as a copy of
    what it names (a YAML alias bomb: kilobytes of text for billions of values, or a long
    string named a million times). A node that holds itself (``&a [*a]``) is refused."""
    size: dict[int, tuple[int, int]] = {}
    todo: list[tuple[yaml.Node, bool]] = [(root, False)]
    while todo:
        node, closing = todo.pop()
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = node.value if isinstance(node, yaml.SequenceNode) else []
        if closing:
            text = len(node.value) if isinstance(node, yaml.ScalarNode) else 0
            size[id(node)] = (
                1 + sum(size[id(c)][0] for c in children),
                text + sum(size[id(c)][1] for c in children),
            )
        elif size.get(id(node)) == _OPEN:  # met again before it closes
            raise _TooLargeError(
                f"the value at line {node.start_mark.line + 1} holds itself (an alias inside "
                "its own anchor)"
            )
        elif id(node) not in size:
            size[id(node)] = _OPEN
            todo.append((node, True))
            todo.extend((c, False) for c in children)
    return size[id(root)]


_OPEN = (-1, -1)  # _expanded_size: a node whose children are still being counted


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


def _file_problem(mode: int, size: int) -> str | None:
    """Why a file of this ``mode`` and ``size`` is not one to read as a params file."""
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _FILE_KINDS if test(mode)), "not a regular file")
        return f"it is {kind}: a params file must be a regular file"
    if size > MAX_PARAMS_BYTES:
        return (
            f"it is {size:,} bytes; a params file is at most {MAX_PARAMS_BYTES:,} bytes "
            "(1 MiB): a study's settings take a few KB"
        )
    return None


def _read_bounded(path: Path) -> bytes:
    """The bytes of the regular file ``path``, at most :data:`MAX_PARAMS_BYTES` of them: a
    device, a FIFO or a huge file is refused before a byte is read (and the open does not
    wait for a FIFO's writer)."""
    try:
        st = path.stat()
        problem = _file_problem(st.st_mode, st.st_size)
        if problem:
            raise ParamError("params file", str(path), problem)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())  # the file opened, should it have been swapped meanwhile
            problem = _file_problem(st.st_mode, st.st_size)
            if problem:
                raise ParamError("params file", str(path), problem)
            data = f.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ParamError("params file", str(path), "the file does not exist") from None
    except OSError as err:
        raise ParamError("params file", str(path), f"it cannot be read ({err.strerror})") from None
    if len(data) > MAX_PARAMS_BYTES:  # it grew while being read
        raise ParamError("params file", str(path), _file_problem(stat.S_IFREG, len(data)))
    return data


def _depth_problem(text: str) -> str | None:
    """Lists and mappings nested deeper than :data:`MAX_DEPTH`, found from the parser's events
    before anything is built (PyYAML builds nested values recursively)."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                line = event.start_mark.line + 1
                return f"lists and mappings nest more than {MAX_DEPTH} deep at line {line}"
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return None


def read_yaml(path: str | Path) -> Any:
    """The YAML file at ``path``; a ParamError naming the file for a missing file, one that
    is not a regular file or is over 1 MiB, bytes that are not UTF-8, invalid YAML, a
    mapping key given twice, or a document too large for a params file (aliases expanding to
    more than :data:`MAX_VALUES` values, nesting deeper than :data:`MAX_DEPTH`, a number of
    more than :data:`MAX_DIGITS` characters)."""
    path = Path(path)
    data = _read_bounded(path)
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
        deep = _depth_problem(text)
        if deep:
            raise _TooLargeError(deep)
        loader = _UniqueKeyLoader(text)
        try:
            return loader.get_single_data()
        finally:
            loader.dispose()
    except (_DuplicateKeyError, _TooLargeError) as err:
        raise ParamError("params file", str(path), str(err)) from None
    except yaml.YAMLError as err:
        raise ParamError(
            "params file", str(path), f"it is not valid YAML ({_yaml_problem(err, text)})"
        ) from None


def load_params(path: str | Path | None = None, *, build: bool = True) -> Study:
    """Read and validate ``params.yaml``; raises :class:`ParamError` on the first bad value.
    ``build``: as for :func:`validate`."""
    return validate(read_yaml(params_file() if path is None else path), build=build)


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


# -- the grid's model ids, shared by the DAG and the stages ----------------------------------


@dataclass(frozen=True)
class StudentJob:
    """One distillation job of the grid: (teacher, method, student, seed)."""

    teacher: str | None  # None for a method without a teacher (st)
    method: str
    student: str
    seed: int

    @property
    def id(self) -> str:
        parts = [self.teacher] if self.teacher is not None else []
        return ID_SEP.join([*parts, self.method, self.student, f"s{self.seed}"])


def student_jobs(params: Study) -> list[StudentJob]:
    """Every distillation job, in report order: students without a teacher first, then per
    teacher, method, student and seed."""
    methods = [get_method(m) for m in params.distill.methods]
    out = [
        StudentJob(None, m.name, s, seed)
        for m in methods
        if not m.needs_teacher
        for s in params.students
        for seed in params.seeds
    ]
    out += [
        StudentJob(t, m.name, s, seed)
        for t in params.teachers
        for m in methods
        if m.needs_teacher
        for s in params.students
        for seed in params.seeds
    ]
    return out


def student_ids(params: Study) -> list[str]:
    return [j.id for j in student_jobs(params)]


def teacher_ids(params: Study) -> list[str]:
    """A teacher's model id is its name."""
    return list(params.teachers)


def model_ids(params: Study) -> list[str]:
    """Every model the attack stage evaluates: the teachers, then each student."""
    return [*teacher_ids(params), *student_ids(params)]


def parse_student_id(params: Study, model_id: str) -> StudentJob:
    """The job of a student id; a clear error for an id that is not in the grid. Read from
    the id's parts (names never equal a method, nor look like a seed: :func:`_name`), in time
    independent of the grid's size: the DAG parses every student's id."""
    job = _student_job(params, model_id)
    if job is not None:
        return job
    known = student_ids(params)
    shown = ", ".join(known[:6]) + (f", ... ({len(known)} in all)" if len(known) > 6 else "")
    raise ParamError(
        "--model",
        model_id,
        "not a student of this study; ids are <teacher>--<method>--<student>--s<seed> (or "
        f"st--<student>--s<seed>): {shown}",
    )


def _student_job(params: Study, model_id: Any) -> StudentJob | None:
    parts = model_id.split(ID_SEP) if isinstance(model_id, str) else []
    if len(parts) not in (3, 4) or not re.fullmatch(r"s(0|[1-9]\d{0,9})", parts[-1]):
        return None
    teacher = parts[0] if len(parts) == 4 else None
    method, student, seed = parts[-3], parts[-2], int(parts[-1][1:])
    if method not in params.distill.methods or student not in params.students:
        return None
    if (teacher is None) == get_method(method).needs_teacher:
        return None
    if (teacher is not None and teacher not in params.teachers) or seed not in params.seed_set:
        return None
    return StudentJob(teacher, method, student, seed)


def check_teacher(params: Study, name: str) -> Teacher:
    if name not in params.teachers:
        raise ParamError("--teacher", name, f"known teachers: {', '.join(params.teachers)}")
    return params.teachers[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m pipeline.params", description="Check a params file, or list every key."
    )
    ap.add_argument("path", nargs="?", default=None, help="default: $KDIGA_PARAMS or params.yaml")
    ap.add_argument("--describe", action="store_true", help="every key, its default and meaning")
    args = ap.parse_args(argv)
    if args.describe:
        rows = describe()
        width = max(len(k) for k, _, _ in rows)
        for k, default, doc in rows:
            print(f"{k:<{width}}  {default:<24} {doc}".rstrip())
        return 0
    try:
        p = load_params(args.path)
    except ParamError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"ok: {len(p.teachers)} teacher(s), {len(p.students)} student(s), "
        f"{len(p.distill.methods)} method(s), {len(p.seeds)} seed(s): "
        f"{len(student_ids(p))} distillation jobs"
    )
    for warning in p.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
