"""Model card (README.md with Hugging Face metadata) for a weights folder."""

from __future__ import annotations

import json
from typing import Any


def render_model_card(config: dict[str, Any], name: str) -> str:
    """Markdown model card with a YAML header Hugging Face understands."""
    training = config.get("training") or {}
    results = config.get("results") or {}
    dataset = training.get("dataset")
    header = [
        "---",
        "library_name: smi-hub",
        "license: apache-2.0",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        "- self-supervised-learning",
        "- smi",
        f"- {config['arch']}",
    ]
    if dataset:
        header += ["datasets:", f"- {dataset}"]
    if results:
        header += ["metrics:"] + [f"- {k}" for k in sorted(results)]
    header.append("---")
    arch = (
        f"{config['arch']} (base width {config.get('base_width', 64)}"
        f"{', small-image stem' if config.get('small_stem') else ''}), "
        f"{config.get('num_features', '?')}-d pooled features, projector "
        f"{config.get('projector_dims') or 'not included'}"
    )
    lines = [
        *header,
        "",
        f"# {name}",
        "",
        "A ResNet trained with **SMI** (Semantic Mutual Information; Mishra, Ballester and "
        "Karatzas, arXiv 2606.08332), packaged by [smi-hub](https://github.com/smi-hub/smi-hub).",
        "",
        f"- Architecture: {arch}",
        f"- Input: {config.get('image_size')} px RGB, mean {config.get('mean')}, "
        f"std {config.get('std')} (grayscale images are replicated to 3 channels)",
        f"- Parameters in the weights file: {config.get('num_params', '?'):,}"
        if isinstance(config.get("num_params"), int)
        else "- Parameters in the weights file: ?",
        f"- model.safetensors sha256: `{config.get('weights_sha256', '?')}`",
        "",
        "## Usage",
        "",
        "```python",
        "import smi_hub",
        f'model = smi_hub.load("{name}")  # or a local folder / Hugging Face repo id',
        "features = smi_hub.extract_features(model, ['image.jpg'])",
        "```",
        "",
        "The backbone tensors use torchvision's ResNet names, so `model.safetensors` (without "
        "`projector.*`) also loads into `torchvision.models."
        f"{config['arch']}()` with its `fc` removed when the standard stem and width are used.",
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
