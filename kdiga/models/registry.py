"""Model registry: ``build_model(name, ...)`` for every architecture kdiga knows.

Built-in names are listed, with their builders, in :mod:`kdiga.models.catalog` (no torch, so
the params schema reads it cheaply); ``@register_model`` adds architectures of one's own;
``"timm:<name>"`` and ``"torchvision:<name>"`` are resolved by :mod:`kdiga.models.external`.
Every model comes back wrapped in :class:`~kdiga.models.normalized.NormalizedModel`, inputs
in [0, 1].

Default normalisation: the identity (mean 0, std 1) unless ``mean``/``std`` are given, except
for ``pretrained=True`` timm and torchvision models, which take the mean/std their weights
were trained with (timm's ``pretrained_cfg``, torchvision's weights transforms).

Grouped convolutions (MobileNetV2's depthwise layers, and those of timm/torchvision models)
are built as :class:`~kdiga.models.layers.GroupedConv2d`: the same layer and weights, with a
double backward that does not loop over the groups (see :mod:`kdiga.models.layers`).
BatchNorm layers (plain ``nn.BatchNorm2d`` with ``affine=True``) are built as
:class:`~kdiga.models.batchnorm.IGABatchNorm2d`: the same layer, state and forward, with an
explicit train-mode double backward (see :mod:`kdiga.models.batchnorm`). Teachers are
converted too: in eval mode IGABatchNorm2d is nn.BatchNorm2d's forward, and without
``create_graph`` both layers run PyTorch's own kernels.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from kdiga.models import external
from kdiga.models.batchnorm import use_batchnorm_double_backward
from kdiga.models.catalog import BUILTIN, EXTERNAL_PREFIXES
from kdiga.models.layers import use_grouped_double_backward
from kdiga.models.normalized import NormalizedModel, resolve_stats

logger = logging.getLogger(__name__)

#: builder(num_classes, in_chans, image_size, **kwargs) -> raw nn.Module giving logits [B, N].
Builder = Callable[..., nn.Module]

_BUILDERS: dict[str, Builder] = {}  # architectures registered at run time


def register_model(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering ``builder(num_classes, in_chans, image_size, **kwargs)``."""
    if ":" in name:
        raise ValueError(f"built-in model names may not contain ':' (reserved), got {name!r}")

    def deco(builder: Builder) -> Builder:
        if name in _BUILDERS or name in BUILTIN:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        return builder

    return deco


def list_models() -> list[str]:
    """Sorted architecture names: the built-in ones and those registered at run time
    (``"timm:<name>"``/``"torchvision:<name>"`` also work)."""
    return sorted({*BUILTIN, *_BUILDERS})


def _builder(name: str) -> Builder:
    if name in _BUILDERS:
        return _BUILDERS[name]
    module, _, function = BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int, got {value!r}")


def build_model(
    name: str,
    num_classes: int,
    *,
    in_chans: int = 3,
    image_size: int = 32,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pretrained: bool = False,
    **kwargs: Any,
) -> NormalizedModel:
    """Build architecture ``name`` wrapped with its input normalisation.

    Args:
        name: one of :func:`list_models`, or ``"timm:<name>"``, ``"torchvision:<name>"``.
        num_classes: N, the logits' width.
        in_chans: C of the inputs [B, C, H, W].
        image_size: H = W the model is built for (CNNs here pool adaptively and accept other
            sizes; ViTs need it).
        mean, std: per-channel normalisation (1 or C values); see the module docstring for
            the default.
        pretrained: download pretrained weights (timm/torchvision only). Offline this raises
            ``RuntimeError`` naming the model and how to supply a local file.
        **kwargs: architecture options (``width``, ``width_mult``, ``depth``,
            ``widen_factor``, timm/torchvision constructor arguments), stored for reloading.

    Returns:
        NormalizedModel: ``forward(x [B, C, H, W] in [0, 1]) -> logits [B, N]``.
    """
    _check_positive(num_classes=num_classes, in_chans=in_chans, image_size=image_size)
    default_stats = None
    if name.startswith(EXTERNAL_PREFIXES):
        net, default_stats = external.build_external(
            name,
            num_classes,
            in_chans=in_chans,
            image_size=image_size,
            pretrained=pretrained,
            **kwargs,
        )
    elif name in _BUILDERS or name in BUILTIN:
        if pretrained:
            raise ValueError(
                f"{name!r} has no pretrained weights to download; build it with "
                "pretrained=False and load a checkpoint (kdiga.models.load_model, "
                "kdiga.teachers.load_teacher('file:...'))"
            )
        try:
            net = _builder(name)(num_classes, in_chans, image_size, **kwargs)
        except TypeError as exc:
            raise ValueError(f"bad options for {name!r}: {exc}") from exc
    else:
        raise ValueError(
            f"unknown model {name!r}; allowed: {', '.join(list_models())}, "
            "'timm:<timm model name>', 'torchvision:<torchvision model name>'"
        )
    converted = use_grouped_double_backward(net)  # same weights; IGA's double backward
    if converted:  # makes one call per grouped layer instead of one per group
        logger.debug("%s: %d grouped convolutions use GroupedConv2d", name, converted)
    converted = use_batchnorm_double_backward(net)  # same state and forward, cheaper IGA
    if converted:
        logger.debug("%s: %d BatchNorm layers use IGABatchNorm2d", name, converted)
    mean_l, std_l = resolve_stats(mean, std, in_chans, default_stats)
    stored = {k: v for k, v in kwargs.items() if k not in external_only_kwargs()}
    logger.debug("built %s (%d classes, %d chans, %dpx)", name, num_classes, in_chans, image_size)
    return NormalizedModel(
        net,
        mean_l,
        std_l,
        arch=name,
        num_classes=num_classes,
        in_chans=in_chans,
        image_size=image_size,
        build_kwargs=stored,
    )


def external_only_kwargs() -> frozenset[str]:
    """Keyword arguments that only matter when downloading weights (not kept for reloading)."""
    return frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "weights"})


_RANDOM_FILLS = frozenset({"normal_", "uniform_", "random_", "exponential_", "bernoulli_"})


class _NoRandomInit(TorchFunctionMode):
    """Random fills of meta tensors are skipped: they are no-ops there, and torch's meta
    ``normal_`` alone imports torch._dynamo (about a second)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _RANDOM_FILLS and args and getattr(args[0], "is_meta", False):
            return args[0]
        return func(*args, **(kwargs or {}))


def state_shapes(name: str, num_classes: int, **build: Any) -> dict[str, tuple[int, ...]] | None:
    """Names and shapes of the raw net's state_dict that ``build_model(name, num_classes,
    **build)`` would build, found on PyTorch's meta device: nothing is allocated, initialised
    or downloaded. What a file's header describes can so be checked against its tensors
    before the model is built. None when the meta device cannot build it (an op it lacks).

    Raises:
        ValueError: as :func:`build_model` (unknown name, bad options).
    """
    try:
        with torch.device("meta"), _NoRandomInit():
            net = build_model(name, num_classes, **build).net
    except RuntimeError:
        return None
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}
