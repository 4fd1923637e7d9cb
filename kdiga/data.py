"""Datasets as uint8 image tensors, fixed splits, and batch augmentations in torch.

Every loader returns images as uint8 ``[N, C, H, W]`` and labels as int64 ``[N]``; models
see ``to_float(images)`` in [0, 1] (normalisation lives in the model wrapper).

- ``digits``: scikit-learn's copy of the UCI handwritten digits (1,797 real 8x8 images),
  upsampled bilinearly; the embedded default study. Its train/test split is fixed.
- ``cifar10``: torchvision's loader over a local root (no download unless asked).
- ``imagenet``: an ImageFolder root; streamed (``imagenet_folder``) or, with ``n``, a fixed
  subset held in memory (the paper evaluates on 1,000 test images).
- ``synthetic``: class templates plus noise, for tests and benchmarks only.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from kdiga.errors import KdigaError
from kdiga.options import AUGMENTATIONS, DATASET_INFO, DATASETS

if TYPE_CHECKING:
    from torchvision.datasets import ImageFolder

logger = logging.getLogger(__name__)

DIGITS_TEST_FRACTION = 1 / 3
DIGITS_SPLIT_SEED = 0


class DatasetNotFoundError(KdigaError, FileNotFoundError, ValueError):
    """A dataset's files are not where they were looked for (a ``ValueError`` too)."""


def _check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise ValueError(f"split={split!r} is not valid for dataset {name!r}; allowed: {allowed}")


def split_indices(
    labels: Tensor, fraction: float, seed: int = 0, stratify: bool = True
) -> tuple[Tensor, Tensor]:
    """Split ``range(len(labels))`` into (kept, held-out) sorted int64 index tensors.

    The held-out part takes ``round(fraction * n_c)`` samples of each class ``c`` when
    ``stratify`` (else ``round(fraction * N)`` overall), chosen by a generator seeded with
    ``seed``: the result depends only on (labels, fraction, seed, stratify).

    Args:
        labels: int labels ``[N]``.
        fraction: share held out, in [0, 1).
        seed: seed of the choice.
        stratify: keep the class proportions in both parts.
    """
    labels = torch.as_tensor(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D [N]; got shape {tuple(labels.shape)}")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1)")
    gen = torch.Generator().manual_seed(int(seed))
    n = labels.numel()
    held = torch.zeros(n, dtype=torch.bool)
    if stratify:
        groups = [labels == c for c in torch.unique(labels, sorted=True)]
    else:
        groups = [torch.ones(n, dtype=torch.bool)]
    for mask in groups:
        idx = torch.nonzero(mask).flatten()
        k = round(fraction * idx.numel())
        held[idx[torch.randperm(idx.numel(), generator=gen)[:k]]] = True
    return torch.nonzero(~held).flatten(), torch.nonzero(held).flatten()


def seeded_subset(n_total: int, n: int, seed: int) -> Tensor:
    """``n`` distinct indices into ``range(n_total)``, sorted, int64 ``[n]``, fixed by ``seed``:
    the first ``n`` of a permutation drawn by a generator seeded with ``seed``, so a larger
    ``n`` keeps the smaller one's draw (the fixed test subsets, the bounds' samples)."""
    if not (isinstance(n_total, int) and isinstance(n, int) and 1 <= n <= n_total):
        raise ValueError(f"need ints 1 <= n <= n_total, got n={n!r:.20}, n_total={n_total!r:.20}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n_total, generator=gen)[:n].sort().values


def _subset(images: Tensor, labels: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    """A fixed random subset of ``n`` samples (in their original order); all when n is None."""
    if n is None:
        return images, labels
    if n < 1:
        raise ValueError(f"n={n!r} must be >= 1 or None (all samples)")
    if n >= labels.numel():
        return images, labels
    idx = seeded_subset(labels.numel(), n, seed)
    return images[idx], labels[idx]


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    """Bilinear resize of uint8 ``[N, C, H, W]`` to ``[N, C, size, size]``, rounded to uint8."""
    if images.shape[-2:] == (size, size):
        return images
    smaller = size < images.shape[-1]
    out = F.interpolate(
        images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=smaller
    )
    return out.round().clamp(0, 255).to(torch.uint8)


def _load_digits(split: str, image_size: int, channels: int) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits  # noqa: PLC0415 (heavy and optional: for the digits dataset only)

    bunch = load_digits()
    raw = torch.from_numpy(np.asarray(bunch.images, dtype=np.float64))  # [1797, 8, 8] in 0..16
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    images = (raw * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    train_idx, test_idx = split_indices(labels, DIGITS_TEST_FRACTION, DIGITS_SPLIT_SEED)
    idx = train_idx if split == "train" else test_idx
    images = _resize_uint8(images[idx], image_size)
    if channels == 3:
        images = images.expand(-1, 3, -1, -1).contiguous()
    return images, labels[idx]


def _synthetic(
    split: str, image_size: int, channels: int, num_classes: int, n: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Class template + Gaussian noise; templates depend on ``seed`` only, samples on the split."""
    templates = torch.rand(
        num_classes, channels, image_size, image_size, generator=torch.Generator().manual_seed(seed)
    )
    split_seed = seed * 1000003 + (1 if split == "train" else 2)
    gen = torch.Generator().manual_seed(split_seed)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    noise = torch.randn(n, channels, image_size, image_size, generator=gen)
    x = (templates[labels] + 0.25 * noise).clamp(0, 1)
    return (x * 255).round().to(torch.uint8), labels.long()


def _load_cifar10(
    split: str, root: str | Path | None, image_size: int, download: bool
) -> tuple[Tensor, Tensor]:
    how = (
        "put the 'CIFAR-10 python version' archive (cifar-10-python.tar.gz from "
        "https://www.cs.toronto.edu/~kriz/cifar.html) extracted as <root>/cifar-10-batches-py/, "
        "or pass download=True on a machine with network access"
    )
    if root is None:
        raise DatasetNotFoundError(f"cifar10 needs root=<directory>; {how}")
    root = Path(root)
    if not download and not (root / "cifar-10-batches-py").is_dir():
        raise DatasetNotFoundError(f"cifar10 not found under {root}: {how}")
    from torchvision.datasets import CIFAR10  # noqa: PLC0415 (heavy and optional: for cifar10 and imagenet only)

    try:
        ds = CIFAR10(str(root), train=split == "train", download=download)
    except (RuntimeError, OSError) as err:  # torchvision: "Dataset not found or corrupted"
        raise DatasetNotFoundError(f"cifar10 under {root} did not load ({err}); {how}") from err
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    labels = torch.as_tensor(ds.targets, dtype=torch.int64)
    return _resize_uint8(images, image_size), labels


def imagenet_folder(
    root: str | Path, split: str = "val", *, resize: int = 256, crop: int = 224
) -> ImageFolder:
    """ImageFolder over ``<root>/<split>/<wnid>/*.JPEG`` yielding (uint8 ``[3, crop, crop]``, int).

    Each image is resized (short side ``resize``) and center-cropped to ``crop``, the usual
    ImageNet evaluation transform; ``split="test"`` reads the ``val`` folder (the paper's test
    images). Class indices follow the sorted folder names (the standard wnid order).
    """
    _check_split("imagenet", split, ("train", "val", "test"))
    if resize < 1 or crop < 1 or crop > resize:
        raise ValueError(f"need 1 <= crop <= resize; got resize={resize!r}, crop={crop!r}")
    folder = Path(root) / ("val" if split == "test" else split)
    if not folder.is_dir():
        raise DatasetNotFoundError(
            f"imagenet split {split!r} not found: expected class folders under {folder} "
            "(<root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG; the validation images "
            "must be sorted into class folders)"
        )
    from torchvision import transforms  # noqa: PLC0415 (heavy and optional: for cifar10 and imagenet only)
    from torchvision.datasets import ImageFolder  # noqa: PLC0415 (heavy and optional: for cifar10 and imagenet only)

    tf = transforms.Compose(
        [
            transforms.Resize(resize, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(crop),
            transforms.PILToTensor(),
        ]
    )
    try:
        return ImageFolder(str(folder), transform=tf)
    except (FileNotFoundError, OSError) as err:
        raise DatasetNotFoundError(f"imagenet folder {folder} is not usable: {err}") from err


def _load_imagenet(
    split: str, root: str | Path | None, image_size: int, n: int | None, seed: int
) -> tuple[Tensor, Tensor]:
    if root is None:
        raise DatasetNotFoundError("imagenet needs root=<ImageFolder root with train/ and val/>")
    if n is None:
        raise ValueError(
            "imagenet is not held in memory whole: pass n=<number of images> for a fixed "
            "subset (the paper evaluates on 1000), or stream it with imagenet_folder()/shards"
        )
    ds = imagenet_folder(root, split, resize=round(image_size * 256 / 224), crop=image_size)
    targets = torch.as_tensor(ds.targets, dtype=torch.int64)
    _, order = _subset(targets, torch.arange(targets.numel()), n, seed)
    images = torch.stack([ds[int(i)][0] for i in order])
    return images, targets[order]


def _check_dataset_options(
    name: str, channels: int | None, num_classes: int | None, download: bool
) -> None:
    """ValueError for an option that dataset ``name`` does not take."""
    if channels is not None and name not in ("digits", "synthetic"):
        raise ValueError(f"channels= is for 'digits' and 'synthetic' only; got dataset {name!r}")
    if num_classes is not None and name != "synthetic":
        raise ValueError(f"num_classes= is for 'synthetic' only; got dataset {name!r}")
    if download and name != "cifar10":
        raise ValueError(f"download=True is for 'cifar10' only; got dataset {name!r}")


def load_dataset(
    name: str,
    split: str,
    *,
    root: str | Path | None = None,
    image_size: int | None = None,
    n: int | None = None,
    seed: int = 0,
    channels: int | None = None,
    num_classes: int | None = None,
    download: bool = False,
) -> tuple[Tensor, Tensor]:
    """Load a dataset split into memory: uint8 images ``[N, C, H, W]``, int64 labels ``[N]``.

    Args:
        name: one of ``DATASETS``.
        split: "train" or "test" ("val" is an alias of "test" for imagenet).
        root: data directory (cifar10, imagenet).
        image_size: output side; default: the dataset's (``kdiga.options.DATASET_INFO``).
        n: keep a fixed random subset of ``n`` samples (seeded by ``seed``); for ``synthetic``,
            the number of samples (default 512); required for ``imagenet``.
        seed: seed of the subset (and of the synthetic data); never changes the digits split.
        channels: digits: 1 (default) or 3 (grey replicated); synthetic: any (default 3).
        num_classes: synthetic only (default 10).
        download: cifar10 only: let torchvision download (needs network).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; allowed: {DATASETS}")
    info = DATASET_INFO[name]
    size = info.image_size if image_size is None else int(image_size)
    if size < 1:
        raise ValueError(f"image_size={image_size!r} must be >= 1")
    _check_dataset_options(name, channels, num_classes, download)

    if name == "imagenet":
        _check_split(name, split, ("train", "val", "test"))
        images, labels = _load_imagenet(split, root, size, n, seed)
        logger.info("imagenet %s: %d images", split, labels.numel())
        return images, labels
    _check_split(name, split, ("train", "test"))
    if name == "digits":
        ch = info.channels if channels is None else channels
        if ch not in (1, 3):
            raise ValueError(f"channels={channels!r} for digits; allowed: 1, 3")
        images, labels = _load_digits(split, size, ch)
    elif name == "cifar10":
        images, labels = _load_cifar10(split, root, size, download)
    else:
        ch = info.channels if channels is None else channels
        k = info.classes if num_classes is None else num_classes
        count = (info.train_images if split == "train" else info.test_images) if n is None else n
        if ch < 1 or k < 2 or count < 1:
            raise ValueError(
                f"synthetic needs channels >= 1, num_classes >= 2, n >= 1; "
                f"got channels={ch}, num_classes={k}, n={count}"
            )
        return _synthetic(split, size, ch, k, count, seed)
    images, labels = _subset(images, labels, n, seed)
    logger.info(
        "%s %s: %d images of shape %s", name, split, labels.numel(), tuple(images.shape[1:])
    )
    return images, labels


def to_float(images: Tensor) -> Tensor:
    """uint8 images ``[..., C, H, W]`` -> float32 in [0, 1]; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point in [0, 1]; got {images.dtype}")
    return images.float()


def _random_crop(x: Tensor, padding: int, generator: torch.Generator) -> Tensor:
    """Per-sample random crop of ``x`` ``[B, C, H, W]`` after zero padding by ``padding``."""
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # [B, 1, H, 1]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # [B, 1, 1, W]
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows, cols]


def augment(
    x: Tensor, kind: str, generator: torch.Generator | None = None, *, padding: int = 4
) -> Tensor:
    """Random batch augmentation in torch, one draw per sample, on the device of ``x``.

    Args:
        x: images ``[B, C, H, W]`` (float or uint8).
        kind: "none"; "crop" (zero-pad by ``padding`` then a random crop back to H x W; for
            digits, which must not be mirrored); "crop_flip" (crop, then a horizontal flip with
            probability 1/2: the standard CIFAR-10 augmentation).
        generator: CPU generator for the draws (reproducible runs pass a seeded one).
        padding: pixels of padding for the crop.
    """
    if kind not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {kind!r}; allowed: {AUGMENTATIONS}")
    if x.ndim != 4:
        raise ValueError(f"x must be [B, C, H, W]; got shape {tuple(x.shape)}")
    if padding < 0:
        raise ValueError(f"padding={padding!r} must be >= 0")
    if kind == "none":
        return x
    out = _random_crop(x, padding, generator) if padding > 0 else x
    if kind == "crop_flip":
        flip = torch.rand(x.shape[0], generator=generator) < 0.5
        out = torch.where(flip.to(x.device)[:, None, None, None], out.flip(-1), out)
    return out
