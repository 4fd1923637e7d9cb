"""Model registry: named architectures wrapped with their input normalisation.

``build_model(name, num_classes, ...)`` returns a :class:`NormalizedModel` taking images in
[0, 1], shape [B, C, H, W], and returning logits [B, N]. Built-in names (``list_models()``):
``small_cnn``, ``resnet18``, ``resnet34``, ``resnet50``, ``mobilenet_v2``, ``wrn_34_10``;
plus ``"timm:<name>"`` and ``"torchvision:<name>"``. ``save_model``/``load_model`` write and
read ``kdiga-model/1`` files.

Double backward (the IGA term) works through every architecture here; models with attention
(timm ViTs) need the student's forward under :func:`kdiga.utils.math_attention`.
"""

from kdiga.models import cifar_resnet, mobilenetv2, small_cnn, wideresnet  # noqa: F401 (register)
from kdiga.models.io import (
    FORMAT,
    CheckpointError,
    CheckpointNotFoundError,
    is_model_record,
    load_model,
    model_from_record,
    read_checkpoint,
    save_model,
)
from kdiga.models.normalized import NormalizedModel, resolve_stats
from kdiga.models.registry import build_model, list_models, register_model

__all__ = [
    "FORMAT",
    "CheckpointError",
    "CheckpointNotFoundError",
    "NormalizedModel",
    "build_model",
    "is_model_record",
    "list_models",
    "load_model",
    "model_from_record",
    "read_checkpoint",
    "register_model",
    "resolve_stats",
    "save_model",
]
