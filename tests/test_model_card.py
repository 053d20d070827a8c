"""Model cards as the Hugging Face Hub reads them: every card smi-hub writes is parsed with
huggingface_hub (``ModelCard.load``, ``model_index_to_eval_results``) and each field checked:
one task per evaluation protocol, the right splits, ``base_model`` for fine-tuned models, a
model-index for a fine-tune on an image folder, and a timm snippet that gives the model's own
head and data config."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import timm.data
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results
from PIL import Image

import smi_hub
from smi_hub import SMIModel, fashion_mnist
from smi_hub.model_card import TASKS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _parse(folder):
    """(card, {metric_name: EvalResult}) as the Hub reads the card's model-index."""
    card = ModelCard.load(folder / "README.md")
    name, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    assert name == card.data.model_name
    by_metric = {r.metric_name: r for r in results}
    assert len(by_metric) == len(results)
    return card, by_metric


def test_embedded_card_has_one_task_per_protocol(tmp_path):
    model = smi_hub.load()
    out = model.save_pretrained(tmp_path / "m", name="smi_resnet18_fmnist")
    card, results = _parse(out)
    expected = {
        "knn_top1": "knn", "knn_top5": "knn", "linear_top1": "linear", "linear_top5": "linear",
        "transfer_1shot_top1": "lowshot", "transfer_5shot_top1": "lowshot",
        "transfer_10shot_top1": "lowshot",
    }  # fmt: skip
    assert set(results) == set(expected)  # no std, no train-set accuracy
    for key, task in expected.items():
        r = results[key]
        assert (r.task_type, r.task_name) == TASKS[task], key
        assert r.dataset_type == "zalando-datasets/fashion_mnist" and r.dataset_split == "test"
        assert r.metric_type == "accuracy"
        assert r.metric_value == model.weights_config["results"][key]
    assert len({TASKS[t] for t in expected.values()}) == 3  # the Hub shows three tasks
    assert card.data.base_model is None and card.data.datasets == ["zalando-datasets/fashion_mnist"]
    assert card.data.pipeline_tag == "image-feature-extraction"


def test_transfer_on_all_labels_is_its_own_task(tmp_path):
    model = SMIModel(
        arch="resnet18", base_width=4, small_stem=True, projector_dims=[], image_size=28
    )
    training = {"dataset": "fashion_mnist", "evaluation_datasets": {"transfer": "hf:me/digits"}}
    results = {"transfer_allshot_top1": 70.0, "transfer_1shot_top1": 30.0, "knn_top1": 80.0}
    out = model.save_pretrained(tmp_path / "m", training=training, results=results)
    card, parsed = _parse(out)
    assert (
        parsed["transfer_allshot_top1"].task_type,
        parsed["transfer_allshot_top1"].task_name,
    ) == TASKS["transfer"]
    assert parsed["transfer_1shot_top1"].task_type == TASKS["lowshot"][0]
    assert parsed["transfer_allshot_top1"].dataset_type == "me/digits"
    assert parsed["knn_top1"].dataset_type == "zalando-datasets/fashion_mnist"
    assert card.data.datasets == ["me/digits", "zalando-datasets/fashion_mnist"]


def test_finetune_card_splits_and_base_model(tmp_path):
    model = SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[],
                     image_size=28, num_classes=3)  # fmt: skip
    training = {
        "task": "finetune", "base_model": "someone/smi-base", "dataset": "fashion_mnist",
        "test_split": "test", "evaluation_datasets": {"finetune": "fashion_mnist"},
    }  # fmt: skip
    results = {"finetune_val_top1": 91.0, "finetune_top1": 88.5, "finetune_top5": 99.0}
    out = model.save_pretrained(tmp_path / "ft", training=training, results=results)
    card, parsed = _parse(out)
    assert parsed["finetune_val_top1"].dataset_split == "validation"
    assert parsed["finetune_top1"].dataset_split == "test"
    assert parsed["finetune_top5"].dataset_split == "test"
    assert {(r.task_type, r.task_name) for r in parsed.values()} == {TASKS["finetune"]}
    assert card.data.base_model == "someone/smi-base"
    assert card.data.base_model_relation == "finetune"
    assert card.data.pipeline_tag == "image-classification"
    assert "Fine-tuned from `someone/smi-base`" in card.text
    # a registry name or local folder is no Hub id: named in the text, not in the metadata
    training["base_model"] = "smi_resnet18_fmnist"
    out = model.save_pretrained(tmp_path / "ft2", training=training, results=results)
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and "Fine-tuned from `smi_resnet18_fmnist`" in card.text


def _image_folder(root, per_class=6):
    images, labels = fashion_mnist.load_arrays("train")
    for folder, name in (("coat", "Coat"), ("sandal", "Sandal"), ("bag", "Bag")):
        for split in ("train", "test"):
            (root / split / folder).mkdir(parents=True)
        c = list(fashion_mnist.CLASSES).index(name)
        for j, i in enumerate(np.flatnonzero(labels == c)[: 2 * per_class]):
            split = "train" if j < per_class else "test"
            Image.fromarray(images[i]).save(root / split / folder / f"{i}.png")
    return root


@pytest.mark.slow
def test_finetune_on_an_image_folder_gets_a_model_index(tmp_path):
    """A real fine-tune of the embedded default on an image folder of Fashion-MNIST photos."""
    from training import finetune as ft
    from training.finetune_data import FinetuneConfig

    data = _image_folder(tmp_path / "clothes")
    result = ft.finetune(FinetuneConfig(
        out=str(tmp_path / "o"), data="imagefolder", data_path=str(data), test_split="test",
        max_steps=2, batch_size=8, val_fraction=0.25, progress=False,
    ))  # fmt: skip
    card, parsed = _parse(tmp_path / "o")
    assert set(parsed) == {"finetune_val_top1", "finetune_top1", "finetune_top5"}
    assert parsed["finetune_val_top1"].dataset_split == "validation"
    assert parsed["finetune_top1"].dataset_split == "test"
    for r in parsed.values():
        assert (r.dataset_type, r.dataset_name) == ("imagefolder", "clothes")
        assert (r.task_type, r.task_name) == TASKS["finetune"]
    assert parsed["finetune_top1"].metric_value == round(result["metrics"]["top1"], 4)
    assert parsed["finetune_val_top1"].metric_value == round(result["metrics"]["val_top1"], 4)
    assert card.data.datasets is None  # a local folder is no Hub dataset id
    assert "Fine-tuned from `smi_resnet18_fmnist`" in card.text


@pytest.mark.slow
@pytest.mark.parametrize("num_classes", [0, 10])
def test_card_timm_snippet_keeps_head_and_data_config(tmp_path, num_classes):
    """The card's timm code (both routes) gives the model's own logits / features and timm's
    data config resolves to its image size and statistics, not ImageNet's 224 px."""
    torch.manual_seed(0)
    model = SMIModel(arch="resnet18", projector_dims=[], image_size=32, mean=(0.3, 0.3, 0.3),
                     std=(0.2, 0.25, 0.3), num_classes=num_classes).eval()  # fmt: skip
    out = model.save_pretrained(tmp_path / "w", name="w")
    text = (out / "README.md").read_text()
    assert f"num_classes={num_classes}" in text
    assert num_classes == 0 or "num_classes=0" not in text  # a classifier's card keeps its head
    code = text.split("into timm:\n\n```python\n", 1)[1].split("```", 1)[0]
    code = code.replace("path/to/w", str(out))
    routes = code.split("# or from the weights file alone", 1)
    x = torch.randn(2, 3, 32, 32)
    for snippet in (routes[0], code):  # local-dir route, then the file + overlay route
        ns: dict = {}
        exec(compile(snippet, "card", "exec"), ns)
        tm = ns["model"]
        with torch.no_grad():
            assert torch.allclose(tm(x), model(x), atol=1e-5)
        cfg = timm.data.resolve_model_data_config(tm)
        assert tuple(cfg["input_size"]) == (3, 32, 32)
        assert tuple(cfg["mean"]) == (0.3, 0.3, 0.3) and tuple(cfg["std"]) == (0.2, 0.25, 0.3)
        assert cfg["crop_pct"] == 1.0
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["num_classes"] == (
        num_classes
    )
