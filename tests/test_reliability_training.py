"""Bad-input suite for training: every setting is range-checked up front (exit code 2 with
the key, the value and what is allowed), checkpoints are verified before use (SHA-256
sidecar, else the zip CRCs) with a fallback to the newest intact one, and nothing is ever
unpickled. Each case is one test id; docs/reliability.md lists them."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import pickle
import random
import re
import subprocess
import sys
import typing
import zipfile
from pathlib import Path

import pytest
import torch

from smi_hub import export
from smi_hub.errors import CheckpointError as ExportCheckpointError
from training import pretrain
from training.checkpoint import (
    CheckpointError,
    find_latest,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
    sidecar_path,
    verify_checkpoint,
)
from training.config import ConfigError, PretrainConfig
from training.config_checks import LOSS_KWARGS, check_runtime
from training.config_load import load_config
from training.losses import LOSSES

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "training" / "configs" / "fmnist_resnet18_smi.yaml"
BASE = ["data.source=fashion_mnist"]  # the defaults otherwise (epochs 100, batch 2048, smi)
TINY = [
    f"--config={CONFIG}",
    "model.base_width=4",
    "model.projector_dims=[32,32]",
    "train.batch_size=32",
    "data.num_workers=0",
    "data.subset=128",
    "log.progress=false",
    "log.tensorboard=false",
    "log.monitor_samples=0",
    "train.channels_last=false",
]
NOISE = random.Random(0).randbytes(4096)  # "random bytes", the same in every run


def advises_unpickling(message: str) -> bool:
    """True if ``message`` relays torch's advice to load with weights_only=False."""
    return re.search(r"weights_only`?\s*(=|set to)\s*`?False", message) is not None


# (test id, overrides, fragments the message must contain: the key, the value, the range)
CONFIG_CASES = [
    ("grad_clip_negative", ["train.grad_clip=-1"], ["train.grad_clip", "-1.0", "(0, inf)"]),
    ("grad_clip_zero", ["train.grad_clip=0"], ["train.grad_clip", "0.0", "null: no clipping"]),
    ("grad_clip_nan", ["train.grad_clip=.nan"], ["train.grad_clip", "nan"]),
    ("max_steps_zero", ["train.max_steps=0"], ["train.max_steps", "got 0", "[1, inf)"]),
    ("max_steps_negative", ["train.max_steps=-5"], ["train.max_steps", "-5", "[1, inf)"]),
    ("momentum_negative", ["train.momentum=-1"], ["train.momentum", "-1.0", "[0, 1)"]),
    ("momentum_one", ["train.momentum=1"], ["train.momentum", "1.0", "[0, 1)"]),
    ("min_lr_ratio_above_one", ["train.min_lr_ratio=5"], ["train.min_lr_ratio", "5.0", "[0, 1]"]),
    ("min_lr_ratio_negative", ["train.min_lr_ratio=-0.1"], ["train.min_lr_ratio", "-0.1"]),
    ("lr_nan", ["train.lr=.nan"], ["train.lr", "nan", "(0, inf)"]),
    ("lr_inf", ["train.lr=.inf"], ["train.lr", "inf", "finite"]),
    ("lr_zero", ["train.lr=0"], ["train.lr", "0.0", "(0, inf)"]),
    ("lr_negative", ["train.lr=-0.1"], ["train.lr", "-0.1"]),
    ("weight_decay_nan", ["train.weight_decay=.nan"], ["train.weight_decay", "nan", "[0, inf)"]),
    ("weight_decay_negative", ["train.weight_decay=-1e-4"], ["train.weight_decay", "-0.0001"]),
    ("lars_eta_zero", ["train.lars_eta=0"], ["train.lars_eta", "0.0", "(0, inf)"]),
    ("bias_bn_lr_ratio_negative", ["train.bias_bn_lr_ratio=-1"], ["train.bias_bn_lr_ratio"]),
    ("warmup_negative", ["train.warmup_epochs=-1"], ["train.warmup_epochs", "-1.0", "[0, 100]"]),
    ("warmup_beyond_epochs", ["train.warmup_epochs=200"], ["train.warmup_epochs", "200.0"]),
    ("warmup_nan", ["train.warmup_epochs=.nan"], ["train.warmup_epochs", "nan"]),
    ("epochs_zero", ["train.epochs=0"], ["train.epochs", "got 0", "[1, inf)"]),
    ("epochs_negative", ["train.epochs=-3"], ["train.epochs", "-3"]),
    ("batch_size_one", ["train.batch_size=1"], ["train.batch_size", "got 1", "[2, inf)"]),
    ("batch_size_zero", ["train.batch_size=0"], ["train.batch_size", "got 0"]),
    ("max_nonfinite_zero", ["train.max_nonfinite=0"], ["train.max_nonfinite", "[1, inf)"]),
    ("optimizer_unknown", ["train.optimizer=adam"], ["train.optimizer", "'adam'", "lars, sgd"]),
    ("precision_unknown", ["train.precision=fp8"], ["train.precision", "'fp8'", "fp32, bf16"]),
    ("channels_last_not_bool", ["train.channels_last=maybe"], ["train.channels_last", "maybe"]),
    ("sync_bn_not_bool", ["train.sync_bn=2"], ["train.sync_bn", "true or false"]),
    ("lr_scale_batch_not_bool", ["train.lr_scale_batch=2"], ["train.lr_scale_batch"]),
    ("exclude_bias_bn_not_bool", ["train.exclude_bias_bn=1"], ["train.exclude_bias_bn"]),
    ("smi_lambda_nan", ["loss.kwargs.lambda_offdiag=.nan"], ["loss.kwargs.lambda_offdiag", "nan"]),
    ("smi_lambda_negative", ["loss.kwargs.lambda_offdiag=-1"], ["[0, inf)", "-1"]),
    ("smi_lambda_inf", ["loss.kwargs.lambda_offdiag=.inf"], ["loss.kwargs.lambda_offdiag", "inf"]),
    ("smi_lambda_text", ["loss.kwargs.lambda_offdiag=big"], ["lambda_offdiag", "'big'"]),
    ("smi_eps_zero", ["loss.kwargs.eps=0"], ["loss.kwargs.eps", "(0, 1)"]),
    ("smi_eps_one", ["loss.kwargs.eps=1"], ["loss.kwargs.eps", "(0, 1)"]),
    ("smi_std_eps_zero", ["loss.kwargs.std_eps=0"], ["loss.kwargs.std_eps", "(0, inf)"]),
    ("smi_diag_weight_negative", ["loss.kwargs.diag_weight=-2"], ["loss.kwargs.diag_weight"]),
    ("smi_gather_not_bool", ["loss.kwargs.gather=3"], ["loss.kwargs.gather", "true or false"]),
    ("smi_unknown_kwarg", ["loss.kwargs.lambd=0.1"], ["loss.kwargs.lambd", "lambda_offdiag"]),
    (
        "barlow_lambd_negative",
        ["loss.name=barlow_twins", "loss.kwargs.lambd=-0.005"],
        ["loss.kwargs.lambd", "-0.005", "[0, inf)"],
    ),
    (
        "barlow_bn_eps_nan",
        ["loss.name=barlow_twins", "loss.kwargs.bn_eps=.nan"],
        ["loss.kwargs.bn_eps", "nan"],
    ),
    (
        "vicreg_gamma_zero",
        ["loss.name=vicreg", "loss.kwargs.gamma=0"],
        ["loss.kwargs.gamma", "(0, inf)"],
    ),
    (
        "vicreg_sim_weight_negative",
        ["loss.name=vicreg", "loss.kwargs.sim_weight=-25"],
        ["loss.kwargs.sim_weight", "-25"],
    ),
    (
        "vicreg_eps_negative",
        ["loss.name=vicreg", "loss.kwargs.eps=-1"],
        ["loss.kwargs.eps", "(0, inf)"],
    ),
    ("loss_unknown", ["loss.name=simclr"], ["loss.name", "'simclr'"]),
    ("hflip_prob_two", ["data.augment.hflip_prob=2"], ["data.augment.hflip_prob", "2.0", "[0, 1]"]),
    ("hflip_prob_negative", ["data.augment.hflip_prob=-0.5"], ["data.augment.hflip_prob"]),
    ("jitter_prob_above_one", ["data.augment.color_jitter_prob=1.5"], ["color_jitter_prob"]),
    ("grayscale_prob_negative", ["data.augment.grayscale_prob=-1"], ["grayscale_prob", "[0, 1]"]),
    ("blur_prob_two", ["data.augment.blur_prob=[1.0,2.0]"], ["data.augment.blur_prob[1]", "2.0"]),
    ("blur_prob_length", ["data.augment.blur_prob=[1.0]"], ["data.augment.blur_prob", "2 values"]),
    ("solarize_prob_nan", ["data.augment.solarize_prob=[0,.nan]"], ["solarize_prob[1]", "nan"]),
    (
        "jitter_negative",
        ["data.augment.color_jitter=[-1,0.4,0.2,0.1]"],
        ["color_jitter[0] (brightness)", "-1.0", "[0, inf)"],
    ),
    (
        "jitter_hue_too_large",
        ["data.augment.color_jitter=[0.4,0.4,0.2,0.9]"],
        ["color_jitter[3] (hue)", "0.9", "[0, 0.5]"],
    ),
    ("jitter_length", ["data.augment.color_jitter=[0.4,0.4]"], ["color_jitter", "4 values"]),
    (
        "augment_device_unknown",
        ["data.augment.device=tpu"],
        ["data.augment.device", "tpu", "auto, cpu, gpu"],
    ),
    ("crop_scale_zero", ["data.augment.crop_scale=[0,1]"], ["crop_scale[0]", "(0, 1]"]),
    ("crop_scale_reversed", ["data.augment.crop_scale=[0.9,0.2]"], ["crop_scale", "min <= max"]),
    ("crop_scale_above_one", ["data.augment.crop_scale=[0.08,1.5]"], ["crop_scale[1]", "1.5"]),
    ("blur_sigma_reversed", ["data.augment.blur_sigma=[2,0.1]"], ["blur_sigma", "min <= max"]),
    ("blur_sigma_zero", ["data.augment.blur_sigma=[0,2]"], ["blur_sigma[0]", "(0, inf)"]),
    ("max_bad_fraction_one", ["data.max_bad_fraction=1"], ["data.max_bad_fraction", "[0, 1)"]),
    ("max_bad_fraction_negative", ["data.max_bad_fraction=-0.1"], ["data.max_bad_fraction"]),
    ("num_workers_negative", ["data.num_workers=-1"], ["data.num_workers", "-1", "[0, inf)"]),
    ("subset_zero", ["data.subset=0"], ["data.subset", "got 0", "[1, inf)"]),
    ("subset_below_batch", ["data.subset=16"], ["data.subset", "fewer than one batch", "2048"]),
    ("fmnist_split_unknown", ["data.split=validation"], ["data.split", "'validation'", "train"]),
    ("split_empty", ['data.split=""'], ["data.split", "must not be empty"]),
    ("path_empty", ['data.path=""'], ["data.path", "must not be empty"]),
    ("imagefolder_without_path", ["data.source=imagefolder"], ["data.path is required"]),
    ("source_unknown", ["data.source=s3"], ["data.source", "'s3'"]),
    ("image_key_empty", ['data.image_key=""'], ["data.image_key", "must not be empty"]),
    ("label_key_empty", ['data.label_key=" "'], ["data.label_key", "must not be empty"]),
    ("arch_unknown", ["model.arch=vit"], ["model.arch", "'vit'"]),
    ("base_width_zero", ["model.base_width=0"], ["model.base_width", "[1, 256]"]),
    ("base_width_huge", ["model.base_width=10000000"], ["model.base_width", "10000000"]),
    ("image_size_zero", ["model.image_size=0"], ["model.image_size", "got 0", "[8, 4096]"]),
    ("image_size_huge", ["model.image_size=100000"], ["model.image_size", "100000"]),
    ("projector_empty", ["model.projector_dims=[]"], ["model.projector_dims", "at least one"]),
    ("projector_zero_width", ["model.projector_dims=[0]"], ["model.projector_dims[0]", "[2, "]),
    ("projector_huge", ["model.projector_dims=[1000000]"], ["model.projector_dims[0]", "1000000"]),
    ("mean_nan", ["model.mean=[.nan,0,0]"], ["model.mean[0]", "nan", "[0, 1]"]),
    ("mean_length", ["model.mean=[0.5,0.5]"], ["model.mean", "3 values"]),
    ("std_zero", ["model.std=[0,0,0]"], ["model.std[0]", "0.0", "(0, inf)"]),
    ("std_negative", ["model.std=[1,-1,1]"], ["model.std[1]", "-1.0"]),
    ("small_stem_not_bool", ["model.small_stem=3"], ["model.small_stem", "true or false"]),
    ("zero_init_not_bool", ["model.zero_init_residual=0"], ["model.zero_init_residual"]),
    ("projector_bias_not_bool", ["model.projector_bias=none"], ["model.projector_bias"]),
    ("seed_negative", ["seed=-1"], ["seed", "got -1", "[0, 4294967295]"]),
    ("seed_too_large", ["seed=4294967296"], ["seed", "4294967296"]),
    ("device_unknown", ["device=banana"], ["device", "'banana'", "auto, cpu, cuda"]),
    ("device_cuda_index", ["device=cuda:1"], ["device", "'cuda:1'"]),
    ("device_mps", ["device=mps"], ["device", "'mps'"]),
    ("output_dir_empty", ['output_dir=""'], ["output_dir", "must not be empty"]),
    ("output_dir_none", ["output_dir="], ["output_dir", "expected a string"]),
    ("every_steps_zero", ["checkpoint.every_steps=0"], ["checkpoint.every_steps", "[1, inf)"]),
    ("keep_last_zero", ["checkpoint.keep_last=0"], ["checkpoint.keep_last", "[1, inf)"]),
    ("log_every_steps_zero", ["log.every_steps=0"], ["log.every_steps", "[1, inf)"]),
    ("monitor_samples_one", ["log.monitor_samples=1"], ["log.monitor_samples", "got 1"]),
    ("monitor_samples_negative", ["log.monitor_samples=-3"], ["log.monitor_samples", "-3"]),
    ("progress_not_bool", ["log.progress=2"], ["log.progress", "true or false"]),
    ("tensorboard_not_bool", ["log.tensorboard=on_disk"], ["log.tensorboard", "true or false"]),
]


@pytest.mark.parametrize(
    "overrides, fragments", [pytest.param(o, f, id=i) for i, o, f in CONFIG_CASES]
)
def test_bad_setting_is_refused_naming_key_value_and_range(overrides, fragments):
    with pytest.raises(ConfigError) as e:
        load_config(None, [*BASE, *overrides])
    for fragment in fragments:
        assert fragment in str(e.value)


def test_the_largest_model_that_trains_also_loads():
    """Training accepts no architecture the weights loader would refuse at export/load time."""
    from smi_hub.schema import (
        MAX_BASE_WIDTH,
        MAX_IMAGE_SIZE,
        MAX_PROJECTOR_DIM,
        validate_config,
    )

    big = [
        f"model.base_width={MAX_BASE_WIDTH}",
        f"model.image_size={MAX_IMAGE_SIZE}",
        f"model.projector_dims=[{MAX_PROJECTOR_DIM}]",
    ]
    m = load_config(None, [*BASE, *big]).model
    validate_config({k: getattr(m, k) for k in ("base_width", "image_size", "projector_dims")})
    with pytest.raises(ConfigError, match="model.base_width"):
        load_config(None, [*BASE, f"model.base_width={MAX_BASE_WIDTH + 1}"])


def _leaf_keys(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    keys: set[str] = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.add(prefix + f.name)
    return keys


def test_every_setting_has_a_bad_input_case():
    covered = {o.split("=")[0] for _, overrides, _ in CONFIG_CASES for o in overrides}
    covered |= {"loss.kwargs"} if any(k.startswith("loss.kwargs.") for k in covered) else set()
    missing = sorted(_leaf_keys(PretrainConfig) - covered)
    assert not missing, f"settings without a bad-input case: {missing}"


def test_loss_argument_table_matches_the_loss_classes():

    for name, allowed in LOSS_KWARGS.items():
        params = inspect.signature(LOSSES[name].__init__).parameters
        assert set(allowed) == set(params) - {"self"}, name


def test_shipped_defaults_and_recipes_pass():
    assert load_config(None, BASE).train.lr == 0.2
    for path in sorted((ROOT / "training" / "configs").glob("*.yaml")):
        load_config(path)


# --- checks that need this machine (device, output folder, processes) -------------------


def _fresh(tmp_path: Path, *extra: str) -> PretrainConfig:
    return load_config(None, [*BASE, f"output_dir={tmp_path / 'run'}", *extra])


def test_runtime_cuda_requested_without_a_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"device: 'cuda' was requested but no CUDA GPU"):
        check_runtime(_fresh(tmp_path, "device=cuda"))


def test_runtime_output_dir_is_a_file(tmp_path):
    f = tmp_path / "run"
    f.write_text("not a folder")
    with pytest.raises(ConfigError, match="is an existing file, not a folder"):
        check_runtime(_fresh(tmp_path))
    assert f.read_text() == "not a folder"


def test_runtime_output_dir_below_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    cfg = load_config(None, [*BASE, f"output_dir={tmp_path / 'file' / 'run'}"])
    with pytest.raises(ConfigError, match="output_dir: .* is not a writable folder"):
        check_runtime(cfg)


def test_runtime_output_dir_not_writable():
    cfg = load_config(None, [*BASE, "output_dir=/proc/smi-hub-run"])  # even root cannot
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_runtime(cfg)


def test_runtime_output_dir_with_nul_byte():
    cfg = load_config(None, [*BASE, 'output_dir="runs/a\\0b"'])
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_runtime(cfg)


def test_runtime_output_dir_is_created_and_left_clean(tmp_path):
    check_runtime(_fresh(tmp_path))
    assert (tmp_path / "run").is_dir() and not list((tmp_path / "run").iterdir())


@pytest.mark.parametrize(
    "batch, processes", [pytest.param(2, 2, id="one_image_per_process"), (6, 4)]
)
def test_runtime_batch_per_process(tmp_path, monkeypatch, batch, processes):
    monkeypatch.setattr(pretrain.D, "world_size", lambda: processes)
    cfg = _fresh(tmp_path, f"train.batch_size={batch}", "device=cpu")
    with pytest.raises(ConfigError, match=f"at least 2 images.*at least {2 * processes}"):
        pretrain.train(cfg)


def test_a_failed_run_releases_its_output_folder_at_once(tmp_path, monkeypatch):
    """The folder's lock goes when ``train`` raises, not when the traceback is collected: a
    notebook or a sweep that keeps the exception can start the next run in the same folder."""
    from smi_hub.outputs import claim_output_dir

    monkeypatch.setattr(pretrain.D, "world_size", lambda: 2)
    cfg = _fresh(tmp_path, "train.batch_size=2", "device=cpu")
    with pytest.raises(ConfigError) as failure:
        pretrain.train(cfg)
    assert failure.value.__traceback__ is not None  # the frames (and the claim) are alive
    claim_output_dir(tmp_path / "run", "pretrain", flag="output_dir").release()


# --- exit codes and messages of the command -----------------------------------------------


@pytest.mark.parametrize(
    "override, fragment",
    [
        pytest.param("train.grad_clip=-1", "train.grad_clip", id="grad_clip"),
        pytest.param("train.max_steps=0", "train.max_steps", id="max_steps"),
        pytest.param("train.lr=.nan", "train.lr", id="lr_nan"),
        pytest.param("device=cuda", "no CUDA GPU", id="cuda_without_gpu"),
        pytest.param("output_dir=/proc/x", "not a writable folder", id="unwritable_output"),
    ],
)
def test_cli_config_errors_exit_2_without_traceback(override, fragment, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rc = pretrain.main([*TINY, override])
    err = capsys.readouterr().err
    assert rc == pretrain.EXIT_CONFIG == 2
    assert fragment in err and "Traceback" not in err


@pytest.mark.slow
def test_cli_subprocess_bad_setting_exits_2(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "training.pretrain", *TINY, f"output_dir={tmp_path}/run"]
        + ["train.momentum=-1"],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "Config error: train.momentum: must be a finite number in [0, 1), got -1.0" in r.stderr
    assert not (tmp_path / "run").exists()  # nothing written for a refused config


@pytest.mark.slow
def test_divergence_before_any_checkpoint_says_none_exists(tmp_path, monkeypatch, capsys):
    real = pretrain.build_loss

    def nan_loss(name, **kw):
        loss = real(name, **kw)
        return lambda a, b: loss(a, b) * float("nan")

    monkeypatch.setattr(pretrain, "build_loss", nan_loss)
    out = tmp_path / "run"
    rc = pretrain.main([*TINY, f"output_dir={out}", "train.max_nonfinite=2"])
    err = capsys.readouterr().err
    assert rc == pretrain.EXIT_DIVERGED
    assert "No checkpoint was written yet" in err and "nothing to resume" in err
    assert "intact" not in err
    assert list_checkpoints(out / "checkpoints") == []


# --- checkpoints ------------------------------------------------------------------------


def _three_checkpoints(folder: Path) -> list[Path]:
    for step in (1, 2, 3):
        save_checkpoint({"step": step, "model": {"w": torch.full((64,), float(step))}}, folder)
    return list_checkpoints(folder)


def _flip(path: Path, offset: int, n: int = 2) -> None:
    with open(path, "r+b") as f:  # in place: a hard-linked last.pt changes its target too
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _data_offset(path: Path) -> int:
    """Byte offset of the first stored tensor's data inside a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename)
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
    return info.header_offset + 30 + name_len + extra_len


def test_checkpoint_writes_a_sha256_sidecar_for_each_file(tmp_path):
    paths = _three_checkpoints(tmp_path)
    for p in [*paths, tmp_path / "last.pt"]:
        digest, name = sidecar_path(p).read_text().split()
        assert digest == hashlib.sha256(p.read_bytes()).hexdigest() and name == p.name


def test_checkpoint_files_respect_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        _three_checkpoints(tmp_path)
    finally:
        os.umask(old)
    for p in tmp_path.iterdir():
        assert p.stat().st_mode & 0o777 == 0o644, p


def test_checkpoint_keep_last_deletes_sidecars_too(tmp_path):
    for step in range(1, 6):
        save_checkpoint({"step": step}, tmp_path, keep_last=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "checkpoint_00000004.pt",
        "checkpoint_00000004.pt.sha256",
        "checkpoint_00000005.pt",
        "checkpoint_00000005.pt.sha256",
        "last.pt",
        "last.pt.sha256",
    ]


def test_checkpoint_stale_temporaries_of_a_killed_write_are_removed(tmp_path):
    stale = tmp_path / ".checkpoint_00000007.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    other = tmp_path / "notes.tmp"
    other.write_text("not ours")
    save_checkpoint({"step": 8}, tmp_path)
    assert not stale.exists() and other.exists()


@pytest.mark.parametrize(
    "damage",
    ["flip_two_bytes", "empty", "random_bytes", "truncated", "replaced_by_other_checkpoint"],
)
def test_damaged_last_checkpoint_falls_back_to_newest_intact(tmp_path, caplog, damage):
    paths = _three_checkpoints(tmp_path)
    last = tmp_path / "last.pt"
    if damage == "flip_two_bytes":
        _flip(last, _data_offset(last) + 10)  # hard link: checkpoint 3 is damaged too
    elif damage == "empty":
        open(last, "wb").close()
    elif damage == "random_bytes":
        last.write_bytes(NOISE[:4096])
    elif damage == "truncated":
        os.truncate(last, last.stat().st_size // 2)
    else:
        last.unlink()
        last.write_bytes(paths[0].read_bytes())
    with caplog.at_level(logging.WARNING, logger="training.checkpoint"):
        found = find_latest(tmp_path)
    assert found in paths[1:]
    assert "Skipping damaged checkpoints" in caplog.text and "last.pt" in caplog.text
    expected = 3.0 if found == paths[2] else 2.0
    assert load_checkpoint(tmp_path)["model"]["w"][0].item() == expected


def test_flipped_bytes_are_caught_by_the_sidecar(tmp_path):
    _three_checkpoints(tmp_path)
    target = tmp_path / "checkpoint_00000003.pt"
    _flip(target, _data_offset(target) + 100)
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(target)


def test_flipped_bytes_without_sidecar_are_caught_by_the_zip_crc(tmp_path):
    _three_checkpoints(tmp_path)
    target = tmp_path / "checkpoint_00000003.pt"
    sidecar_path(target).unlink()
    _flip(target, _data_offset(target) + 100)
    with pytest.raises(CheckpointError, match="fails its CRC check"):
        verify_checkpoint(target)


def test_checkpoint_without_sidecar_still_loads(tmp_path):
    """Checkpoints written before sidecars existed (or a run killed between the renames)."""
    _three_checkpoints(tmp_path)
    target = tmp_path / "checkpoint_00000002.pt"
    sidecar_path(target).unlink()
    assert load_checkpoint(target)["step"] == 2


def test_unreadable_sidecar_is_reported(tmp_path):
    _three_checkpoints(tmp_path)
    target = tmp_path / "checkpoint_00000002.pt"
    sidecar_path(target).write_text("not a digest\n")
    with pytest.raises(CheckpointError, match="does not hold a SHA-256 digest"):
        load_checkpoint(target)


def test_sidecar_of_another_checkpoint_is_a_mismatch(tmp_path):
    _three_checkpoints(tmp_path)
    a, b = tmp_path / "checkpoint_00000001.pt", tmp_path / "checkpoint_00000002.pt"
    sidecar_path(a).write_text(sidecar_path(b).read_text())
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        load_checkpoint(a)


def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    for p in _three_checkpoints(tmp_path):
        open(p, "wb").close()
    with pytest.raises(CheckpointError) as e:
        find_latest(tmp_path)
    msg = str(e.value)
    assert "No intact checkpoint" in msg and "is empty (0 bytes)" in msg
    assert "checkpoint_00000001.pt" in msg and not advises_unpickling(msg)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_malicious_pickle_checkpoint_is_refused_for_safety(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "smi-hub-checkpoint", "version": 1, "x": _Evil()}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "non-tensor Python objects" in msg and "system" in msg and "refused for safety" in msg
    assert not advises_unpickling(msg)


def test_plain_pickle_file_is_not_relayed_advice(tmp_path):
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"format": "smi-hub-checkpoint"}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "not a torch checkpoint archive" in str(e.value)
    assert not advises_unpickling(str(e.value))


def test_newer_checkpoint_version_asks_for_an_upgrade(tmp_path):
    save_checkpoint({"step": 1}, tmp_path)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    torch.save({**state, "version": 99}, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="version 99.*Upgrade smi-hub"):
        load_checkpoint(tmp_path / "future.pt")


def test_empty_run_folder_has_no_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="No checkpoint found"):
        load_checkpoint(tmp_path)


def test_resume_from_checkpoint_missing_training_state_exits_3(tmp_path, capsys):
    save_checkpoint({"step": 1, "model": {}}, tmp_path / "ckpt")
    out = tmp_path / "run"
    rc = pretrain.main([*TINY, f"output_dir={out}", "--resume", str(tmp_path / "ckpt/last.pt")])
    err = capsys.readouterr().err
    assert rc == pretrain.EXIT_DATA
    assert "lacks model_config, optimizer" in err and "Traceback" not in err


def test_resume_auto_with_every_checkpoint_damaged_exits_3(tmp_path, capsys):
    ckpt = tmp_path / "run" / "checkpoints"
    for p in _three_checkpoints(ckpt):
        p.write_bytes(NOISE[:1000])
    rc = pretrain.main([*TINY, f"output_dir={tmp_path / 'run'}", "--resume", "auto"])
    err = capsys.readouterr().err
    assert rc == pretrain.EXIT_DATA
    assert "No intact checkpoint" in err and not advises_unpickling(err)


@pytest.mark.slow
def test_resume_auto_skips_a_tampered_last_checkpoint_and_ends_identical(tmp_path):
    """A two-byte flip in last.pt (and its hard-linked twin) makes --resume auto redo the
    last steps from the previous checkpoint; the result equals the uninterrupted run."""
    extra = ["train.epochs=2", "checkpoint.every_steps=3"]  # checkpoints at steps 3, 4, 6, 8
    full, damaged = tmp_path / "full", tmp_path / "damaged"
    assert pretrain.main([*TINY, f"output_dir={full}", *extra]) == 0
    assert pretrain.main([*TINY, f"output_dir={damaged}", *extra]) == 0
    last = damaged / "checkpoints" / "last.pt"
    _flip(last, _data_offset(last) + 1000)
    assert find_latest(last.parent).name == "checkpoint_00000006.pt"  # 8 shares last.pt's inode
    assert pretrain.main([*TINY, f"output_dir={damaged}", *extra, "--resume", "auto"]) == 0
    a, b = load_checkpoint(full), load_checkpoint(damaged)
    assert a["step"] == b["step"] == 8
    events = [json.loads(line) for line in (damaged / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e.get("event") == "resume"] == [6]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


# --- smi-hub export reads checkpoints the same safe way -----------------------------------


def test_export_malicious_pickle_is_refused_for_safety_not_truncated(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "smi-hub-checkpoint", "version": 1, "x": _Evil()}, path)
    with pytest.raises(ExportCheckpointError) as e:
        export.read_checkpoint(path)
    msg = str(e.value)
    assert "non-tensor Python objects" in msg and "refused for safety" in msg
    assert "truncated" not in msg and not advises_unpickling(msg)


def test_export_random_bytes_get_no_unpickling_advice(tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(NOISE[:4096])
    with pytest.raises(ExportCheckpointError) as e:
        export.read_checkpoint(path)
    assert "is not a torch checkpoint archive" in str(e.value)
    assert not advises_unpickling(str(e.value))


def test_the_advice_detector_recognizes_torchs_message(tmp_path):
    """The negative checks above are meaningful: torch's own error carries the advice."""
    path = tmp_path / "random.pt"
    path.write_bytes(NOISE[:4096])
    with pytest.raises(Exception) as e:
        torch.load(path, weights_only=True)
    assert advises_unpickling(str(e.value))
