"""The machinery of the schema: a key, a section and named entries (:func:`key`,
:func:`section`, :func:`entries`), parsing a mapping against them (:func:`_parse`), the
generic checks (``_int``, ``_float``, ``_choice``, ... and their factories ``integer``,
``number``, ``choice``, ...), the checks of single keys, the limits they enforce, and
:class:`ParamError` with :func:`shown`, which keeps every message short."""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import stat
from collections.abc import Callable, Iterator, Mapping
from dataclasses import field
from fractions import Fraction
from pathlib import Path
from typing import Any

# The library's tables, without torch (validating params imports none; see validate's build).
from kdiga.errors import KdigaError
from kdiga.methods import method_names
from kdiga.models.catalog import BUILTIN as BUILTIN_MODELS

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


_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
)


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
            k,
            v,
            f"expected an integer >= 1 and <= {MAX_EPOCHS}: 0 epochs leaves the model "
            "untrained, and the report would show it under its method's name",
        )
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
        raise ParamError(
            k, v, "allowed: scratch, pretrained (timm or torchvision weights), file:<checkpoint>"
        )
    if v == "file:":
        raise ParamError(k, v, "name the checkpoint's path: file:<path>")
    return v


def _methods(k: str, v: Any) -> list[str]:
    names = method_names()
    return _list(k, v, lambda kk, x: _choice(kk, x, names))


def _seeds(k: str, v: Any) -> list[int]:
    return _list(k, v, lambda kk, x: _int(kk, x, 0, SEED_MAX))


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


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__
