"""A trained model's logits and clean accuracy, in eval mode."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdiga.data import to_float
from kdiga.train.config import check_data
from kdiga.utils import eval_mode


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return torch.device("cpu") if p is None else p.device


def predict(
    model: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> Tensor:
    """Logits ``[N, K]`` (float32, on CPU) of ``model`` on images ``[N, C, H, W]``, eval mode.

    ``device`` None uses the model's own device; otherwise the model is moved there. The
    model's train/eval mode is restored afterwards.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W]; got shape {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    dev = _model_device(model) if device is None else torch.device(device)
    model.to(dev)
    out = []
    with eval_mode(model), torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = to_float(images[start : start + batch_size].to(dev))
            out.append(model(x).float().cpu())
    if not out:
        raise ValueError("no images to predict (N = 0)")
    return torch.cat(out)


def evaluate(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    *,
    batch_size: int = 512,
    device: str | torch.device | None = None,
) -> float:
    """Clean accuracy of ``model`` on (images ``[N, C, H, W]``, labels ``[N]``), in eval mode."""
    images, labels = check_data(images, labels, "evaluation")
    logits = predict(model, images, batch_size=batch_size, device=device)
    return (logits.argmax(1) == labels.cpu()).float().mean().item()
