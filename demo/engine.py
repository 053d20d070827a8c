"""The demo's engine: model loading, the models a page offers, the model self-check, the gallery
embeddings (cached, ``demo/gallery_index.py``) and the searches and maps, with the locks that keep
them consistent; what the page shows of them is ``demo/display.py``. No Gradio here:
``demo/app.py`` wires a :class:`SearchEngine` to the page.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

import smi_hub
from smi_hub.errors import ImageLoadError, SMIHubError
from smi_hub.gallery import label_of
from smi_hub.images import IMAGE_EXTENSIONS, check_size, list_images, load_image, to_rgb
from smi_hub.ood import Verdict, verdict
from smi_hub.registry import DEFAULT_MODEL, REGISTRY, list_models
from smi_hub.schema import validate_config
from smi_hub.script_modules import load_demo_module
from smi_hub.search_service import SearchService
from smi_hub.settings import cache_dir

# query images: refused from their header, before decoding, above these (far below Pillow's
# decompression-bomb limit of 179 M pixels); --max-pixels changes the first
MAX_PIXELS = 40_000_000
MAX_DECODE_BYTES = 512 << 20
EXAMPLES = 10


_MODEL_STATE = (
    "model",
    "model_name",
    "model_key",
    "model_error",
    "index",
    "index_dir",
    "cache_hit",
    "skipped",
    "probe",
    "classes",
    "profile",
)


class DemoError(Exception):
    """A problem to show to the user (bad input, no model, empty gallery ...)."""


class Match(NamedTuple):
    """One neighbour: gallery file, class label (its folder) and cosine similarity."""

    path: Path
    label: str
    score: float


# --------------------------------------------------------------------------------------------
# the demo's other modules, loaded by path
# --------------------------------------------------------------------------------------------


HERE = Path(__file__).parent  # demo/ is no package: its files load each other by path
gallery_index = load_demo_module(
    "gallery_index", HERE
)  # embeddings cache, class labels, probe, profile
display = load_demo_module("display", HERE)  # what the page shows: images with maps, run, status


# --------------------------------------------------------------------------------------------
# the engine: model + gallery index + search + maps (no Gradio)
# --------------------------------------------------------------------------------------------


class SearchEngine(display.PageView):
    """Holds the model and the gallery index and answers searches.

    Args:
        model: an ``SMIModel`` or anything ``smi_hub.load`` accepts (None: the embedded default).
        gallery: folder of images, class folders optional (None: ``smi_hub.default_gallery()``).
        cache_root: where gallery embeddings are cached (default ``<smi_hub cache>/demo``).
        max_pixels, max_decode_bytes: larger query images are refused before decoding.
        progress: tqdm progress bars while embedding the gallery.
        models: more models the page offers (names or folders), besides the registry models
            available here and ``model``.
        allow_any_model: let the page load any name, folder, Hugging Face repo id or URL
            (off: only the offered models; see :meth:`may_load`).
        index: an index folder (``smi-hub index``, any kind) to search instead of a gallery
            folder: nothing is extracted, the searches go through
            :class:`smi_hub.search_service.SearchService` (as ``smi-hub serve``), and the
            model is the index's own (or ``model``).

    A model or gallery that cannot be used does not raise here: the problem is kept in
    ``model_error`` / ``gallery_error``, shown in :meth:`status_markdown` and raised as
    ``DemoError`` by :meth:`search`.
    """

    def __init__(
        self,
        model: Any = None,
        gallery: str | os.PathLike | None = None,
        *,
        cache_root: str | os.PathLike | None = None,
        max_pixels: int = MAX_PIXELS,
        max_decode_bytes: int = MAX_DECODE_BYTES,
        progress: bool = True,
        models: Sequence[str | os.PathLike] = (),
        allow_any_model: bool = False,
        index: str | os.PathLike | None = None,
    ) -> None:
        self.lock = threading.RLock()
        self.cache_root = Path(cache_root) if cache_root is not None else cache_dir() / "demo"
        self.max_pixels = max_pixels
        self.max_decode_bytes = max_decode_bytes
        self.allow_any_model = allow_any_model
        given = [model] if isinstance(model, str | os.PathLike) else []
        self.offered = list(dict.fromkeys([*available_models(), *map(str, [*given, *models])]))
        self.progress = progress
        self.model: torch.nn.Module | None = None
        self.model_name = ""
        self.model_key = ""
        self.model_error: str | None = None
        self.gallery: Path | None = None
        self.gallery_error: str | None = None
        self.files: list[Path] = []
        self.index: smi_hub.EmbeddingIndex | None = None
        self.index_dir: Path | None = None
        self.cache_hit = False
        self.skipped: list[tuple[str, str]] = []
        self.probe: torch.nn.Linear | None = None
        self.classes: list[str] = []
        self.profile: dict[str, Any] = {}  # the gallery's own nearest-neighbour scores
        self.service: SearchService | None = None
        if index is not None:
            self._open_index(index, model)
            return
        self.set_gallery(gallery)
        with contextlib.suppress(DemoError):  # kept in model_error; the page shows it
            self.set_model(model)

    def _open_index(self, index: str | os.PathLike, model: Any) -> None:
        """Serve an index folder: its model (or ``model``), no gallery folder, no extraction."""
        name = str(model) if isinstance(model, str | os.PathLike) else None
        try:
            service = SearchService(
                index, name, max_pixels=self.max_pixels, max_decode_bytes=self.max_decode_bytes
            )
            paths = (service.gallery_path(i) for i in range(min(len(service), 1000)))
            self.files = [Path(p) for p in paths if p is not None]
            self.self_check(service.model)
        except (DemoError, SMIHubError, OSError) as e:
            self.model_error = f"Could not open the index {index}: {e}"
            return
        self.service, self.model, self.model_name = service, service.model, service.model_name
        self.model_key = gallery_index.model_sha256(service.model)
        self.index, self.index_dir = service.index, service.index_dir
        self.offered = [service.model_name]
        self._build_probe()
        self.profile = service.profile

    # ---- setup -----------------------------------------------------------------------------

    def set_gallery(self, gallery: str | os.PathLike | None) -> None:
        """Use ``gallery`` (None: the default Fashion-MNIST gallery); errors go to
        ``gallery_error``."""
        with self.lock:
            self.gallery, self.files, self.gallery_error = None, [], None
            self.index = None
            try:
                folder = Path(gallery).expanduser() if gallery is not None else None
                if folder is None:
                    folder = smi_hub.default_gallery()
                if not folder.is_dir():
                    raise DemoError(f"The gallery {folder} is not a folder of images.")
                folder = folder.resolve()
                files = list_images(folder)
                self.gallery, self.files = folder, files
                if not files:
                    raise DemoError(
                        f"The gallery {folder} holds no images (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)}). Put images in it, in "
                        "one sub-folder per class for labelled results."
                    )
            except (DemoError, SMIHubError, OSError) as e:
                self.gallery_error = str(e)
            if self.model is not None and self.gallery_error is None:
                try:
                    self._build_index()
                except Exception as e:
                    self.gallery_error = f"Could not index the gallery: {type(e).__name__}: {e}"

    def may_load(self, target: str) -> bool:
        """Whether the page may load ``target``: one of :attr:`offered`, or anything when the
        operator allowed it. Decided on the string alone (no file or network access)."""
        return self.allow_any_model or target in self.offered

    def self_check(self, model: torch.nn.Module) -> None:
        """``DemoError`` unless ``model`` has a valid config and gives finite features that
        differ between a gallery image and a synthetic ramp (a degenerate model gives the
        same features for every image, so every search would return arbitrary neighbours)."""
        config = getattr(model, "config", None)
        if isinstance(config, dict):
            try:
                validate_config(config, source="the model's config")
            except SMIHubError as e:
                raise DemoError(str(e)) from None
        ramp = np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)
        images = [Image.fromarray(ramp)]
        for path in self.files[:5]:
            with contextlib.suppress(ImageLoadError):
                images.append(load_image(path))
                break
        if len(images) == 1:
            images.append(Image.fromarray(255 - ramp))
        feats = smi_hub.extract_features(model, images, progress=False).features
        if len(feats) != 2 or not bool(torch.isfinite(feats).all()):
            raise DemoError(
                "its features of a gallery image are NaN or infinite (diverged or corrupt "
                "weights, or a broken preprocessing config)"
            )
        if torch.equal(feats[0], feats[1]):
            raise DemoError(
                "it gives the same features for different images (constant output: a "
                "degenerate or untrained-and-collapsed model)"
            )

    def set_model(self, model: Any = None) -> str:
        """Load ``model`` (name, folder, repo id, URL or ``SMIModel``) and index the gallery
        with it. On failure the previous model stays and ``DemoError`` says why."""
        name = (
            "(model object)"
            if isinstance(model, torch.nn.Module)
            else str(model or DEFAULT_MODEL).strip()
        )
        if self.service is not None:
            raise DemoError(
                f"This page serves the index {self.index_dir}, built with "
                f"{self.service.model_name}; another model's queries cannot search it."
            )
        try:
            loaded = (
                model
                if isinstance(model, torch.nn.Module)
                else smi_hub.load(name, progress=self.progress)
            )
            loaded.eval()
            self.self_check(loaded)
            key = gallery_index.model_sha256(loaded)
        except Exception as e:  # any loader problem is a message, not a crash
            msg = f"Could not load model {name!r}: {e}"
            with self.lock:
                if self.model is None:
                    self.model_error = msg
            raise DemoError(msg) from e
        # the new model's gallery index is built on a copy, without holding the lock: searches
        # go on with the current model meanwhile, then the new state is swapped in at once
        staged = copy.copy(self)
        staged.model, staged.model_name, staged.model_key = loaded, name, key
        try:
            if staged.gallery_error is None and staged.gallery is not None:
                staged._build_index()
        except Exception as e:  # e.g. a model that cannot embed these images
            msg = f"Could not index the gallery with model {name!r}: {type(e).__name__}: {e}"
            with self.lock:
                if self.model is None:
                    self.model_error = msg
            raise DemoError(msg) from e
        with self.lock:
            for attr in _MODEL_STATE:
                setattr(self, attr, getattr(staged, attr))
            self.model_error = None
        return self.status_markdown()

    def _build_index(self) -> None:
        """Gallery embeddings from the cache when model and gallery files match, else computed
        (tqdm bar) and cached."""
        assert self.model is not None and self.gallery is not None
        folder = gallery_index.cache_folder(self.cache_root, self.model_key, self.gallery)
        self.cache_hit = False
        self.index, self.cache_hit, self.skipped = gallery_index.cached_index(
            self.model, self.model_key, self.gallery, self.files, folder, self.progress
        )
        self.index_dir = folder
        self._build_probe()

    def _build_probe(self) -> None:
        """The gallery's neighbour profile and a linear probe for Grad-CAM: the normalized mean
        embedding of each gallery class."""
        assert self.index is not None
        self.probe, self.classes = None, []
        if len(self.index) == 0 or self.index.embeddings is None:  # approximate: no probe
            return
        self.profile = gallery_index.gallery_profile(self.index)
        self.probe, self.classes = gallery_index.class_probe(self.index, self.gallery)

    # ---- queries ---------------------------------------------------------------------------

    def query_image(self, image: Any) -> Image.Image:
        """The query as RGB; ``DemoError`` for missing, unreadable or oversized images."""
        if image is None:
            raise DemoError("Upload an image or pick an example first.")
        if isinstance(image, dict) and "path" in image:  # a gradio FileData payload
            image = image["path"]
        if isinstance(image, str | os.PathLike):
            path = Path(image)
            try:
                return load_image(path, self.max_pixels, self.max_decode_bytes)
            except ImageLoadError as e:
                raise DemoError(str(e).replace(str(path), path.name)) from None
        if isinstance(image, np.ndarray):
            try:
                image = Image.fromarray(image)
            except (TypeError, ValueError) as e:
                raise DemoError(f"Not an image array: {e}") from None
        if isinstance(image, Image.Image):
            try:
                check_size(
                    *image.size, image.mode, self.max_pixels, self.max_decode_bytes,
                    transparency_key="transparency" in image.info,
                )  # fmt: skip
            except ImageLoadError as e:
                raise DemoError(str(e)) from None
            return to_rgb(image)
        raise DemoError(f"Not an image: got a {type(image).__name__}.")

    def _ready(self) -> tuple[torch.nn.Module, smi_hub.EmbeddingIndex]:
        if self.model is None:
            raise DemoError(
                self.model_error or "No model is loaded; load one under 'Model and gallery'."
            )
        if self.gallery_error is not None:
            raise DemoError(self.gallery_error)
        if self.index is None or len(self.index) == 0:
            raise DemoError(
                f"None of the {len(self.files)} gallery files could be read as an image"
                + (f" ({self.skipped[0][1]})" if self.skipped else "")
                + "."
            )
        return self.model, self.index

    def search(self, image: Any, k: int = 5) -> tuple[Image.Image, torch.Tensor, list[Match]]:
        """The query image, its pooled embedding and its ``k`` nearest gallery images (scores
        descending)."""
        pil = self.query_image(image)
        with self.lock:
            model, index = self._ready()
            feats = smi_hub.extract_features(model, [pil], progress=False).features
            if self.service is not None:  # the code path of `smi-hub serve`
                answer = self.service.search_vector(feats[0], k=max(1, int(k)))
                matches = [
                    Match(Path(r["path"] or r["label"]), r["label"], r["score"])
                    for r in answer["results"]
                ]
                return pil, feats[0], matches
            found = index.search(feats, k=max(1, int(k)))
            assert self.gallery is not None
            matches = [
                Match(
                    self.gallery / rel,
                    gallery_index.class_label(self.gallery / rel, self.gallery),
                    float(s),
                )
                for s, rel in zip(found.scores[0].tolist(), found.labels[0], strict=True)
            ]
        return pil, feats[0], matches

    def maps(
        self,
        query: Image.Image,
        embedding: torch.Tensor,
        matches: Sequence[Match],
        method: str = "similarity",
    ) -> tuple[torch.Tensor, list[torch.Tensor | None], str]:
        """Localization maps of the query and of each neighbour, and a note on what they show.

        ``similarity``: the query's map against its own embedding; each neighbour's map against
        the query's embedding (where it matches the query). ``gradcam``: Grad-CAM of the
        gallery class-mean probe for the class the probe predicts for the query.
        """
        if method not in ("similarity", "gradcam"):
            raise DemoError(f"Unknown map type {method!r}; use similarity or gradcam.")
        with self.lock:
            model, _ = self._ready()
            kw: dict[str, Any] = {}
            note = "similarity to the query's embedding"
            if method == "gradcam":
                if self.probe is None:
                    raise DemoError("Grad-CAM needs the stored vectors of a flat index.")
                with torch.no_grad():
                    target = int(self.probe(embedding[None].float())[0].argmax())
                kw = {"probe": self.probe, "target": target}
                note = f"Grad-CAM for class '{self.classes[target] or 'gallery'}'"
                qmap = smi_hub.localization_map(model, query, method="gradcam", **kw)
            else:
                qmap = smi_hub.localization_map(model, query, method="similarity")
                kw = {"query": embedding}
            nmaps: list[torch.Tensor | None] = []
            for m in matches:
                try:
                    nmaps.append(smi_hub.localization_map(model, m.path, method=method, **kw))
                except (ImageLoadError, OSError):
                    nmaps.append(None)  # a gallery file changed since indexing: show it plain
        return qmap, nmaps, note

    def verdict(self, matches: Sequence[Match]) -> Verdict:
        """Whether the best match is in the gallery's usual range (:mod:`smi_hub.ood`)."""
        profile = self.service.profile if self.service is not None else self.profile
        return verdict(matches[0].score, profile) if matches else Verdict(None, None)


def available_models() -> list[str]:
    """Registry names whose pretrained weights can be loaded here."""
    return [n for n in list_models() if REGISTRY[n].available]


def example_images(engine: SearchEngine, n: int = EXAMPLES) -> list[str]:
    """Up to ``n`` gallery images, one per class first."""
    if engine.gallery is None and engine.service is None:
        return []
    by_class: dict[str, list[Path]] = {}
    for p in engine.files:
        if p.is_file():
            label = gallery_index.class_label(p, engine.gallery) if engine.gallery else label_of(p)
            by_class.setdefault(label, []).append(p)
    picked: list[str] = []
    depth = 0
    while len(picked) < n and any(len(v) > depth for v in by_class.values()):
        picked += [str(v[depth]) for v in by_class.values() if len(v) > depth]
        depth += 1
    return picked[:n]
