"""The built-in architectures by name, without torch.

Each name maps to the builder that makes it, ``"module:function"``, imported when a model is
built (:func:`kdiga.models.build_model`). The params schema checks architecture names
against this table, and it loads without torch: a Snakemake dry run pays no torch import.
A builder is ``builder(num_classes, in_chans, image_size, **kwargs) -> nn.Module`` (logits
[B, N]); architectures of one's own are added at run time with
:func:`kdiga.models.register_model`.
"""

from __future__ import annotations

#: name -> "module:function" of its builder
BUILTIN: dict[str, str] = {
    "mobilenet_v2": "kdiga.models.mobilenetv2:mobilenet_v2",
    "resnet18": "kdiga.models.cifar_resnet:resnet18",
    "resnet34": "kdiga.models.cifar_resnet:resnet34",
    "resnet50": "kdiga.models.cifar_resnet:resnet50",
    "small_cnn": "kdiga.models.small_cnn:small_cnn",
    "wrn_34_10": "kdiga.models.wideresnet:wrn_34_10",
}
#: names resolved by kdiga.models.external: "timm:<name>", "torchvision:<name>"
EXTERNAL_PREFIXES = ("timm:", "torchvision:")
