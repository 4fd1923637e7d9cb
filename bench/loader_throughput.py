"""Streamed JPEG shards vs ImageFolder: decoded images/s per CPU core, and vs a KDIGA step.

What is measured, on synthetic JPEGs (smooth random images plus noise, quality 90, square,
``--source-size`` pixels, 10 classes) generated into a temporary ImageFolder and written once
as shards by ``kdiga.stream.write_image_shards`` (the write is reported, not compared):

- streamed: one training epoch of ``kdiga.stream.stream_loader`` (tar read, JPEG decode by
  ``torchvision.io``, RandomResizedCrop + flip, shuffle buffer of 1000), a new epoch number
  per run;
- ImageFolder: one epoch of ``torchvision.datasets.ImageFolder`` (PIL decode) with
  ``RandomResizedCrop(S)``, ``RandomHorizontalFlip()``, ``PILToTensor()`` through a
  ``DataLoader`` (shuffled, ``drop_last``): the usual way, the same transforms, workers and
  batch size;
- on CUDA also the streamed loader with ``decode="cuda"`` (nvJPEG in the main process).

Both loaders yield the same images per epoch (N // B batches of B). They run interleaved,
one epoch per call, after a warm-up round; the median of the repeats is reported. Per loader:
images/s (wall), images/s per worker core (images/s / max(workers, 1): a worker per core),
and images per CPU second (user + system time of the process and its joined workers: robust
on a shared machine). Then one KDIGA training step (teacher ResNet-50 -> student ResNet-18,
torchvision's ImageNet architectures through ``kdiga.models.build_model``, 1000 classes, the
authors' KDIGA settings as in ``bench.step_cost``) on a batch of the same B images of
S x S already in memory: its images/s, the loader/step ratio (>= 1: the data path keeps up,
with ``--workers`` workers), and the CPU cores of decoding one step needs. On CPU the step
runs with one torch thread (as ``bench.step_cost``) and shares the machine with the loaders;
the loader/step ratio matters most on a GPU.

Run alone: ``python -m bench.loader_throughput [--quick] [--images N] [--source-size P]
[--crop S] [--batch B] [--workers W] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from bench.common import compare, device, fmt_table, header, num_threads
from bench.pairs import METHOD_CFG
from kdiga.data import to_float
from kdiga.methods import build_loss
from kdiga.models import build_model
from kdiga.shards import write_manifest
from kdiga.stream import list_image_folder, stream_loader, write_image_shards

CLASSES = 10
QUALITY = 90
SHUFFLE = 1000
TEACHER, STUDENT = "torchvision:resnet50", "torchvision:resnet18"
STEP_CLASSES = 1000


@dataclass(frozen=True)
class Sizes:
    """What one run measures."""

    images: int
    source_size: int
    crop: int
    batch: int
    workers: int
    repeats: int


def default_sizes(quick: bool, cuda: bool) -> Sizes:
    """2000 images of 256 px; crop 224 and batch 128 on CUDA, 64 and 32 on CPU; quick: less."""
    workers = min(8, os.cpu_count() or 1)
    if quick:
        return Sizes(512, 128, 64 if cuda else 32, 32 if cuda else 16, workers, 2)
    return Sizes(2000, 256, 224 if cuda else 64, 128 if cuda else 32, workers, 3)


def make_folder(root: Path, n: int, size: int, seed: int = 0) -> None:
    """``n`` JPEGs of ``size`` x ``size`` in ``CLASSES`` class folders under ``root``."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = root / f"class{i % CLASSES:02d}"
        cls.mkdir(parents=True, exist_ok=True)
        coarse = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), np.int16)
        noisy = (smooth + rng.integers(-10, 11, smooth.shape)).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, format="JPEG", quality=QUALITY)
        (cls / f"{i:06d}.jpg").write_bytes(buf.getvalue())


@dataclass
class Epochs:
    """Wall and CPU seconds and images of each timed epoch of one loader."""

    wall: list[float]
    cpu: list[float]
    images: int = 0

    def rates(self, workers: int) -> tuple[float, float, float]:
        """(images/s, images/s per worker core, images per CPU second), medians."""
        per_s = self.images / statistics.median(self.wall)
        return per_s, per_s / max(workers, 1), self.images / statistics.median(self.cpu)


def _cpu_seconds() -> float:
    """User + system seconds of this process and its waited-for children so far."""
    me, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def streamed(manifest: Path, s: Sizes, decode: str) -> Callable[[int], int]:
    """One streamed training epoch (number ``epoch``); returns the images it yielded."""

    def epoch(e: int) -> int:
        loader = stream_loader(
            manifest,
            train=True,
            batch_size=s.batch,
            image_size=s.crop,
            workers=s.workers,
            seed=0,
            epoch=e,
            rank=0,
            world_size=1,
            shuffle_buffer=SHUFFLE,
            decode=decode,
        )
        return sum(x.shape[0] for x, _ in loader)

    return epoch


def image_folder(root: Path, s: Sizes) -> Callable[[int], int]:
    """One epoch of torchvision's ImageFolder + DataLoader with the same transforms."""
    tf = T.Compose([T.RandomResizedCrop(s.crop), T.RandomHorizontalFlip(), T.PILToTensor()])
    dataset = ImageFolder(str(root), transform=tf)

    def epoch(e: int) -> int:
        loader = DataLoader(
            dataset,
            batch_size=s.batch,
            shuffle=True,
            num_workers=s.workers,
            drop_last=True,
            generator=torch.Generator().manual_seed(e),
        )
        return sum(x.shape[0] for x, _ in loader)

    return epoch


def time_loaders(loaders: dict[str, Callable[[int], int]], repeats: int) -> dict[str, Epochs]:
    """One warm-up round, then ``repeats`` rounds in rotated order, one epoch per call."""
    names = list(loaders)
    for name in names:
        loaders[name](0)
    out = {name: Epochs([], []) for name in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu = time.perf_counter(), _cpu_seconds()
            out[name].images = loaders[name](r + 1)
            out[name].wall.append(time.perf_counter() - wall)
            out[name].cpu.append(_cpu_seconds() - cpu)
    return out


def step_rate(s: Sizes, dev: torch.device) -> float:
    """Images/s of a KDIGA step (teacher ResNet-50 -> student ResNet-18) at batch B, S px."""
    torch.manual_seed(0)
    teacher = build_model(TEACHER, STEP_CLASSES, image_size=s.crop).to(dev).eval()
    teacher.requires_grad_(False)
    student = build_model(STUDENT, STEP_CLASSES, image_size=s.crop).to(dev).train()
    loss = build_loss("kdiga", **METHOD_CFG["kdiga"])
    opt = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x = torch.randint(0, 256, (s.batch, 3, s.crop, s.crop), dtype=torch.uint8, device=dev)
    y = torch.randint(0, STEP_CLASSES, (s.batch,), device=dev)

    def step() -> None:
        parts = loss(student, teacher, to_float(x), y)
        opt.zero_grad(set_to_none=True)
        parts["loss"].backward()
        opt.step()

    timing = compare({"kdiga step": step}, repeats=s.repeats, dev=dev)["kdiga step"]
    return s.batch / timing.median


def run(quick: bool = False, sizes: Sizes | None = None) -> str:
    """Loader images/s and per CPU core, streamed vs ImageFolder, and loader/step ratios."""
    dev = device()
    s = sizes or default_sizes(quick, dev.type == "cuda")
    with tempfile.TemporaryDirectory() as tmp:
        root, shards = Path(tmp) / "train", Path(tmp) / "shards"
        t0 = time.perf_counter()
        make_folder(root, s.images, s.source_size)
        t_make = time.perf_counter() - t0
        list_image_folder(root)  # imports torchvision's folder helpers: not part of the write
        t0 = time.perf_counter()
        entries = write_image_shards(
            root, shards, prefix="train", max_per_shard=max(1, s.images // 16), shuffle_seed=0
        )
        t_write = time.perf_counter() - t0
        write_manifest(entries, shards / "train.json", dataset="synthetic", split="train")
        mib = sum(Path(e["path"]).stat().st_size for e in entries) / 2**20
        loaders = {
            "streamed shards": streamed(shards / "train.json", s, "cpu"),
            "ImageFolder + DataLoader": image_folder(root, s),
        }
        if dev.type == "cuda":
            loaders["streamed, decode on GPU"] = streamed(shards / "train.json", s, "cuda")
        epochs = time_loaders(loaders, s.repeats)
    threads = 1 if dev.type == "cpu" else None
    with num_threads(threads):
        step = step_rate(s, dev)
        step_threads = torch.get_num_threads()
    rates = {name: e.rates(s.workers) for name, e in epochs.items()}
    rows = [
        [name, e.images, statistics.median(e.wall), *(f"{v:.0f}" for v in rates[name])]
        for name, e in epochs.items()
    ]
    ours, theirs = rates["streamed shards"], rates["ImageFolder + DataLoader"]
    lines = [
        "== loader throughput: streamed JPEG shards vs ImageFolder, and vs a KDIGA step ==",
        f"{s.images} JPEGs of {s.source_size}x{s.source_size} (q{QUALITY}, made in "
        f"{t_make:.1f} s), {len(entries)} shards ({mib:.1f} MiB, written in {t_write:.1f} s: "
        f"{s.images / t_write:.0f} images/s); train views RandomResizedCrop({s.crop}) + flip, "
        f"batch {s.batch}, workers {s.workers}, median of {s.repeats} epochs after a warm-up; "
        f"{os.cpu_count()} logical cores",
        "",
        fmt_table(
            rows,
            ["loader", "images/epoch", "wall s", "images/s", "per worker core", "per CPU s"],
        ),
        "",
        f"streamed / ImageFolder: {ours[0] / theirs[0]:.2f}x images/s, "
        f"{ours[1] / theirs[1]:.2f}x per worker core, {ours[2] / theirs[2]:.2f}x per CPU second",
        f"KDIGA step ({TEACHER} -> {STUDENT}, {STEP_CLASSES} classes, {s.crop}x{s.crop}, batch "
        f"{s.batch}, {dev.type}, {step_threads} torch thread(s)): {step:.1f} images/s",
    ]
    for name, (per_s, _, per_cpu) in rates.items():
        lines.append(
            f"{name} / step: {per_s / step:.2f} ({'keeps up' if per_s >= step else 'too slow'} "
            f"with {s.workers} workers); decoding for the step needs {step / per_cpu:.2f} cores"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: small, fast")
    for flag, what in (
        ("--images", "number of JPEGs (2000; quick 512)"),
        ("--source-size", "side of the generated JPEGs in pixels (256; quick 128)"),
        ("--crop", "S, side of the views and of the step's input (CUDA 224, CPU 64; quick /2)"),
        ("--batch", "B of the loaders and of the step (CUDA 128, CPU 32; quick /2)"),
        ("--workers", "DataLoader workers of both loaders (min(8, cores))"),
        ("--repeats", "timed epochs per loader, and timed steps (3; quick 2)"),
    ):
        parser.add_argument(flag, type=int, default=None, help=what)
    args = parser.parse_args(argv)
    given = {k: v for k, v in vars(args).items() if k != "quick" and v is not None}
    bad = [
        f"--{k.replace('_', '-')}={v}" for k, v in given.items() if v < (0 if k == "workers" else 1)
    ]
    if bad:
        parser.error(f"{', '.join(bad)}: sizes must be >= 1 (workers >= 0)")
    base = default_sizes(args.quick, device().type == "cuda")
    sizes = Sizes(**{**base.__dict__, **given})
    print(header())
    print(run(args.quick, sizes))


if __name__ == "__main__":
    main()
