"""The loader of one rank's batches of an epoch of image shards (:func:`stream_loader`), and
the two ways the project uses it: a split held in memory (:func:`load_image_split`) and the
training batches of :func:`kdiga.train.fit` (:class:`ShardBatches`).

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
yield the bytes; the main process decodes each batch with
:func:`kdiga.stream.views.decode_jpeg_batch` (``torchvision.io.decode_jpeg`` on the device,
batched) and applies the same crops and flips there. PNG samples are decoded by the workers
on the CPU. Batches then live on the device.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from kdiga.distributed import current
from kdiga.files import sha256_file
from kdiga.shards import ShardError, read_manifest
from kdiga.stream.plan import WorkerStream, plan_epoch
from kdiga.stream.seeds import mix
from kdiga.stream.tar import count_samples
from kdiga.stream.views import decode_jpeg_batch, eval_view, train_view
from kdiga.stream.worker import PAD_LABEL, Encoded, EpochSettings, EpochStream, Failure

DECODES = ("cpu", "cuda")


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
        shards.append((path, count_samples(path) if count < 0 else count))
    if not shards:
        raise ValueError("no shards given")
    return shards


def _manifest_classes(source: Any) -> int | None:
    """The number of classes a manifest declares (None for other sources, or none declared)."""
    if not isinstance(source, str | os.PathLike) or Path(source).suffix != ".json":
        return None
    classes = read_manifest(source).get("num_classes")
    return classes if isinstance(classes, int) and not isinstance(classes, bool) else None


def _on_device(batch: Encoded, device: torch.device, size: int) -> tuple[Tensor, Tensor]:
    """Decode an :class:`Encoded` batch on ``device`` and apply its views there."""
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
        cfg: EpochSettings,
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

    def _settings(self) -> EpochSettings:
        return dataclasses.replace(self._cfg, epoch=self.epoch, start_batch=self.start_batch)

    def _plan(self) -> tuple[int, list[list[WorkerStream]]]:
        c = self._cfg
        return plan_epoch(
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
        dataset = EpochStream(self.shards, streams[cfg.rank], cfg)
        if cfg.workers == 0:
            source: Iterable[Any] = dataset
        else:
            # its own generator: the default one would draw the workers' base seed from the
            # global RNG, which a trainer restores on resume (the views do not use that seed)
            source = DataLoader(
                dataset,
                batch_size=None,
                num_workers=cfg.workers,
                pin_memory=self.pin_memory,
                generator=torch.Generator().manual_seed(mix("workers", cfg.seed, self.epoch)),
            )
        self.batch = self.start_batch
        for item in source:
            if isinstance(item, Failure):
                raise ShardError(item.message)
            if isinstance(item, Encoded):
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


def _place(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) as given, or from the initialised process group when both are None."""
    if (rank is None) != (world_size is None):
        raise ValueError(f"pass both rank and world_size, or neither; got {rank=}, {world_size=}")
    if rank is None:
        info = current()
        rank, world_size = info.rank, info.world_size
    _check_int("world_size", world_size, 1)
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank!r} must be an int in [0, world_size={world_size})")
    return rank, world_size


def _decode_device(decode: str) -> torch.device | None:
    """The device of ``decode="cuda[:N]"`` (None: the workers decode on the CPU)."""
    kind = str(decode).split(":", 1)[0]
    if kind not in DECODES:
        raise ValueError(f"decode={decode!r}; allowed: 'cpu', 'cuda' or 'cuda:<index>'")
    if kind != "cuda":
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"decode={decode!r} but CUDA is not available; use decode='cpu'")
    return torch.device(decode)


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
    """A loader of one rank's batches of one epoch of image shards (:mod:`kdiga.stream.plan`).

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
            bytes and :func:`kdiga.stream.views.decode_jpeg_batch` decodes on that device).
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
    rank, world_size = _place(rank, world_size)
    device = _decode_device(decode)
    cfg = EpochSettings(
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
        manifest,
        train=False,
        batch_size=batch_size,
        image_size=int(doc["image_size"]),
        workers=workers,
        rank=0,
        world_size=1,
    )
    xs, ys = [], []
    for x, y in loader:
        keep = y != PAD_LABEL
        xs.append(x[keep])
        ys.append(y[keep])
    images, labels = torch.cat(xs), torch.cat(ys)
    if len(labels) != doc["num_samples"]:
        raise ShardError(
            f"{manifest}: read {len(labels)} samples, the manifest says {doc['num_samples']}"
        )
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
        world = current().world_size
        if batch_size % world:
            raise ValueError(
                f"batch_size={batch_size} (the global batch) is not divisible by the world size "
                f"{world}: pick a multiple of {world}"
            )
        self.manifest = manifest
        self.kwargs = dict(
            train=True,
            batch_size=batch_size // world,
            image_size=image_size,
            workers=workers,
            seed=seed,
            shuffle_buffer=shuffle_buffer,
            decode=decode,
        )
        self.steps_per_epoch = len(stream_loader(manifest, **self.kwargs))

    def batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        yield from stream_loader(self.manifest, epoch=epoch, start_batch=start_batch, **self.kwargs)
