"""training.plots: metrics.jsonl parsing (resumed runs) and the PNG it writes."""

import json

import pytest

from training.plots import plot_runs, read_metrics


def write_run(path, losses, resumed_at=None):
    path.mkdir(parents=True)
    rows = [{"type": "event", "event": "start", "step": 0}]
    rows += [{"type": "train", "step": s, "loss": v} for s, v in enumerate(losses, 1)]
    if resumed_at is not None:  # a resumed run logs the steps after its checkpoint again
        rows += [{"type": "train", "step": s, "loss": -1.0} for s in range(resumed_at, 4)]
    rows += [
        {"type": "epoch", "epoch": e, "projector_effective_rank": 10.0 * e}
        | {"projector_alignment": 1.0 / e, "projector_uniformity": -e}
        for e in (1, 2)
    ]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_read_metrics_keeps_the_last_row_of_a_step(tmp_path):
    write_run(tmp_path / "a", [3.0, 2.0, 1.0], resumed_at=2)
    train, epochs = read_metrics(tmp_path / "a")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert [r["loss"] for r in train] == [3.0, -1.0, -1.0]
    assert [r["projector_effective_rank"] for r in epochs] == [10.0, 20.0]


@pytest.mark.slow
def test_plot_runs_writes_a_png(tmp_path):
    write_run(tmp_path / "smi", [3.0, 2.0, 1.0])
    write_run(tmp_path / "bt", [30.0, 20.0, 10.0])
    out = plot_runs([tmp_path / "smi", tmp_path / "bt"], tmp_path / "img" / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_run_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="training run directory"):
        read_metrics(tmp_path / "nope")
    write_run(tmp_path / "a", [1.0])
    with pytest.raises(ValueError, match="1 labels for 2 runs"):
        plot_runs([tmp_path / "a", tmp_path / "a"], tmp_path / "x.png", labels=["a"])
