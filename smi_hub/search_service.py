"""Search over an index folder: the one code path behind ``smi-hub serve`` and ``smi-hub demo
--index``.

:class:`SearchService` opens an index folder (``smi-hub index`` output, any kind, memory-mapped)
and the model that built it, embeds a query image with the model's eval transform, searches,
and answers gallery ids (row numbers), gallery paths, class labels (the image's folder), float
scores and the out-of-domain verdict of :mod:`smi_hub.ood`. Only files the index holds are
ever handed out (:meth:`SearchService.item_path`).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from smi_hub.errors import ImageLoadError, SMIHubError
from smi_hub.features import extract_features
from smi_hub.gallery import label_of
from smi_hub.hub import load
from smi_hub.images import IMAGE_EXTENSIONS, check_size, load_image, to_rgb
from smi_hub.index import EmbeddingIndex
from smi_hub.ood import RULE, threshold_score, verdict
from smi_hub.registry import DEFAULT_MODEL

MAX_PIXELS = 40_000_000  # query images are refused from their header above these
MAX_DECODE_BYTES = 512 << 20
MAX_K = 100


class ItemNotFound(SMIHubError, KeyError):
    """A gallery id that the index does not hold, or whose file is gone."""


def class_label(path: str) -> str:
    """Class of a gallery image: its folder's name, Fashion-MNIST folders mapped back to their
    class names (``smi_hub.gallery.label_of``)."""
    return label_of(path)


def decode_query(data: bytes, max_pixels: int, max_decode_bytes: int) -> Image.Image:
    """An uploaded image as RGB; its size is checked from the header before decoding
    (``ImageLoadError`` for oversized, empty or unreadable data)."""
    if not data:
        raise ImageLoadError("the upload is empty; send an image file.")
    try:
        with Image.open(io.BytesIO(data)) as im:
            check_size(
                im.width, im.height, im.mode, max_pixels, max_decode_bytes, "the query image",
                transparency_key="transparency" in im.info,
            )  # fmt: skip
            im.load()
            return to_rgb(ImageOps.exif_transpose(im))
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageLoadError(f"the query image is too large ({e}); downscale it first.") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
        raise ImageLoadError(f"not a readable image ({type(e).__name__}: {e}).") from e


class SearchService:
    """An index folder and its model, ready to answer searches (thread-safe).

    Args:
        index_dir: a folder written by ``smi-hub index`` / ``EmbeddingIndex.save``.
        model: registry name, weights folder, repo id or URL (default: the model recorded in
            the index, else the embedded default model).
        device: where the model runs (default cpu).
        max_pixels, max_decode_bytes: larger query images are refused before decoding.
    """

    def __init__(
        self,
        index_dir: str | os.PathLike,
        model: str | None = None,
        device: str | None = None,
        max_pixels: int = MAX_PIXELS,
        max_decode_bytes: int = MAX_DECODE_BYTES,
    ) -> None:
        self.index_dir = Path(index_dir).expanduser().resolve()
        self.index = EmbeddingIndex.load(self.index_dir)
        meta = self.index.metadata
        self.model_name = str(model or meta.get("model") or DEFAULT_MODEL)
        self.model = load(self.model_name, device=device, progress=False).eval()
        dim = getattr(self.model, "num_features", None)
        if dim is not None and dim != self.index.dim:
            raise SMIHubError(
                f"{self.model_name} gives {dim}-d features but {self.index_dir} holds "
                f"{self.index.dim}-d vectors; serve it with the model that built it "
                f"({meta.get('model') or 'not recorded'})."
            )
        # relative gallery paths are relative to the folder `smi-hub index` ran in
        self.root = Path(meta.get("cwd") or os.getcwd())
        self.profile: dict[str, Any] = meta.get("neighbour_profile") or {}
        self.max_pixels, self.max_decode_bytes = max_pixels, max_decode_bytes
        self._lock = threading.Lock()  # faiss search knobs are set per call

    def __len__(self) -> int:
        return len(self.index)

    # ---- gallery items -----------------------------------------------------------------------

    def gallery_path(self, item: int) -> str | None:
        """The indexed file of row ``item`` as an absolute path (None for labels that are not
        file paths, e.g. dataset rows). ``ItemNotFound`` for ids outside the index."""
        if not isinstance(item, int) or not 0 <= item < len(self.index):
            raise ItemNotFound(f"no gallery item {item!r}; ids run from 0 to {len(self) - 1}.")
        label = self.index.labels[item]
        if not isinstance(label, str) or Path(label).suffix.lower() not in IMAGE_EXTENSIONS:
            return None
        path = Path(label)
        return str(path if path.is_absolute() else self.root / path)

    def item_path(self, item: int) -> Path:
        """The image file of gallery ``item``, only if the index holds it and it is still a
        file; ``ItemNotFound`` otherwise. No path from a request is ever opened."""
        path = self.gallery_path(item)
        if path is None or not Path(path).is_file():
            raise ItemNotFound(f"gallery item {item} has no image file here ({path}).")
        return Path(path)

    # ---- queries -----------------------------------------------------------------------------

    def embed(self, image: Image.Image) -> torch.Tensor:
        """The pooled embedding (D,) of an RGB image, with the model's eval transform."""
        return extract_features(self.model, [image], progress=False).features[0]

    def search_image(
        self, image: bytes | Image.Image, k: int = 10, min_score: float | None = None
    ) -> dict[str, Any]:
        """Search with an uploaded image (bytes, checked before decoding, or a PIL image)."""
        if isinstance(image, bytes | bytearray):
            image = decode_query(bytes(image), self.max_pixels, self.max_decode_bytes)
        return self.search_vector(self.embed(image), k, min_score)

    def search_item(self, item: int, k: int = 10, min_score: float | None = None) -> dict[str, Any]:
        """Search with a gallery image (its stored vector for a flat index, else its file
        embedded again). The item itself is among the results."""
        path = self.gallery_path(item)
        if self.index.kind == "flat" and self.index.embeddings is not None:
            vector = self.index.embeddings[item].clone()
        elif path is not None:
            try:
                vector = self.embed(load_image(path, self.max_pixels, self.max_decode_bytes))
            except ImageLoadError as e:
                raise ItemNotFound(f"gallery item {item}: {e}") from None
        else:
            raise ItemNotFound(f"gallery item {item} has no stored vector or image file here.")
        return self.search_vector(vector, k, min_score)

    def search_vector(
        self, vector: torch.Tensor, k: int = 10, min_score: float | None = None
    ) -> dict[str, Any]:
        """Top-``k`` gallery items of an embedding, with the out-of-domain verdict (computed on
        the top score before ``min_score`` drops weaker results)."""
        if not 1 <= int(k) <= MAX_K:
            raise ValueError(f"k must be from 1 to {MAX_K}, got {k}.")
        if not bool(torch.isfinite(vector).all()) or float(vector.norm()) == 0.0:
            raise ValueError("the query's embedding is not finite or is zero; it cannot match.")
        with self._lock:
            found = self.index.search(vector.reshape(1, -1), k=int(k))
        results = []
        for score, row in zip(found.scores[0].tolist(), found.indices[0].tolist(), strict=True):
            if row < 0 or (min_score is not None and score < min_score):
                continue
            label = self.index.labels[row]
            path = self.gallery_path(row)
            results.append(
                {
                    "id": row,
                    "path": path,
                    "label": class_label(path) if path else str(label),
                    "score": float(score),
                }
            )
        top = float(found.scores[0, 0]) if found.indices[0, 0] >= 0 else float("nan")
        in_domain, pct = verdict(top, self.profile)
        return {
            "results": results,
            "top_score": top,
            "in_domain": in_domain,
            "percentile": pct,
        }

    def info(self) -> dict[str, Any]:
        """Model, preprocessing, index kind, size and the recall measured at build."""
        meta = self.index.metadata
        cfg = dict(getattr(self.model, "pretrained_cfg", None) or {})
        build = meta.get("build") or {}
        return {
            "model": self.model_name,
            "model_sha256": cfg.get("weights_sha256"),
            "preprocessing": {
                key: cfg.get(key)
                for key in ("input_size", "crop_pct", "interpolation", "mean", "std")
            },
            "index": {
                "kind": self.index.kind,
                "factory": self.index.factory,
                "count": len(self.index),
                "dim": self.index.dim,
                "nprobe": self.index.nprobe,
                "ef_search": self.index.ef_search,
                "refine": self.index.refine,
                "recall_at_10": build.get(
                    "recall_at_10", 1.0 if self.index.kind == "flat" else None
                ),
                "layer": meta.get("layer"),
            },
            "out_of_domain": {
                "rule": RULE if self.profile else "no neighbour profile in this index (rebuild it)",
                "profile_queries": self.profile.get("queries"),
                "threshold_score": threshold_score(self.profile),
            },
            "max_pixels": self.max_pixels,
            "max_k": MAX_K,
        }
