"""smi_hub.fileio: atomic writes that respect the umask and never leave a mixed folder."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from smi_hub import fileio


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_atomic_write_bytes_respects_umask(tmp_path, umask):
    p = fileio.atomic_write_bytes(tmp_path / "a.bin", b"abc")
    assert p.read_bytes() == b"abc"
    assert _mode(p) == 0o666 & ~umask
    assert [f.name for f in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        fileio.atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_folder_replaces_the_whole_set(tmp_path, umask):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.npy").write_text("from an earlier run")
    (out / "features.safetensors").write_text("old")
    with fileio.atomic_folder(out) as tmp:
        assert not (tmp / "stale.npy").exists()
        (tmp / "features.safetensors").write_text("new")
        assert (out / "features.safetensors").read_text() == "old"  # readers see the old set
    assert sorted(f.name for f in out.iterdir()) == ["features.safetensors"]
    assert (out / "features.safetensors").read_text() == "new"
    assert _mode(out) == 0o777 & ~umask
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_failure_leaves_old_folder_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt), fileio.atomic_folder(out) as tmp:
        (tmp / "a").write_text("new")
        raise KeyboardInterrupt
    assert (out / "a").read_text() == "old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_atomic_folder_swaps_in_one_step_on_linux(tmp_path, monkeypatch):
    """With renameat2 the old folder is never absent: no os.replace of the folder happens."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    calls = []
    real_replace = os.replace
    monkeypatch.setattr(fileio.os, "replace", lambda a, b: (calls.append(b), real_replace(a, b)))
    with fileio.atomic_folder(out) as tmp:
        (tmp / "a").write_text("new")
    assert (out / "a").read_text() == "new"
    assert Path(out) not in [Path(c) for c in calls]
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]


def test_a_swap_killed_between_two_renames_is_recovered(tmp_path, monkeypatch):
    """Without atomic exchange: the old folder moved aside and never replaced comes back."""
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "a").write_text("old")
    real_replace = os.replace

    def killed(a, b):
        if Path(b) == out:
            raise KeyboardInterrupt  # the process dies after moving the old folder aside
        real_replace(a, b)

    monkeypatch.setattr(fileio.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt), fileio.atomic_folder(out) as tmp:
        (tmp / "a").write_text("new")
    monkeypatch.setattr(fileio.os, "replace", real_replace)
    assert not out.exists()
    fileio.recover_folder(out)
    assert (out / "a").read_text() == "old"
    assert sorted(f.name for f in tmp_path.iterdir()) == ["out"]
