"""End-to-end pretraining on real Fashion-MNIST images: outputs, checkpoints, resume,
unreadable images, non-finite losses, SIGKILL recovery and a 2-process gloo run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import pretrain, pretrain_data
from training.checkpoint import list_checkpoints, load_checkpoint
from training.config_load import load_config
from training.data import DataError, ImageFolderDataset, SafeTwoViewDataset, check_readable

ROOT = Path(__file__).parents[1]
CONFIG = ROOT / "training" / "configs" / "fmnist_resnet18_smi.yaml"

TINY = [
    "model.base_width=4",
    "model.projector_dims=[32,32]",
    "train.batch_size=32",
    "data.num_workers=0",
    "log.progress=false",
    "log.tensorboard=false",
    "log.monitor_samples=64",
    "train.channels_last=false",
]


def tiny_config(out: Path, *extra: str, config: Path = CONFIG):
    return load_config(
        config, [f"output_dir={out}", "data.subset=128", "train.epochs=1", *TINY, *extra]
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_tiny_pretraining_run_writes_the_run_directory(tmp_path):
    out = tmp_path / "run"
    cfg = tiny_config(
        out,
        "train.epochs=2",
        "checkpoint.every_steps=3",
        "checkpoint.keep_last=2",
        "log.tensorboard=true",
    )
    pretrain.train(cfg)
    assert (out / "config.yaml").is_file()
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert load_config(out / "config.yaml").to_dict() == cfg.to_dict()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    names = ["checkpoint_00000006.pt", "checkpoint_00000008.pt", "last.pt"]
    assert ckpts == sorted(names + [n + ".sha256" for n in names])  # with their checksums

    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert state["format"] == "smi-hub-checkpoint" and state["version"] == 1
    assert state["step"] == 8 and state["epoch"] == 2 and state["step_in_epoch"] == 0
    assert state["model_config"]["base_width"] == 4
    assert not any(k.startswith("module.") for k in state["model"])
    assert state["config"]["loss"]["name"] == "smi"
    for key in ("optimizer", "scheduler", "scaler", "rng"):
        assert key in state

    records = read_jsonl(out / "metrics.jsonl")
    # what decides bit-reproducibility on a CPU: the same seed at 1 and 2 threads gave
    # different weights after 8 steps (CPU kernels reduce in a thread-dependent order)
    assert records[0]["event"] == "start"
    assert records[0]["torch"] == torch.__version__
    assert records[0]["torch_threads"] == torch.get_num_threads()
    train = [r for r in records if r["type"] == "train"]
    epochs = [r for r in records if r["type"] == "epoch"]
    assert [r["step"] for r in epochs] == [4, 8]
    assert all(np.isfinite(r["loss"]) for r in train)
    for key in ("images_per_s", "lr", "skipped_images"):
        assert key in train[-1]
    for key in (
        "backbone_std",
        "backbone_effective_rank",
        "projector_alignment",
        "backbone_uniformity",
    ):
        assert np.isfinite(epochs[-1][key])


@pytest.mark.slow
def test_pretraining_learns_compared_with_a_no_update_control(tmp_path, monkeypatch):
    """Same data, views and initial weights; the control's optimizer never steps."""
    extra = ("train.epochs=2", "train.warmup_epochs=0", "log.every_steps=1")
    pretrain.train(tiny_config(tmp_path / "learn", *extra))
    real_build = pretrain.build_optimizer

    def frozen(*args, **kwargs):
        opt = real_build(*args, **kwargs)
        opt.step = lambda closure=None: None
        return opt

    monkeypatch.setattr(pretrain, "build_optimizer", frozen)
    pretrain.train(tiny_config(tmp_path / "control", *extra))
    runs = {}
    for name in ("learn", "control"):
        records = read_jsonl(tmp_path / name / "metrics.jsonl")
        losses = [r["loss"] for r in records if r["type"] == "train"]
        runs[name] = (losses, load_checkpoint(tmp_path / name))
    (learn, learned), (control, untouched) = runs["learn"], runs["control"]
    assert len(learn) == len(control) == 8
    assert learn[0] == control[0]  # the first step sees the same batch and weights
    # the parameters move: every weight tensor of the backbone and projector
    weights = [k for k, v in learned["model"].items() if v.dtype.is_floating_point]
    weights = [k for k in weights if not k.endswith(("running_mean", "running_var"))]
    moved = [k for k in weights if not torch.equal(learned["model"][k], untouched["model"][k])]
    assert moved == weights
    # the loss falls on the same batches: every late step below the control's
    assert all(a < b for a, b in zip(learn[4:], control[4:], strict=True)), (learn, control)
    assert sum(learn[4:]) / 4 < sum(control[4:]) / 4 - 0.05 * abs(sum(control[4:]) / 4)


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["barlow_twins", "vicreg"])
def test_baselines_train_with_the_same_pipeline(tmp_path, loss):
    out = tmp_path / loss
    config = CONFIG.with_name(f"fmnist_resnet18_{loss}.yaml")  # differs only in its loss
    last = pretrain.train(tiny_config(out, "train.max_steps=2", config=config))
    assert np.isfinite(last["loss"])
    assert load_checkpoint(out)["config"]["loss"]["name"] == loss


@pytest.mark.slow
def test_resume_in_process_matches_uninterrupted(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    extra = ("train.epochs=2", "checkpoint.every_steps=3", "checkpoint.keep_last=10")
    pretrain.train(tiny_config(full, *extra))
    # a run killed after step 5: its newest checkpoint is step 3, in the middle of epoch 1
    (part / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "checkpoint_00000003.pt", part / "checkpoints")
    assert load_checkpoint(part)["step_in_epoch"] == 3
    pretrain.train(tiny_config(part, *extra), resume="auto")
    a = load_checkpoint(full)
    b = load_checkpoint(part)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


@pytest.mark.slow
def test_existing_run_needs_resume_flag(tmp_path):
    out = tmp_path / "run"
    pretrain.train(tiny_config(out, "train.max_steps=1"))
    rc = pretrain.main(["--config", str(CONFIG), f"output_dir={out}", "data.subset=128", *TINY])
    assert rc == pretrain.EXIT_CONFIG


def _write_fmnist_folder(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for i, (im, y) in enumerate(zip(images, labels, strict=True)):
        d = root / f"class_{y}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im, mode="L").save(d / f"{i:04d}.png")


@pytest.mark.slow
def test_corrupt_images_are_skipped_and_counted(tmp_path, fmnist_test, caplog):
    images, labels = fmnist_test
    root = tmp_path / "folder"
    _write_fmnist_folder(root, images[:96], labels[:96])
    (root / "class_0").mkdir(exist_ok=True)
    good = next(root.rglob("*.png")).read_bytes()
    (root / "class_0" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "class_0" / "garbage.jpg").write_bytes(b"not an image at all" * 10)
    (root / "class_0" / "empty.png").write_bytes(b"")
    out = tmp_path / "run"
    cfg = load_config(
        CONFIG,
        [
            f"output_dir={out}",
            "data.source=imagefolder",
            f"data.path={root}",
            "train.epochs=3",
            "data.max_bad_fraction=0.2",
            *TINY,
        ],
    )
    with caplog.at_level("WARNING", logger="training.data"):
        pretrain.train(cfg)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "Skipping unreadable image" in warned
    assert any(name in warned for name in ("truncated.png", "garbage.jpg", "empty.png"))
    epochs = [r for r in read_jsonl(out / "metrics.jsonl") if r["type"] == "epoch"]
    assert len(epochs) == 3 and sum(r["skipped_images"] for r in epochs) > 0
    assert (out / "checkpoints" / "last.pt").is_file()


def test_mostly_unreadable_dataset_stops_with_clear_error(tmp_path, fmnist_test, capsys):
    images, labels = fmnist_test
    root = tmp_path / "bad"
    _write_fmnist_folder(root, images[:4], labels[:4])
    junk = root / f"class_{labels[0]}"
    for i in range(60):
        (junk / f"junk_{i}.png").write_bytes(os.urandom(64))
    with pytest.raises(DataError, match="mostly unreadable"):
        check_readable(ImageFolderDataset(root), max_bad_fraction=0.05)
    ds = SafeTwoViewDataset(ImageFolderDataset(root), transform=lambda im: (im, im))
    with pytest.raises(DataError, match="mostly unreadable"):
        for i in range(len(ds)):
            ds[i]
    rc = pretrain.main(
        [
            "--config",
            str(CONFIG),
            f"output_dir={tmp_path / 'run'}",
            "data.source=imagefolder",
            f"data.path={root}",
            *TINY,
        ]
    )
    assert rc == pretrain.EXIT_DATA
    assert "mostly unreadable" in capsys.readouterr().err


def test_grayscale_and_transparent_images_go_through_the_same_pipeline(tmp_path, fmnist_test):
    """A transparent pixel is white (composited on white) whatever the mode, and an image
    reaches the augmentations as the same RGB picture in every mode."""
    images, _ = fmnist_test
    gray = images[0].copy()
    clear = np.zeros_like(gray, dtype=bool)
    clear[:, :10] = True  # the left third is fully transparent
    expected = gray.copy()
    expected[clear] = 255
    alpha = np.where(clear, 0, 255).astype(np.uint8)
    hidden = np.where(clear, 0, gray).astype(np.uint8)  # black under the transparent pixels
    rgba = np.stack([hidden, hidden, hidden, alpha], axis=-1)
    # palette index i is gray level i; index 1 is transparent, so opaque pixels use >= 2
    palette = Image.fromarray(np.where(clear, 1, np.maximum(hidden, 2)).astype(np.uint8), "P")
    palette.putpalette([v for i in range(256) for v in (i, i, i)])
    files = {
        "gray": Image.fromarray(expected, mode="L"),
        "rgba": Image.fromarray(rgba, mode="RGBA"),
        "la": Image.fromarray(np.stack([hidden, alpha], axis=-1), mode="LA"),
        "palette": palette,
    }
    views = {}
    for name, image in files.items():
        root = tmp_path / name / "c"
        root.mkdir(parents=True)
        image.save(root / "img.png", **({"transparency": 1} if name == "palette" else {}))
        cfg = load_config(CONFIG, ["data.source=imagefolder", f"data.path={root.parent}"])
        ds = pretrain_data.build_train_dataset(cfg)
        rgb = np.asarray(ds.base[0][0])
        reference = np.where(clear, 255, np.maximum(gray, 2)) if name == "palette" else expected
        assert rgb.shape == (28, 28, 3) and (rgb == reference[..., None]).all(), name
        a, b, skipped = ds[0]
        assert a.shape == b.shape == (3, 28, 28) and skipped == 0
        views[name] = (a, b)
    for name in ("rgba", "la"):  # identical pictures get identical views (same seed, index)
        assert torch.equal(views[name][0], views["gray"][0]), name
        assert torch.equal(views[name][1], views["gray"][1]), name


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    cfg = tiny_config(out, "train.epochs=3", "checkpoint.every_steps=2", "train.max_nonfinite=3")
    pretrain.train(cfg)  # a good run: 12 steps, last checkpoint at step 12
    good = load_checkpoint(out)
    real_build = pretrain.build_loss

    def nan_after_resume(name, **kw):
        loss = real_build(name, **kw)
        return lambda a, b: loss(a, b) * float("nan")

    monkeypatch.setattr(pretrain, "build_loss", nan_after_resume)
    rc = pretrain.main(
        [
            "--config",
            str(CONFIG),
            "--resume",
            "auto",
            f"output_dir={out}",
            "data.subset=128",
            "train.epochs=4",
            "train.max_nonfinite=3",
            *TINY,
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert rc == pretrain.EXIT_DIVERGED
    assert "3 consecutive non-finite steps" in err and "last good checkpoint" in err
    after = load_checkpoint(out)
    assert after["step"] == good["step"] == 12
    for k in good["model"]:
        assert torch.equal(good["model"][k], after["model"][k])
    events = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("event") == "nonfinite"]
    assert len(events) == 3


def _cli(out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "training.pretrain", "--config", str(CONFIG),
        f"output_dir={out}", "data.subset=256", *TINY, *extra,
    ]  # fmt: skip


KILL_WHILE_SAVING = """
import io, os, runpy, signal, sys
import torch

kill_step, sys.argv = int(sys.argv[1]), ["training.pretrain", *sys.argv[2:]]
sys.path.insert(0, os.getcwd())  # training/ runs from the checkout (not in the wheel)
real_save = torch.save


def save(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == kill_step:  # SIGKILL halfway through
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        half = buf.getvalue()[: len(buf.getvalue()) // 2]
        if hasattr(f, "write"):
            f.write(half)
            f.flush()
        else:
            with open(f, "wb") as out:
                out.write(half)
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)


torch.save = save
runpy.run_module("training.pretrain", run_name="__main__", alter_sys=True)
"""


@pytest.mark.slow
def test_resume_after_sigkill_gives_identical_weights(tmp_path):
    """SIGKILL while checkpoint 21 (mid-epoch 2) is half written, deterministically: the
    previous checkpoints stay readable and the resumed run ends bit-identical."""
    extra = ("train.epochs=3", "checkpoint.every_steps=3", "train.batch_size=16")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(full, *extra), check=True, cwd=ROOT, env=env, capture_output=True)

    script = tmp_path / "kill_while_saving.py"
    script.write_text(KILL_WHILE_SAVING)
    cmd = [sys.executable, str(script), "21", *_cli(killed, *extra)[3:]]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    # a reader sees complete checkpoints only: the half-written one is not under its name
    ckpt_dir = killed / "checkpoints"
    names = [*list_checkpoints(ckpt_dir), ckpt_dir / "last.pt"]
    assert [p.name for p in names[-2:]] == ["checkpoint_00000018.pt", "last.pt"]
    steps = [load_checkpoint(p)["step"] for p in names]
    assert steps[-2:] == [18, 18] and steps == sorted(steps)
    killed_at = load_checkpoint(killed)
    assert killed_at["step"] == 18 and killed_at["step_in_epoch"] == 2

    subprocess.run(
        [*_cli(killed, *extra), "--resume", "auto"], check=True, cwd=ROOT, env=env,
        capture_output=True,
    )  # fmt: skip
    a, b = load_checkpoint(full), load_checkpoint(killed)
    assert a["step"] == b["step"] == 48
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    resumes = [r for r in read_jsonl(killed / "metrics.jsonl") if r.get("event") == "resume"]
    assert len(resumes) == 1


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_process_gloo(tmp_path):
    out = tmp_path / "ddp"
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "training.pretrain",
        "--config", str(CONFIG), f"output_dir={out}", "data.subset=128", "train.epochs=1",
        "device=cpu", *TINY,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    start = read_jsonl(out / "metrics.jsonl")[0]
    assert start["event"] == "start" and start["world_size"] == 2
    state = load_checkpoint(out)
    assert state["step"] == 4  # 128 images / global batch 32
    assert not any(k.startswith("module.") for k in state["model"])


def test_hf_datasets_source_saved_to_disk(tmp_path, fmnist_test):
    import io

    import datasets

    images, labels = fmnist_test
    encoded = []
    for im in images[:40]:
        buf = io.BytesIO()
        Image.fromarray(im, mode="L").save(buf, format="PNG")
        encoded.append({"bytes": buf.getvalue(), "path": None})
    encoded[5] = {"bytes": b"corrupt bytes", "path": None}
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    ds = datasets.Dataset.from_dict(
        {"image": encoded, "label": labels[:40].tolist()}, features=features
    )
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "hf"))
    cfg = load_config(CONFIG, ["data.source=hf", f"data.path={tmp_path / 'hf'}"])
    train_ds = pretrain_data.build_train_dataset(cfg)
    assert len(train_ds) == 40 and train_ds.base.targets[:3] == labels[:3].tolist()
    a, b, skipped = train_ds[5]  # the corrupt row is replaced by the next one and counted
    assert skipped == 1 and a.shape == (3, 28, 28)
    assert train_ds[0][2] == 0
    ds.to_parquet(str(tmp_path / "images.parquet"))  # a local data file works too
    cfg = load_config(CONFIG, ["data.source=hf", f"data.path={tmp_path / 'images.parquet'}"])
    parquet_ds = pretrain_data.build_train_dataset(cfg)
    assert len(parquet_ds) == 40 and parquet_ds[5][2] == 1
    val = load_config(CONFIG, ["data.source=hf", f"data.path={tmp_path / 'hf'}", "data.split=val"])
    with pytest.raises(DataError, match="has splits"):
        pretrain_data.build_train_dataset(val)
