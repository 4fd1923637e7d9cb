"""Image shards written from an ImageFolder split or from encoded images.

A sample is ``<key>.jpg`` (or ``<key>.png``, by the file's real format) plus ``<key>.cls``
(the label as decimal text), written by :func:`kdiga.shards.write_tar_shards`: the same input
gives the same bytes on every run, and the entries returned go to
:func:`kdiga.shards.write_manifest` unchanged.
"""

from __future__ import annotations

import operator
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from kdiga.progress import ProgressFn, Tracker
from kdiga.shards import ShardError, check_shard_names, write_tar_shards
from kdiga.stream.folder import list_image_folder
from kdiga.stream.images import IMAGE_EXTS, PIL_EXTS, prepare, probe
from kdiga.stream.seeds import mix


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
            stored = IMAGE_EXTS.get(str(ext).lower())
            if stored is None:
                raise ValueError(f"{name}: ext={ext!r}; allowed: jpg, jpeg, png")
            try:
                label = -1 if isinstance(label, bool) else operator.index(label)
            except TypeError:
                label = -1
            if label < 0:
                raise ValueError(f"{name}: its label must be an int >= 0")
            fmt = probe(bytes(data), name)[0]
            if PIL_EXTS.get(fmt) != stored:
                raise ShardError(f"{name}: ext {ext!r} but the bytes are a {fmt} image")
            yield f"{i:09d}", bytes(data), stored, label

    return write_tar_shards(items(), out_dir, prefix=prefix, max_per_shard=max_per_shard)


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
        random.Random(mix("write", int(shuffle_seed))).shuffle(order)
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
    (:func:`kdiga.stream.images.probe`); nothing is decoded unless ``resize_short`` is given. Same
    input, same bytes.

    Args:
        split_dir: ``<split_dir>/<class>/<image file>``.
        out_dir: directory of the shards (created).
        prefix: shard file prefix: ``<out_dir>/<prefix>-000000.tar``, ...
        max_per_shard: samples per shard (the last may have fewer). Use at least
            ``world_size * workers`` shards for training.
        resize_short: if given, an image whose short side is longer is decoded, shrunk to
            that short side (bicubic) and stored as a JPEG of quality
            :data:`kdiga.stream.images.JPEG_QUALITY`; smaller JPEG and PNG files stay as they
            are; other formats are re-encoded.
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
            data, ext = prepare(Path(path).read_bytes(), path, resize_short)
            yield f"{i:0{width}d}", data, ext, label

    track = Tracker(progress, f"shard {prefix}", len(order), "images")
    return write_tar_shards(
        items(), out_dir, prefix=prefix, max_per_shard=max_per_shard, track=track
    )
