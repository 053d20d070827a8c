"""Model card (README.md with Hugging Face metadata) for a weights folder.

The YAML header is built with ``huggingface_hub.ModelCardData``: library, license, tags,
datasets and a ``model-index`` with one evaluation result per top-1/top-5 accuracy, so the Hub
shows the metrics. The body describes the architecture, the training recipe and a usage snippet
that loads the folder the card sits in.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
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
    """(dataset type, display name) of a training/evaluation data source: a Hub dataset id, or
    ``imagefolder`` and the folder's name for a local image folder (the model-index still
    records the result; the Hub links only real dataset ids)."""
    if not source:
        return None
    if source in DATASETS:
        return DATASETS[source]
    kind, sep, path = source.partition(":")
    if sep and kind == "hf" and _is_repo_id(path):
        return path, path
    if sep or source.startswith(("/", ".", "~")) or Path(source).expanduser().exists():
        local = path if sep else source
        return "imagefolder", Path(local.rstrip("/")).name or local
    return source, source


def _is_repo_id(text: str) -> bool:
    """``owner/name`` (or ``name``) as the Hub spells ids, and not an existing local path."""
    return bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text)) and not (
        text.startswith(".") or Path(text).expanduser().exists()
    )


# protocol -> (model-index task type, task name). The Hub groups model-index results by task
# type and dataset, so every protocol has its own type: one task per protocol.
TASKS = {
    "knn": ("image-classification-knn", "k-NN classification on frozen features"),
    "linear": ("image-classification-linear-probe", "Linear probe on frozen features"),
    "lowshot": ("image-classification-low-shot", "Low-shot linear probe (k labels per class)"),
    "transfer": ("image-classification-transfer", "Transfer: linear probe on all labels"),
    "semisup": ("image-classification-semi-supervised", "Semi-supervised fine-tuning"),
    "finetune": ("image-classification", "Fine-tuning"),
}


def _task_and_split(key: str, training: dict[str, Any]) -> tuple[str, str] | None:
    """(protocol task key, dataset split) of a results key, or None when it is no result
    (standard deviations, train-set accuracies, non-accuracy values)."""
    if not key.endswith(("top1", "top5")) or "_train_" in key:
        return None
    protocol, _, metric = key.partition("_")
    test_split = str(training.get("test_split") or "test")
    if protocol == "transfer":
        shots = metric.split("shot_", 1)[0] if "shot_" in metric else "all"
        return ("lowshot" if shots != "all" else "transfer"), test_split
    if protocol == "finetune" and metric.startswith("val_"):
        return "finetune", "validation"  # held out of the training split, not the test set
    return protocol, test_split


def eval_results(config: dict[str, Any], model_name: str) -> list[Any]:
    """``EvalResult`` entries (model-index) for the accuracy metrics in ``config['results']``.

    A key ``<protocol>_..._top1`` (or ``top5``) is one result under its protocol's own task
    (:data:`TASKS`; ``transfer_<k>shot_*`` is low-shot, ``transfer_allshot_*`` transfer); its
    dataset is the protocol's evaluation dataset (``training.evaluation_datasets``), else the
    training dataset; a fine-tune's ``val_top1`` is filed under split ``validation``, test
    accuracies under the test split. Standard deviations and train-set accuracies are not
    results.
    """
    from huggingface_hub import EvalResult

    training = config.get("training") or {}
    by_protocol = training.get("evaluation_datasets") or {}
    out = []
    for key, value in sorted((config.get("results") or {}).items()):
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        task = _task_and_split(key, training)
        protocol = key.split("_", 1)[0]
        ds = _dataset(by_protocol.get(protocol) or training.get("dataset"))
        if task is None or ds is None:
            continue
        task_type, task_name = TASKS.get(task[0], (f"image-classification-{protocol}", protocol))
        out.append(
            EvalResult(
                task_type=task_type,
                task_name=task_name,
                dataset_type=ds[0],
                dataset_name=ds[1],
                dataset_split=task[1],
                metric_type="accuracy",
                metric_name=key,
                metric_value=value,
            )
        )
    return out


def base_model(config: dict[str, Any]) -> str | None:
    """The Hugging Face repo id a fine-tuned model started from (``training.base_model``),
    or None when that is not a repo id (a registry name or a local folder; the card's text
    names it instead)."""
    base = (config.get("training") or {}).get("base_model")
    return base if isinstance(base, str) and "/" in base and _is_repo_id(base) else None


def card_data(config: dict[str, Any], name: str) -> Any:
    """The ``ModelCardData`` of a weights folder's config."""
    from huggingface_hub import ModelCardData

    training = config.get("training") or {}
    sources = [training.get("dataset"), *(training.get("evaluation_datasets") or {}).values()]
    datasets = sorted(
        {ds[0] for ds in map(_dataset, sources) if ds is not None and ds[0] != "imagefolder"}
    )
    results = eval_results(config, name)
    classifier = bool(config.get("num_classes"))
    base = base_model(config)
    return ModelCardData(
        model_name=name if results else None,
        library_name="smi-hub",
        license=LICENSE,
        pipeline_tag="image-classification" if classifier else "image-feature-extraction",
        tags=[*TAGS, config["arch"]] + (["image-classification"] if classifier else []),
        datasets=datasets or None,
        base_model=base,
        base_model_relation="finetune" if base else None,
        eval_results=results or None,
    )


def timm_snippet(config: dict[str, Any], name: str, repo_id: str | None) -> list[str]:
    """Python lines that load these weights with timm and resolve timm's data config to this
    model's own preprocessing (empty for layouts timm cannot build)."""
    arch = config.get("architecture")
    cfg = config.get("pretrained_cfg") or {}
    if not arch or not cfg:
        return []
    num_classes = int(config.get("num_classes") or 0)
    folder = repo_id and f"hf-hub:{repo_id}" or f"local-dir:path/to/{name}"
    size = tuple(cfg.get("input_size") or (3, config["image_size"], config["image_size"]))
    overlay = (
        f'file="path/to/{name}/model.safetensors", num_classes={num_classes}, '
        f"input_size={size}, mean={tuple(cfg['mean'])}, std={tuple(cfg['std'])}, "
        f"crop_pct={cfg.get('crop_pct', 1.0)}, interpolation={cfg.get('interpolation')!r}"
    )
    return [
        "import timm",
        "",
        f'model = timm.create_model("{folder}", pretrained=True).eval()  # reads config.json',
        "# or from the weights file alone (num_classes and the data config must be given: timm",
        "# otherwise drops the head and assumes ImageNet's 224 px and statistics)",
        f'model = timm.create_model("{arch}", pretrained=True, num_classes={num_classes},',
        f"                          pretrained_cfg_overlay=dict({overlay})).eval()",
        "data_config = timm.data.resolve_model_data_config(model)",
        "transform = timm.data.create_transform(**data_config)",
    ]


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
    timm_lines = timm_snippet(config, name, repo_id)
    timm_text = (
        [
            "The tensors use torchvision's ResNet names, so `model.safetensors` loads with "
            f"`strict=True` into `torchvision.models.{config['arch']}()` (with `fc` replaced or "
            "removed) and into timm:",
            "",
            "```python",
            *timm_lines,
            "```",
        ]
        if timm_lines
        else [
            "This layout (narrow width or small-image stem) is smi-hub's own: load it with "
            "`smi_hub.load`; torchvision and timm build only the standard-width ImageNet stem."
        ]
    )
    base = (config.get("training") or {}).get("base_model")
    base_text = [f"Fine-tuned from `{base}`.", ""] if base else []
    lines = [
        "---",
        card_data(config, name).to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        *base_text,
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
        *timm_text,
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
