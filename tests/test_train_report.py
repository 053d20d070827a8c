"""training.report: the results table from evaluation JSONs."""

import json

import pytest

from training.report import main, results_table


def write(folder, protocol, metrics):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{protocol}.json").write_text(json.dumps({"protocol": protocol, "metrics": metrics}))


def test_table_rows_and_missing_cells(tmp_path):
    write(tmp_path / "a", "knn", {"top1": 81.234})
    write(tmp_path / "a", "linear", {"top1": 85.0})
    transfer = {"10shot_top1": 60.0, "10shot_top1_std": 1.25, "1shot_top1": 30.0}
    write(tmp_path / "a", "transfer", transfer | {"1shot_top1_std": 2.0})
    write(tmp_path / "b", "knn", {"top1": 70.0})
    table = results_table({"SMI": tmp_path / "a", "random": tmp_path / "b"}).splitlines()
    assert table[0] == "| model | k-NN top-1 | linear top-1 | 1-shot top-1 | 10-shot top-1 |"
    assert table[2] == "| SMI | 81.2 | 85.0 | 30.0 ± 2.0 | 60.0 ± 1.2 |"
    assert table[3] == "| random | 70.0 |  |  |  |"


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["no-equals-sign"])
    assert "LABEL=FOLDER" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a folder"):
        main([f"x={tmp_path / 'missing'}"])
