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

The names below are loaded on first use (PEP 562), so :mod:`kdiga.models.catalog` (the names
the params schema checks) loads without torch.
"""

from __future__ import annotations

from kdiga.lazy import lazy_exports

#: public name -> the module that defines it
_EXPORTS = {
    "FORMAT": "kdiga.models.io",
    "CheckpointError": "kdiga.models.errors",
    "CheckpointNotFoundError": "kdiga.models.errors",
    "GroupedConv2d": "kdiga.models.layers",
    "NormalizedModel": "kdiga.models.normalized",
    "WeightsUnavailableError": "kdiga.models.errors",
    "build_model": "kdiga.models.registry",
    "grouped_conv2d": "kdiga.models.layers",
    "is_model_record": "kdiga.models.io",
    "list_models": "kdiga.models.registry",
    "load_model": "kdiga.models.io",
    "model_from_record": "kdiga.models.io",
    "read_checkpoint": "kdiga.models.io",
    "read_model_record": "kdiga.models.io",
    "register_model": "kdiga.models.registry",
    "resolve_stats": "kdiga.models.normalized",
    "save_model": "kdiga.models.io",
    "use_grouped_double_backward": "kdiga.models.layers",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
