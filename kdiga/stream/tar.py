"""The tar reader of image shards: each shard's samples, in order, every header checked.

A missing, truncated or corrupt shard or sample, or a count that differs from the declared
one, raises :class:`kdiga.shards.ShardError` naming the shard and the sample.
"""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass

from kdiga.shards import ShardError, decode_label
from kdiga.stream.images import IMAGE_EXTS


@dataclass(frozen=True)
class RawSample:
    """One undecoded sample as read from a shard."""

    shard: str
    key: str
    ext: str
    data: bytes
    label: int
    rep: int = 0


_BLOCK = tarfile.BLOCKSIZE
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)


def _split_name(path: str, name: str) -> tuple[str, str]:
    """WebDataset's (key, extension) of a member name: the extension starts at the first dot
    of the file name."""
    head, _, base = name.rpartition("/")
    if "." not in base:
        raise ShardError(f"{path}: member {name} has no extension")
    stem, ext = base.split(".", 1)
    return f"{head}/{stem}" if head else stem, ext.lower()


def _number(field: bytes) -> int:
    """A tar header's numeric field: octal text, or GNU base-256 (high bit set)."""
    if field[:1] and field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _header(path: str, block: bytes, offset: int) -> tuple[str, int, bytes]:
    """(name, size, type flag) of a ustar/GNU header block whose checksum holds."""
    try:
        stored = _number(block[148:156])
        size = _number(block[124:136])
    except ValueError:
        stored, size = -1, -1
    if stored != sum(block) - sum(block[148:156]) + 8 * 32 or size < 0:
        raise ShardError(f"{path}: corrupt member header at byte {offset}")
    name = block[:100].split(b"\0", 1)[0]
    if block[257:263] == b"ustar\x00" and block[345] != 0:
        name = block[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "replace"), size, block[156:157]


def _tar_members(path: str) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) of each file of an uncompressed tar, read front to back.

    A small reader of the ustar/GNU/PAX layouts that ``wds.TarWriter`` and ``tar`` write,
    several times faster per member than ``tarfile``, which matters for small images. Every
    header's checksum is verified, a short member is reported, and after the end-of-archive
    block nothing but zeros may follow.
    """
    try:
        with open(path, "rb", buffering=1 << 20) as fh:
            yield from _tar_blocks(path, fh)
    except OSError as err:
        raise ShardError(f"{path}: not a readable tar shard ({err})") from err


def _tar_blocks(path: str, fh: io.BufferedReader) -> Iterator[tuple[str, str, bytes]]:
    long_name, pax = None, {}
    end = os.fstat(fh.fileno()).st_size
    while True:
        offset = fh.tell()
        block = fh.read(_BLOCK)
        if len(block) < _BLOCK:
            raise ShardError(
                f"{path}: ends at byte {offset + len(block)}, inside a member header or before "
                "the end-of-archive marker (truncated)"
            )
        if not block.strip(b"\0"):
            if fh.read().strip(b"\0"):
                raise ShardError(f"{path}: data after the end-of-archive marker at byte {offset}")
            return
        name, size, kind = _header(path, block, offset)
        size = pax.get("size", size)
        name = pax.get("path", long_name or name)
        data = _member_data(path, fh, name, size, offset, end - offset - _BLOCK)
        if kind == tarfile.XHDTYPE:
            pax = _pax_records(path, data)
        elif kind == tarfile.GNUTYPE_LONGNAME:
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind != tarfile.XGLTYPE:
            long_name, pax = None, {}
            if kind in _FILE_TYPES:
                yield (*_split_name(path, name), data)


def _member_data(
    path: str, fh: io.BufferedReader, name: str, size: int | str, offset: int, left: int
) -> bytes:
    """The data of the member whose header is at byte ``offset`` (``fh`` is then past its
    padding), its declared ``size`` checked against the ``left`` bytes after the header."""
    if not (isinstance(size, int) or size.isdigit()) or int(size) > left:
        raise ShardError(
            f"{path}: member {name[:100]} declares {str(size)[:20]} bytes at byte {offset}, "
            f"more than the {left} left in the shard (corrupt or altered header)"
        )
    size = int(size)
    data = fh.read(size)
    if len(data) < size:
        raise ShardError(f"{path}: member {name} is truncated ({len(data)} of {size} bytes)")
    fh.seek(-size % _BLOCK, os.SEEK_CUR)
    return data


def _pax_records(path: str, data: bytes) -> dict[str, str]:
    """The ``"<length> <key>=<value>\\n"`` records of a PAX extended header."""
    records, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] != b"\0":
        length = data[pos:].split(b" ", 1)[0]
        end = pos + int(length) if length.isdigit() else -1
        if end <= pos or end > len(data):
            raise ShardError(f"{path}: corrupt PAX header")
        key, _, value = data[pos + len(length) + 1 : end - 1].partition(b"=")
        records[key.decode()] = value.decode("utf-8", "replace")
        pos = end
    return records


def _sample(path: str, key: str, parts: dict[str, bytes], num_classes: int | None) -> RawSample:
    """The sample ``key`` of shard ``path`` from its members ``parts`` (extension -> bytes):
    one image and a label (checked against ``num_classes``, when given)."""
    image = [e for e in parts if e in IMAGE_EXTS]
    if len(image) != 1 or "cls" not in parts:
        raise ShardError(
            f"{path}: sample {key!r} needs one image (jpg or png) and 'cls'; has {sorted(parts)}"
        )
    try:
        label = decode_label(parts["cls"], num_classes)
    except ValueError as err:
        raise ShardError(f"{path}: sample {key!r}: {err}") from err
    return RawSample(path, key, IMAGE_EXTS[image[0]], parts[image[0]], label)


def read_shard(path: str, count: int, num_classes: int | None = None) -> Iterator[RawSample]:
    """The samples of one shard, in order, checked against the declared ``count`` (and their
    labels against ``num_classes``, when given)."""
    members = _tar_members(path)
    n, last = 0, None
    key: str | None = None
    parts: dict[str, bytes] = {}
    while True:
        try:
            member = next(members, None)
        except ShardError as err:
            where = f"after sample {last!r}" if last is not None else "before its first sample"
            raise ShardError(f"{err} ({where})") from err
        if member is None or member[0] != key:
            if key is not None:
                n += 1
                if n > count:
                    raise ShardError(f"{path}: sample {key!r} is beyond the {count} declared")
                last = key
                yield _sample(path, key, parts, num_classes)
            if member is None:
                break
            key, parts = member[0], {}
        parts[member[1]] = member[2]
    if n != count:
        raise ShardError(f"{path}: {n} samples, {count} declared (truncated or replaced?)")


def count_samples(path: str) -> int:
    """Samples in a shard, from its member headers only (the data is skipped, not read)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            keys = [_split_name(path, m.name)[0] for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"{path}: not a readable tar shard ({type(err).__name__}: {err})") from err
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])
