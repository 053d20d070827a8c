"""The ImageNet recipes hold the values of the reference code (docs/training.md's table).

References read: facebookresearch/barlowtwins@8e8d284 main.py, facebookresearch/vicreg@4e12602
main_vicreg.py + resnet.py (README's 1000-epoch command). The LR schedule is checked against an
independent transcription of their ``adjust_learning_rate``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from smi_hub.models import SMIModel
from training.config_load import load_config
from training.optim import LARS, WarmupCosine, build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
LOSSES = ("smi", "barlow_twins", "vicreg")

# The table of docs/training.md: what every paper-scale recipe must hold.
COMMON = {
    "model.arch": "resnet50",
    "model.base_width": 64,
    "model.small_stem": False,
    "model.projector_dims": [8192, 8192, 8192],
    "model.image_size": 224,
    "model.zero_init_residual": True,
    "train.batch_size": 2048,
    "train.optimizer": "lars",
    "train.lr": 0.2,
    "train.lr_scale_batch": True,
    "train.weight_decay": 1e-6,
    "train.momentum": 0.9,
    "train.lars_eta": 0.001,
    "train.exclude_bias_bn": True,
    "train.warmup_epochs": 10.0,
    "train.min_lr_ratio": 0.001,
    "train.sync_bn": True,
    "data.augment.crop_scale": [0.08, 1.0],
    "data.augment.hflip_prob": 0.5,
    "data.augment.color_jitter": [0.4, 0.4, 0.2, 0.1],
    "data.augment.color_jitter_prob": 0.8,
    "data.augment.grayscale_prob": 0.2,
    "data.augment.blur_prob": [1.0, 0.1],
    "data.augment.blur_sigma": [0.1, 2.0],
    "data.augment.solarize_prob": [0.0, 0.2],
}
PER_LOSS = {
    "smi": {
        "model.projector_bias": False,
        "train.bias_bn_lr_ratio": 0.0048 / 0.2,
        "loss.kwargs": {"lambda_offdiag": 8.0, "eps": 0.1},
    },
    "barlow_twins": {
        "model.projector_bias": False,
        "train.bias_bn_lr_ratio": 0.0048 / 0.2,
        "loss.kwargs": {"lambd": 0.0051},
    },
    "vicreg": {
        "model.projector_bias": True,
        "train.bias_bn_lr_ratio": 1.0,
        "loss.kwargs": {"sim_weight": 25.0, "var_weight": 25.0, "cov_weight": 1.0},
    },
}


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _recipes() -> list[tuple[str, int, Path]]:
    out = []
    for loss in LOSSES:
        out.append((loss, 1000, CONFIGS / f"imagenet_resnet50_{loss}.yaml"))
        for path in sorted(CONFIGS.glob(f"imagenet_resnet50_{loss}_*ep.yaml")):
            out.append((loss, int(path.stem.rsplit("_", 1)[1][:-2]), path))
    return out


def test_every_loss_has_a_1000_epoch_recipe_and_a_300_epoch_variant():
    names = {p.name for _, _, p in _recipes()}
    for loss in LOSSES:
        assert f"imagenet_resnet50_{loss}.yaml" in names
        assert f"imagenet_resnet50_{loss}_300ep.yaml" in names


@pytest.mark.parametrize("loss,epochs,path", _recipes(), ids=lambda v: getattr(v, "name", v))
def test_recipe_holds_the_reference_values(loss: str, epochs: int, path: Path):
    cfg = load_config(path)
    assert cfg.loss.name == loss
    assert cfg.train.epochs == epochs
    assert path.stem.endswith(f"_{epochs}ep") or epochs == 1000
    for key, want in {**COMMON, **PER_LOSS[loss]}.items():
        got = _get(cfg, key)
        if isinstance(want, float):
            assert got == pytest.approx(want, rel=1e-12), key
        else:
            assert got == want, key


def test_variants_differ_from_their_1000_epoch_recipe_only_in_epochs_and_output_dir():
    for loss in LOSSES:
        full = load_config(CONFIGS / f"imagenet_resnet50_{loss}.yaml").to_dict()
        for path in CONFIGS.glob(f"imagenet_resnet50_{loss}_*ep.yaml"):
            short = load_config(path).to_dict()
            assert short["output_dir"].endswith(path.stem)
            short["train"]["epochs"] = full["train"]["epochs"]
            short["output_dir"] = full["output_dir"]
            assert short == full, path.name


def _small_r50(loss: str) -> SMIModel:
    """The recipe's model with a narrow projector (cheap to build; same init rules)."""
    m = load_config(CONFIGS / f"imagenet_resnet50_{loss}.yaml").model
    torch.manual_seed(0)
    return SMIModel(
        arch=m.arch,
        base_width=m.base_width,
        projector_dims=[32, 32, 16],
        zero_init_residual=m.zero_init_residual,
        projector_bias=m.projector_bias,
    )


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_recipe_model_zero_inits_each_residual_block_and_has_the_reference_projector(loss):
    model = _small_r50(loss)
    bn3 = [m.bn3 for m in model.modules() if type(m).__name__ == "Bottleneck"]
    assert len(bn3) == 16 and all(float(bn.weight.detach().abs().sum()) == 0 for bn in bn3)
    other = [model.bn1, model.layer1[0].bn1, model.layer1[0].bn2, model.layer1[0].downsample[1]]
    assert all(bool((bn.weight == 1).all()) for bn in other)
    linears = [m for m in model.projector if isinstance(m, nn.Linear)]
    assert linears[-1].bias is None  # both references: last projector Linear without bias
    assert all((lin.bias is not None) == (loss == "vicreg") for lin in linears[:-1])


def test_model_defaults_are_unchanged():
    """Without the new options: torchvision's init and bias-free projector (the embedded
    default and the Fashion-MNIST recipes depend on it)."""
    model = SMIModel(arch="resnet18", base_width=8, small_stem=True, projector_dims=[16, 8])
    assert float(model.layer1[0].bn2.weight.detach().min()) == 1.0
    assert model.projector[0].bias is None
    assert "projector_bias" not in model.config
    with_bias = SMIModel(arch="resnet18", base_width=8, small_stem=True, projector_dims=[16, 8],
                         projector_bias=True)  # fmt: skip
    assert with_bias.config["projector_bias"] is True
    assert SMIModel(**with_bias.config).state_dict().keys() == with_bias.state_dict().keys()


def _reference_lr(step: int, epochs: int, steps_per_epoch: int, base: float) -> float:
    """The references' ``adjust_learning_rate`` (BT: base = batch/256 x lr; same shape)."""
    max_steps, warmup = epochs * steps_per_epoch, 10 * steps_per_epoch
    if step < warmup:
        return base * step / warmup
    step, max_steps = step - warmup, max_steps - warmup
    q = 0.5 * (1 + math.cos(math.pi * step / max_steps))
    return base * q + base * 0.001 * (1 - q)


@pytest.mark.slow
@pytest.mark.parametrize("loss", LOSSES)
def test_optimizer_groups_and_schedule_match_the_reference(loss):
    cfg = load_config(CONFIGS / f"imagenet_resnet50_{loss}.yaml")
    model = _small_r50(loss)
    t = cfg.train
    peak = t.lr * t.batch_size / 256
    opt = build_optimizer(model, t.optimizer, peak, t.weight_decay, t.momentum, t.lars_eta,
                          t.exclude_bias_bn, t.bias_bn_lr_ratio)  # fmt: skip
    assert isinstance(opt, LARS)
    weights, biases = opt.param_groups
    # the references' filter: ndim == 1 -> no weight decay, no LARS adaptation
    assert all(p.ndim > 1 for p in weights["params"]) and all(p.ndim == 1 for p in biases["params"])
    assert len(weights["params"]) + len(biases["params"]) == len(list(model.parameters()))
    assert weights["lars"] and not biases["lars"]
    assert weights["weight_decay"] == 1e-6 and biases["weight_decay"] == 0.0
    bias_base = 2048 / 256 * (0.0048 if loss != "vicreg" else 0.2)
    assert weights["lr"] == pytest.approx(2048 / 256 * 0.2)
    assert biases["lr"] == pytest.approx(bias_base)
    # schedule: 1000 epochs at (say) 625 steps per epoch (the reference has 625 at 2048)
    spe = 625
    sched = WarmupCosine(opt, cfg.train.epochs * spe, int(cfg.train.warmup_epochs * spe),
                         cfg.train.min_lr_ratio)  # fmt: skip
    for step in (0, 1, 3000, 6249, 6250, 6251, 100000, 400000, 624999):
        sched.load_state_dict({**sched.state_dict(), "step": step})
        # ours during warmup is the reference one step later (no first step at LR 0)
        ref_step = step + 1 if step < 10 * spe else step
        for group, base in zip(opt.param_groups, (peak, bias_base), strict=True):
            want = _reference_lr(ref_step, cfg.train.epochs, spe, base)
            assert group["lr"] == pytest.approx(want, rel=1e-9), (step, base)


@pytest.mark.parametrize("batch", [256, 128, 64])
def test_one_gpu_fmnist_recipe_changes_only_batch_projector_and_output_dir(batch):
    """The small-hardware recipes (docs/results.md, "Where SMI is efficient") load, validate,
    build their model, and are the SMI Fashion-MNIST recipe at another batch (the LR follows
    by the linear rule) with the 2048-wide projector output the study measured."""
    path = CONFIGS / f"fmnist_resnet18_smi_1gpu_b{batch}.yaml"
    cfg = load_config(path)
    assert cfg.train.batch_size == batch and cfg.train.lr_scale_batch
    assert cfg.train.lr * batch / 256 == pytest.approx(2.0 * batch / 256)
    assert cfg.model.projector_dims == [1024, 1024, 2048]
    assert cfg.output_dir.endswith(path.stem)
    got, base = cfg.to_dict(), load_config(CONFIGS / "fmnist_resnet18_smi.yaml").to_dict()
    for d in (got, base):
        d["train"].pop("batch_size"), d["model"].pop("projector_dims"), d.pop("output_dir")
    assert got == base
    assert "Where SMI is efficient" in path.read_text()
    model = SMIModel(**{k: v for k, v in cfg.to_dict()["model"].items()})
    assert model.projector[-1].out_features == 2048
