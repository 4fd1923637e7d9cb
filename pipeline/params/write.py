"""Keys written into a params file as text, so its comments, order and layout stay as they
are (``python -m pipeline.dag`` writes the keys a job reads that the file leaves to their
defaults, for DVC, which reads params from the file alone)."""

from __future__ import annotations

from pathlib import Path

import yaml

from kdiga.files import atomic_write_text


def write_keys(path: str | Path, values: dict[str, object]) -> None:
    """Add each dotted key of ``values`` to the block-style YAML file at ``path``: at the end
    of its section's block, a missing section at the end of its parent's. One atomic write."""
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    for dotted, value in values.items():
        lines = _insert_key(lines, dotted.split("."), value)
    atomic_write_text("\n".join(lines) + "\n", path)


def _insert_key(lines: list[str], parts: list[str], value: object) -> list[str]:
    """``lines`` of a block-style YAML file with ``parts[-1]: value`` added under the mapping
    at ``parts[:-1]`` (created where missing)."""
    start, end, indent = 0, len(lines), 0
    for depth, part in enumerate(parts[:-1]):
        found = _find_key(lines, start, end, indent, part)
        if found is None:  # the section is missing: write it whole, with the value inside
            nested: object = value
            for name in reversed(parts[depth + 1 :]):
                nested = {name: nested}
            return _insert_block(lines, end, indent, {part: nested})
        start, end = found + 1, _block_end(lines, found + 1, indent)
        indent += 2
    return _insert_block(lines, end, indent, {parts[-1]: value})


def _find_key(lines: list[str], start: int, end: int, indent: int, key: str) -> int | None:
    for i in range(start, end):
        line = lines[i]
        if len(line) - len(line.lstrip(" ")) == indent and line.strip().startswith(f"{key}:"):
            return i
    return None


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index after the last line indented deeper than ``indent`` from ``start`` on
    (trailing blank lines and comments at the block's end stay outside it)."""
    end = start
    for i in range(start, len(lines)):
        text = lines[i].strip()
        if not text or text.startswith("#"):
            continue
        if len(lines[i]) - len(lines[i].lstrip(" ")) <= indent:
            break
        end = i + 1
    return end


def _insert_block(lines: list[str], at: int, indent: int, mapping: dict) -> list[str]:
    text = yaml.safe_dump(mapping, sort_keys=False, default_flow_style=False, width=100)
    block = [" " * indent + line for line in text.splitlines()]
    return [*lines[:at], *block, *lines[at:]]
