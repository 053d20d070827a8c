"""Long jobs say what they will do, and about how long it takes, before they start."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import smi_hub
from smi_hub import SMIModel
from smi_hub.cli import main as cli_main
from smi_hub.plan import _is_channels_last, duration, seconds_per_image
from training import pretrain
from training.config_load import load_config

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "fmnist_resnet18_smi.yaml"


def tiny() -> SMIModel:
    torch.manual_seed(0)
    return SMIModel(arch="resnet18", base_width=4, small_stem=True, image_size=28)


@pytest.mark.slow
def test_timing_a_batch_changes_nothing_in_the_model_or_the_rng():
    model = tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    for train in (True, False):
        assert seconds_per_image(model, 28, "cpu", train=train) > 0
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BatchNorm statistics too
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), rng)


@pytest.mark.slow
def test_the_timed_batch_takes_the_models_memory_layout():
    # training feeds a channels-last model a channels-last batch; an NCHW batch given to one
    # made oneDNN's 1x1 convolution backward hang or crash at this width on this CPU
    model = tiny()
    assert not _is_channels_last(model)
    model = model.to(memory_format=torch.channels_last)
    assert _is_channels_last(model)
    assert seconds_per_image(model, 28, "cpu", train=True) > 0


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.2, "~1 s"), (45, "~45 s"), (600, "~10 min"), (11400, "~3 h 10 min")]
)
def test_duration(seconds, text):
    assert duration(seconds) == text


PLAN = r"plan: (\w+) .*; estimate ~\d+ (s|min|h)"


@pytest.mark.slow
def test_extract_prints_its_plan(tmp_path, capsys):
    weights = smi_hub.save_weights_folder(tiny().eval(), tmp_path / "w")
    gallery = smi_hub.default_gallery(tmp_path / "gallery", per_class=1)
    out = tmp_path / "store"
    assert cli_main(["extract", str(gallery), "-o", str(out), "--model", str(weights)]) == 0
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("plan:"))
    assert re.match(PLAN, line) and "10 images (1 batches of 64) on cpu" in line
    assert str(out) in line


@pytest.mark.slow
def test_pretrain_prints_its_plan(tmp_path, capsys):
    cfg = load_config(
        CONFIG,
        [f"output_dir={tmp_path / 'run'}", "data.subset=64", "train.epochs=1",
         "train.max_steps=1", "model.base_width=4", "model.projector_dims=[16,16]",
         "train.batch_size=32", "log.progress=false", "log.tensorboard=false",
         "log.monitor_samples=0", "train.channels_last=false"],
    )  # fmt: skip
    pretrain.train(cfg)
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("plan:"))
    assert re.match(PLAN, line), line
    assert "on 64 images x 1 epochs = 1 steps of 32 (1 to go) on 1 x cpu" in line
