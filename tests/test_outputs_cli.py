"""Issue 18, data loss: every command that writes a folder under the one output policy.

Each test first reproduces a reported case (a command that deleted or overwrote the user's
files, mixed two runs, died of SIGBUS on a full disk, replaced a symlink, or wrote to ``./~``)
and checks the behaviour now: refused with a message naming ``--overwrite``, nothing of the
user's lost.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import smi_hub
from smi_hub.cli import main
from smi_hub.feature_store import FeatureStore, work_folder
from smi_hub.outputs import OutputFolderError, claim_output_dir
from training import finetune as ft
from training import pretrain

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Path:
    return smi_hub.default_gallery(tmp_path_factory.mktemp("g") / "gallery", per_class=1)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _user_folder(folder: Path, files: dict[str, str]) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return _tree(folder)


def test_index_into_its_own_photo_folder_is_refused_and_deletes_nothing(gallery, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    for p in sorted(gallery.rglob("*.png")):
        (photos / p.name).write_bytes(p.read_bytes())
    (photos / "album.txt").write_text("holiday 2025")
    before = _tree(photos)
    assert main(["index", str(photos), "-o", str(photos)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and "not replaced" in err
    assert _tree(photos) == before
    # --overwrite: the index is written beside the photos, every photo stays
    assert main(["index", str(photos), "-o", str(photos), "--overwrite"]) == 0
    after = _tree(photos)
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) == {"index.json", "embeddings.safetensors"}
    assert len(smi_hub.EmbeddingIndex.load(photos)) == 10
    # and again: the index files are replaced, the photos still stay
    assert main(["index", str(photos), "-o", str(photos), "--overwrite"]) == 0
    assert {k: _tree(photos)[k] for k in before} == before


@pytest.mark.parametrize(
    "files",
    [
        pytest.param({"thesis.tex": "\\chapter{}", "data.csv": "a,b\n"}, id="thesis.tex+data.csv"),
        pytest.param({".bashrc": "alias ll='ls -l'"}, id="hidden dotfile"),
    ],
)
def test_index_into_a_folder_of_user_files_is_refused(gallery, tmp_path, capsys, files):
    before = _user_folder(tmp_path / "work", files)
    assert main(["index", str(gallery), "-o", str(tmp_path / "work")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _tree(tmp_path / "work") == before


def test_index_into_the_current_directory_is_refused(gallery, tmp_path, monkeypatch, capsys):
    before = _user_folder(tmp_path / "home", {"notes.md": "todo"})
    monkeypatch.chdir(tmp_path / "home")
    assert main(["index", str(gallery), "-o", os.getcwd()]) == 2
    assert main(["index", str(gallery), "-o", "."]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _tree(tmp_path / "home") == before


@pytest.mark.slow
def test_a_feature_store_is_not_replaced_by_an_index(gallery, tmp_path, capsys):
    store = tmp_path / "feats"
    assert main(["extract", str(gallery), "-o", str(store)]) == 0
    before = _tree(store)
    assert main(["index", str(store), "-o", str(store)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _tree(store) == before and len(FeatureStore.open(store)) == 10
    # an earlier index is replaced as a whole (its own kind)
    assert main(["index", str(store), "-o", str(tmp_path / "idx")]) == 0
    assert main(["index", str(store), "-o", str(tmp_path / "idx"), "--kind", "flat"]) == 0
    assert sorted(os.listdir(tmp_path / "idx")) == ["embeddings.safetensors", "index.json"]


@pytest.mark.slow
def test_extract_over_an_index_or_user_files_is_refused(gallery, tmp_path, capsys):
    idx = tmp_path / "idx"
    assert main(["index", str(gallery), "-o", str(idx)]) == 0
    before = _tree(idx)
    assert main(["extract", str(gallery), "-o", str(idx)]) == 2
    assert _tree(idx) == before
    user = _user_folder(tmp_path / "u", {"data.csv": "1,2"})
    assert main(["extract", str(gallery), "-o", str(tmp_path / "u")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["extract", str(gallery), "-o", str(tmp_path / "u"), "--overwrite"]) == 0
    assert {k: _tree(tmp_path / "u")[k] for k in user} == user
    assert len(FeatureStore.open(tmp_path / "u")) == 10


@pytest.fixture
def checkpoint(run_checkpoint):
    from conftest import demo_model

    return run_checkpoint(demo_model(0, 8, [16]))


def test_export_never_overwrites_the_users_readme_and_config(checkpoint, tmp_path, capsys):
    p = tmp_path / "p"
    before = _user_folder(p, {"README.md": "# My project", "config.json": '{"lr": 0.1}'})
    assert main(["export", str(checkpoint), str(p)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(checkpoint), str(p), "--overwrite"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert _tree(p) == before
    # a folder with other files: --overwrite writes the weights beside them
    q = tmp_path / "q"
    other = _user_folder(q, {"notes.txt": "keep"})
    assert main(["export", str(checkpoint), str(q)]) == 2
    assert main(["export", str(checkpoint), str(q), "--overwrite"]) == 0
    assert {k: _tree(q)[k] for k in other} == other
    smi_hub.load(q)
    # re-export into its own folder: allowed without --overwrite, run files kept
    assert main(["export", str(checkpoint), str(tmp_path / "w")]) == 0
    (tmp_path / "w" / "checkpoints").mkdir()
    assert main(["export", str(checkpoint), str(tmp_path / "w")]) == 0
    assert (tmp_path / "w" / "checkpoints").is_dir()


def test_save_pretrained_into_a_user_folder_is_refused(tmp_path):
    from conftest import demo_model

    before = _user_folder(tmp_path / "p", {"README.md": "# mine", "config.json": "{}"})
    model = demo_model(0, 8, [16])
    with pytest.raises(OutputFolderError, match="never overwritten"):
        model.save_pretrained(tmp_path / "p", overwrite=True)
    with pytest.raises(OutputFolderError, match="--overwrite"):
        smi_hub.save_weights_folder(model, tmp_path / "p")
    assert _tree(tmp_path / "p") == before


def test_finetune_out_with_users_readme_and_config_is_refused(tmp_path, capsys):
    p = tmp_path / "p"
    before = _user_folder(p, {"README.md": "# My project", "config.json": '{"lr": 0.1}'})
    argv = ["--model", "smi_resnet18_fmnist", "--data", "fashion_mnist", "--out", str(p)]
    assert ft.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert ft.main([*argv, "--overwrite"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    assert _tree(p) == before


def test_pretrain_output_dir_with_user_files_is_refused(tmp_path, capsys):
    before = _user_folder(tmp_path / "run", {"thesis.tex": "x"})
    cfg = str(ROOT / "training/configs/fmnist_resnet18_smi.yaml")
    assert pretrain.main(["--config", cfg, f"output_dir={tmp_path / 'run'}", "device=cpu"]) != 0
    assert "--overwrite" in capsys.readouterr().err
    assert _tree(tmp_path / "run") == before


def test_second_extract_on_a_locked_output_is_refused_and_touches_nothing(
    gallery, tmp_path, capsys
):
    mix = tmp_path / "mix"
    first = claim_output_dir(mix, "features")  # a first run is writing mix
    work = work_folder(mix)
    work.mkdir()
    (work / "fingerprint.json").write_text(json.dumps({"fingerprint": "first run"}))
    (work / "shard-00000.safetensors").write_bytes(b"first run's shard")
    before = _tree(tmp_path)
    try:
        code = main(["extract", str(gallery), "-o", str(mix), "--model", "smi_resnet18_fmnist"])
        assert code == 1
        assert "Another smi-hub run is writing" in capsys.readouterr().err
        assert _tree(tmp_path) == before  # the first run's work folder is intact
    finally:
        first.release()


@pytest.mark.slow
def test_symlinked_output_is_written_through(gallery, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    for _ in range(2):
        assert main(["index", str(gallery), "-o", str(tmp_path / "link")]) == 0
    assert (tmp_path / "link").is_symlink()
    assert sorted(os.listdir(tmp_path / "real")) == ["embeddings.safetensors", "index.json"]
    assert sorted(os.listdir(tmp_path)) == ["link", "real"]  # no .link.XXXX.old litter


@pytest.mark.slow
def test_tilde_output_goes_to_home(gallery, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["index", str(gallery), "-o", "~/x"]) == 0
    assert (tmp_path / "home" / "x" / "index.json").is_file()
    assert not (tmp_path / "~").exists()


@pytest.mark.parametrize("command", ["index", "extract", "export"])
def test_300_character_output_gets_a_clear_error(gallery, tmp_path, capsys, command):
    long = str(tmp_path / ("x" * 300))
    argv = ["export", str(gallery), long] if command == "export" else [command, str(gallery)]
    assert main(argv if command == "export" else [*argv, "-o", long]) == 2
    err = capsys.readouterr().err
    assert "at most 200" in err and "Traceback" not in err


@pytest.mark.slow
def test_flat_index_files_follow_the_umask(gallery, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["index", str(gallery), "-o", str(tmp_path / "i"), "--kind", "flat"]) == 0
    finally:
        os.umask(old)
    for name in ("embeddings.safetensors", "index.json"):
        assert stat.S_IMODE((tmp_path / "i" / name).stat().st_mode) == 0o644, name


_FULL_DISK = """
import resource, signal, sys
from smi_hub.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a too-large write then fails with EFBIG
limit = int(sys.argv[3])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
sys.exit(main(["extract", sys.argv[1], "-o", sys.argv[2], "--npy", "--shard-size", "4"]))
"""


@pytest.mark.slow
def test_disk_full_during_extract_npy_keeps_the_shards_and_resumes(gallery, tmp_path):
    """Each file may hold at most 4 kB: the 4-row shards (2.3 kB) fit, features.npy (10 x 128
    floats, 5.2 kB) does not, like a disk that fills up at the end of the run."""
    out = tmp_path / "feats"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(gallery), str(out), "4096"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr  # not 135 (SIGBUS)
    assert "finished shards are kept" in run.stderr and "re-run" in run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [".feats.partial"]  # no orphan .tmp
    shards = sorted(work_folder(out).glob("shard-*.safetensors"))
    assert len(shards) == 3
    inodes = {p.name: p.stat().st_ino for p in shards}
    # space again: the re-run resumes (the same shard files, not recomputed)
    assert main(["extract", str(gallery), "-o", str(out), "--npy", "--shard-size", "4"]) == 0
    assert {p.name: p.stat().st_ino for p in out.glob("shard-*")} == inodes
    store = FeatureStore.open(out)
    import numpy as np

    assert torch.equal(torch.from_numpy(np.load(out / "features.npy")), store.to_tensor())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["feats"]
