"""benchmarks/loss_cost.py runs on tiny cases (timing and memory passes) and writes its JSON."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from smi_hub.script_modules import load_file_module

ROOT = Path(__file__).parents[1]


def _load_benchmark():
    return load_file_module("loss_cost", ROOT / "benchmarks" / "loss_cost.py", register=False)


@pytest.mark.slow
def test_loss_cost_smoke(tmp_path):
    """As a user runs it (its memory pass starts a child process of its own)."""
    out = tmp_path / "loss_cost.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "loss_cost.py"), "--n", "8", "16", "--d", "32"]
    r = subprocess.run(
        [*cmd, "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr[-2000:]
    table = r.stdout
    assert "| 8 | 32 |" in table and "barlow_twins/smi time" in table
    assert "D=32: SMI costlier than Barlow Twins from N ~" in table
    data = json.loads(out.read_text())
    assert set(data) == {"settings", "cases", "crossover"}
    if sys.platform.startswith("linux"):
        assert data["settings"]["memory_method"].startswith("VmHWM")
    assert [(c["n"], c["d"]) for c in data["cases"]] == [(8, 32), (16, 32)]
    for case in data["cases"]:
        assert case["grad_bytes"] == 2 * case["n"] * 32 * 4
        assert list(case["losses"]) == ["smi", "barlow_twins", "vicreg"]
        for name, row in case["losses"].items():
            assert len(row["times"]) == 3 and row["seconds"] == statistics.median(row["times"])
            assert min(row["times"]) > 0
            if sys.platform.startswith("linux"):
                assert row["peak_bytes"] >= 0
            assert row["time_ratio_to_smi"] == row["seconds"] / case["losses"]["smi"]["seconds"]
            if name == "smi":
                assert row["time_ratio_to_smi"] == 1.0
    assert data["crossover"]["32"]["n"] >= 1
    # the printed table is the JSON's cases, in the benchmark's own format
    bench = _load_benchmark()
    assert bench.markdown(data["cases"], ["smi", "barlow_twins", "vicreg"]) in table
    rows = [line for line in table.splitlines() if line.startswith("| 8 |")]
    assert len(rows) == 1 and rows[0].count("|") == 2 + 2 * 3 + 2 * 2 + 1


def test_crossover_interpolates_and_extrapolates():
    bench = _load_benchmark()

    def case(n, smi, bt):
        return {
            "n": n,
            "d": 64,
            "losses": {
                "smi": {"seconds": smi, "time_ratio_to_smi": 1.0},
                "barlow_twins": {"seconds": bt, "time_ratio_to_smi": bt / smi},
            },
        }

    measured = bench.crossover([case(100, 1.0, 2.0), case(400, 2.0, 1.0)], 64)
    assert measured["n"] == 200 and "measured" in measured["how"]
    two = bench.crossover([case(100, 1.0, 8.0), case(200, 1.0, 4.0)], 64)
    assert two["n"] == two["n_ratio_rule"] == 800 and "1/N" in two["how"]
    # exact cost models: SMI 1e-6 N^2 + 1e-4 N, Barlow Twins 2 + 1e-3 N -> cross at N = 1934
    cases = [case(n, 1e-6 * n * n + 1e-4 * n, 2 + 1e-3 * n) for n in (100, 200, 400, 800)]
    fitted = bench.crossover(cases, 64)
    assert fitted["n"] == fitted["n_fit"] == 1934 and "fitted cost models" in fitted["how"]
    assert bench.crossover([case(100, 2.0, 1.0)], 64)["n"] == 100
    assert bench.crossover([], 64) is None
