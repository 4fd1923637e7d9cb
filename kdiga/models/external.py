"""``timm:<name>`` and ``torchvision:<name>`` architectures (imported lazily).

Pretrained weights come from the network (Hugging Face hub, download.pytorch.org). Offline the
download fails with an ``OSError`` deep inside the hub client; it is turned into one
``RuntimeError`` naming the model and how to supply the weights as a local file. Setting
``HF_HUB_OFFLINE=1`` makes timm fail at once instead of retrying for about a minute.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from torch import nn

from kdiga.models.errors import WeightsUnavailableError

logger = logging.getLogger(__name__)

Stats = tuple[Sequence[float], Sequence[float]]


def build_external(
    name: str,
    num_classes: int,
    *,
    in_chans: int,
    image_size: int,
    pretrained: bool,
    **kwargs: Any,
) -> tuple[nn.Module, Stats | None]:
    """Raw net for ``"timm:<name>"``/``"torchvision:<name>"`` and its default (mean, std).

    The default statistics are the pretrained weights' own when ``pretrained`` is true, else
    ``None`` (the caller's identity default).
    """
    scheme, _, model_name = name.partition(":")
    if not model_name:
        raise ValueError(f"{name!r} names no model; write '{scheme}:<model name>'")
    if scheme == "timm":
        return build_timm(model_name, num_classes, in_chans, image_size, pretrained, **kwargs)
    return build_torchvision(model_name, num_classes, in_chans, image_size, pretrained, **kwargs)


def _offline_error(arch: str, exc: BaseException) -> RuntimeError:
    return WeightsUnavailableError(
        f"pretrained weights for {arch!r} could not be downloaded ({type(exc).__name__}: "
        f"{exc}). Offline? Download the weights file elsewhere, copy it here and load it with "
        f"kdiga.teachers.load_teacher('file:<path>', arch={arch!r}) (or, for timm, "
        f"load_teacher({arch!r}, weights='<path>')); or build with pretrained=False."
    )


def timm_default_stats(model_name: str) -> Stats | None:
    """(mean, std) from timm's pretrained config of ``model_name``, or ``None``."""
    import timm  # noqa: PLC0415 (heavy and optional: only timm: models need it)

    cfg = timm.models.get_pretrained_cfg(model_name)
    if cfg is None or cfg.mean is None or cfg.std is None:
        return None
    return tuple(cfg.mean), tuple(cfg.std)


def build_timm(
    model_name: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    pretrained: bool,
    **kwargs: Any,
) -> tuple[nn.Module, Stats | None]:
    """``timm.create_model`` with ``img_size=image_size`` when the model accepts it."""
    import timm  # noqa: PLC0415 (heavy and optional: only timm: models need it)

    if not timm.is_model(model_name):
        raise ValueError(
            f"unknown timm model {model_name!r}; list names with timm.list_models('*pattern*')"
        )
    common = dict(pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)
    try:
        try:
            net = timm.create_model(model_name, img_size=image_size, **common)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
            net = timm.create_model(model_name, **common)
    except OSError as exc:
        raise _offline_error(f"timm:{model_name}", exc) from exc
    except TypeError as exc:
        raise ValueError(f"bad options for timm:{model_name}: {exc}") from exc
    stats = None
    cfg = getattr(net, "pretrained_cfg", None) or {}
    if pretrained and cfg.get("mean") is not None and cfg.get("std") is not None:
        stats = (tuple(cfg["mean"]), tuple(cfg["std"]))
    return net, stats


def build_torchvision(
    model_name: str,
    num_classes: int,
    in_chans: int,
    image_size: int,
    pretrained: bool,
    **kwargs: Any,
) -> tuple[nn.Module, Stats | None]:
    """``torchvision.models.get_model`` (weights ``"DEFAULT"`` when ``pretrained``).

    Pretrained weights with another ``num_classes`` than theirs keep every tensor whose shape
    matches and leave the classifier freshly initialised.
    """
    import torchvision  # noqa: PLC0415 (heavy and optional: only torchvision: models need it)

    if model_name not in torchvision.models.list_models():
        raise ValueError(
            f"unknown torchvision model {model_name!r}; "
            "list names with torchvision.models.list_models()"
        )
    if in_chans != 3:
        raise ValueError(f"torchvision models take 3 input channels, got in_chans={in_chans}")
    if "weights" in kwargs:
        raise ValueError("pass pretrained=True instead of weights= for torchvision models")
    net = _torchvision_create(model_name, image_size, num_classes=num_classes, **kwargs)
    if not pretrained:
        return net, None
    weights = torchvision.models.get_model_weights(model_name).DEFAULT
    try:  # weights_only: torch.hub's own default would unpickle whatever the file holds
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except OSError as exc:
        raise _offline_error(f"torchvision:{model_name}", exc) from exc
    own = net.state_dict()
    matching = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    skipped = sorted(set(own) - set(matching))
    if skipped:
        logger.info("torchvision:%s: kept fresh (shape differs): %s", model_name, skipped)
    net.load_state_dict(matching, strict=False)
    transform = weights.transforms()
    return net, (tuple(transform.mean), tuple(transform.std))


def _torchvision_create(model_name: str, image_size: int, **kwargs: Any) -> nn.Module:
    import torchvision  # noqa: PLC0415 (heavy and optional: only torchvision: models need it)

    try:
        try:
            return torchvision.models.get_model(model_name, image_size=image_size, **kwargs)
        except TypeError as exc:
            if "image_size" not in str(exc):
                raise
            return torchvision.models.get_model(model_name, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad options for torchvision:{model_name}: {exc}") from exc
