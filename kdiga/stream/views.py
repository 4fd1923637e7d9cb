"""The views of a streamed image, and its decoding (CPU, or batched on a device).

Training: RandomResizedCrop(S) (scale 0.08-1, ratio 3/4-4/3) and a horizontal flip with
probability 1/2, drawn from a generator seeded by (seed, epoch, sample key, pass);
evaluation: resize the short side to ``round(S * 256 / 224)`` (bilinear, antialiased) and
CenterCrop(S). Pixel values agree with torchvision's PIL transforms to within 1 (rounding of
the resize).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
from torch import Tensor
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2 import functional as TF

from kdiga.shards import ShardError
from kdiga.stream.seeds import mix

#: Ratio of the evaluation resize to the crop (the usual 256 / 224).
EVAL_RESIZE_RATIO = 256 / 224

_SCALE = (0.08, 1.0)
_RATIO = (3 / 4, 4 / 3)


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


def draw_crop(
    key: str, rep: int, height: int, width: int, seed: int, epoch: int
) -> tuple[int, int, int, int, bool]:
    """The training crop and flip ``(top, left, h, w, flip)`` of sample ``key`` in pass
    ``rep`` of an image ``height x width``: the same whichever worker draws it, and when."""
    rng = random.Random(mix("crop", seed, epoch, key, rep))
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


def decode_cpu(data: bytes, where: str) -> Tensor:
    """Encoded JPEG or PNG bytes -> uint8 ``[3, H, W]`` RGB on the CPU; ``where`` names the
    sample in the ShardError of bytes that do not decode."""
    try:
        return decode_image(
            torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB
        )
    except RuntimeError as err:
        message = str(err).strip().splitlines()[-1]
        raise ShardError(f"{where} does not decode ({message})") from err


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
