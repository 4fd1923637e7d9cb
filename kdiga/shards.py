"""WebDataset tar shards of uint8 images and int labels, with a JSON manifest.

A sample is two tar members, ``<key>.npy`` (the uint8 ``[C, H, W]`` array, lossless; or
``<key>.png`` when written with ``fmt="png"``) and ``<key>.cls`` (the label as decimal text).
Keys are the zero-padded sample indices, so shards read back in write order.

Small datasets are read whole into memory (``read_shards``), verifying checksums and counts;
large ones (ImageNet) stream through ``shard_dataset``, split by node and by DataLoader
worker at shard granularity.

A shard is input like any other, even one whose manifest matches it: a member's declared size
is checked against what is left of the shard before it is read, and labels against the
number of classes (``load_sharded``: the manifest's; ``read_shards``: ``num_classes=``).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from kdiga.errors import KdigaError
from kdiga.files import atomic_path, atomic_write_text, sha256_file
from kdiga.progress import ProgressFn, Tracker

logger = logging.getLogger(__name__)

FORMATS = ("npy", "png")
MANIFEST_VERSION = 1
_MTIME = 0  # fixed int mtime: identical bytes for the same data; a float adds a PAX header
PROGRESS_EVERY = 256  # images between two progress reports of a shard writer


class ShardError(KdigaError, ValueError):
    """A shard or manifest is missing, corrupt, truncated or fails its checksum."""


def _encode(image: np.ndarray, fmt: str) -> bytes:
    if fmt == "npy":
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(image), allow_pickle=False)
        return buf.getvalue()
    hwc = image.transpose(1, 2, 0)
    pil = Image.fromarray(hwc[:, :, 0] if hwc.shape[2] == 1 else hwc)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


_NPY_HEADERS: dict[bytes, tuple[int, np.dtype, tuple[int, ...], bool]] = {}


def _npy_header(data: bytes) -> tuple[int, np.dtype, tuple[int, ...], bool]:
    """(data offset, dtype, shape, fortran_order) of a ``.npy`` member; cached by the header
    bytes, which every sample of one shape and dtype shares (raises ValueError)."""
    magic = np.lib.format.MAGIC_PREFIX
    if data[: len(magic)] != magic or len(data) < 10:
        raise ValueError("not an .npy array (bad magic)")
    size_len = 2 if data[6] == 1 else 4
    start = 8 + size_len
    end = start + int.from_bytes(data[8:start], "little")
    key = bytes(data[:end])
    header = _NPY_HEADERS.get(key)
    if header is None:
        buf = io.BytesIO(key)
        version = np.lib.format.read_magic(buf)
        read = {(1, 0): np.lib.format.read_array_header_1_0}.get(
            version, np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(buf)
        if dtype.hasobject:
            raise ValueError("object arrays are not allowed")
        header = (end, dtype, tuple(shape), bool(fortran))
        if len(_NPY_HEADERS) < 64:
            _NPY_HEADERS[key] = header
    return header


def _decode_npy(data: bytes) -> np.ndarray:
    """``np.load`` of one ``.npy`` member without its per-call parsing: the header is parsed
    once per distinct header and the array is a copy of the bytes after it."""
    if data[6:7] not in (b"\x01", b"\x02"):  # another .npy version: numpy's own reader
        return np.load(io.BytesIO(data), allow_pickle=False)
    offset, dtype, shape, fortran = _npy_header(data)
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(
            f".npy payload has {len(data) - offset} bytes, its header says "
            f"{count * dtype.itemsize} (truncated or corrupt)"
        )
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C").copy()


def _decode_image(data: bytes, ext: str) -> np.ndarray:
    """Bytes of one ``.npy`` / ``.png`` member -> uint8 ``[C, H, W]`` (raises ValueError)."""
    if ext == "npy":
        arr = _decode_npy(data)
    else:
        with Image.open(io.BytesIO(data)) as img:
            arr = np.asarray(img)
        arr = arr[:, :, None] if arr.ndim == 2 else arr
        arr = arr.transpose(2, 0, 1)
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise ValueError(f"image must be uint8 [C, H, W]; got {arr.dtype} shape {arr.shape}")
    return arr


def decode_label(data: bytes, num_classes: int | None = None) -> int:
    """A ``.cls`` member's label; ValueError if it is not an integer (or, given
    ``num_classes``, not in ``[0, num_classes)``)."""
    try:
        label = int(data[:32].decode("ascii").strip()) if len(data) <= 32 else None
    except (UnicodeDecodeError, ValueError):
        label = None
    if label is None:
        raise ValueError(f"label is not an integer: {data[:20]!r}")
    if num_classes is not None and not 0 <= label < num_classes:
        raise ValueError(f"label {label} is not a class of this data (0 to {num_classes - 1})")
    return label


def check_shard_names(prefix: str, max_per_shard: int) -> None:
    """ValueError unless ``prefix`` is a plain name (no '/' or '.') and ``max_per_shard >= 1``."""
    if not prefix or "/" in prefix or "." in prefix:
        raise ValueError(f"prefix={prefix!r} must be a non-empty name without '/' or '.'")
    if max_per_shard < 1:
        raise ValueError(f"max_per_shard={max_per_shard!r} must be >= 1")


def write_tar_shards(
    samples: Iterable[tuple[str, bytes, str, int]],
    out_dir: str | os.PathLike,
    *,
    prefix: str,
    max_per_shard: int,
    track: Tracker | None = None,
) -> list[dict[str, Any]]:
    """Write ``(key, bytes, ext, label)`` samples as ``<out_dir>/<prefix>-NNNNNN.tar``: the tar
    writer of every shard (:func:`write_shards`, :mod:`kdiga.stream`'s image shards).

    A sample is the members ``<key>.<ext>`` (the bytes) and ``<key>.cls`` (the label as
    decimal text), with fixed metadata, so the same samples give the same bytes. Each shard
    holds at most ``max_per_shard`` samples, is written to a temporary file and renamed into
    place; the samples are consumed one at a time. ``track`` is told the samples written at
    the start, every :data:`PROGRESS_EVERY` and at the end of each shard.

    Returns:
        one ``{"path": str, "count": int, "sha256": str}`` per shard, in order.

    Raises:
        ValueError: no samples.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    it = iter(samples)
    entries: list[dict[str, Any]] = []
    written = 0
    if track is not None:
        track.at(0)
    for shard in itertools.count():
        first = next(it, None)
        if first is None:
            break
        path = out / f"{prefix}-{shard:06d}.tar"
        count = 0
        with (
            atomic_path(path) as tmp,
            open(tmp, "wb") as fh,
            wds.TarWriter(fh, encoder=False, mtime=_MTIME, user="kdiga", group="kdiga") as sink,
        ):
            for key, data, ext, label in itertools.chain(
                [first], itertools.islice(it, max_per_shard - 1)
            ):
                # reported once the next sample comes: a shard's last one is reported below
                if track is not None and count and (written + count) % PROGRESS_EVERY == 0:
                    track.at(written + count, f"shard {shard + 1}")
                sink.write({"__key__": key, ext: data, "cls": str(int(label)).encode("ascii")})
                count += 1
        written += count
        if track is not None:
            track.at(written, f"shard {shard + 1}")
        entries.append({"path": str(path), "count": count, "sha256": sha256_file(path)})
    if not entries:
        raise ValueError("no samples to write")
    logger.info("wrote %d samples in %d shards to %s", written, len(entries), out)
    return entries


def write_shards(
    images: Tensor,
    labels: Tensor,
    out_dir: str | os.PathLike,
    *,
    prefix: str,
    max_per_shard: int = 10000,
    fmt: str = "npy",
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Write ``images`` (uint8 ``[N, C, H, W]``) and ``labels`` (``[N]``) as tar shards.

    Shards are ``<out_dir>/<prefix>-000000.tar``, ... of at most ``max_per_shard`` samples,
    each written to a temporary file and renamed into place. Member metadata is fixed, so the
    same data always gives the same bytes. ``progress`` is called with a
    :class:`kdiga.progress.Progress` of the task "shard <prefix>" (images written of N) at
    the start, every :data:`PROGRESS_EVERY` images and at the end of each shard.

    Returns:
        one ``{"path": str, "count": int, "sha256": str}`` per shard, in order.
    """
    if fmt not in FORMATS:
        raise ValueError(f"fmt={fmt!r}; allowed: {FORMATS}")
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 [N, C, H, W]; got {images.dtype} {tuple(images.shape)}"
        )
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.numel() != images.shape[0] or labels.is_floating_point():
        raise ValueError(
            f"labels must be int [N] with N={images.shape[0]}; got {labels.dtype} "
            f"{tuple(labels.shape)}"
        )
    if images.shape[0] == 0:
        raise ValueError("no samples to write (N = 0)")
    check_shard_names(prefix, max_per_shard)
    arrays = images.cpu().numpy()
    ys = labels.cpu().tolist()
    width = max(9, len(str(len(ys) - 1)))
    samples = ((f"{i:0{width}d}", _encode(arrays[i], fmt), fmt, y) for i, y in enumerate(ys))
    track = Tracker(progress, f"shard {prefix}", len(ys), "images")
    return write_tar_shards(
        samples, out_dir, prefix=prefix, max_per_shard=max_per_shard, track=track
    )


def _lookup(table: Mapping[str, Any] | None, path: Path) -> Any:
    if table is None:
        return None
    for key in (str(path), path.name):
        if key in table:
            return table[key]
    raise ShardError(f"{path}: no entry for this shard in the given checksums/counts")


def _read_members(path: Path) -> Iterator[tuple[str, str, bytes]]:
    """(key, extension, bytes) for each file member of a tar, with tar errors as ShardError."""
    try:
        end = path.stat().st_size
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.size > end - member.offset_data:
                    raise ShardError(
                        f"{path}: member {member.name[:100]} declares {member.size} bytes, more "
                        f"than the {max(end - member.offset_data, 0)} left in the shard (corrupt "
                        "or altered header)"
                    )
                fh = tar.extractfile(member)
                data = fh.read() if fh is not None else b""
                if len(data) != member.size:
                    raise ShardError(f"{path}: member {member.name} is truncated")
                base = member.name.rsplit("/", 1)[-1]
                if "." not in base:
                    raise ShardError(f"{path}: member {member.name} has no extension")
                stem, ext = base.split(".", 1)
                yield member.name[: len(member.name) - len(base)] + stem, ext, data
            # tarfile stops silently at a bad header after the first one: what follows the
            # last good member must be the end-of-archive marker (zero blocks), nothing else.
            tar.fileobj.seek(tar.offset)
            rest = tar.fileobj.read()
            if len(rest) < 2 * tarfile.BLOCKSIZE or rest.strip(b"\0"):
                raise ShardError(
                    f"{path}: truncated or corrupt after byte {tar.offset} (no valid member "
                    "header or end-of-archive marker there)"
                )
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{path}: not a readable tar shard ({type(err).__name__}: {err})") from err


def _read_one(path: Path, num_classes: int | None = None) -> tuple[list[np.ndarray], list[int]]:
    samples: dict[str, dict[str, bytes]] = {}
    for key, ext, data in _read_members(path):
        samples.setdefault(key, {})[ext] = data
    images, labels = [], []
    for key, parts in samples.items():
        ext = next((e for e in FORMATS if e in parts), None)
        if ext is None or "cls" not in parts:
            raise ShardError(
                f"{path}: sample {key!r} needs an image ({' or '.join(FORMATS)}) and 'cls'; "
                f"has {sorted(parts)}"
            )
        try:
            images.append(_decode_image(parts[ext], ext))
            labels.append(decode_label(parts["cls"], num_classes))
        except Exception as err:  # numpy/PIL raise many types on corrupt bytes
            raise ShardError(f"{path}: sample {key!r} does not decode ({err})") from err
    return images, labels


def read_shards(
    paths: Sequence[str | os.PathLike],
    *,
    sha256: Mapping[str, str] | None = None,
    counts: Mapping[str, int] | None = None,
    num_classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Read shards whole into memory: uint8 images ``[N, C, H, W]``, int64 labels ``[N]``.

    Samples come in the order of ``paths``, then of the members in each shard. ``sha256`` and
    ``counts`` map a shard (its path as given, or its file name) to the expected checksum and
    sample count; every shard must then have an entry. ``num_classes``: labels must lie in
    ``[0, num_classes)``.

    Raises:
        ShardError: a missing, unreadable, truncated or corrupt shard, a sample without an
            image or label, a checksum or count mismatch, or images of differing shapes.
    """
    if len(paths) == 0:
        raise ValueError("no shard paths given")
    all_images: list[np.ndarray] = []
    all_labels: list[int] = []
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise ShardError(f"{path}: shard file not found")
        expected = _lookup(sha256, path)
        if expected is not None and sha256_file(path) != expected:
            raise ShardError(f"{path}: sha256 mismatch (expected {expected}); the file changed")
        images, labels = _read_one(path, num_classes)
        want = _lookup(counts, path)
        if want is not None and len(labels) != int(want):
            raise ShardError(f"{path}: {len(labels)} samples, expected {want} (truncated?)")
        if images and all_images and images[0].shape != all_images[0].shape:
            raise ShardError(
                f"{path}: image shape {images[0].shape} differs from {all_images[0].shape}"
            )
        if any(im.shape != images[0].shape for im in images):
            raise ShardError(f"{path}: images of differing shapes")
        all_images += images
        all_labels += labels
    if not all_images:
        raise ShardError(f"no samples in shards {[str(p) for p in paths]}")
    x = torch.from_numpy(np.stack(all_images))
    return x, torch.tensor(all_labels, dtype=torch.int64)


def _decode_sample(sample: dict[str, Any]) -> tuple[Tensor, Tensor]:
    url = sample.get("__url__", "?")
    key = sample.get("__key__", "?")
    ext = next((e for e in FORMATS if e in sample), None)
    if ext is None or "cls" not in sample:
        raise ShardError(f"{url}: sample {key!r} needs an image and 'cls'")
    try:
        image = _decode_image(sample[ext], ext)
        label = decode_label(sample["cls"])
    except Exception as err:
        raise ShardError(f"{url}: sample {key!r} does not decode ({err})") from err
    return torch.from_numpy(image), torch.tensor(label, dtype=torch.int64)


def shard_dataset(
    urls: str | Sequence[str | os.PathLike], *, shuffle: int = 0, seed: int = 0, epoch: int = 0
) -> wds.WebDataset:
    """Stream shards as an IterableDataset of (uint8 ``[C, H, W]``, int64 label) pairs.

    Shards are split across distributed ranks (``wds.split_by_node``, from ``RANK`` /
    ``WORLD_SIZE`` or the initialised process group) and then across DataLoader workers
    (``wds.split_by_worker``): each sample is seen exactly once per pass over all ranks and
    workers. The split is per shard, so use at least ranks x workers shards (a rank or worker
    without a shard yields nothing), and equal shard sizes for DDP.

    Args:
        urls: shard paths/URLs, or a brace pattern ``"dir/train-{000000..000009}.tar"``.
        shuffle: 0 keeps the write order; k > 0 shuffles the shard order and then samples in
            a buffer of k, seeded by (seed, epoch).
        seed: seed of the shuffle.
        epoch: pass the epoch number for a different (reproducible) order each epoch.
    """
    if shuffle < 0:
        raise ValueError(f"shuffle={shuffle!r} must be >= 0 (0: no shuffling)")
    if not isinstance(urls, str):
        urls = [str(u) for u in urls]
        if not urls:
            raise ValueError("no shard urls given")
    mixed = int(seed) * 1000003 + int(epoch)
    ds = wds.WebDataset(
        urls,
        shardshuffle=shuffle if shuffle > 0 else False,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,
        seed=mixed,
    )
    if shuffle > 0:
        ds = ds.shuffle(shuffle, seed=mixed)
    return ds.map(_decode_sample)


def write_manifest(
    entries: Sequence[Mapping[str, Any]], path: str | os.PathLike, **info: Any
) -> None:
    """Write the shard manifest JSON (atomic): shards with counts and sha256, plus ``info``.

    Shard paths are stored relative to the manifest's directory, so the directory can move.
    ``info`` carries dataset facts, e.g. dataset, split, image_size, num_classes, channels.
    """
    path = Path(path)
    shards = []
    for e in entries:
        missing = {"path", "count", "sha256"} - set(e)
        if missing:
            raise ValueError(f"manifest entry {dict(e)} lacks {sorted(missing)}")
        rel = os.path.relpath(Path(e["path"]).resolve(), path.parent.resolve())
        shards.append({"path": rel, "count": int(e["count"]), "sha256": str(e["sha256"])})
    reserved = {"version", "shards", "num_samples"} & set(info)
    if reserved:
        raise ValueError(f"info keys {sorted(reserved)} are reserved for the manifest itself")
    doc = {
        "version": MANIFEST_VERSION,
        "num_samples": sum(s["count"] for s in shards),
        **info,
        "shards": shards,
    }
    try:
        text = json.dumps(doc, indent=2, sort_keys=False)
    except TypeError as err:
        raise ValueError(f"manifest info must be JSON-serialisable: {err}") from err
    atomic_write_text(text + "\n", path)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a manifest written by ``write_manifest``; shard paths come back resolved."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError as err:
        raise ShardError(f"{path}: manifest not found") from err
    except (OSError, ValueError) as err:
        raise ShardError(f"{path}: manifest is not valid JSON ({err})") from err
    if not isinstance(doc, dict) or not isinstance(doc.get("shards"), list):
        raise ShardError(f"{path}: manifest has no 'shards' list")
    if doc.get("version") != MANIFEST_VERSION:
        raise ShardError(f"{path}: manifest version {doc.get('version')!r}, expected 1")
    for s in doc["shards"]:
        if not isinstance(s, dict) or {"path", "count", "sha256"} - set(s):
            raise ShardError(f"{path}: bad shard entry {s!r}")
        s["path"] = str(path.parent / s["path"])
    return doc


def load_sharded(manifest_path: str | os.PathLike) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """Read every shard of a manifest into memory, verifying checksums and counts, labels
    against its ``num_classes`` and the images' shape against its ``channels`` and
    ``image_size`` (when it declares them).

    Returns:
        images uint8 ``[N, C, H, W]``, labels int64 ``[N]``, and the manifest dict.
    """
    doc = read_manifest(manifest_path)
    paths = [s["path"] for s in doc["shards"]]
    classes = doc.get("num_classes")
    images, labels = read_shards(
        paths,
        sha256={s["path"]: s["sha256"] for s in doc["shards"]},
        counts={s["path"]: s["count"] for s in doc["shards"]},
        num_classes=classes if isinstance(classes, int) and not isinstance(classes, bool) else None,
    )
    want = (doc.get("channels"), doc.get("image_size"), doc.get("image_size"))
    if None not in want and tuple(images.shape[1:]) != want:
        raise ShardError(
            f"{manifest_path}: its shards hold images of shape {list(images.shape[1:])}, the "
            f"manifest declares {list(want)} (channels, image_size): run the shard stage again"
        )
    return images, labels, doc
