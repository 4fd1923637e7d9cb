"""The errors of loading and building models, without torch: :mod:`kdiga.models.io` raises
them for model files, :mod:`kdiga.models.external` for pretrained weights it cannot fetch."""

from __future__ import annotations

from kdiga.errors import KdigaError


class CheckpointError(KdigaError, ValueError):
    """A model file that does not load (missing, corrupt, truncated, wrong format or keys)."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The model file does not exist."""


class WeightsUnavailableError(CheckpointError, RuntimeError):
    """Weights to download (a ``url:`` teacher, timm or torchvision pretrained weights) could
    not be had: offline, or the server refused."""
