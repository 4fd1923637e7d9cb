"""One rank's epoch as each DataLoader worker (or the main process) runs its stream.

A worker reads its shards (:mod:`kdiga.stream.plan` says which), decodes and augments, and
yields whole batches: ``(x, y, keys)``, or an :class:`Encoded` batch for decoding on the
device, or a :class:`Failure` to raise in the main process as one line.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from kdiga.shards import ShardError
from kdiga.stream.images import probe
from kdiga.stream.plan import WorkerStream, owed
from kdiga.stream.seeds import mix
from kdiga.stream.tar import RawSample, read_shard
from kdiga.stream.views import decode_cpu, draw_crop, eval_view, train_view

#: Label of the padding rows of evaluation batches (``F.cross_entropy``'s ``ignore_index``).
PAD_LABEL = -100


@dataclass(frozen=True)
class Encoded:
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
class Failure:
    """An error raised in a worker, handed to the main process to raise as one line."""

    message: str


def _shuffled(items: Iterable[RawSample], size: int, rng: random.Random) -> Iterator[RawSample]:
    """A shuffle buffer of ``size`` samples drawing with ``rng``."""
    buf: list[RawSample] = []
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
class EpochSettings:
    """What one rank's epoch depends on: :func:`kdiga.stream.stream_loader`'s arguments."""

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


class EpochStream(IterableDataset):
    """One rank's epoch: each DataLoader worker (or the main process) runs one stream."""

    def __init__(
        self, shards: list[tuple[str, int]], streams: list[WorkerStream], cfg: EpochSettings
    ) -> None:
        super().__init__()
        self.shards, self.streams, self.cfg = shards, streams, cfg

    def __iter__(self) -> Iterator[Any]:
        cfg, k = self.cfg, max(self.cfg.workers, 1)
        info = get_worker_info()
        w = ((info.id if info is not None else 0) + cfg.start_batch) % k
        stream = self.streams[w]
        skip = owed(cfg.start_batch, w, k)
        try:
            slots = itertools.islice(self._slots(stream, w), skip * cfg.batch_size, None)
            for _ in range(stream.batches - skip):
                yield self._batch(list(itertools.islice(slots, cfg.batch_size)))
        except ShardError as err:
            yield Failure(str(err))

    def _samples(self, stream: WorkerStream, rep: int) -> Iterator[RawSample]:
        for i in stream.shards:
            for raw in read_shard(*self.shards[i], self.cfg.num_classes):
                yield raw if rep == 0 else dataclasses.replace(raw, rep=rep)

    def _slots(self, stream: WorkerStream, w: int) -> Iterator[RawSample | None]:
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
        rng = random.Random(mix("buffer", cfg.seed, cfg.epoch, cfg.world_size, cfg.rank, w))
        return _shuffled(raw, cfg.shuffle_buffer, rng)

    def _batch(self, rows: list[RawSample | None]) -> Any:
        cfg = self.cfg
        labels = torch.tensor(
            [PAD_LABEL if r is None else r.label for r in rows], dtype=torch.int64
        )
        keys = ["" if r is None else r.key for r in rows]
        if cfg.on_device:
            return self._encoded(rows, labels, keys)
        blank = torch.zeros(3, cfg.image_size, cfg.image_size, dtype=torch.uint8)
        images = [blank if r is None else self._view(r) for r in rows]
        return torch.stack(images), labels, keys

    def _view(self, sample: RawSample) -> Tensor:
        cfg = self.cfg
        image = decode_cpu(sample.data, _where(sample))
        if not cfg.train:
            return eval_view(image, cfg.image_size)
        crop = draw_crop(sample.key, sample.rep, *image.shape[-2:], cfg.seed, cfg.epoch)
        return train_view(image, crop, cfg.image_size)

    def _encoded(self, rows: list[RawSample | None], labels: Tensor, keys: list[str]) -> Encoded:
        images: list[bytes | Tensor | None] = []
        crops: list[tuple[int, int, int, int, bool] | None] = []
        for r in rows:
            if r is None:
                images.append(None)
                crops.append(None)
                continue
            if r.ext == "jpg":
                _, width, height = probe(r.data, _where(r))
                images.append(r.data)
            else:
                image = decode_cpu(r.data, _where(r))
                height, width = image.shape[-2:]
                images.append(image)
            crops.append(
                draw_crop(r.key, r.rep, height, width, self.cfg.seed, self.cfg.epoch)
                if self.cfg.train
                else None
            )
        where = ["" if r is None else _where(r) for r in rows]
        return Encoded(images, crops, labels, keys, where)


def _where(sample: RawSample) -> str:
    """How errors name a sample: its shard and key."""
    return f"{sample.shard}: sample {sample.key!r}"
