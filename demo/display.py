"""What the demo page shows: images at display size with heat maps blended over, and
``PageView`` (mixed into ``SearchEngine``): a search's items and status, the engine's status."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

import smi_hub
from smi_hub.errors import ImageLoadError
from smi_hub.images import load_image

# UI label -> localization_map method (the value the page and the API use)
MAP_TYPES = {
    "similarity (own embedding; neighbours: match to the query)": "similarity",
    "Grad-CAM (gallery class-mean probe, query's class)": "gradcam",
}
DISPLAY_SIZE = 224  # px of the longer side of displayed images (28 px images: x8, nearest)


def display_image(image: Image.Image, size: int = DISPLAY_SIZE) -> Image.Image:
    """Image resized for display: small images upscaled by an integer factor (nearest, so the
    pixels stay sharp), large ones downscaled to fit ``size``."""
    w, h = image.size
    longer = max(w, h)
    if longer < size:
        f = max(1, size // longer)
        return image.resize((w * f, h * f), Image.Resampling.NEAREST)
    if longer > 2 * size:
        s = 2 * size / longer
        return image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.LANCZOS)
    return image


def render(image: Image.Image, heat: torch.Tensor | None, alpha: float) -> Image.Image:
    """The display-size image with the heat map blended over it (``smi_hub.overlay``)."""
    disp = display_image(image)
    if heat is None or alpha <= 0:
        return disp
    return smi_hub.overlay(disp, heat, alpha=float(min(max(alpha, 0.0), 1.0)))


def _short(text: str, n: int = 12) -> str:
    return text[:n] if text else "?"


class PageView:
    """What the page shows of a ``SearchEngine`` (mixed into it): :meth:`run` answers a search
    with its ``query_image``, ``search``, ``maps`` and ``verdict`` under its ``lock``;
    :meth:`status_markdown` reads its model, gallery, index and cache state."""

    def run(
        self, image: Any, k: int = 5, map_type: str = "similarity", alpha: float = 0.4
    ) -> tuple[list[tuple[Image.Image, str]], Image.Image | None, str]:
        """(gallery items, query overlay, status markdown) for the page; ``DemoError`` on bad
        input or a missing model / gallery."""
        method = MAP_TYPES.get(map_type, map_type)
        image = self.query_image(image)  # decoded outside the lock: other searches go on
        with self.lock:  # the same model for the search and the maps
            pil, emb, matches = self.search(image, k)
            qmap, nmaps, note = self.maps(pil, emb, matches, method)
        items = []
        for rank, (m, heat) in enumerate(zip(matches, nmaps, strict=True), start=1):
            try:
                shown = render(load_image(m.path), heat, alpha)
            except ImageLoadError:
                shown = Image.new("RGB", (DISPLAY_SIZE, DISPLAY_SIZE), "gray")
            items.append((shown, f"{rank}. {m.label or m.path.name} · {m.score:.3f}"))
        top = ", ".join(f"{m.label or m.path.name} ({m.score:.3f})" for m in matches[:3])
        status = (
            f"Top {len(matches)} of {len(self.index or [])} gallery images; nearest: {top}. "
            f"Maps: {note}."
        )
        v = self.verdict(matches)
        if v.in_domain is False:
            status = (
                f"**Out of domain: this image is unlike anything in the gallery.** Its best "
                f"match ({matches[0].score:.3f}) is at percentile {v.percentile:.1f} of the "
                "gallery's own nearest-neighbour scores: the neighbours below are the least "
                "unlike, not similar.  \n" + status
            )
        elif v.in_domain:
            status = (
                f"In domain: the best match is at percentile {v.percentile:.1f} of the "
                "gallery's own nearest-neighbour scores (in the gallery's usual range).  \n"
                + status
            )
        return items, render(pil, qmap, alpha), status

    def status_markdown(self) -> str:
        """Model, gallery and cache state (or what is wrong) as Markdown."""
        lines = []
        if self.model is None:
            lines.append(f"**Model: not loaded.** {self.model_error or ''}")
        else:
            cfg = getattr(self.model, "config", {}) or {}
            lines.append(
                f"**Model:** `{self.model_name}` ({cfg.get('arch', '?')}, width "
                f"{cfg.get('base_width', '?')}, {cfg.get('image_size', '?')} px input, "
                f"{getattr(self.model, 'num_features', '?')}-d features; weights sha256 "
                f"`{_short(self.model_key)}`)"
            )
        if self.service is not None:
            build = self.index.metadata.get("build", {}) if self.index is not None else {}
            recall = build.get("recall_at_10", 1.0 if self.service.index.kind == "flat" else "?")
            lines.append(
                f"**Index:** `{self.index_dir}`: {len(self.service)} images, "
                f"{self.service.index.factory} (recall@10 {recall} at build)"
            )
        elif self.gallery_error is not None:
            lines.append(f"**Gallery: unusable.** {self.gallery_error}")
        elif self.gallery is not None:
            n = len(self.index) if self.index is not None else 0
            classes = f", {len(self.classes)} classes" if self.classes else ""
            lines.append(f"**Gallery:** `{self.gallery}`: {n} images indexed{classes}")
            if self.skipped:
                shown = "; ".join(f"{name}: {why}" for name, why in self.skipped[:3])
                lines.append(f"**Skipped {len(self.skipped)} unreadable file(s):** {shown}")
            if self.index_dir is not None and n:
                how = "reused from" if self.cache_hit else "computed and cached in"
                lines.append(f"**Embeddings:** {how} `{self.index_dir}`")
        return "  \n".join(lines)
