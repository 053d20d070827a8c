"""Registry of named smi-hub models: where their weights are, how to preprocess, metadata.

Statuses:

- ``embedded``: the weights folder ships inside the package (``smi_hub/weights/<name>/``);
  its ``config.json`` is the source of the metadata and results shown by ``smi-hub info``.
- ``not published``: a recipe exists (``training/configs/...``) but no weights have been
  trained and released; ``pretrained=False`` still gives the architecture.
- ``published``: downloadable from ``url`` (sha256-pinned). No entry has this status yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smi_hub.schema import IMAGENET_MEAN, IMAGENET_STD, default_resize_ratio

WEIGHTS_ROOT = Path(__file__).resolve().parent / "weights"
DEFAULT_MODEL = "smi_resnet18_fmnist"
STATUSES = ("embedded", "published", "not published")


@dataclass(frozen=True)
class ModelEntry:
    """One named model.

    Args:
        name: registry name (``smi_hub.load(name)``).
        description: one line.
        status: ``embedded``, ``published`` or ``not published``.
        model_config: ``SMIModel`` keyword arguments of the architecture (also used for
            ``pretrained=False`` and for preprocessing when the weights are not available).
        dataset: pretraining data.
        loss: pretraining objective (``smi``, ``barlow_twins``, ``vicreg``).
        recipe: training config, relative to the source checkout.
        epochs: planned pretraining epochs of the recipe.
        resize_ratio: evaluation resize (short side = image_size * ratio) before the center crop.
        sha256: sha256 of ``model.safetensors`` the entry is published with.
        url: download URL (``published`` entries only).
        eval_args: extra ``training.evaluate`` arguments of the recipe's k-NN evaluation.
    """

    name: str
    description: str
    status: str
    model_config: dict[str, Any]
    dataset: str
    loss: str
    recipe: str
    epochs: int | None = None
    resize_ratio: float = 1.0
    sha256: str | None = None
    url: str | None = None
    eval_args: str = ""

    @property
    def weights_folder(self) -> Path | None:
        """Folder of the embedded weights (may not exist yet), else None."""
        return WEIGHTS_ROOT / self.name if self.status == "embedded" else None

    @property
    def available(self) -> bool:
        """True when pretrained weights can be loaded (embedded folder present, or a URL)."""
        if self.status == "embedded":
            folder = self.weights_folder
            return folder is not None and (folder / "config.json").is_file()
        return self.status == "published" and self.url is not None

    def folder_config(self) -> dict[str, Any] | None:
        """The embedded folder's ``config.json``, or None when it is absent."""
        if not self.available or self.weights_folder is None:
            return None
        return json.loads((self.weights_folder / "config.json").read_text())

    def how_to_build(self) -> str:
        """Commands that train and export this entry's weights."""
        run_dir = f"runs/{Path(self.recipe).stem}"
        out = (
            f"smi_hub/weights/{self.name}" if self.status == "embedded" else f"weights/{self.name}"
        )
        return (
            f"python -m training.pretrain --config {self.recipe}\n"
            f"python -m training.evaluate knn --run-dir {run_dir}{self.eval_args}\n"
            f"smi-hub export {run_dir}/checkpoints/last.pt {out} --name {self.name}"
        )


def preprocessing(config: dict[str, Any], resize_ratio: float | None = None) -> dict[str, Any]:
    """The evaluation preprocessing a model config implies."""
    size = int(config.get("image_size", 224))
    if resize_ratio is None:
        resize_ratio = float(config.get("resize_ratio", default_resize_ratio(size)))
    return {
        "convert": "RGB (grayscale replicated to 3 channels, alpha composited on white)",
        "resize": int(round(size * resize_ratio)),
        "interpolation": "bicubic",
        "center_crop": size,
        "mean": list(config.get("mean", IMAGENET_MEAN)),
        "std": list(config.get("std", IMAGENET_STD)),
    }


_FMNIST = {
    "arch": "resnet18",
    "base_width": 16,
    "small_stem": True,
    "projector_dims": [],  # trained with 1024-1024-1024; exported without it (backbone only)
    "image_size": 28,
    "mean": [0.286, 0.286, 0.286],
    "std": [0.353, 0.353, 0.353],
}
_IMAGENET_R50 = {
    "arch": "resnet50",
    "base_width": 64,
    "small_stem": False,
    "projector_dims": [8192, 8192, 8192],
    "image_size": 224,
    "mean": list(IMAGENET_MEAN),
    "std": list(IMAGENET_STD),
}

REGISTRY: dict[str, ModelEntry] = {
    e.name: e
    for e in (
        ModelEntry(
            name=DEFAULT_MODEL,
            description="Embedded default: SMI ResNet-18 (width 16, small stem) on Fashion-MNIST",
            status="embedded",
            model_config=_FMNIST,
            dataset="fashion_mnist",
            loss="smi",
            recipe="training/configs/fmnist_resnet18_smi.yaml",
            epochs=5,
            resize_ratio=1.0,
            # sha256 of smi_hub/weights/smi_resnet18_fmnist/model.safetensors, checked on load
            sha256="60f268e893577d7d1abc2d7e3ab91b8da8d2ccca427597c4dd52080a52f3fdc5",
        ),
        *(
            ModelEntry(
                name=f"{loss}_resnet50_imagenet",
                description=f"{label} ResNet-50 on ImageNet-1k (paper-scale recipe)",
                status="not published",
                # VICReg's projector has hidden Linear biases (its recipe's model.projector_bias)
                model_config={
                    **_IMAGENET_R50,
                    **({"projector_bias": True} if loss == "vicreg" else {}),
                },
                dataset="imagenet-1k",
                loss=loss,
                recipe=f"training/configs/imagenet_resnet50_{loss}.yaml",
                epochs=1000,
                resize_ratio=256 / 224,
                eval_args=(
                    " --dataset imagefolder --data-path /datasets/imagenet --test-split val"
                    " --resize-ratio 1.142857"
                ),
            )
            for loss, label in (
                ("smi", "SMI"),
                ("barlow_twins", "Barlow Twins"),
                ("vicreg", "VICReg"),
            )
        ),
    )
}


def list_models() -> list[str]:
    """Names of the registered models, default first."""
    return [DEFAULT_MODEL] + sorted(n for n in REGISTRY if n != DEFAULT_MODEL)


def get_entry(name: str) -> ModelEntry:
    """The registry entry ``name``; ``KeyError`` listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"Unknown model {name!r}; known models: {', '.join(list_models())}."
        ) from None
