"""ImageNet-scale data: shards of the original JPEG bytes, streamed, decoded by the workers.

ImageNet's 1.28M training images do not fit in memory, and decoding them once into arrays
would multiply their size by ten. The shards here hold each image's file bytes unchanged.

Writing
-------
:func:`write_image_shards` turns an ImageFolder split (``<split_dir>/<class>/<file>``, class
index = position of the folder name in sorted order, exactly as torchvision's ``ImageFolder``)
into WebDataset tars. A sample is ``<key>.jpg`` (or ``<key>.png``, by the file's real format)
plus ``<key>.cls`` (the label as decimal text); the key is the image's index in the
``ImageFolder`` listing, zero-padded, so ``ImageFolder(split_dir).samples[int(key)]`` is its
source file. Nothing is decoded or re-encoded unless ``resize_short`` asks for it. Member
metadata is fixed, so the same input gives the same bytes on every run, and the entries
returned go to :func:`kdiga.shards.write_manifest` unchanged. :func:`write_encoded_shards`
writes the same layout from an iterable of ``(bytes, ext, label)``.

Reading: :func:`stream_loader`
------------------------------
DataLoader workers read the tars, decode and augment; the loader yields uint8 batches
``x [B, 3, S, S]`` and int64 labels ``y [B]``. Training: RandomResizedCrop(S) (scale 0.08-1,
ratio 3/4-4/3) and a horizontal flip with probability 1/2; evaluation: resize the short side
to ``round(S * 256 / 224)`` (bilinear, antialiased) and CenterCrop(S). Pixel values agree
with torchvision's PIL transforms to within 1 (rounding of the resize).

The plan of an epoch, the rule every rank computes alike from the shard counts:

1. Shard order: the written order for evaluation; for training a permutation seeded by
   (seed, epoch).
2. Shards go to ranks, then each rank's shards to its ``max(workers, 1)`` worker streams:
   taking the shards in that order, each goes to the rank (then stream) holding the fewest
   samples so far, ties to the lowest index. The split is per shard.
3. Steps per epoch, the same on every rank (so uneven shards cannot hang DDP):

   - training: ``N // (batch_size * world_size)`` for N samples in all. Rank batch ``i``
     comes from stream ``i % K`` (K streams), so stream ``w`` owes ``ceil((steps - w) / K)``
     full batches. It reads its shards in order, wrapping around to its own first sample if
     it runs short and stopping when it has enough (a rank's surplus is left out this epoch;
     another order leaves out others next epoch), then passes the samples through a shuffle
     buffer of ``shuffle_buffer`` samples seeded by (seed, epoch, rank, stream).
   - evaluation: every sample exactly once over all ranks, in the written order within each
     stream. ``steps`` is the least count for which every stream's samples fit in the batches
     it owes; every batch has ``batch_size`` rows, and rows past a stream's last sample are
     padding: zero images with label :data:`PAD_LABEL` (-100, the default ``ignore_index``
     of ``F.cross_entropy``) and key ``""``. Count correct predictions where
     ``y != PAD_LABEL`` and sum over ranks.

   Training needs every stream to hold a sample: at least ``world_size * max(workers, 1)``
   non-empty shards. A training crop and flip are drawn from a generator seeded by
   (seed, epoch, sample key, pass), pass 0 unless a stream wrapped around, so they do not
   depend on which worker decodes the sample nor when.

The order is thus a pure function of (seed, epoch, world_size, workers, batch_size) and the
shard counts; ``workers=0`` (decoding in the main process) gives the order of ``workers=1``.

Resuming mid-epoch
------------------
``start_batch=k`` yields exactly the batches an uninterrupted epoch yields from batch ``k``
on: each stream skips the samples of its batches before ``k`` after reading them, without
decoding them, and the DataLoader workers take the streams rotated by ``k`` so the batches
still come in order. :meth:`StreamLoader.state_dict` returns ``{"epoch", "batch", ...}``,
``batch`` being the number of batches of the epoch yielded so far (``start_batch`` included);
checkpoint it after the optimiser step on the last yielded batch, and resume with
:meth:`StreamLoader.load_state_dict` (or ``epoch=``, ``start_batch=``). With ``batch ==
len(loader)`` the epoch is complete: call :meth:`StreamLoader.set_epoch` with the next one.

Decoding on the GPU
-------------------
``decode="cuda"``: workers read the bytes, draw the crop (from the JPEG header's size) and
yield the bytes; the main process decodes each batch with :func:`decode_jpeg_batch`
(``torchvision.io.decode_jpeg`` on the device, batched) and applies the same crops and flips
there. PNG samples are decoded by the workers on the CPU. Batches then live on the device.

Errors: a file that is not a decodable JPEG or PNG (when writing), and a missing, truncated
or corrupt shard or sample (when reading), raise :class:`kdiga.shards.ShardError` naming the
file, or the shard and the sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import logging
import math
import operator
import os
import random
import stat
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

# imported here, not where used, so that DataLoader workers forked per epoch find them loaded
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from kdiga.data import DatasetNotFoundError
from kdiga.files import sha256_file
from kdiga.progress import ProgressFn, Tracker
from kdiga.shards import (
    ShardError,
    check_shard_names,
    decode_label,
    read_manifest,
    write_tar_shards,
)

logger = logging.getLogger(__name__)

#: JPEG quality of the images that ``resize_short`` re-encodes.
JPEG_QUALITY = 90
#: Label of the padding rows of evaluation batches (``F.cross_entropy``'s ``ignore_index``).
PAD_LABEL = -100
#: Ratio of the evaluation resize to the crop (the usual 256 / 224).
EVAL_RESIZE_RATIO = 256 / 224
DECODES = ("cpu", "cuda")

_READ_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png"}
_PIL_EXTS = {"JPEG": "jpg", "PNG": "png"}
_SCALE = (0.08, 1.0)
_RATIO = (3 / 4, 4 / 3)


def _mix(*parts: Any) -> int:
    """A 64-bit seed from ``parts``, the same in every process and on every run."""
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little")


# --- writing ------------------------------------------------------------------------------


_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_size(data: bytes, name: str) -> tuple[int, int]:
    """(width, height) from a JPEG's frame header, walking its marker segments to the scan."""
    pos, size = 2, None
    while True:
        while data[pos : pos + 2] == b"\xff\xff":  # fill bytes
            pos += 1
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise ShardError(f"{name}: not a decodable image (no JPEG marker at byte {pos})")
        marker = data[pos + 1]
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            pos += 2
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if length < 2 or pos + 2 + length > len(data):
            raise ShardError(f"{name}: JPEG is truncated (segment at byte {pos} runs past its end)")
        if marker in _SOF_MARKERS and length >= 8:
            size = (
                int.from_bytes(data[pos + 7 : pos + 9], "big"),
                int.from_bytes(data[pos + 5 : pos + 7], "big"),
            )
        elif marker == 0xDA:
            if size is None:
                raise ShardError(
                    f"{name}: not a decodable image (JPEG scan without a frame header)"
                )
            return size
        elif marker == 0xD9:
            raise ShardError(f"{name}: not a decodable image (JPEG ends before its scan)")
        pos += 2 + length


def _probe(data: bytes, name: str) -> tuple[str, int, int]:
    """(PIL format, width, height) of an encoded image, checked cheaply (raises ShardError).

    A JPEG's marker segments must be whole up to its scan, with a frame header giving the
    size, and an end-of-image marker must follow the last scan (neither marker can occur in
    the entropy-coded data, so a truncated JPEG fails). Other formats must open with PIL; a
    PNG's chunks must pass their checksums up to IEND.
    """
    if data[:3] == b"\xff\xd8\xff":
        fmt, (width, height) = "JPEG", _jpeg_size(data, name)
        if data.rfind(b"\xff\xd9") < data.rfind(b"\xff\xda"):
            raise ShardError(f"{name}: JPEG is truncated (no end-of-image marker after its scan)")
    else:
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (width, height) = img.format or "?", img.size
                if fmt == "PNG":
                    img.verify()
        except Exception as err:  # PIL raises many types on bad bytes
            raise ShardError(
                f"{name}: not a decodable image ({type(err).__name__}: {err})"
            ) from err
    if width < 1 or height < 1:
        raise ShardError(f"{name}: image of size {width}x{height}")
    return fmt, width, height


def _reencode(data: bytes, name: str, short: int) -> bytes:
    """Decode, shrink so the short side is at most ``short`` (bicubic), encode as JPEG."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            rgb = img.convert("RGB")
    except Exception as err:
        raise ShardError(f"{name}: not a decodable image ({type(err).__name__}: {err})") from err
    width, height = rgb.size
    if min(width, height) > short:  # torchvision's Resize(int) sizes: the long side truncated
        if width <= height:
            size = (short, int(short * height / width))
        else:
            size = (int(short * width / height), short)
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling="4:2:0")
    return buf.getvalue()


def _prepare(data: bytes, name: str, resize_short: int | None) -> tuple[bytes, str]:
    """(bytes, ext) to store for one image file: its own bytes, or a shrunk JPEG."""
    fmt, width, height = _probe(data, name)
    ext = _PIL_EXTS.get(fmt)
    if resize_short is not None and (ext is None or min(width, height) > resize_short):
        return _reencode(data, name, resize_short), "jpg"
    if ext is None:
        raise ShardError(
            f"{name}: a {fmt} image; shards store JPEG and PNG files as they are: convert it, "
            "or pass resize_short to re-encode it as JPEG"
        )
    return data, ext


def write_encoded_shards(
    samples: Iterable[tuple[bytes, str, int]],
    out_dir: str | os.PathLike,
    *,
    prefix: str,
    max_per_shard: int = 1000,
) -> list[dict[str, Any]]:
    """Write already encoded images as shards: one ``(bytes, ext, label)`` per sample.

    Keys are the running sample index, zero-padded to 9 digits. Each image is checked as
    :func:`write_image_shards` checks files, and must be of the format ``ext`` says. The
    samples are consumed one at a time, so a generator of any length is fine.

    Args:
        samples: ``(encoded bytes, "jpg" | "jpeg" | "png", label >= 0)`` per sample.
        out_dir: directory of the shards (created).
        prefix: shard file prefix: ``<out_dir>/<prefix>-000000.tar``, ...
        max_per_shard: samples per shard (the last may have fewer).

    Returns:
        one ``{"path": str, "count": int, "sha256": str}`` per shard, in order, as
        :func:`kdiga.shards.write_shards` returns.

    Raises:
        ShardError: a sample that is not a decodable image of its format.
        ValueError: a bad extension, label, prefix or ``max_per_shard``, or no samples.
    """
    check_shard_names(prefix, max_per_shard)

    def items() -> Iterator[tuple[str, bytes, str, int]]:
        for i, (data, ext, label) in enumerate(samples):
            name = f"sample {i}"
            stored = _READ_EXTS.get(str(ext).lower())
            if stored is None:
                raise ValueError(f"{name}: ext={ext!r}; allowed: jpg, jpeg, png")
            try:
                label = -1 if isinstance(label, bool) else operator.index(label)
            except TypeError:
                label = -1
            if label < 0:
                raise ValueError(f"{name}: its label must be an int >= 0")
            fmt = _probe(bytes(data), name)[0]
            if _PIL_EXTS.get(fmt) != stored:
                raise ShardError(f"{name}: ext {ext!r} but the bytes are a {fmt} image")
            yield f"{i:09d}", bytes(data), stored, label

    return write_tar_shards(items(), out_dir, prefix=prefix, max_per_shard=max_per_shard)


def list_image_folder(split_dir: str | os.PathLike) -> tuple[list[tuple[str, int]], list[str]]:
    """(``[(path, class index)]``, class names) of an ImageFolder split, as torchvision lists it.

    Classes are the sorted sub-folder names; files are those with an image extension, in
    torchvision's ``make_dataset`` order, so the list equals ``ImageFolder(split_dir).samples``
    for a folder of plain files and folders. What torchvision would follow or open blindly is
    refused, naming it (nothing is opened while listing): a symlinked folder (its images would
    be trained under the class holding the link; one to ``/`` walks the whole filesystem), a
    symlink leading out of ``split_dir``, and an image name that is not a regular file (a
    FIFO would hang the shard job). A symlink to a regular file inside ``split_dir`` is read.

    Raises:
        DatasetNotFoundError: no such directory, no class folders, or a class without images.
        ShardError: a symlinked folder, a symlink out of ``split_dir``, or a special file.
    """
    root = Path(split_dir)
    if not root.is_dir():
        raise DatasetNotFoundError(f"{root}: no such directory (expected <split_dir>/<class>/*)")
    real = os.path.realpath(root)
    with os.scandir(root) as it:
        entries = sorted(it, key=operator.attrgetter("name"))
    classes = [e.name for e in entries if e.is_dir()]
    if not classes:
        raise DatasetNotFoundError(f"{root}: not an ImageFolder split (no class folders)")
    samples, empty = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        if os.path.islink(folder):
            raise _link_error(folder, real)
        found = [
            (os.path.join(where, f), index)
            for where, files in sorted(_image_files(folder, real))
            for f in sorted(files)
        ]
        samples += found
        if not found:
            empty.append(name)
    if empty:
        raise DatasetNotFoundError(
            f"{root}: not an ImageFolder split (no image files for the classes "
            f"{', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''}; extensions: "
            f"{', '.join(IMG_EXTENSIONS)})"
        )
    return samples, classes


def _image_files(top: str, real_root: str) -> Iterator[tuple[str, list[str]]]:
    """(folder, names of its image files) for ``top`` and every folder below it, following
    no symlinked folder; an image name that is a special file or a symlink leaving
    ``real_root`` raises ShardError."""
    stack = [top]
    while stack:
        where = stack.pop()
        files = []
        with os.scandir(where) as it:
            for e in it:
                if e.is_symlink():
                    if os.path.isdir(e.path):
                        raise _link_error(e.path, real_root)
                    if e.name.lower().endswith(IMG_EXTENSIONS):
                        _check_linked_file(e.path, real_root)
                        files.append(e.name)
                elif e.is_dir(follow_symlinks=False):
                    stack.append(e.path)
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    if not e.is_file(follow_symlinks=False):
                        raise ShardError(
                            f"{e.path}: {_kind(e.path)} named like an image, not a regular file: "
                            "remove it from the ImageFolder (reading it could block forever)"
                        )
                    files.append(e.name)
        yield where, files


def _kind(path: str) -> str:
    mode = os.lstat(path).st_mode
    kinds = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    return next((name for test, name in kinds if test(mode)), "a special file")


def _link_error(path: str, real_root: str) -> ShardError:
    return ShardError(
        f"{path}: a symlink to the folder {os.path.realpath(path)}; an ImageFolder class holds "
        f"files, and symlinked folders are not followed (under {real_root} its images would "
        "be trained as this class): remove the link, or copy the images in"
    )


def _check_linked_file(path: str, real_root: str) -> None:
    target = os.path.realpath(path)
    if os.path.commonpath([real_root, target]) != real_root:
        raise ShardError(
            f"{path}: a symlink to {target}, out of the ImageFolder {real_root}; no link out "
            "of it is followed: copy the file in, or remove the link"
        )
    if not os.path.isfile(target):
        what = "nothing (a broken link)" if not os.path.lexists(target) else _kind(target)
        raise ShardError(f"{path}: a symlink to {what}, not an image file: remove it")


def _write_order(n: int, indices: Sequence[int] | None, shuffle_seed: int | None) -> list[int]:
    if indices is None:
        order = list(range(n))
    else:
        order = [int(i) for i in indices]
        bad = [i for i in order if not 0 <= i < n]
        if bad or len(set(order)) != len(order) or not order:
            raise ValueError(
                f"indices must be distinct ints in [0, {n}) (the folder's {n} images), at least "
                f"one; got {len(order)} indices" + (f", out of range: {bad[:5]}" if bad else "")
            )
    if shuffle_seed is not None:
        random.Random(_mix("write", int(shuffle_seed))).shuffle(order)
    return order


def write_image_shards(
    split_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    prefix: str,
    max_per_shard: int = 1000,
    resize_short: int | None = None,
    indices: Sequence[int] | None = None,
    shuffle_seed: int | None = None,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Write an ImageFolder split as WebDataset shards of the original image file bytes.

    A sample is ``<key>.jpg`` or ``<key>.png`` (the file's real format, whatever its name
    says) and ``<key>.cls``; the key is the image's index in :func:`list_image_folder`
    (``ImageFolder.samples``) zero-padded to at least 9 digits. Every file's header is checked
    (see the module docstring); nothing is decoded unless ``resize_short`` is given. Same
    input, same bytes.

    Args:
        split_dir: ``<split_dir>/<class>/<image file>``.
        out_dir: directory of the shards (created).
        prefix: shard file prefix: ``<out_dir>/<prefix>-000000.tar``, ...
        max_per_shard: samples per shard (the last may have fewer). Use at least
            ``world_size * workers`` shards for training.
        resize_short: if given, an image whose short side is longer is decoded, shrunk to
            that short side (bicubic) and stored as a JPEG of quality :data:`JPEG_QUALITY`;
            smaller JPEG and PNG files stay as they are; other formats are re-encoded.
        indices: write only these images (indices into the listing), e.g. a fixed test subset.
        shuffle_seed: write the images in an order permuted by this seed (so each shard mixes
            classes); None keeps the listing's (class-sorted) order.
        progress: called with a :class:`kdiga.progress.Progress` of the task
            "shard <prefix>" (images written of those listed) at the start, every
            :data:`kdiga.shards.PROGRESS_EVERY` images and at the end of each shard.

    Returns:
        one ``{"path": str, "count": int, "sha256": str}`` per shard, in order, for
        :func:`kdiga.shards.write_manifest`.

    Raises:
        ShardError: a file that is not a decodable image (its path named), or, without
            ``resize_short``, one that is neither JPEG nor PNG.
        DatasetNotFoundError: ``split_dir`` is not an ImageFolder split.
        ValueError: bad ``indices``, ``prefix``, ``max_per_shard`` or ``resize_short``.
    """
    check_shard_names(prefix, max_per_shard)
    if resize_short is not None and (isinstance(resize_short, bool) or resize_short < 1):
        raise ValueError(f"resize_short={resize_short!r} must be an int >= 1 or None")
    samples, _ = list_image_folder(split_dir)
    order = _write_order(len(samples), indices, shuffle_seed)
    width = max(9, len(str(len(samples) - 1)))

    def items() -> Iterator[tuple[str, bytes, str, int]]:
        for i in order:
            path, label = samples[i]
            data, ext = _prepare(Path(path).read_bytes(), path, resize_short)
            yield f"{i:0{width}d}", data, ext, label

    track = Tracker(progress, f"shard {prefix}", len(order), "images")
    return write_tar_shards(
        items(), out_dir, prefix=prefix, max_per_shard=max_per_shard, track=track
    )


# --- the plan of an epoch -----------------------------------------------------------------


@dataclass(frozen=True)
class _Stream:
    """One worker stream of one rank: its shards (indices), their samples, the batches owed."""

    shards: tuple[int, ...]
    samples: int
    batches: int


def _owed(steps: int, w: int, k: int) -> int:
    """How many of the batches ``0..steps-1`` stream ``w`` of ``k`` gives (batch i: i % k)."""
    return max(0, (steps - w + k - 1) // k)


def _balance(items: Sequence[int], counts: Sequence[int], parts: int) -> list[list[int]]:
    """Each item, in order, to the part with the fewest samples so far (ties: lowest part)."""
    out: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in items:
        p = min(range(parts), key=lambda j: (load[j], j))
        out[p].append(i)
        load[p] += counts[i]
    return out


def _plan(
    counts: Sequence[int],
    *,
    train: bool,
    batch_size: int,
    world_size: int,
    workers: int,
    seed: int,
    epoch: int,
) -> tuple[int, list[list[_Stream]]]:
    """(steps per epoch, ``streams[rank][w]``): the rule of the module docstring."""
    k = max(workers, 1)
    order = list(range(len(counts)))
    if train:
        random.Random(_mix("shards", seed, epoch)).shuffle(order)
    layout = [_balance(r, counts, k) for r in _balance(order, counts, world_size)]
    sizes = [[sum(counts[i] for i in s) for s in rank] for rank in layout]
    total = sum(counts)
    if train:
        steps = total // (batch_size * world_size)
        if steps < 1:
            raise ValueError(
                f"{total} samples make no training step of batch_size={batch_size} x "
                f"world_size={world_size}"
            )
    else:
        steps = max(
            (
                k * (math.ceil(n / batch_size) - 1) + w + 1
                for rank in sizes
                for w, n in enumerate(rank)
                if n > 0
            ),
            default=0,
        )
        if steps < 1:
            raise ValueError("the shards hold no samples")
    streams = [
        [
            _Stream(tuple(s), n, _owed(steps, w, k))
            for w, (s, n) in enumerate(zip(rank, ns, strict=True))
        ]
        for rank, ns in zip(layout, sizes, strict=True)
    ]
    if train:
        empty = [
            (r, w)
            for r, rank in enumerate(streams)
            for w, s in enumerate(rank)
            if s.batches > 0 and s.samples == 0
        ]
        if empty:  # a ShardError: one line in a stage, not a traceback
            nonempty = sum(1 for c in counts if c > 0)
            raise ShardError(
                f"training needs at least world_size x max(workers, 1) = {world_size * k} "
                f"non-empty shards (each worker stream of each rank reads whole shards); got "
                f"{nonempty}: write smaller shards or use fewer workers"
            )
    return steps, streams


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Raw:
    """One undecoded sample as read from a shard."""

    shard: str
    key: str
    ext: str
    data: bytes
    label: int
    rep: int = 0


@dataclass(frozen=True)
class _Encoded:
    """A batch as the workers hand it over for decoding on the device (``decode="cuda"``).

    ``images[i]``: JPEG bytes, an already decoded uint8 ``[3, H, W]`` tensor (PNG), or None
    (padding); ``crops[i]``: (top, left, height, width, flip) for training, None otherwise.
    """

    images: list[bytes | Tensor | None]
    crops: list[tuple[int, int, int, int, bool] | None]
    labels: Tensor
    keys: list[str]
    where: list[str]


@dataclass(frozen=True)
class _Failure:
    """An error raised in a worker, handed to the main process to raise as one line."""

    message: str


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
        left = end - offset - _BLOCK
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
        if kind == tarfile.XHDTYPE:
            pax = _pax_records(path, data)
        elif kind == tarfile.GNUTYPE_LONGNAME:
            long_name = data.split(b"\0", 1)[0].decode("utf-8", "replace")
        elif kind != tarfile.XGLTYPE:
            long_name, pax = None, {}
            if kind in _FILE_TYPES:
                yield (*_split_name(path, name), data)


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


def _read_shard(path: str, count: int, num_classes: int | None = None) -> Iterator[_Raw]:
    """The samples of one shard, in order, checked against the declared ``count`` (and their
    labels against ``num_classes``, when given)."""
    members = _tar_members(path)
    n, last = 0, None
    key: str | None = None
    parts: dict[str, bytes] = {}

    def sample(key: str, parts: dict[str, bytes]) -> _Raw:
        image = [e for e in parts if e in _READ_EXTS]
        if len(image) != 1 or "cls" not in parts:
            raise ShardError(
                f"{path}: sample {key!r} needs one image (jpg or png) and 'cls'; has "
                f"{sorted(parts)}"
            )
        try:
            label = decode_label(parts["cls"], num_classes)
        except ValueError as err:
            raise ShardError(f"{path}: sample {key!r}: {err}") from err
        return _Raw(path, key, _READ_EXTS[image[0]], parts[image[0]], label)

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
                yield sample(key, parts)
            if member is None:
                break
            key, parts = member[0], {}
        parts[member[1]] = member[2]
    if n != count:
        raise ShardError(f"{path}: {n} samples, {count} declared (truncated or replaced?)")


def _count_samples(path: str) -> int:
    """Samples in a shard, from its member headers only (the data is skipped, not read)."""
    try:
        with tarfile.open(path, mode="r:") as tar:
            keys = [_split_name(path, m.name)[0] for m in tar if m.isfile()]
    except (tarfile.TarError, OSError) as err:
        raise ShardError(f"{path}: not a readable tar shard ({type(err).__name__}: {err})") from err
    return sum(1 for i, k in enumerate(keys) if i == 0 or k != keys[i - 1])


def _resolve(source: Any) -> list[tuple[str, int]]:
    """(path, count) per shard from a manifest path, manifest entries, or shard paths."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if path.suffix == ".json":
            return _resolve(read_manifest(path)["shards"])
        if path.suffix != ".tar":
            raise ValueError(
                f"source {str(path)!r}: expected a manifest (.json), a shard (.tar), or a list "
                "of shard paths or manifest entries"
            )
        source = [path]
    shards = []
    for item in source:
        if isinstance(item, Mapping):
            if "path" not in item or "count" not in item:
                raise ValueError(f"shard entry {dict(item)} needs 'path' and 'count'")
            path, count = str(item["path"]), int(item["count"])
        else:
            path = str(item)
            count = -1
        if not Path(path).is_file():
            raise ShardError(f"{path}: shard file not found")
        shards.append((path, _count_samples(path) if count < 0 else count))
    if not shards:
        raise ValueError("no shards given")
    return shards


def _manifest_classes(source: Any) -> int | None:
    """The number of classes a manifest declares (None for other sources, or none declared)."""
    if not isinstance(source, str | os.PathLike) or Path(source).suffix != ".json":
        return None
    classes = read_manifest(source).get("num_classes")
    return classes if isinstance(classes, int) and not isinstance(classes, bool) else None


def _crop_params(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's (top, left, h, w), torchvision's algorithm with ``rng``'s draws."""
    area = height * width
    log_lo, log_hi = math.log(_RATIO[0]), math.log(_RATIO[1])
    for _ in range(10):
        target = area * rng.uniform(*_SCALE)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    ratio = width / height  # fallback: the central crop of the allowed aspect ratio
    if ratio < _RATIO[0]:
        w, h = width, round(width / _RATIO[0])
    elif ratio > _RATIO[1]:
        w, h = round(height * _RATIO[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _draw_crop(
    sample: _Raw, height: int, width: int, seed: int, epoch: int
) -> tuple[int, int, int, int, bool]:
    rng = random.Random(_mix("crop", seed, epoch, sample.key, sample.rep))
    top, left, h, w = _crop_params(height, width, rng)
    return top, left, h, w, rng.random() < 0.5


def train_view(image: Tensor, crop: tuple[int, int, int, int, bool], size: int) -> Tensor:
    """Crop ``(top, left, height, width, flip)`` of uint8 ``[3, H, W]``, resized to
    ``[3, size, size]`` (bilinear, antialiased), mirrored if ``flip``."""
    top, left, h, w, flip = crop
    out = TF.resized_crop(image, top, left, h, w, [size, size], antialias=True)
    return out.flip(-1) if flip else out


def eval_view(image: Tensor, size: int) -> Tensor:
    """uint8 ``[3, H, W]`` -> ``[3, size, size]``: short side to ``round(size * 256 / 224)``
    (bilinear, antialiased), then the central ``size x size``."""
    out = TF.resize(image, [round(size * EVAL_RESIZE_RATIO)], antialias=True)
    return TF.center_crop(out, [size, size])


def _decode_cpu(sample: _Raw) -> Tensor:
    try:
        return decode_image(
            torch.frombuffer(bytearray(sample.data), dtype=torch.uint8), mode=ImageReadMode.RGB
        )
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1]
        raise ShardError(
            f"{sample.shard}: sample {sample.key!r} does not decode ({message})"
        ) from err


def decode_jpeg_batch(data: Sequence[bytes | Tensor], device: str | torch.device) -> list[Tensor]:
    """Decode JPEGs on ``device`` in one batched call: uint8 ``[3, H_i, W_i]`` per image, RGB.

    ``torchvision.io.decode_jpeg(list, device=device)``: on CUDA the batch goes through
    nvJPEG at once; on the CPU it is decoded one by one.

    Args:
        data: the encoded images, as bytes or uint8 CPU tensors ``[L]``.
        device: where to decode and return the images.

    Raises:
        ShardError: an image of the batch does not decode (the batch is not split to find it).
    """
    if len(data) == 0:
        return []
    tensors = [
        d if isinstance(d, Tensor) else torch.frombuffer(bytearray(d), dtype=torch.uint8)
        for d in data
    ]
    try:
        return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1]
        raise ShardError(f"a JPEG of the batch does not decode on {device} ({message})") from err


def _shuffled(items: Iterable[_Raw], size: int, rng: random.Random) -> Iterator[_Raw]:
    """A shuffle buffer of ``size`` samples drawing with ``rng``."""
    buf: list[_Raw] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        buf[j], item = item, buf[j]
        yield item
    rng.shuffle(buf)
    yield from buf


@dataclass(frozen=True)
class _Settings:
    train: bool
    batch_size: int
    image_size: int
    seed: int
    epoch: int
    rank: int
    world_size: int
    workers: int
    shuffle_buffer: int
    start_batch: int
    on_device: bool
    num_classes: int | None = None  # labels are checked against it


class _EpochStream(IterableDataset):
    """One rank's epoch: each DataLoader worker (or the main process) runs one stream."""

    def __init__(
        self, shards: list[tuple[str, int]], streams: list[_Stream], cfg: _Settings
    ) -> None:
        super().__init__()
        self.shards, self.streams, self.cfg = shards, streams, cfg

    def __iter__(self) -> Iterator[Any]:
        cfg, k = self.cfg, max(self.cfg.workers, 1)
        info = get_worker_info()
        w = ((info.id if info is not None else 0) + cfg.start_batch) % k
        stream = self.streams[w]
        skip = _owed(cfg.start_batch, w, k)
        try:
            slots = itertools.islice(self._slots(stream, w), skip * cfg.batch_size, None)
            for _ in range(stream.batches - skip):
                yield self._batch(list(itertools.islice(slots, cfg.batch_size)))
        except ShardError as err:
            yield _Failure(str(err))

    def _samples(self, stream: _Stream, rep: int) -> Iterator[_Raw]:
        for i in stream.shards:
            for raw in _read_shard(*self.shards[i], self.cfg.num_classes):
                yield raw if rep == 0 else dataclasses.replace(raw, rep=rep)

    def _slots(self, stream: _Stream, w: int) -> Iterator[_Raw | None]:
        """The stream's samples in batch order; None for an evaluation padding row."""
        cfg = self.cfg
        need = stream.batches * cfg.batch_size
        if not cfg.train:
            return itertools.chain(
                self._samples(stream, 0), itertools.repeat(None, need - stream.samples)
            )
        passes = itertools.chain.from_iterable(self._samples(stream, r) for r in itertools.count())
        raw = itertools.islice(passes, need)
        if cfg.shuffle_buffer <= 1:
            return raw
        rng = random.Random(_mix("buffer", cfg.seed, cfg.epoch, cfg.world_size, cfg.rank, w))
        return _shuffled(raw, cfg.shuffle_buffer, rng)

    def _batch(self, rows: list[_Raw | None]) -> Any:
        cfg = self.cfg
        labels = torch.tensor(
            [PAD_LABEL if r is None else r.label for r in rows], dtype=torch.int64
        )
        keys = ["" if r is None else r.key for r in rows]
        if cfg.on_device:
            return self._encoded(rows, labels, keys)
        blank = torch.zeros(3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
        images = [blank if r is None else self._view(r, _decode_cpu(r)) for r in rows]
        return torch.stack(images), labels, keys

    def _view(self, sample: _Raw, image: Tensor) -> Tensor:
        cfg = self.cfg
        if not cfg.train:
            return eval_view(image, cfg.image_size)
        crop = _draw_crop(sample, image.shape[-2], image.shape[-1], cfg.seed, cfg.epoch)
        return train_view(image, crop, cfg.image_size)

    def _encoded(self, rows: list[_Raw | None], labels: Tensor, keys: list[str]) -> _Encoded:
        images: list[bytes | Tensor | None] = []
        crops: list[tuple[int, int, int, int, bool] | None] = []
        for r in rows:
            if r is None:
                images.append(None)
                crops.append(None)
                continue
            if r.ext == "jpg":
                _, width, height = _probe(r.data, f"{r.shard}: sample {r.key!r}")
                images.append(r.data)
            else:
                image = _decode_cpu(r)
                height, width = image.shape[-2:]
                images.append(image)
            crops.append(
                _draw_crop(r, height, width, self.cfg.seed, self.cfg.epoch)
                if self.cfg.train
                else None
            )
        where = ["" if r is None else f"{r.shard}: sample {r.key!r}" for r in rows]
        return _Encoded(images, crops, labels, keys, where)


def _on_device(batch: _Encoded, device: torch.device, size: int) -> tuple[Tensor, Tensor]:
    """Decode an :class:`_Encoded` batch on ``device`` and apply its views there."""
    jpeg = [i for i, im in enumerate(batch.images) if isinstance(im, bytes)]
    try:
        decoded = dict(
            zip(jpeg, decode_jpeg_batch([batch.images[i] for i in jpeg], device), strict=True)
        )
    except ShardError as err:
        names = "; ".join(batch.where[i] for i in jpeg)
        raise ShardError(f"{err}; the batch: {names}") from err
    out = []
    for i, image in enumerate(batch.images):
        if image is None:
            out.append(torch.zeros(3, size, size, dtype=torch.uint8, device=device))
            continue
        image = decoded[i] if i in decoded else image.to(device)
        crop = batch.crops[i]
        out.append(eval_view(image, size) if crop is None else train_view(image, crop, size))
    return torch.stack(out), batch.labels.to(device)


class StreamLoader:
    """Batches of one rank's epoch of shards; build it with :func:`stream_loader`.

    Iterating yields ``(x, y)`` (or ``(x, y, keys)`` with ``keys=True``): ``x`` uint8
    ``[B, 3, S, S]``, ``y`` int64 ``[B]``, from batch ``start_batch`` to ``len(self) - 1``.
    ``len(self)`` is the steps of a whole epoch, equal on every rank. ``batch`` counts the
    epoch's batches yielded so far (``start_batch`` included); see the module docstring for
    checkpointing with :meth:`state_dict`.
    """

    def __init__(
        self,
        shards: list[tuple[str, int]],
        cfg: _Settings,
        *,
        device: torch.device | None,
        keys: bool,
        pin_memory: bool,
    ) -> None:
        self.shards, self._cfg, self.device = shards, cfg, device
        self.keys, self.pin_memory = keys, pin_memory
        self.epoch, self.start_batch = cfg.epoch, cfg.start_batch
        self.steps, _ = self._plan()
        if not 0 <= self.start_batch <= self.steps:
            raise ValueError(f"start_batch={self.start_batch} must be in [0, {self.steps}]")
        self.batch = self.start_batch

    @property
    def num_samples(self) -> int:
        """Samples in all the shards (over every rank)."""
        return sum(c for _, c in self.shards)

    def _settings(self) -> _Settings:
        return dataclasses.replace(self._cfg, epoch=self.epoch, start_batch=self.start_batch)

    def _plan(self) -> tuple[int, list[list[_Stream]]]:
        c = self._cfg
        return _plan(
            [n for _, n in self.shards],
            train=c.train,
            batch_size=c.batch_size,
            world_size=c.world_size,
            workers=c.workers,
            seed=c.seed,
            epoch=self.epoch,
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[Tensor, ...] | tuple[Tensor, Tensor, list[str]]]:
        cfg = self._settings()
        steps, streams = self._plan()
        dataset = _EpochStream(self.shards, streams[cfg.rank], cfg)
        if cfg.workers == 0:
            source: Iterable[Any] = dataset
        else:
            # its own generator: the default one would draw the workers' base seed from the
            # global RNG, which a trainer restores on resume (the views do not use that seed)
            source = DataLoader(
                dataset, batch_size=None, num_workers=cfg.workers, pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(_mix("workers", cfg.seed, self.epoch)),
            )  # fmt: skip
        self.batch = self.start_batch
        for item in source:
            if isinstance(item, _Failure):
                raise ShardError(item.message)
            if isinstance(item, _Encoded):
                x, y = _on_device(item, self.device, cfg.image_size)
                keys = item.keys
            else:
                x, y, keys = item
            self.batch += 1
            yield (x, y, keys) if self.keys else (x, y)
        if self.batch != steps:
            raise RuntimeError(f"rank {cfg.rank} yielded {self.batch} of {steps} batches")

    def set_epoch(self, epoch: int) -> None:
        """Move to ``epoch`` from its first batch (its own shard order and augmentation)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch!r} must be >= 0")
        self.epoch, self.start_batch, self.batch = int(epoch), 0, 0

    def state_dict(self) -> dict[str, Any]:
        """Where this rank stands: ``epoch``, ``batch`` (batches of it yielded) and the
        settings the order depends on, which :meth:`load_state_dict` checks."""
        c = self._cfg
        return {
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": c.seed,
            "world_size": c.world_size,
            "workers": c.workers,
            "batch_size": c.batch_size,
            "train": c.train,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume at ``state["epoch"]``, batch ``state["batch"]`` (the next one to yield).

        Raises:
            ValueError: the state lacks a key, or was saved with other settings (seed,
                world_size, workers, batch_size, train, number of samples): the order would
                differ, so the resumed epoch would not be the interrupted one.
        """
        mine = self.state_dict()
        missing = set(mine) - set(state)
        if missing:
            raise ValueError(f"loader state lacks {sorted(missing)}")
        differ = {
            k: (state[k], v)
            for k, v in mine.items()
            if k not in ("epoch", "batch") and state[k] != v
        }
        if differ:
            raise ValueError(
                "loader state was saved with other settings (saved, now): "
                + ", ".join(f"{k}={a!r}, {b!r}" for k, (a, b) in differ.items())
            )
        if not 0 <= int(state["batch"]) <= self.steps:
            raise ValueError(f"state batch={state['batch']!r} must be in [0, {self.steps}]")
        self.epoch, self.start_batch = int(state["epoch"]), int(state["batch"])
        self.batch = self.start_batch


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} must be an int >= {low}")
    return value


def stream_loader(
    source: str | os.PathLike | Sequence[str | os.PathLike | Mapping[str, Any]],
    *,
    train: bool,
    batch_size: int,
    image_size: int = 224,
    workers: int = 0,
    seed: int = 0,
    epoch: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    shuffle_buffer: int = 1000,
    start_batch: int = 0,
    decode: str = "cpu",
    keys: bool = False,
    pin_memory: bool = False,
) -> StreamLoader:
    """A loader of one rank's batches of one epoch of image shards (module docstring: the plan).

    Args:
        source: a manifest path (``.json``, :func:`kdiga.shards.write_manifest`), a shard path
            (``.tar``), or a list of shard paths or ``{"path", "count"}`` entries. Counts come
            from the manifest or entries; bare shard paths are counted from their tar headers.
        train: training views (random crop + flip, shuffled, ``N // (B * W)`` steps) or
            evaluation views (resize + center crop, every sample once, padded batches).
        batch_size: B, samples per batch of this rank (the global batch is B x world_size).
        image_size: S of the views.
        workers: DataLoader worker processes decoding (0: the main process); the order
            depends on it.
        seed, epoch: what the shard order, shuffle buffer and crops are seeded by.
        rank, world_size: this process's place; both None: from the initialised process group
            (:func:`kdiga.distributed.current`), else one process.
        shuffle_buffer: samples in each stream's shuffle buffer (training; 0 or 1: none).
        start_batch: first batch to yield (resume mid-epoch), in ``[0, len(loader)]``.
        decode: "cpu" (the workers decode), or "cuda" / "cuda:N" (the workers hand over JPEG
            bytes and :func:`decode_jpeg_batch` decodes on that device).
        keys: also yield each row's sample key (``""`` for padding rows).
        pin_memory: the DataLoader's ``pin_memory`` (CPU decoding with workers).

    Returns:
        a :class:`StreamLoader`; ``len()`` is the steps per epoch, the same on every rank.

    Raises:
        ValueError: a bad argument (what was given and what is allowed), too few samples for
            one training step, or too few shards for the training streams.
        ShardError: a missing shard or an unreadable manifest (here); a truncated or corrupt
            shard or sample, or a count that differs from the declared one (while iterating),
            naming the shard and the sample.
    """
    for name, value, low in (
        ("batch_size", batch_size, 1),
        ("image_size", image_size, 1),
        ("workers", workers, 0),
        ("epoch", epoch, 0),
        ("shuffle_buffer", shuffle_buffer, 0),
        ("start_batch", start_batch, 0),
    ):
        _check_int(name, value, low)
    if (rank is None) != (world_size is None):
        raise ValueError(f"pass both rank and world_size, or neither; got {rank=}, {world_size=}")
    if rank is None:
        from kdiga.distributed import current

        info = current()
        rank, world_size = info.rank, info.world_size
    _check_int("world_size", world_size, 1)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an int in [0, world_size={world_size})")
    kind = str(decode).split(":", 1)[0]
    if kind not in DECODES:
        raise ValueError(f"decode={decode!r}; allowed: 'cpu', 'cuda' or 'cuda:<index>'")
    device = None
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"decode={decode!r} but CUDA is not available; use decode='cpu'")
        device = torch.device(decode)
    cfg = _Settings(
        train=bool(train),
        batch_size=batch_size,
        image_size=image_size,
        seed=int(seed),
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        workers=workers,
        shuffle_buffer=shuffle_buffer,
        start_batch=start_batch,
        on_device=device is not None,
        num_classes=_manifest_classes(source),
    )
    return StreamLoader(_resolve(source), cfg, device=device, keys=keys, pin_memory=pin_memory)


# --- for kdiga.train and the pipeline -----------------------------------------------------


def load_image_split(
    manifest: str | os.PathLike, *, batch_size: int = 256, workers: int = 0
) -> tuple[Tensor, Tensor, dict[str, Any]]:
    """A whole split of image shards in memory, as evaluation views: for the fixed test subset
    and the validation split, which every model is evaluated on.

    Every shard's sha256 is checked against the manifest first. Images come in the written
    order, each resized (short side ``round(S * 256 / 224)``) and center-cropped to the
    manifest's ``image_size`` S.

    Returns:
        images uint8 ``[N, 3, S, S]``, labels int64 ``[N]`` and the manifest.

    Raises:
        ShardError: a missing shard, a checksum or count that differs, a corrupt sample.
    """
    doc = read_manifest(manifest)
    for s in doc["shards"]:
        if not Path(s["path"]).is_file():
            raise ShardError(f"{s['path']}: shard is missing")
        if sha256_file(s["path"]) != s["sha256"]:
            raise ShardError(
                f"{s['path']}: sha256 differs from the manifest {manifest} (corrupt or "
                "replaced): run the shard stage again"
            )
    loader = stream_loader(
        manifest, train=False, batch_size=batch_size, image_size=int(doc["image_size"]),
        workers=workers, rank=0, world_size=1,
    )  # fmt: skip
    xs, ys = [], []
    for x, y in loader:
        keep = y != PAD_LABEL
        xs.append(x[keep])
        ys.append(y[keep])
    images, labels = torch.cat(xs), torch.cat(ys)
    if len(labels) != doc["num_samples"]:
        raise ShardError(f"{manifest}: read {len(labels)} samples, the manifest says "
                         f"{doc['num_samples']}")  # fmt: skip
    return images, labels, doc


class ShardBatches:
    """Training batches streamed from image shards for :func:`kdiga.train.fit`
    (a :class:`kdiga.train.BatchStream`): each process's :func:`stream_loader` of epoch
    ``e`` from step ``k``, with ``batch_size`` the global batch split over the ranks.

    Args:
        manifest: the training split's manifest.
        batch_size: the global batch (divisible by the world size).
        image_size, workers, seed, shuffle_buffer, decode: as :func:`stream_loader`.
    """

    def __init__(
        self,
        manifest: str | os.PathLike,
        *,
        batch_size: int,
        image_size: int,
        workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        decode: str = "cpu",
    ) -> None:
        from kdiga.distributed import current

        world = current().world_size
        if batch_size % world:
            raise ValueError(
                f"batch_size={batch_size} (the global batch) is not divisible by the world size "
                f"{world}: pick a multiple of {world}"
            )
        self.manifest = manifest
        self.kwargs = dict(
            train=True, batch_size=batch_size // world, image_size=image_size, workers=workers,
            seed=seed, shuffle_buffer=shuffle_buffer, decode=decode,
        )  # fmt: skip
        self.steps_per_epoch = len(stream_loader(manifest, **self.kwargs))

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        yield from stream_loader(self.manifest, epoch=epoch, start_batch=start_batch, **self.kwargs)
