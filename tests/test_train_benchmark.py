"""benchmarks/train_step.py runs end to end (tiny settings) and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_train_step_benchmark_smoke(tmp_path):
    out = tmp_path / "train_step.json"
    cmd = [
        sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--base-width", "8",  # width 4: oneDNN hang
        "--projector", "64", "64", "--batch-size", "8", "--steps", "2", "--warmup", "0",
        "--out", str(out),
    ]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| smi |" in r.stdout and "| barlow_twins |" in r.stdout
    data = json.loads(out.read_text())
    assert [row["loss"] for row in data["results"]] == ["smi", "barlow_twins", "vicreg"]
    assert data["settings"]["projector"] == [64, 64] and data["settings"]["steps"] == 2
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")][1:]
    assert len(table) == 3
    for row, line in zip(data["results"], table, strict=True):
        # the columns are consistent with each other and with the printed table
        assert row["images_per_s"] == pytest.approx(8 * 1000 / row["step_ms"])
        assert 0 < row["step_ms_min"] <= row["step_ms"] and row["loss_ms"] > 0
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells == [
            row["loss"],
            f"{row['images_per_s']:.1f}",
            f"{row['step_ms']:.1f}",
            f"{row['loss_ms']:.1f}",
        ]
