"""benchmarks/efficiency_study.py: the grid resumes where it stopped, refuses other settings,
and counts the bytes each process hands to collectives (tiny two-process run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smi_hub.script_modules import load_file_module

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    return load_file_module(name, ROOT / "benchmarks" / f"{name}.py", register=False)


study = _load("efficiency_study")
report = _load("efficiency_report")
TINY = ["--images", "64", "--batches", "32", "64", "--widths", "64", "128", "--batch-width",
        "64", "--sync-width", "64", "--sync-batch", "32", "--eval-train", "50",
        "--eval-test", "50"]  # fmt: skip


def _fake_row(cell: dict, p: dict, out: Path) -> dict:
    acc = {"knn_top1": 50.0, "linear_top1": 60.0, "1shot_top1": 20.0, "1shot_top1_std": 1.0,
           "5shot_top1": 40.0, "5shot_top1_std": 2.0}  # fmt: skip
    if cell["loss"] == "none":
        return {**cell, **acc, "cell_s": 0.1}
    mib = 2.0**20
    by = {"loss": mib * (cell["sync"] == "gathered"), "ddp_grad": 3 * mib * (cell["nproc"] > 1)}
    return {**cell, **acc, "steps": p["images"] // cell["batch"], "num_params": 1000,
            "peak_lr": 2.0 * cell["batch"] / 256, "step_ms": 10.0, "peak_rss_mb": 100.0,
            "bytes_per_step": by, "cell_s": 0.1}  # fmt: skip


@pytest.mark.slow
def test_grid_resumes_after_an_interruption_and_runs_each_cell_once(tmp_path, monkeypatch):
    ran: list[str] = []

    def run_cell(cell, p, out):
        ran.append(cell["id"])
        if cell["id"] == "smi-b256-w128-single-s0" and ran.count(cell["id"]) == 1:
            raise KeyboardInterrupt  # killed in the middle of this cell
        return _fake_row(cell, p, out)

    monkeypatch.setattr(study, "run_cell", run_cell)
    args = ["--out", str(tmp_path), *TINY]
    with pytest.raises(KeyboardInterrupt):
        study.main(args)
    done = json.loads((tmp_path / "results.json").read_text())["cells"]
    first = ran.index("smi-b256-w128-single-s0")
    assert list(done) == ran[:first]  # every finished cell was saved before the next began
    study.main(args)
    expected = [c["id"] for c in study.plan(
        {**study.PRESETS["cpu"], "batches": [32, 64], "widths": [64, 128], "batch_width": 64,
         "sync_width": 64, "sync_batch": 32}, [0], study.TABLES["cpu"])]  # fmt: skip
    assert ran[first + 1 :] == expected[first:]  # the rerun started at the interrupted cell
    assert sorted(ran) == sorted(expected + ["smi-b256-w128-single-s0"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["cells"]) == set(expected)
    # batch 256 at the batch table's width is the width table's cell, run once
    assert ran.count("smi-b256-w64-single-s0") == 1
    study.main(args)  # nothing left: nothing runs
    assert len(ran) == len(expected) + 1
    # the report has one row per cell of each table and writes three plots
    text = report.write_report(tmp_path).read_text()
    assert text.count("| SMI |") == 2 + 2 + 2  # batch, width, sync rows
    assert "| SMI | local batch | 0.00 | 3.00 |" in text
    assert "| SMI | gathered global batch | 1.00 | 3.00 |" in text
    assert all((tmp_path / f"efficiency_{n}.png").is_file() for n in ("batch", "width", "sync"))


def test_grid_refuses_a_results_folder_made_with_other_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "run_cell", _fake_row)
    study.main(["--out", str(tmp_path), *TINY, "--tables", "random"])
    with pytest.raises(SystemExit, match="other settings"):
        study.main(["--out", str(tmp_path), *TINY, "--images", "128", "--tables", "random"])


def test_report_averages_accuracy_over_seeds_and_takes_the_fastest_seeds_step(
    tmp_path, monkeypatch
):
    """Accuracy: mean ± half range over seeds; step time: the least loaded seed's (a run
    next to other jobs is slower, never faster); memory does not depend on the load."""

    def run_cell(cell, p, out):
        row = _fake_row(cell, p, out)
        return {**row, "knn_top1": 50.0 + 2 * cell["seed"], "step_ms": 30.0 - 20 * cell["seed"]}

    monkeypatch.setattr(study, "run_cell", run_cell)
    study.main(["--out", str(tmp_path), *TINY, "--tables", "batch", "--seeds", "0", "1",
                "--match", "smi-b32-*"])  # fmt: skip
    text = report.write_report(tmp_path).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| 32 | SMI |"))
    assert "| 51.0 ± 1.0 |" in row
    assert row.endswith("| 10 | 0.3 | 100 |")  # step ms, ms/image, peak RSS
    # only the batch table was run: no empty width or sync table, no empty plot
    assert "**Batch size**" in text
    assert "Projector width" not in text and "Synchronization" not in text
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["efficiency_batch.png"]


@pytest.mark.slow
@pytest.mark.distributed
def test_bytes_per_step_of_the_loss_and_of_ddp_gradients(tmp_path):
    """Two gloo processes, local batch 4, projector output 32: the gathered SMI loss hands each
    process's 2 x 4 x 32 float32 embeddings (+ one int64 size per gather) to all_gather; the
    local loss none; DDP all-reduces every parameter's float32 gradient once per step."""
    p = {**study.PRESETS["cpu"], "images": 16, "epochs": 1, "hidden": 16, "eval_train": 10,
         "eval_test": 10}  # fmt: skip
    rows = {}
    for sync in ("gathered", "local"):
        cell = {"id": sync, "loss": "smi", "batch": 8, "width": 32, "sync": sync, "nproc": 2,
                "seed": 0}  # fmt: skip
        rows[sync] = study.pretrain_cell(cell, p, tmp_path / sync)
    for sync, row in rows.items():
        assert row["steps"] == 2
        assert row["bytes_per_step"]["ddp_grad"] == 4 * row["num_params"]
        assert row["bytes_per_step"].get("loss", 0) == (2 * (4 * 32 * 4 + 8) if sync ==
                                                        "gathered" else 0)  # fmt: skip
        assert row["peak_rss_mb"] > 0 and row["step_ms"] > 0


def test_shards_split_the_grid_and_share_one_results_file(tmp_path, monkeypatch):
    ran: list[str] = []

    def run_cell(cell, p, out):
        ran.append(cell["id"])
        return _fake_row(cell, p, out)

    monkeypatch.setattr(study, "run_cell", run_cell)
    study.main(["--out", str(tmp_path), *TINY, "--shard", "1/2"])
    second = list(ran)
    study.main(["--out", str(tmp_path), *TINY, "--shard", "0/2"])
    first = ran[len(second) :]
    expected = [c["id"] for c in study.plan(
        {**study.PRESETS["cpu"], "batches": [32, 64], "widths": [64, 128], "batch_width": 64,
         "sync_width": 64, "sync_batch": 32}, [0], study.TABLES["cpu"])]  # fmt: skip
    assert first == expected[0::2] and second == expected[1::2]
    assert set(json.loads((tmp_path / "results.json").read_text())["cells"]) == set(expected)
    study.main(["--out", str(tmp_path), *TINY, "--seeds", "1", "--match", "smi-b256-*"])
    assert sorted(ran[len(expected) :]) == ["smi-b256-w128-single-s1", "smi-b256-w64-single-s1"]


@pytest.mark.parametrize("bad", ["2/2", "-1/2", "1", "a/b"])
def test_a_bad_shard_is_refused_at_parse_time(bad, capsys):
    with pytest.raises(SystemExit):
        study.main(["--out", "unused", "--shard", bad])
    assert "--shard" in capsys.readouterr().err


@pytest.mark.slow
def test_gpu_wrapper_passes_the_out_dir_and_options_through(tmp_path):
    """benchmarks/gpu_efficiency.sh shares gpu_suite.sh's prelude (gpu_env.sh): OUT_DIR first,
    the study's options after it, the log in OUT_DIR."""
    import os
    import subprocess
    import sys

    out = tmp_path / "eff"
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_efficiency.sh"), str(out), "--help"],
        env={**os.environ, "PYTHON": sys.executable}, cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "usage: efficiency_study.py" in proc.stdout
    assert "--shard" in (out / "efficiency.log").read_text()
