"""Reading a params file: bounded in size, nesting, numbers and YAML aliases, plain values
only, every mapping key once (:func:`read_yaml`), then checked whole (:func:`validate`,
:func:`load_params`)."""

from __future__ import annotations

import copy
import datetime
import os
import stat
from pathlib import Path
from typing import Any

import yaml

from pipeline.params.checks import check_models, check_study, param_warnings
from pipeline.params.fields import (
    _FILE_KINDS,
    ParamError,
    _one_line,
    _parse,
    shown,
)
from pipeline.params.schema import Study

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
                at or "params",
                v,
                f"the file holds more than {MAX_VALUES:,} values (counting "
                "each use of a YAML alias): a params file needs far fewer; write them out",
            )
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    where = f"{at}.{shown(k, repr_=False)}" if at else shown(k, repr_=False)
                    raise ParamError(
                        where, x, f"a key must be text, not {type(k).__name__}: quote it"
                    )
                todo.append((x, f"{at}.{k}" if at else k))
        elif isinstance(v, list):
            todo.extend((x, f"{at}[{i}]") for i, x in enumerate(v))
        elif v is not None and not isinstance(v, str | int | float | bool):
            kind = next((n for t, n in _YAML_TYPES.items() if isinstance(v, t)), None)
            kind = kind or f"a {type(v).__name__}"
            raise ParamError(
                at or "params",
                v,
                f"{kind} is not a plain value: params take text, numbers, "
                "true/false, null, lists and mappings (quote a date or a path to give text)",
            )


def params_file() -> str:
    """The params file: $KDIGA_PARAMS when set (e.g. a preset), else params.yaml."""
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


def validate(raw: Any, *, build: bool = True) -> Study:
    """Check a whole params mapping; the :class:`Study` it describes (defaults filled in).

    ``build``: also build every model on PyTorch's meta device (:func:`check_models`), so a
    bad ``kwargs`` stops here. That imports torch (about 2 s): the DAG and the hand-offs,
    which build no model, pass False, and the Snakefile checks the models at the start of a
    real run instead; every stage job checks them (it imports torch anyway).
    """
    check_plain(raw)
    study = _parse(Study, "", raw)
    check_study(study)  # across sections, once each has its values
    object.__setattr__(study, "raw", copy.deepcopy(dict(raw)))
    object.__setattr__(study, "warnings", tuple(param_warnings(study)))
    if build:
        check_models(study)
    return study
