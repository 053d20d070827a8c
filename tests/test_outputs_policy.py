"""The output-folder policy (``smi_hub.outputs``), case by case for every kind of output.

Each case builds a folder, asks for it as the output of one kind of command, with and without
``overwrite``, and checks what the policy decides; accepted cases then commit a new output
and check that every file the command did not write is still there, byte for byte. The ids
are the rows of docs/reliability.md "Output folders".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from smi_hub.outputs import KINDS, OutputFolderError, claim_output_dir, commit_folder

SIGNATURES = {
    "index": ("index.json", json.dumps({"format": "smi-hub-index"})),
    "features": ("manifest.json", json.dumps({"format": "smi-hub-features"})),
    "weights": ("config.json", json.dumps({"library": "smi-hub", "arch": "resnet18"})),
    "pretrain": ("config.yaml", "seed: 0\noutput_dir: runs/x\n"),
}
DATA_FILE = {  # one file of each kind besides its signature
    "index": "embeddings.safetensors",
    "features": "shard-00000.safetensors",
    "weights": "model.safetensors",
    "pretrain": "metrics.jsonl",
}
# files a user made, with the names of each kind's own files (never overwritten)
CLASH = {
    "index": {"index.json": '{"mine": 1}', "embeddings.safetensors": "mine"},
    "features": {"manifest.json": "{}", "shard-00000.safetensors": "mine"},
    "weights": {"README.md": "# my project", "config.json": '{"lr": 0.1}'},
    "pretrain": {"config.yaml": "my: settings\n"},
}


def _own(folder: Path, kind: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name, text = SIGNATURES[kind]
    (folder / name).write_text(text)
    (folder / DATA_FILE[kind]).write_text("old data")


def _other(kind: str) -> str:
    return {"index": "features", "features": "index", "weights": "index", "pretrain": "weights"}[
        kind
    ]


SETUPS = {
    "missing": lambda f, k: None,
    "empty": lambda f, k: f.mkdir(),
    "own": _own,
    "own + user notes.txt": lambda f, k: (_own(f, k), (f / "notes.txt").write_text("mine")),
    "thesis.tex + data.csv": lambda f, k: (
        f.mkdir(),
        (f / "thesis.tex").write_text("\\chapter{}"),
        (f / "data.csv").write_text("a,b\n1,2\n"),
    ),
    "photos": lambda f, k: (
        f.mkdir(),
        *[(f / f"IMG_{i}.png").write_bytes(b"\x89PNG" + bytes([i])) for i in range(3)],
    ),
    "hidden .git only": lambda f, k: ((f / ".git").mkdir(parents=True),),
    "user files with own names": lambda f, k: (
        f.mkdir(),
        *[(f / n).write_text(t) for n, t in CLASH[k].items()],
    ),
    "other kind's output": lambda f, k: _own(f, _other(k)),
    "corrupt signature": lambda f, k: (
        f.mkdir(),
        (f / SIGNATURES[k][0]).write_text("{not json"),
    ),
    "data file without signature": lambda f, k: (
        f.mkdir(),
        (f / DATA_FILE[k]).write_text("orphan"),
    ),
    "a file, not a folder": lambda f, k: f.write_text("I am a file"),
    "symlink to own": lambda f, k: (_own(f.parent / "target", k), f.symlink_to("target")),
    "symlink to user files": lambda f, k: (
        (f.parent / "target").mkdir(),
        (f.parent / "target" / "notes.txt").write_text("mine"),
        f.symlink_to("target"),
    ),
}

R = "refused"
NEVER = "never overwritten"
# (setup) -> (without overwrite, with overwrite); per-kind exceptions below
EXPECT = {
    "missing": ("new", "new"),
    "empty": ("empty", "empty"),
    "own": ("own", "own"),
    "own + user notes.txt": (R, "shared"),
    "thesis.tex + data.csv": (R, "shared"),
    "photos": (R, "shared"),
    "hidden .git only": (R, "shared"),
    "user files with own names": (R, NEVER),
    "other kind's output": (R, "shared"),
    "corrupt signature": (R, NEVER),
    "data file without signature": (R, NEVER),
    "a file, not a folder": ("is a file", "is a file"),
    "symlink to own": ("own", "own"),
    "symlink to user files": (R, "shared"),
}
EXCEPTIONS = {  # a training folder as fine-tuning output shares checkpoints/ with it
    ("weights", "other kind's output"): (R, "shared"),
    ("pretrain", "other kind's output"): (R, NEVER),
    ("pretrain", "data file without signature"): ("own", "own"),  # metrics.jsonl: a run file
}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


CASES = [
    pytest.param(
        kind, setup, overwrite, id=f"{kind}-{setup}-{'overwrite' if overwrite else 'plain'}"
    )
    for kind in KINDS
    for setup in SETUPS
    for overwrite in (False, True)
]


@pytest.mark.parametrize("kind,setup,overwrite", CASES)
def test_output_policy(tmp_path, kind, setup, overwrite):
    if kind == "pretrain" and setup == "other kind's output":
        setup_fn = lambda f, k: (_own(f, "weights"), (f / "checkpoints").mkdir())  # noqa: E731
    else:
        setup_fn = SETUPS[setup]
    folder = tmp_path / "out"
    setup_fn(folder, kind)
    before = _tree(tmp_path)
    expected = EXCEPTIONS.get((kind, setup), EXPECT[setup])[overwrite]
    if expected in (R, NEVER, "is a file"):
        match = {R: "--overwrite", NEVER: NEVER, "is a file": "is a file"}[expected]
        with pytest.raises(OutputFolderError, match=match):
            claim_output_dir(folder, kind, overwrite)
        assert _tree(tmp_path) == before  # nothing touched
        assert not list(tmp_path.glob(".out.lock"))  # lock released and removed
        return
    claim = claim_output_dir(folder, kind, overwrite)
    try:
        assert claim.mode == expected
        if setup.startswith("symlink"):
            assert claim.path == (tmp_path / "target").resolve()
        if kind == "pretrain":
            return  # training writes its run files itself (tests/test_outputs_cli.py)
        with commit_folder(claim, swap=kind != "weights") as tmp:
            name, text = SIGNATURES[kind]
            (tmp / name).write_text(text.replace("}", ', "new": 1}'))
            (tmp / DATA_FILE[kind]).write_text("new data")
    finally:
        claim.release()
    after = _tree(tmp_path)
    for name, data in before.items():  # every file the command does not own is intact
        top = Path(name).parts[1] if Path(name).parts[0] in ("out", "target") else name
        if not KINDS[kind].owns(top):
            assert after.get(name) == data, name
    target = claim.path
    assert json.loads((target / SIGNATURES[kind][0]).read_text())["new"] == 1
    assert (target / DATA_FILE[kind]).read_text() == "new data"
    if setup.startswith("symlink"):
        assert (tmp_path / "out").is_symlink()  # the link stays, written through
    litter = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert litter == [], litter  # no .out.XXXX.tmp / .old / .lock left


def test_second_claim_is_refused_while_the_first_holds_the_lock(tmp_path):
    first = claim_output_dir(tmp_path / "mix", "features")
    with pytest.raises(OutputFolderError, match="Another smi-hub run is writing"):
        claim_output_dir(tmp_path / "mix", "features")
    first.release()
    claim_output_dir(tmp_path / "mix", "features").release()
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.slow
def test_lock_is_released_when_its_process_is_killed(tmp_path):
    import signal
    import subprocess
    import sys

    code = (
        "import sys, time\nfrom smi_hub.outputs import claim_output_dir\n"
        "c = claim_output_dir(sys.argv[1], 'index')\nprint('locked', flush=True)\ntime.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "idx")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderError, match="Another smi-hub run"):
            claim_output_dir(tmp_path / "idx", "index")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    claim_output_dir(tmp_path / "idx", "index").release()  # the kernel dropped the lock


@pytest.mark.parametrize(
    "path,match",
    [
        pytest.param("", "is empty", id="empty -o"),
        pytest.param("   ", "is empty", id="blank -o"),
        pytest.param("x" * 300, "at most 200", id="300-character -o"),
        pytest.param("a/" + "y" * 256 + "/b", "at most 200", id="300-character component"),
    ],
)
def test_bad_output_names_get_a_clear_error(tmp_path, monkeypatch, path, match):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputFolderError, match=match):
        claim_output_dir(path, "index")
    assert os.listdir(tmp_path) == []


def test_tilde_is_expanded_where_it_is_checked_and_written(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    claim = claim_output_dir("~/x", "index")
    try:
        assert claim.path == (tmp_path / "home" / "x").resolve()
        with commit_folder(claim) as tmp:
            (tmp / "index.json").write_text(SIGNATURES["index"][1])
    finally:
        claim.release()
    assert (tmp_path / "home" / "x" / "index.json").is_file()
    assert not (tmp_path / "~").exists()


def test_a_users_file_named_like_a_run_file_is_not_taken_for_a_killed_run(tmp_path):
    """Without its signature, a folder counts as a killed run of fine-tuning only when its run
    files are fine-tuning's (labels.json with its fields, checkpoints/ with checkpoint files):
    a user's own labels.json or checkpoints/ is refused, and never overwritten."""
    user = {
        "labels.json": lambda f: (f / "labels.json").write_text('{"0": "cat", "1": "dog"}'),
        "metrics.json": lambda f: (f / "metrics.json").write_text('{"acc": 0.9}'),
        "checkpoints": lambda f: (f / "checkpoints").mkdir() or (
            f / "checkpoints" / "epoch=3.ckpt").write_bytes(b"lightning"),
    }  # fmt: skip
    for name, make in user.items():
        folder = tmp_path / name / "out"
        folder.mkdir(parents=True)
        make(folder)
        before = _tree(folder)
        with pytest.raises(OutputFolderError, match="--overwrite"):
            claim_output_dir(folder, "weights")
        with pytest.raises(OutputFolderError, match="never overwritten"):
            claim_output_dir(folder, "weights", overwrite=True)
        assert _tree(folder) == before
    killed = tmp_path / "killed" / "out"  # what a fine-tuning run killed mid-way leaves
    (killed / "checkpoints").mkdir(parents=True)
    (killed / "checkpoints" / "checkpoint_00000010.pt").write_bytes(b"state")
    (killed / "checkpoints" / "checkpoint_00000010.pt.sha256").write_text("0" * 64)
    (killed / "labels.json").write_text(json.dumps(
        {"dataset": "fashion_mnist", "split": "train", "seed": 0, "label_fraction": 0.1}))  # fmt: skip
    claim = claim_output_dir(killed, "weights")
    assert claim.mode == "own"
    claim.release()
