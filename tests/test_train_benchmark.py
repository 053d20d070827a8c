"""benchmarks/train_step.py runs end to end (tiny settings) and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_train_step_benchmark_smoke(tmp_path):
    out = tmp_path / "train_step.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--base-width", "4",
        "--projector", "64", "64", "--batch-size", "8", "--steps", "1", "--warmup", "0",
        "--out", str(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| smi |" in r.stdout and "| barlow_twins |" in r.stdout
    data = json.loads(out.read_text())
    assert [row["loss"] for row in data["results"]] == ["smi", "barlow_twins", "vicreg"]
    assert all(row["images_per_s"] > 0 for row in data["results"])
    assert data["settings"]["projector"] == [64, 64]
