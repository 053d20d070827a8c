"""Localization maps: where in an image a model's features respond.

- ``similarity``: cosine similarity between a query embedding (default: the image's own global
  embedding) and the feature vector at every location of ``forward_features``.
- ``gradcam``: Grad-CAM of a linear probe on the pooled features for a target class.

Both are upsampled (bilinearly) to the image size and scaled to [0, 1].
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T

from smi_hub.images import load_image, to_rgb


def _as_pil(image: Any) -> Image.Image:
    if isinstance(image, str | os.PathLike):
        return load_image(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, np.ndarray):
        return to_rgb(Image.fromarray(image))
    raise TypeError(
        f"image must be a PIL image, a path or a uint8 numpy array, got {type(image).__name__}."
    )


def _input_tensor(
    model: torch.nn.Module, image: Image.Image, input_size: int | None
) -> torch.Tensor:
    """The whole image (no crop), short side resized to ``input_size``, normalized."""
    cfg = model.config
    size = int(input_size or cfg["image_size"])
    tfm = T.Compose(
        [
            T.Resize(size, interpolation=T.InterpolationMode.BICUBIC, antialias=True),
            T.ToTensor(),
            T.Normalize(cfg["mean"], cfg["std"]),
        ]
    )
    device = next(model.parameters()).device
    return tfm(image).unsqueeze(0).to(device)


def _to_unit(m: torch.Tensor) -> torch.Tensor:
    lo, hi = m.min(), m.max()
    if not torch.isfinite(hi - lo) or hi - lo <= 1e-12:
        return torch.zeros_like(m)
    return ((m - lo) / (hi - lo)).clamp_(0, 1)


def _upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]


def _query_vector(model: torch.nn.Module, query: Any, input_size: int | None) -> torch.Tensor:
    if isinstance(query, torch.Tensor):
        q = query.detach().float().flatten()
        if q.numel() != model.num_features:
            raise ValueError(
                f"query has {q.numel()} values but the model's features are "
                f"{model.num_features}-d; pass a pooled embedding (model.embed) or an image."
            )
        return q
    x = _input_tensor(model, _as_pil(query), input_size)
    with torch.inference_mode():
        return model.embed(x)[0].float()


def localization_map(
    model: torch.nn.Module,
    image: Any,
    method: str = "similarity",
    query: Any = None,
    probe: torch.nn.Linear | None = None,
    target: int | None = None,
    input_size: int | None = None,
) -> torch.Tensor:
    """An H x W map in [0, 1] (H x W = the image's size) of where the model responds.

    Args:
        model: an ``SMIModel``.
        image: PIL image, path or uint8 array (any mode; converted to RGB).
        method: ``similarity`` or ``gradcam``.
        query: for ``similarity``: a pooled embedding (C values) or an image / path whose
            embedding is compared with every location. Default: the image's own embedding.
        probe: for ``gradcam``: an ``nn.Linear`` on the pooled features (C -> classes).
        target: for ``gradcam``: class index (default: the probe's top prediction).
        input_size: short side the image is resized to before the forward pass (default:
            the model's image_size; larger values give finer maps). The image is not cropped.
    """
    if method not in ("similarity", "gradcam"):
        raise ValueError(f"method must be 'similarity' or 'gradcam', got {method!r}.")
    pil = _as_pil(image)
    size = (pil.height, pil.width)
    model.eval()
    x = _input_tensor(model, pil, input_size)
    if method == "similarity":
        q = _query_vector(model, query, input_size) if query is not None else None
        with torch.inference_mode():
            fmap = model.forward_features(x)[0].float()  # C x h x w
        if q is None:
            q = fmap.mean(dim=(1, 2))
        sim = torch.einsum("chw,c->hw", F.normalize(fmap, dim=0), F.normalize(q.to(fmap), dim=0))
        return _to_unit(_upsample(sim, size).cpu())

    if not isinstance(probe, torch.nn.Linear):
        raise ValueError("method='gradcam' needs probe=nn.Linear(num_features, num_classes).")
    if probe.in_features != model.num_features:
        raise ValueError(
            f"probe takes {probe.in_features} features but the model gives {model.num_features}."
        )
    with torch.inference_mode():
        fmap = model.forward_features(x).float()
    fmap = fmap.clone().requires_grad_(True)  # B x C x h x w, a leaf we differentiate at
    with torch.enable_grad():
        logits = probe.float()(fmap.mean(dim=(2, 3)))
        cls = int(logits[0].argmax()) if target is None else int(target)
        if not 0 <= cls < logits.shape[1]:
            raise ValueError(f"target {cls} is outside the probe's {logits.shape[1]} classes.")
        (grad,) = torch.autograd.grad(logits[0, cls], fmap)
    weights = grad[0].mean(dim=(1, 2))  # C: global-average-pooled gradients
    cam = F.relu(torch.einsum("chw,c->hw", fmap[0].detach(), weights))
    return _to_unit(_upsample(cam, size).cpu())


def _jet(v: np.ndarray) -> np.ndarray:
    """A jet-like colormap: [0, 1] -> RGB uint8 (blue, cyan, yellow, red)."""
    v = np.clip(v, 0.0, 1.0)
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.stack([r, g, b], axis=-1) * 255).round().astype(np.uint8)


def overlay(image: Any, heatmap: torch.Tensor | np.ndarray, alpha: float = 0.5) -> Image.Image:
    """Blend a [0, 1] heat map (resized to the image if needed) over the image; an RGB PIL image."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}.")
    pil = _as_pil(image)
    h = torch.as_tensor(np.asarray(heatmap), dtype=torch.float32)
    if h.ndim != 2:
        raise ValueError(f"heatmap must be H x W, got shape {tuple(h.shape)}.")
    if tuple(h.shape) != (pil.height, pil.width):
        h = _upsample(h, (pil.height, pil.width))
    colors = Image.fromarray(_jet(h.clamp(0, 1).numpy()), mode="RGB")
    return Image.blend(pil, colors, alpha)
