"""Model registry: named architectures wrapped with their input normalisation.

``build_model(name, num_classes, ...)`` returns a :class:`NormalizedModel` taking images in
[0, 1], shape [B, C, H, W], and returning logits [B, N]. Built-in names (``list_models()``):
``small_cnn``, ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenet_v2``, ``wrn_34_10``;
plus ``"timm:<name>"`` and ``"torchvision:<name>"``. ``save_model``/``load_model`` write and
read kdiga model files (``kdiga-model/2``: safetensors with a JSON record).

Double backward (the IGA term) works through every architecture here; models with attention
(timm ViTs) need the student's forward under :func:`kdiga.utils.math_attention`. Grouped
convolutions are built as :class:`GroupedConv2d`, whose double backward makes one call per
layer rather than one per group (:mod:`kdiga.models.layers`).
"""

from kdiga.models import cifar_resnet, mobilenetv2, small_cnn, wideresnet  # noqa: F401 (register)
from kdiga.models.io import (
    FORMAT,
    CheckpointError,
    CheckpointNotFoundError,
    WeightsUnavailableError,
    is_model_record,
    load_model,
    model_from_record,
    read_checkpoint,
    read_model_record,
    save_model,
)
from kdiga.models.layers import GroupedConv2d, grouped_conv2d, use_grouped_double_backward
from kdiga.models.normalized import NormalizedModel, resolve_stats
from kdiga.models.registry import build_model, list_models, register_model

__all__ = [
    "FORMAT",
    "CheckpointError",
    "CheckpointNotFoundError",
    "GroupedConv2d",
    "NormalizedModel",
    "WeightsUnavailableError",
    "build_model",
    "grouped_conv2d",
    "is_model_record",
    "list_models",
    "load_model",
    "model_from_record",
    "read_checkpoint",
    "read_model_record",
    "register_model",
    "resolve_stats",
    "save_model",
    "use_grouped_double_backward",
]
