"""Config loading: YAML files, key=value overrides, clear errors for mistakes."""

from pathlib import Path

import pytest

from training import pretrain
from training.config import ConfigError
from training.config_load import load_config, parse_overrides

CONFIGS = sorted((Path(__file__).parents[1] / "training" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_are_valid(path):
    cfg = load_config(path)
    assert cfg.loss.name in path.stem


def test_baseline_configs_differ_only_in_loss_and_output():
    base = load_config(CONFIGS[0].parent / "fmnist_resnet18_smi.yaml").to_dict()
    for loss in ("barlow_twins", "vicreg"):
        other = load_config(CONFIGS[0].parent / f"fmnist_resnet18_{loss}.yaml").to_dict()
        diff = {k for k in base if base[k] != other[k]}
        assert diff == {"loss", "output_dir"}
        assert other["loss"]["name"] == loss


def test_overrides_are_typed_and_nested():
    cfg = load_config(
        None,
        [
            "train.epochs=3",
            "train.warmup_epochs=1",
            "loss.name=vicreg",
            "model.projector_dims=[64,32]",
            "train.weight_decay=1e-4",
            "data.source=fashion_mnist",
        ],
    )
    assert cfg.train.epochs == 3 and cfg.loss.name == "vicreg"
    assert cfg.model.projector_dims == [64, 32]
    assert cfg.train.weight_decay == pytest.approx(1e-4)
    assert parse_overrides(["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=0.1", "Unknown config key 'train.lrr'. Did you mean 'train.lr'?"),
        ("trian.lr=0.1", "Unknown config key 'trian'"),
        ("train.lr=fast", "train.lr: expected a number but got 'fast'"),
        ("train.epochs=2.5", "train.epochs: expected an integer"),
        ("train.epochs=0", "train.epochs: must be an integer in [1, inf), got 0"),
        ("loss.name=simclr", "loss.name: 'simclr' is not one of smi, barlow_twins, vicreg"),
        ("model.projector_dims=8", "model.projector_dims: expected a list"),
        ("train.channels_last=maybe", "train.channels_last: expected true or false"),
        ("train.epochs", "is not KEY=VALUE"),
    ],
)
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.source=fashion_mnist", override])
    assert message in str(e.value)


def test_cli_reports_config_errors_without_traceback(capsys):
    rc = pretrain.main(["--config", str(CONFIGS[0]), "train.batch_size=-1"])
    err = capsys.readouterr().err
    assert rc == pretrain.EXIT_CONFIG
    assert "Config error: train.batch_size: must be an integer in [2, inf), got -1" in err
    assert "Traceback" not in err


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)
