"""The two-view augmentation split in two halves: per image in the DataLoader workers, batched
on the training device.

Workers decode (the source dataset, as for the ``cpu`` path), then :class:`CropTwoViews`
RandomResizedCrops and flips each view to a fixed-size uint8 tensor and draw every other parameter of the view (colour jitter on/off, its four
factors and their order, grayscale, blur sigma, solarize); :class:`BatchAugment` then applies
colour jitter, grayscale, Gaussian blur, solarize and normalization to the whole batch at once
on the training device (a GPU, or the CPU: the same code), with those per-sample parameters.

The distribution is the reference's (facebookresearch/barlowtwins ``Transform``, the same in
facebookresearch/vicreg ``TrainTransform``): RandomResizedCrop(scale (0.08, 1), ratio (3/4,
4/3), bicubic), flip p=0.5, ColorJitter(0.4, 0.4, 0.2, 0.1) with p=0.8 in a random order per
image, grayscale p=0.2, Gaussian blur with sigma ~ U(0.1, 2.0) (p=1.0 view A, 0.1 view B),
solarize at 128 (p=0.0 view A, 0.2 view B). Every number comes from ``AugmentConfig``.

Determinism: the worker draws from ``torch``'s global RNG, which :class:`SafeTwoViewDataset`
seeds from ``(seed, epoch, index)``, so the parameters (hence the views) of item i at epoch e
are the same whatever the number of workers, ranks, or a resume in between.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

RATIO = (3 / 4, 4 / 3)
SOLARIZE_THRESHOLD = 128 / 255  # PIL ImageOps.solarize's default, on [0, 1] values
LUMA = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation parameters of one view (one branch of the pair)."""

    crop_scale: tuple[float, float]
    hflip_prob: float
    color_jitter: tuple[float, float, float, float]
    color_jitter_prob: float
    grayscale_prob: float
    blur_prob: float
    blur_sigma: tuple[float, float]
    solarize_prob: float


def view_specs(augment: Any) -> tuple[ViewSpec, ViewSpec]:
    """View A's and view B's :class:`ViewSpec` from an ``AugmentConfig`` (index 0 = A)."""

    def spec(i: int) -> ViewSpec:
        return ViewSpec(
            crop_scale=tuple(augment.crop_scale),
            hflip_prob=augment.hflip_prob,
            color_jitter=tuple(augment.color_jitter),
            color_jitter_prob=augment.color_jitter_prob,
            grayscale_prob=augment.grayscale_prob,
            blur_prob=augment.blur_prob[i],
            blur_sigma=tuple(augment.blur_sigma),
            solarize_prob=augment.solarize_prob[i],
        )

    return spec(0), spec(1)


def crop_box(
    rng: random.Random,
    height: int,
    width: int,
    scale: Sequence[float],
    ratio: Sequence[float] = RATIO,
) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(top, left, h, w)``: area fraction ~ U(scale), log aspect
    ratio ~ U(log ratio), 10 tries, then the largest centred crop within ``ratio``
    (torchvision's ``RandomResizedCrop.get_params`` algorithm)."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


# Per-view parameters, one float32 row per view (one tensor: cheap to make and to collate).
PARAMS = (
    "top", "left", "height", "width", "flip",
    "jitter", "brightness", "contrast", "saturation", "hue",
    "order0", "order1", "order2", "order3",
    "gray", "sigma", "solarize",
)  # fmt: skip
COLUMN = {name: i for i, name in enumerate(PARAMS)}


def draw_color_params(rng: random.Random, spec: ViewSpec) -> list[float]:
    """One view's batched-op parameters in :data:`PARAMS` order from ``jitter``: jitter
    on/off, factors (brightness, contrast, saturation ~ U(1-s, 1+s) clipped at 0; hue ~
    U(-h, h)), the order of the four jitter ops (a random permutation, as ColorJitter),
    grayscale on/off, blur sigma (0: no blur), solarize on/off."""
    b, c, s, h = spec.color_jitter
    jitter = rng.random() < spec.color_jitter_prob
    order = list(range(4))
    rng.shuffle(order)
    factors = [
        rng.uniform(max(0.0, 1 - b), 1 + b),
        rng.uniform(max(0.0, 1 - c), 1 + c),
        rng.uniform(max(0.0, 1 - s), 1 + s),
        rng.uniform(-h, h),
    ]
    gray = rng.random() < spec.grayscale_prob
    blur = rng.random() < spec.blur_prob
    sigma = rng.uniform(*spec.blur_sigma)
    solarize = rng.random() < spec.solarize_prob
    return [float(jitter), *factors, *order, float(gray), sigma if blur else 0.0, float(solarize)]


def unpack(params: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named columns of an N x len(PARAMS) parameter batch: ``crop`` (N x 4: top, left, h, w),
    ``flip``, ``jitter``, ``factors`` (N x 4), ``order`` (N x 4), ``gray``, ``sigma``,
    ``solarize``."""

    def cols(first: str, n: int = 1) -> torch.Tensor:
        i = COLUMN[first]
        return params[:, i : i + n] if n > 1 else params[:, i]

    return {
        "crop": cols("top", 4).long(),
        "flip": cols("flip") > 0,
        "jitter": cols("jitter") > 0,
        "factors": cols("brightness", 4),
        "order": cols("order0", 4).long(),
        "gray": cols("gray") > 0,
        "sigma": cols("sigma"),
        "solarize": cols("solarize") > 0,
    }


class CropTwoViews:
    """Worker half: RGB PIL image -> two dicts (one per view) of a uint8 ``image`` (3 x S x
    S, cropped, resized bicubic with antialiasing, flipped) and its ``params`` row
    (:data:`PARAMS`; read with :func:`unpack`) for :class:`BatchAugment`.

    The random stream is drawn from torch's global RNG (seeded per item by
    :class:`training.data.SafeTwoViewDataset`)."""

    def __init__(self, image_size: int, specs: tuple[ViewSpec, ViewSpec]) -> None:
        self.image_size = image_size
        self.specs = specs

    def __call__(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], ...]:
        x = TF.pil_to_tensor(image)
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))
        views = []
        for spec in self.specs:
            top, left, h, w = crop_box(rng, x.shape[1], x.shape[2], spec.crop_scale)
            view = TF.resized_crop(
                x,
                top,
                left,
                h,
                w,
                [self.image_size, self.image_size],
                interpolation=InterpolationMode.BICUBIC,
                antialias=True,
            )
            flip = rng.random() < spec.hflip_prob
            if flip:
                view = view.flip(-1)
            row = [top, left, h, w, float(flip), *draw_color_params(rng, spec)]
            views.append({"image": view.contiguous(), "params": torch.tensor(row)})
        return tuple(views)


# ---- batched ops on float images in [0, 1], N x 3 x H x W, one factor per sample ----------


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma, N x 1 x H x W."""
    r, g, b = x.unbind(1)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)  # a blend with black


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (a fraction of the circle) per sample."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    gray = delta == 0
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, 1), 0)
    d = torch.where(gray, 1, delta)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2 + rc - bc, 4 + gc - rc))
    hue = torch.where(gray, 0, hue)
    hue = (hue / 6 + shift.view(-1, 1, 1)) % 1.0
    # HSV -> RGB: channel k = v - v*s*clamp(min(p, 4 - p), 0, 1), p = (n_k + 6h) mod 6
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    p = (n + 6 * hue.unsqueeze(1)) % 6
    k = torch.minimum(p, 4 - p).clamp(0, 1)
    return maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * k)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def box_radius(sigma: torch.Tensor, passes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's extended box blur for ``ImageFilter.GaussianBlur(sigma)``: ``passes`` boxes of
    integer half-width ``l`` plus end weights ``a`` whose variance sums to sigma**2
    (Gwosdek et al., "Theoretical foundations of Gaussian convolution by extended box
    filtering", 2011)."""
    s2 = sigma.double() ** 2 / passes
    length = torch.sqrt(12 * s2 + 1)
    l = torch.floor((length - 1) / 2)  # noqa: E741
    a = (2 * l + 1) * (l * (l + 1) - 3 * s2) / (6 * (s2 - (l + 1) ** 2))
    return l, a


def blur_radius(sigma_max: float) -> int:
    """Half-width of the box kernels that cover every sigma up to ``sigma_max``."""
    return int(box_radius(torch.tensor([sigma_max]))[0]) + 1


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """PIL's Gaussian blur (three extended box passes per axis, edges replicated) with one
    sigma per sample; ``radius`` from :func:`blur_radius` of the largest sigma."""
    n, c, h, w = x.shape
    half, a = box_radius(sigma.cpu())
    t = torch.arange(-radius, radius + 1, dtype=torch.float64).abs().view(1, -1)
    k = torch.where(
        t <= half.view(-1, 1), 1.0, torch.where(t == half.view(-1, 1) + 1, a.view(-1, 1), 0)
    )
    k = (k / k.sum(dim=1, keepdim=True)).to(x.device, x.dtype).repeat_interleave(c, dim=0)
    y = x.reshape(1, n * c, h, w)
    for _ in range(3):
        y = F.conv2d(
            F.pad(y, (radius, radius, 0, 0), mode="replicate"),
            k.view(n * c, 1, 1, -1),
            groups=n * c,
        )
    for _ in range(3):
        y = F.conv2d(
            F.pad(y, (0, 0, radius, radius), mode="replicate"),
            k.view(n * c, 1, -1, 1),
            groups=n * c,
        )
    return y.view(n, c, h, w)


class BatchAugment:
    """Device half: a batch of view dicts from :class:`CropTwoViews` (collated) -> the
    normalized float batch on ``device``. Colour jitter (its four ops in each sample's own
    order), grayscale, blur, solarize, then normalization; each op only touches the samples
    that draw it. Indices are computed from the parameters on the CPU, so nothing waits on the
    device."""

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        blur_sigma_max: float,
        device: torch.device | str = "cpu",
        channels_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        self.mean = torch.tensor(list(mean), device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), device=self.device).view(1, 3, 1, 1)
        self.radius = blur_radius(blur_sigma_max)
        self.channels_last = channels_last

    def _apply(self, x: torch.Tensor, mask: torch.Tensor, fn) -> None:
        """``x[mask] = fn(x[mask], cpu_indices)`` in place; ``mask`` lives on the CPU."""
        idx = mask.nonzero().flatten()
        if idx.numel() == 0:
            return
        dev_idx = idx.to(self.device, non_blocking=True)
        x.index_copy_(0, dev_idx, fn(x.index_select(0, dev_idx), idx))

    def __call__(self, view: dict[str, torch.Tensor]) -> torch.Tensor:
        x = view["image"].to(self.device, non_blocking=True).float().div_(255)
        p = unpack(view["params"])
        jitter, order = p["jitter"], p["order"]
        factors = p["factors"].to(self.device, non_blocking=True)
        for k in range(4):
            for op, fn in enumerate(JITTER_OPS):
                self._apply(
                    x,
                    jitter & (order[:, k] == op),
                    lambda y, i, fn=fn, op=op: fn(y, factors[i.to(self.device), op]),
                )
        self._apply(x, p["gray"], lambda y, i: grayscale(y).expand(-1, 3, -1, -1))
        sigma = p["sigma"]
        self._apply(x, sigma > 0, lambda y, i: gaussian_blur(y, sigma[i], self.radius))
        self._apply(x, p["solarize"], lambda y, i: torch.where(y >= SOLARIZE_THRESHOLD, 1 - y, y))
        x = (x - self.mean) / self.std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x
