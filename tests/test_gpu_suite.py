"""benchmarks/gpu_suite.py and its step modules (gpu_suite_*.py): the CPU dry run (--quick)
through the wrapper, step deadlines, and the helpers the GPU run depends on (budgets,
calibration, weight parts, peaks)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from smi_hub.models import load_weights_folder
from smi_hub.script_modules import load_file_module

ROOT = Path(__file__).parents[1]


def _load_suite():
    return load_file_module("gpu_suite", ROOT / "benchmarks" / "gpu_suite.py", register=False)


gs = _load_suite()
# The step modules as the suite loaded them (benchmarks/gpu_suite_*.py): each name is reached,
# and patched, in the module whose functions look it up.
environment_step = gs.environment_step
measurement_steps = gs.measurement_steps
fmnist_step = gs.fmnist_step
input_step = gs.input_step


def _is_commit(rev: str) -> bool:
    """``rev`` names a commit of this repository (HEAD itself may move: others commit)."""
    r = subprocess.run(
        ["git", "cat-file", "-t", rev], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return len(rev) == 40 and r.stdout.strip() == "commit"


def _in_git() -> bool:
    return subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode == 0


@pytest.mark.slow
def test_quick_suite_through_the_wrapper(tmp_path):
    """`bash benchmarks/gpu_suite.sh DIR --quick` as on the GPU machine, at tiny sizes. The
    budgets are made large: how fast a busy CPU machine is must not decide the result (the
    budget mechanism has its own tests below)."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", SMI_GPU_SUITE_TIMEOUT="7200")
    budget = 100 * sum(gs.QUICK_BUDGETS.values())
    t0 = time.monotonic()
    r = subprocess.run(
        ["bash", "benchmarks/gpu_suite.sh", str(out), "--quick", "--budget-s", str(budget)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=7200,
    )  # fmt: skip
    wall = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert "GPU suite (quick, cpu)" in r.stdout
    assert (out / "suite.log").read_text() == r.stdout  # the wrapper tees its output
    data = json.loads((out / "results.json").read_text())
    assert data["finished"] and data["mode"] == "quick"
    assert list(data["steps"]) == list(gs.STEPS)
    for name, rec in data["steps"].items():
        assert rec["status"] == "ok", (name, rec.get("error"), rec.get("traceback"))
        assert 0 < rec["elapsed_s"] < wall
    assert sum(data["budgets_s"].values()) == pytest.approx(budget)

    env_rec = data["steps"]["environment"]["result"]
    assert env_rec["torch"] == torch.__version__
    assert env_rec["command"] == f"bash benchmarks/gpu_suite.sh {out} --quick --budget-s {budget}"
    assert env_rec["env"]["SMI_FASHION_MNIST_DIR"]
    if _in_git():
        assert _is_commit(env_rec["git"]["commit"])
    assert env_rec["peak"]["measured_matmul_flops"] > 0

    train = data["steps"]["train_step"]["result"]
    eager = [row for row in train["rows"] if not row["compiled"]]
    assert [row["loss"] for row in eager] == list(measurement_steps.LOSSES)
    cfg = measurement_steps.TRAIN["quick"]
    for row in train["rows"]:
        assert row["steps_timed"] == cfg["steps"]
        assert row["step_ms_min"] <= row["step_ms_median"]
        assert row["images_per_s"] == pytest.approx(
            cfg["batch_size"] / (row["step_ms_median"] / 1e3), rel=0.01
        )
        # FLOPs of a training step: at least forward + backward (3x) of both views of a
        # ResNet-18 at width 8 and 32 px (a few MFLOPs per image forward)
        assert row["flops_per_step"] > 3 * 2 * cfg["batch_size"] * 1e6
        rate = row["flops_per_step"] / (row["step_ms_median"] / 1e3)
        assert row["achieved_tflops"] == pytest.approx(rate / 1e12, abs=0.01)
        assert row["mfu_measured_matmul"] == pytest.approx(
            rate / env_rec["peak"]["measured_matmul_flops"], abs=1e-3
        )
        assert row["mfu_datasheet"] is None  # no datasheet peak for a CPU
    assert isinstance(train["compile"], str | dict)

    loss = data["steps"]["loss_cost"]["result"]
    grid = measurement_steps.LOSS_GRID["quick"]
    assert sorted((c["n"], c["d"]) for c in loss["cases"]) == sorted(
        (n, d) for n in grid["n"] for d in grid["d"]
    )
    for case in loss["cases"]:
        smi = case["losses"]["smi"]["seconds"]
        for row in case["losses"].values():
            assert row["time_ratio_to_smi"] == row["seconds"] / smi
    assert set(loss["crossover"]) == {str(d) for d in grid["d"]}

    rows = data["steps"]["extraction"]["result"]["rows"]
    assert len(rows) == 5 and "PNG files" in rows[-1]["variant"]
    for row in rows:
        ratio = row["extract_features_images_per_s"] / row["plain_images_per_s"]
        assert row["ratio"] == pytest.approx(ratio, rel=0.01)

    fm = data["steps"]["fmnist_training"]["result"]
    cal = fm["calibration"]  # two epochs of 2 steps measure the step rate
    assert cal["returncode"] == 0 and cal["seconds_per_step"] > 0 and cal["fixed_s"] > 0
    assert fm["train"]["returncode"] == 0 and fm["train"]["steps_done"] == 3
    assert "train.precision=bf16" in fm["train"]["command"]
    comp = fm["comparison"]
    assert comp["default_knn_top1"] == 85.3 and comp["comparable"] is False
    assert 20 < comp["knn_top1"] <= 100  # chance is 10 %
    assert comp["beats_default"] == (comp["knn_top1"] > 85.3)
    folder = out / fmnist_step.EXPORT_NAME["quick"]
    assert sorted(fm["export"]["files"]) == sorted(p.name for p in folder.iterdir())
    model = load_weights_folder(folder)  # verifies the sha256 of the weights
    assert model.base_width == 8
    card = json.loads((folder / "config.json").read_text())
    assert card["results"]["knn_top1"] == pytest.approx(comp["knn_top1"], abs=1e-3)
    assert len([p for p in out.rglob("*") if p.is_file()]) <= 8  # what $OUT sends back


@pytest.mark.slow
def test_soft_deadline_keeps_the_first_measurement(tmp_path, monkeypatch):
    """A spent budget stops the step between measurements: timed_out, results kept. The
    hard interrupt is moved out of the way (its grace is 2 s at budget 0, and a busy machine
    took longer for the first measurement): this test is about the soft stop only."""
    run_step = gs.run_step
    monkeypatch.setattr(
        gs, "run_step", lambda suite, name, fn, budget_s, grace_s: run_step(
            suite, name, fn, budget_s, 3600.0)
    )  # fmt: skip
    out = tmp_path / "r.json"
    rc = gs.main(["--quick", "--steps", "loss_cost", "--budget", "loss_cost=0", "--out", str(out)])
    assert rc == 1
    data = json.loads(out.read_text())
    rec = data["steps"]["loss_cost"]
    assert rec["status"] == "timed_out" and "between measurements" in rec["timeout"]
    assert len(rec["result"]["cases"]) == 1 and data["finished"]
    assert rec["result"]["crossover"]


def _suite(tmp_path) -> "gs.Suite":
    args = gs.build_parser().parse_args(["--quick", "--out", str(tmp_path / "r.json")])
    args.device = "cpu"
    return gs.Suite(args)


@pytest.mark.slow
def test_hard_deadline_interrupts_a_stuck_step(tmp_path):
    suite = _suite(tmp_path)

    def stuck(step):
        step.result["partial"] = [1, 2]
        step.save()
        on_disk = json.loads(suite.path.read_text())["steps"]["stuck"]
        assert on_disk == {"status": "running", "budget_s": 0.2, "result": {"partial": [1, 2]}}
        time.sleep(30)

    rec = gs.run_step(suite, "stuck", stuck, budget_s=0.2, grace_s=0.3)
    assert rec["status"] == "timed_out" and "interrupted" in rec["timeout"]  # not slept out
    assert json.loads(suite.path.read_text())["steps"]["stuck"]["result"] == {"partial": [1, 2]}

    def broken(step):
        step.result["before"] = True
        raise ValueError("bad shape")

    rec = gs.run_step(suite, "broken", broken, budget_s=5, grace_s=1)
    assert rec["status"] == "error" and rec["error"] == "ValueError: bad shape"
    assert rec["result"] == {"before": True}
    time.sleep(0.3)  # the alarm of the earlier step is cancelled: nothing fires now


def test_budgets_scale_and_override():
    parse = gs.build_parser().parse_args
    assert sum(gs.budgets(parse(["--out", "x"])).values()) == sum(gs.BUDGETS.values()) <= 540
    scaled = gs.budgets(parse(["--out", "x", "--budget-s", "103"]))
    assert sum(scaled.values()) == pytest.approx(103)
    assert scaled["fmnist_training"] == pytest.approx(gs.BUDGETS["fmnist_training"] / 5)
    one = gs.budgets(parse(["--out", "x", "--steps", "loss_cost", "--budget", "loss_cost=7"]))
    assert one == {"loss_cost": 7.0}
    with pytest.raises(SystemExit, match="STEP=SECONDS"):
        gs.budgets(parse(["--out", "x", "--budget", "nostep=3"]))


def test_calibration_uses_the_last_two_epochs():
    records = [
        {"type": "event", "event": "start", "step": 0},
        {"type": "train", "step": 10},
        {"type": "epoch", "step": 30, "elapsed_s": 9.0},  # first epoch: warm-up, ignored
        {"type": "epoch", "step": 60, "elapsed_s": 12.0},
    ]
    rate = fmnist_step._calibrate(records, wall_s=20.0)
    assert rate == {"seconds_per_step": pytest.approx(0.1), "fixed_s": pytest.approx(8.0)}
    with pytest.raises(RuntimeError, match="needs 2"):
        fmnist_step._calibrate(records[:3], wall_s=20.0)


def test_weights_are_cut_into_parts_that_reassemble(tmp_path, monkeypatch):
    src = tmp_path / "model.safetensors"
    payload = os.urandom(25)
    src.write_bytes(payload)
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(fmnist_step, "PART_BYTES", 10)
    names = fmnist_step._split_copy(src, tmp_path / "out" / src.name)
    assert names == [f"model.safetensors.part{i}" for i in range(3)]
    assert b"".join((tmp_path / "out" / n).read_bytes() for n in names) == payload
    monkeypatch.setattr(fmnist_step, "PART_BYTES", 25)
    assert fmnist_step._split_copy(src, tmp_path / "whole.safetensors") == ["whole.safetensors"]


def test_datasheet_peaks_by_device_name():
    assert environment_step.datasheet_bf16("NVIDIA H100 80GB HBM3") == 989.4e12
    assert environment_step.datasheet_bf16("NVIDIA H100 PCIe") == 756.5e12
    assert environment_step.datasheet_bf16("NVIDIA H200") == 989.4e12
    assert environment_step.datasheet_bf16("NVIDIA GeForce RTX 4090") is None


def test_git_revision_names_a_commit_of_the_checkout():
    rev = environment_step.git_revision()
    if _in_git():
        assert rev["from"] == "git" and _is_commit(rev["commit"])
        assert isinstance(rev["dirty"], bool)
    else:
        assert rev["from"] != "git"


@pytest.mark.slow
def test_environment_step_records_versions(tmp_path):
    suite = _suite(tmp_path)
    rec = gs.run_step(
        suite, "environment", environment_step.step_environment, budget_s=60, grace_s=5
    )
    assert rec["status"] == "ok"
    res = rec["result"]
    assert res["torch"] == torch.__version__ and res["cpu_count"] == os.cpu_count()
    assert res["peak"]["device_name"] and res["peak"]["datasheet_bf16_flops"] is None
    assert "gpu" not in res  # a CPU run records no GPU


@pytest.mark.slow
def test_quick_input_pipeline_step(tmp_path):
    """`--steps input_pipeline` (not in the default run) at tiny sizes on the CPU: JPEGs made,
    every per-core row measured, steps fed from the files next to the step alone."""
    out = tmp_path / "r.json"
    assert gs.main(["--quick", "--steps", "input_pipeline", "--out", str(out)]) == 0
    rec = json.loads(out.read_text())["steps"]["input_pipeline"]
    assert rec["status"] == "ok" and rec["budget_s"] == gs.QUICK_EXTRA_BUDGETS["input_pipeline"]
    rows = rec["result"]["per_core"]
    assert rows[0]["variant"].startswith("today") and rows[0]["cost_vs_today"] == 1.0
    assert all(r["ms_per_image_per_core"] > 0 for r in rows)
    e2e = rec["result"]["end_to_end"]
    assert e2e["timed_steps"] == input_step.INPUT["quick"]["steps"]
    assert e2e["images_per_s_end_to_end"] > 0 and e2e["images_per_s_step_only"] > 0
    ex = rec["result"]["extract"]
    n = input_step.INPUT["quick"]["extract_images"]
    assert ex["rows_decode_cpu"] == ex["rows_decode_device"] == n and ex["device_over_cpu"] > 0
    assert ex["pixels_vs_cpu_path"]["max_grey_levels"] <= 1.001  # on the CPU: libjpeg-turbo
    assert any(r["variant"].startswith("extract --decode device") for r in rows)
    assert "input_pipeline" not in gs.budgets(gs.build_parser().parse_args(["--out", "x"]))
