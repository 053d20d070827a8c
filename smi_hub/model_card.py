"""Model card (README.md with Hugging Face metadata) for a weights folder.

The YAML header is built with ``huggingface_hub.ModelCardData``: library, license, tags,
datasets and a ``model-index`` with one evaluation result per top-1/top-5 accuracy, so the Hub
shows the metrics. The body describes the architecture, the training recipe and a usage snippet
that loads the folder the card sits in.
"""

from __future__ import annotations

import json
from typing import Any

from smi_hub.registry import REGISTRY

# data source names used in training configs -> Hugging Face dataset ids and display names
DATASETS = {
    "fashion_mnist": ("zalando-datasets/fashion_mnist", "Fashion-MNIST"),
    "imagenet-1k": ("ILSVRC/imagenet-1k", "ImageNet-1k"),
    "imagenet": ("ILSVRC/imagenet-1k", "ImageNet-1k"),
}
LICENSE = "apache-2.0"
TAGS = ["self-supervised-learning", "smi", "image-feature-extraction"]


def _dataset(source: str | None) -> tuple[str, str] | None:
    """(Hub id, display name) of a training/evaluation data source; None for local paths."""
    if not source:
        return None
    if source in DATASETS:
        return DATASETS[source]
    if ":" in source or source.startswith(("/", ".")):
        return None  # imagefolder:/data/... or a local path: not a Hub dataset
    return source, source


def eval_results(config: dict[str, Any], model_name: str) -> list[Any]:
    """``EvalResult`` entries (model-index) for the accuracy metrics in ``config['results']``.

    A key ``<protocol>_..._top1`` (or ``top5``) is one result; its dataset is the protocol's
    evaluation dataset (``training.evaluation_datasets``), else the training dataset.
    Standard deviations and train-set accuracies are not results.
    """
    from huggingface_hub import EvalResult

    training = config.get("training") or {}
    by_protocol = training.get("evaluation_datasets") or {}
    out = []
    for key, value in sorted((config.get("results") or {}).items()):
        if not key.endswith(("top1", "top5")) or "_train_" in key:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        protocol = key.split("_", 1)[0]
        ds = _dataset(by_protocol.get(protocol) or training.get("dataset"))
        if ds is None:
            continue
        out.append(
            EvalResult(
                task_type="image-classification",
                task_name=f"{protocol} evaluation",
                dataset_type=ds[0],
                dataset_name=ds[1],
                dataset_split="test",
                metric_type="accuracy",
                metric_name=key,
                metric_value=value,
            )
        )
    return out


def card_data(config: dict[str, Any], name: str) -> Any:
    """The ``ModelCardData`` of a weights folder's config."""
    from huggingface_hub import ModelCardData

    training = config.get("training") or {}
    sources = [training.get("dataset"), *(training.get("evaluation_datasets") or {}).values()]
    datasets = sorted({ds[0] for ds in map(_dataset, sources) if ds is not None})
    results = eval_results(config, name)
    classifier = bool(config.get("num_classes"))
    return ModelCardData(
        model_name=name if results else None,
        library_name="smi-hub",
        license=LICENSE,
        pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        tags=[*TAGS, config["arch"]] + (["image-classification"] if classifier else []),
        datasets=datasets or None,
        eval_results=results or None,
    )


def usage_snippet(config: dict[str, Any], name: str, repo_id: str | None) -> list[str]:
    """Python lines that load these weights: by repo id when published, by registry name for
    registered models, else from the folder holding the card."""
    if repo_id:
        source, comment = repo_id, "  # the Hugging Face repo"
    elif name in REGISTRY:
        source, comment = name, "  # registered name (smi_hub.list_models())"
    else:
        source, comment = f"path/to/{name}", "  # the folder holding this card"
    lines = ["import smi_hub", "", f'model = smi_hub.load("{source}"){comment}']
    if config.get("num_classes"):
        lines += [
            "transform = smi_hub.get_transforms(model)",
            "# logits = model(transform(image).unsqueeze(0)); class names: model.class_names",
        ]
    else:
        lines += ["features = smi_hub.extract_features(model, ['image.jpg']).features"]
    return lines


def render_model_card(config: dict[str, Any], name: str, repo_id: str | None = None) -> str:
    """Markdown model card with a YAML header Hugging Face understands."""
    training = config.get("training") or {}
    results = config.get("results") or {}
    head = (
        f", a {config['num_classes']}-way classifier head `fc`" if config.get("num_classes") else ""
    )
    arch = (
        f"{config['arch']} (base width {config.get('base_width', 64)}"
        f"{', small-image stem' if config.get('small_stem') else ''}), "
        f"{config.get('num_features', '?')}-d pooled features{head}, projector "
        f"{config.get('projector_dims') or 'not included'}"
    )
    params = config.get("num_params")
    timm_line = (
        f"The tensors use torchvision's ResNet names, so `model.safetensors` loads with "
        f"`strict=True` into `torchvision.models.{config['arch']}()` (with `fc` replaced or "
        f'removed) and into timm: `timm.create_model("{config["arch"]}", pretrained=True, '
        'pretrained_cfg_overlay=dict(file="model.safetensors"), num_classes=0)`.'
        if config.get("architecture")
        else "This layout (narrow width or small-image stem) is smi-hub's own: load it with "
        "`smi_hub.load`; torchvision and timm build only the standard-width ImageNet stem."
    )
    lines = [
        "---",
        card_data(config, name).to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        "A ResNet trained with **SMI** (Semantic Mutual Information; Mishra, Ballester and "
        "Karatzas, arXiv 2606.08332), packaged by [smi-hub](https://github.com/smi-hub/smi-hub).",
        "",
        f"- Architecture: {arch}",
        f"- Input: {config.get('image_size')} px RGB, mean {config.get('mean')}, "
        f"std {config.get('std')} (grayscale images are replicated to 3 channels)",
        f"- Parameters in the weights file: {params:,}"
        if isinstance(params, int)
        else "- Parameters in the weights file: ?",
        f"- model.safetensors sha256: `{config.get('weights_sha256', '?')}`",
        "",
        "## Usage",
        "",
        "```python",
        *usage_snippet(config, name, repo_id),
        "```",
        "",
        timm_line,
        "",
        "## Training",
        "",
        "```json",
        json.dumps(training, indent=2, sort_keys=True),
        "```",
        "",
        "## Evaluation",
        "",
    ]
    if results:
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in sorted(results.items())]
    else:
        lines.append("No evaluation results were recorded with these weights.")
    return "\n".join(lines) + "\n"
