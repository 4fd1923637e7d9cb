"""Teacher signals paid once: logits and input gradients of K fixed augmented views, cached.

With a teacher much larger than the student (WRN-34-10 -> MobileNetV2, about 73x the MACs),
a KDIGA step (paper eq. 5, Algorithm 1) is dominated by the teacher's forward and input
gradient ``gt = ∇x CE(ft(x), y)``. :func:`compute_signals` pays that once per grid: for each
of K fixed augmented views of every training image it stores the teacher's logits and input
gradient, and every method and student of the grid reuses them through :class:`SignalCache`
(``kdiga.train.fit(..., batch_source=cache)``). What is left per step is the student's
own cost (``bench/teacher_cache.py`` measures a MobileNetV2 student and a ResNet-18-shaped
control of the same MAC ratio). The pipeline's optional ``signals`` stage
(``pipeline/stages/signals.py``) computes the set once per teacher and data.

Views
-----
View ``v`` of sample ``i`` is the image under fixed augmentation parameters: a crop offset
``(oy, ox)`` in the zero-padded image (``[0, 2p]``, p = ``crop_padding``) and a flip bit.
View 0 is the un-augmented image (offset ``(p, p)``, no flip), the centre of the augmentation
distribution, so ``views=1`` is the plain cache of the clean images. View ``v >= 1`` draws its
parameters for all N samples from ``torch.Generator().manual_seed(seed * 1000003 + v)`` in
exactly the order :func:`kdiga.data.augment` draws them, so
``x_view = augment(to_float(images), augment, that generator, padding=p)`` bit for bit. Only
the parameters are stored (``offsets`` int16 ``[K, N, 2]``, ``flips`` bool ``[K, N]``): the
trainer rebuilds the exact augmented input from the uint8 images, by copying pixels.

Which view a sample gets in an epoch (:class:`SignalCache`, ``schedule``): ``"cycle"``
(default) gives sample i the view ``(phase_i + epoch) % K`` with a fixed random phase per
sample, so every sample sees each of its K views once in any K consecutive epochs and a batch
mixes views; ``"random"`` draws a view per sample per epoch. Both depend on (cache seed,
epoch) only, so a resumed run sees the same views as an uninterrupted one. Live training draws
a fresh augmentation every epoch; K views of one sample are a finite sample of that
distribution (``bench/teacher_cache.py`` measures the accuracy effect of K).

Storage and memory
------------------
Per view: logits float32 ``[K, N, classes]`` and input gradients ``[K, N, C, H, W]`` in
``grad_dtype``: ``"float32"`` (exact), ``"float16"`` or ``"bfloat16"`` (half the bytes). The
reduced precisions store ``g / s`` with a per-(view, sample) float32 scale ``s = max|g|``
(``grad_scale`` ``[K, N]``), so small gradients neither underflow nor lose relative
precision: the error of a sample's gradient, relative to its norm, was about 2e-4 in
float16 and 1.5e-3 in bfloat16 (digits teacher, 600 gradients). Size of the gradients:
``K * N * C * H * W * bytes``; CIFAR-10 with 16 views in float16 is 16 * 50,000 * 3,072 * 2
bytes = 4.9 GB (9.8 GB in float32); :func:`signals_nbytes` gives the bytes of every stored
tensor (logits included) before anything is computed. :func:`compute_signals` holds the set in
memory once (compute it where that fits); :func:`load_signals` memory-maps the file by default
(a private mapping of the file), so the set need not fit in a training job's memory: pages are
read on demand and shared through the OS page cache by the jobs of a node (``verify=True``
reads the whole file once to check its sha256).

The file (:func:`save_signals`, a safetensors file written atomically) carries its
metadata: format, views, augment, crop_padding, seed, grad_dtype, N, image shape, number of
classes, the teacher's sha256 (of its state_dict by default, see :func:`module_sha256`, or the
checkpoint file's, given by the caller), the sha256 of the images and labels, and a sha256 of
the stored tensors that :func:`load_signals` checks (``verify=True``).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdiga.artifacts import hash_tensors, load_tensors, save_tensors
from kdiga.data import to_float
from kdiga.errors import KdigaError
from kdiga.files import is_safetensors
from kdiga.losses import TeacherSignals, teacher_signals
from kdiga.options import AUGMENTATIONS, SCHEDULES
from kdiga.options import GRAD_DTYPES as GRAD_DTYPE_NAMES
from kdiga.progress import ProgressFn, Tracker
from kdiga.train import check_data

logger = logging.getLogger(__name__)

SIGNALS_FORMAT = "kdiga.signals/2"
#: the torch dtype of each storage of the input gradients (kdiga.options.GRAD_DTYPES)
GRAD_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in GRAD_DTYPE_NAMES}
_VIEW_SEED_MULT = 1000003
_TENSORS = ("offsets", "flips", "logits", "grads", "grad_scale")


class SignalError(KdigaError, ValueError):
    """A signal file is missing, unreadable, truncated or fails its checksum."""


class SignalMismatchError(SignalError):
    """A signal set was computed for another teacher, other data or another N."""


@dataclass
class SignalSet:
    """Teacher signals of K fixed views of N images (see the module docstring).

    Attributes:
        offsets: int16 ``[K, N, 2]``: crop offsets ``(oy, ox)`` in the padded image.
        flips: bool ``[K, N]``: horizontal flip after the crop.
        logits: float32 ``[K, N, classes]``: teacher logits at the view.
        grads: ``grad_dtype`` ``[K, N, C, H, W]``: per-sample ∇x CE(ft(x_view), y) (eq. 5,
            gt), divided by ``grad_scale`` when that is not None.
        grad_scale: float32 ``[K, N]`` (float16/bfloat16 storage) or None (float32).
        meta: the metadata dict (keys listed in the module docstring).
    """

    offsets: Tensor
    flips: Tensor
    logits: Tensor
    grads: Tensor
    grad_scale: Tensor | None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def views(self) -> int:
        """K, the number of views."""
        return int(self.offsets.shape[0])

    @property
    def n(self) -> int:
        """N, the number of images."""
        return int(self.offsets.shape[1])

    @property
    def padding(self) -> int:
        """Zero padding of the crop, in pixels."""
        return int(self.meta["crop_padding"])

    def take_views(self, k: int) -> SignalSet:
        """The set of views 0..k-1 only (views do not depend on K: the same as computing k)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.views:
            raise ValueError(f"k must be an int in [1, {self.views}], got {k!r}")
        scale = None if self.grad_scale is None else self.grad_scale[:k]
        meta = {key: v for key, v in self.meta.items() if key != "content_sha256"}
        return SignalSet(
            self.offsets[:k],
            self.flips[:k],
            self.logits[:k],
            self.grads[:k],
            scale,
            {**meta, "views": k},
        )

    def view_images(self, images: Tensor, views: Tensor, idx: Tensor) -> Tensor:
        """Float ``[B, C, H, W]`` in [0, 1]: ``images`` (uint8 ``[B, C, H, W]``, the samples
        ``idx`` [B]) under their views ``views`` [B], on the device of ``images``."""
        views, idx = views.cpu().long(), idx.cpu().long()
        return apply_views(
            to_float(images), self.offsets[views, idx], self.flips[views, idx], self.padding
        )

    def signals(
        self, views: Tensor, idx: Tensor, device: str | torch.device = "cpu"
    ) -> TeacherSignals:
        """Cached TeacherSignals (float32) of samples ``idx`` [B] at views ``views`` [B]."""
        views, idx = views.cpu().long(), idx.cpu().long()
        grad = self.grads[views, idx].to(device, torch.float32)
        if self.grad_scale is not None:
            scale = self.grad_scale[views, idx].to(device, torch.float32)
            grad = grad * scale.view(-1, *([1] * (grad.dim() - 1)))
        return TeacherSignals(logits=self.logits[views, idx].to(device), input_grad=grad)


def apply_views(x: Tensor, offsets: Tensor, flips: Tensor, padding: int) -> Tensor:
    """Crop ``x`` [B, C, H, W] (zero-padded by ``padding``) at ``offsets`` [B, 2] = (oy, ox),
    then mirror where ``flips`` [B]; the same pixels as :func:`kdiga.data.augment`."""
    b, c, h, w = x.shape
    dev = x.device
    out = x
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy, ox = offsets[:, 0].long().to(dev), offsets[:, 1].long().to(dev)
        rows = (oy[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        out = padded[bi, ci, rows, cols]
    if bool(flips.any()):
        out = torch.where(flips.to(dev)[:, None, None, None], out.flip(-1), out)
    return out


def view_params(n: int, view: int, augment: str, padding: int, seed: int) -> tuple[Tensor, Tensor]:
    """(offsets int16 [N, 2], flips bool [N]) of view ``view`` (0: identity), drawn as
    :func:`kdiga.data.augment` draws them from ``Generator().manual_seed(seed * 1000003 + v)``."""
    identity = torch.full((n, 2), padding, dtype=torch.int16)
    no_flip = torch.zeros(n, dtype=torch.bool)
    if view == 0 or augment == "none":
        return identity, no_flip
    gen = torch.Generator().manual_seed(int(seed) * _VIEW_SEED_MULT + int(view))
    offsets = identity
    if padding > 0:
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
        offsets = torch.stack([oy, ox], dim=1).to(torch.int16)
    flips = no_flip
    if augment == "crop_flip":
        flips = torch.rand(n, generator=gen) < 0.5
    return offsets, flips


def signals_nbytes(
    views: int, n: int, image_shape: Sequence[int], num_classes: int, grad_dtype: str
) -> int:
    """Bytes of the tensors a set of ``views`` views of ``n`` images stores (what
    :func:`compute_signals` holds in memory and :func:`save_signals` writes; the file adds a
    JSON header of a few kB): offsets int16 ``[K, N, 2]``, flips bool ``[K, N]``, logits
    float32 ``[K, N, classes]``, grads ``[K, N, C, H, W]`` in ``grad_dtype`` and, unless
    that is float32, grad_scale float32 ``[K, N]``. ``image_shape`` is ``(C, H, W)``."""
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype={grad_dtype!r}; allowed: {tuple(GRAD_DTYPES)}")
    pixels = math.prod(int(d) for d in image_shape)
    per_sample = 2 * 2 + 1 + 4 * int(num_classes)  # offsets, flips, logits
    per_sample += pixels * GRAD_DTYPES[grad_dtype].itemsize
    if grad_dtype != "float32":
        per_sample += 4  # grad_scale
    return int(views) * int(n) * per_sample


def module_sha256(model: nn.Module) -> str:
    """sha256 of a module's state_dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    hash_tensors(h, model.state_dict().items())
    return h.hexdigest()


def data_sha256(images: Tensor, labels: Tensor) -> str:
    """sha256 of uint8 images ``[N, C, H, W]`` and labels ``[N]`` (as int64)."""
    h = hashlib.sha256()
    hash_tensors(h, [("images", images), ("labels", torch.as_tensor(labels).long())])
    return h.hexdigest()


def _content_sha256(s: SignalSet) -> str:
    h = hashlib.sha256()
    items = [(k, getattr(s, k)) for k in _TENSORS if getattr(s, k) is not None]
    hash_tensors(h, items)
    return h.hexdigest()


def _check_images(images: Tensor, labels: Tensor) -> Tensor:
    if not isinstance(images, Tensor) or images.dtype != torch.uint8:
        got = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor) else images
        raise ValueError(f"images must be uint8 [N, C, H, W] (as the shards hold); got {got}")
    return check_data(images, labels, "signal")[1]


def _quantize(grad: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """[B, ...] float32 -> (stored [B, ...] in dtype, scale [B] or None for float32)."""
    if dtype == torch.float32:
        return grad.float(), None
    scale = grad.abs().flatten(1).amax(dim=1).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    stored = (grad / scale.view(-1, *([1] * (grad.dim() - 1)))).to(dtype)
    return stored, scale


def _check_settings(
    views: int, augment: str, crop_padding: int, grad_dtype: str, batch_size: int
) -> None:
    """ValueError unless ``compute_signals``' view, augmentation, precision and batch settings
    are valid together."""
    if isinstance(views, bool) or not isinstance(views, int) or views < 1:
        raise ValueError(f"views must be an int >= 1, got {views!r}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment={augment!r}; allowed: {AUGMENTATIONS}")
    if views > 1 and augment == "none":
        raise ValueError(f"views={views} needs an augmentation: with augment='none' use views=1")
    if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
        raise ValueError(f"crop_padding must be an int >= 0, got {crop_padding!r}")
    if views > 1 and augment == "crop" and crop_padding == 0:
        raise ValueError(f"views={views} with augment='crop' needs crop_padding >= 1")
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype={grad_dtype!r}; allowed: {tuple(GRAD_DTYPES)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")


@dataclass
class _Buffers:
    """The tensors of a :class:`SignalSet` being computed, filled batch by batch (logits are
    allocated at the first batch, when the number of classes is known)."""

    offsets: Tensor
    flips: Tensor
    grads: Tensor
    grad_scale: Tensor | None
    logits: Tensor | None = None

    @classmethod
    def empty(cls, views: int, shape: torch.Size, dtype: torch.dtype) -> _Buffers:
        """Uninitialised buffers for ``views`` views of images of ``shape`` [N, C, H, W]."""
        n = shape[0]
        return cls(
            offsets=torch.empty(views, n, 2, dtype=torch.int16),
            flips=torch.empty(views, n, dtype=torch.bool),
            grads=torch.empty(views, *shape, dtype=dtype),
            grad_scale=None if dtype == torch.float32 else torch.empty(views, n),
        )

    def put(self, v: int, sl: slice, sig: TeacherSignals) -> None:
        """Store the teacher's signals of the samples ``sl`` in view ``v``."""
        views, n = self.flips.shape
        if self.logits is None:
            self.logits = torch.empty(views, n, sig.logits.shape[1])
        self.logits[v, sl] = sig.logits.float().cpu()
        stored, scale = _quantize(sig.input_grad.float(), self.grads.dtype)
        self.grads[v, sl] = stored.cpu()
        if self.grad_scale is not None:
            self.grad_scale[v, sl] = scale.cpu()


def compute_signals(
    teacher: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    views: int,
    augment: str,
    crop_padding: int,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    grad_dtype: str = "float32",
    teacher_sha256: str | None = None,
    progress: ProgressFn | None = None,
) -> SignalSet:
    """Teacher logits and input gradients of ``views`` fixed augmented views of every image.

    For each view v and sample i: ``x = view v of images[i]`` (module docstring) and
    ``teacher_signals(teacher, x, y_i)`` (eq. 5, gt: one forward + one backward to x, eval
    mode, parameters frozen). Costs ``views * N`` teacher forward+backward passes, once.

    Args:
        teacher: the teacher; moved to ``device`` (eval mode and frozen only during the calls).
        images: uint8 ``[N, C, H, W]``; labels: int ``[N]``.
        views: K >= 1; view 0 is the un-augmented image. K > 1 needs an augmentation.
        augment: one of ``kdiga.data.AUGMENTATIONS`` (as the training run would use).
        crop_padding: padding of the crop, pixels (>= 0).
        seed: seed of the views' parameters.
        batch_size: images per teacher call.
        device: where the teacher runs; results are stored on CPU.
        grad_dtype: "float32", "float16" or "bfloat16" (see the module docstring).
        teacher_sha256: recorded as the teacher's identity; None: :func:`module_sha256`.
        progress: called with a :class:`kdiga.progress.Progress` of the task "signals",
            counting images of all views (``views * N``), at the start and after each batch.

    Returns:
        the :class:`SignalSet` (on CPU, in memory).
    """
    labels = _check_images(images, labels)
    _check_settings(views, augment, crop_padding, grad_dtype, batch_size)
    device = torch.device(device)
    dtype = GRAD_DTYPES[grad_dtype]
    sha = module_sha256(teacher) if teacher_sha256 is None else str(teacher_sha256)
    teacher.to(device)
    n = labels.numel()
    out = _Buffers.empty(views, images.shape, dtype)
    track = Tracker(progress, "signals", views * n, "images")
    track.at(0, f"view 1/{views}")
    for v in range(views):
        out.offsets[v], out.flips[v] = view_params(n, v, augment, crop_padding, seed)
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            x = apply_views(
                to_float(images[sl].to(device)), out.offsets[v, sl], out.flips[v, sl], crop_padding
            )
            out.put(v, sl, teacher_signals(teacher, x, labels[sl].to(device)))
            track.advance(len(x), f"view {v + 1}/{views}")
        logger.info("teacher signals: view %d/%d done (%d images)", v + 1, views, n)
    meta = {
        "format": SIGNALS_FORMAT,
        "views": views,
        "augment": augment,
        "crop_padding": crop_padding,
        "seed": int(seed),
        "grad_dtype": grad_dtype,
        "n": n,
        "image_shape": list(images.shape[1:]),
        "num_classes": int(out.logits.shape[2]),
        "teacher_sha256": sha,
        "data_sha256": data_sha256(images, labels),
    }
    return SignalSet(out.offsets, out.flips, out.logits, out.grads, out.grad_scale, meta)


def save_signals(signal_set: SignalSet, path: str | os.PathLike) -> None:
    """Write ``signal_set`` to ``path`` atomically (a byte-stable, memory-mappable safetensors
    file, :mod:`kdiga.artifacts`), with its metadata and a sha256 of the stored tensors."""
    meta = dict(signal_set.meta, content_sha256=_content_sha256(signal_set))
    tensors = {k: getattr(signal_set, k) for k in _TENSORS if getattr(signal_set, k) is not None}
    save_tensors(tensors, path, meta=meta)
    logger.info("saved teacher signals (%d views x %d) to %s", signal_set.views, signal_set.n, path)


def _check_structure(obj: Any, path: Path) -> SignalSet:
    if not isinstance(obj, dict) or not isinstance(obj.get("meta"), dict):
        raise SignalError(f"{path}: not a kdiga signal file ({SIGNALS_FORMAT})")
    meta = obj["meta"]
    if meta.get("format") != SIGNALS_FORMAT:
        raise SignalError(
            f"{path}: format {meta.get('format')!r}, expected {SIGNALS_FORMAT!r}; recompute it"
        )
    try:
        s = SignalSet(**{k: obj[k] for k in _TENSORS}, meta=meta)
        k, n = meta["views"], meta["n"]
        shapes = {
            "offsets": (s.offsets.shape, (k, n, 2)),
            "flips": (s.flips.shape, (k, n)),
            "logits": (s.logits.shape, (k, n, meta["num_classes"])),
            "grads": (s.grads.shape, (k, n, *meta["image_shape"])),
        }
        if s.grad_scale is not None:
            shapes["grad_scale"] = (s.grad_scale.shape, (k, n))
        dtype_ok = s.grads.dtype == GRAD_DTYPES[meta["grad_dtype"]]
        scale_ok = (s.grad_scale is None) == (meta["grad_dtype"] == "float32")
    except (KeyError, TypeError, AttributeError) as err:
        raise SignalError(f"{path}: signal file is incomplete ({err!r}); recompute it") from err
    bad = {name: (tuple(got), want) for name, (got, want) in shapes.items() if tuple(got) != want}
    if bad or not dtype_ok or not scale_ok:
        raise SignalError(
            f"{path}: tensors disagree with the metadata (shapes {bad}, grads dtype "
            f"{s.grads.dtype} vs {meta['grad_dtype']!r}); recompute it"
        )
    return s


def load_signals(
    path: str | os.PathLike,
    *,
    mmap: bool = True,
    verify: bool = True,
    teacher_sha256: str | None = None,
    n: int | None = None,
) -> SignalSet:
    """Read a :func:`save_signals` file; memory-mapped unless ``mmap=False``.

    Args:
        path: the file.
        mmap: map the tensors from the file instead of reading them into memory.
        verify: recompute the sha256 of the stored tensors (reads the whole file once).
        teacher_sha256: if given, the teacher the set must have been computed with.
        n: if given, the number of images the set must cover.

    Raises:
        SignalError: missing, unreadable, truncated or corrupt file.
        SignalMismatchError: another teacher or another N than asked.
    """
    path = Path(path)
    if not path.is_file():
        raise SignalError(f"{path}: no teacher-signal file there (compute_signals + save_signals)")
    if not is_safetensors(path):
        raise SignalError(
            f"{path}: not a kdiga signal file ({SIGNALS_FORMAT}, a safetensors file); recompute it"
        )
    try:
        tensors, meta = load_tensors(path, mmap=mmap)
        obj = {"grad_scale": None, **tensors, "meta": meta}
    except Exception as err:  # a bad file raises many types
        raise SignalError(
            f"{path}: teacher-signal file does not load ({err}); recompute it"
        ) from err
    s = _check_structure(obj, path)
    if verify and _content_sha256(s) != s.meta.get("content_sha256"):
        raise SignalError(
            f"{path}: teacher-signal file is corrupt (checksum differs); recompute it"
        )
    if teacher_sha256 is not None and s.meta["teacher_sha256"] != teacher_sha256:
        raise SignalMismatchError(
            f"{path}: computed with teacher sha256 {s.meta['teacher_sha256']}, not the teacher "
            f"given ({teacher_sha256}); recompute the signals for this teacher"
        )
    if n is not None and s.n != n:
        raise SignalMismatchError(f"{path}: holds signals of N={s.n} images, expected N={n}")
    return s


class SignalCache:
    """What the training loop needs from a :class:`SignalSet`: per batch, x and its signals.

    ``cache(idx, epoch) -> (x [B, C, H, W] float in [0, 1], TeacherSignals)`` for the sample
    indices ``idx`` [B] (CPU) of epoch ``epoch`` (0-based): each sample's view of that epoch
    (``schedule``, module docstring), the exact augmented image, and the teacher's logits and
    input gradient at that very image. Pass it to ``kdiga.train.fit(..., batch_source=cache)``
    with ``cfg.augment="none"`` (the cache does the augmenting) and the same images/labels.

    Args:
        signal_set: the signals, e.g. from :func:`load_signals`.
        images: uint8 ``[N, C, H, W]``, the images the set was computed on (checked by hash).
        labels: int ``[N]``, likewise.
        seed: seed of the view schedule (e.g. the student run's seed).
        schedule: "cycle" or "random".
        device: where x and the signals are returned; the images are held there.
    """

    def __init__(
        self,
        signal_set: SignalSet,
        images: Tensor,
        labels: Tensor,
        *,
        seed: int = 0,
        schedule: str = "cycle",
        device: str | torch.device = "cpu",
    ) -> None:
        labels = _check_images(images, labels)
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule={schedule!r}; allowed: {SCHEDULES}")
        if labels.numel() != signal_set.n:
            raise SignalMismatchError(
                f"the signal set covers N={signal_set.n} images, got N={labels.numel()}"
            )
        if data_sha256(images, labels) != signal_set.meta.get("data_sha256"):
            raise SignalMismatchError(
                "the images/labels differ from those the signal set was computed on "
                "(data sha256 mismatch): recompute the signals or pass the same data"
            )
        self.signal_set = signal_set
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.seed = int(seed)
        self.schedule = schedule
        gen = torch.Generator().manual_seed(self.seed)
        self._phase = torch.randint(0, signal_set.views, (signal_set.n,), generator=gen)
        self._epoch_views: tuple[int, Tensor] | None = None

    @property
    def augment(self) -> str:
        """The augmentation the cached views sample."""
        return str(self.signal_set.meta["augment"])

    def views_for(self, idx: Tensor, epoch: int) -> Tensor:
        """The view [B] (int64) each sample of ``idx`` [B] gets in epoch ``epoch``."""
        idx = torch.as_tensor(idx).cpu().long()
        k = self.signal_set.views
        if self.schedule == "cycle":
            return (self._phase[idx] + int(epoch)) % k
        if self._epoch_views is None or self._epoch_views[0] != epoch:
            gen = torch.Generator().manual_seed(self.seed * _VIEW_SEED_MULT + int(epoch))
            self._epoch_views = (epoch, torch.randint(0, k, (self.signal_set.n,), generator=gen))
        return self._epoch_views[1][idx]

    def batch(self, idx: Tensor, epoch: int) -> tuple[Tensor, Tensor]:
        """(x [B, C, H, W] float, views [B]) of samples ``idx`` [B] in epoch ``epoch``."""
        idx = torch.as_tensor(idx).cpu().long()
        views = self.views_for(idx, epoch)
        x = self.signal_set.view_images(self.images[idx.to(self.device)], views, idx)
        return x, views

    def __call__(self, idx: Tensor, epoch: int) -> tuple[Tensor, TeacherSignals]:
        """(x [B, C, H, W], cached TeacherSignals at x) for ``fit(batch_source=...)``."""
        idx = torch.as_tensor(idx).cpu().long()
        x, views = self.batch(idx, epoch)
        return x, self.signal_set.signals(views, idx, self.device)
