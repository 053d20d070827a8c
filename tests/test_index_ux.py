"""What an index build and search tell the user: ignored knobs, progress, tiny ivfpq builds."""

from __future__ import annotations

import warnings

import pytest
import torch

from smi_hub.cli import main as cli_main
from smi_hub.index import EmbeddingIndex
from smi_hub.index_kinds import PQ_MIN_TRAIN


@pytest.fixture
def vectors() -> torch.Tensor:
    return torch.randn(700, 16, generator=torch.Generator().manual_seed(0))


def test_nprobe_on_a_flat_index_warns_instead_of_being_ignored(vectors):
    with pytest.warns(UserWarning, match="nprobe ignored: a flat index has exact search"):
        index = EmbeddingIndex.build(vectors, kind="flat", nprobe=8)
    with pytest.warns(UserWarning, match="ef_search ignored"):
        index.search(vectors[:2], k=3, ef_search=64)
    ivf = EmbeddingIndex.build(vectors, kind="ivf", queries=0)
    with pytest.warns(UserWarning, match="ef_search ignored: a ivf index has no such knob"):
        ivf.search(vectors[:2], k=3, ef_search=64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.search(vectors[:2], k=3)
        ivf.search(vectors[:2], k=3, nprobe=2)


@pytest.mark.slow
def test_cli_search_with_nprobe_on_a_flat_index_says_so(tmp_path, capsys, monkeypatch):
    import smi_hub
    from smi_hub import SMIModel

    m = SMIModel(arch="resnet18", base_width=4, small_stem=True, image_size=28)
    weights = smi_hub.save_weights_folder(m.eval(), tmp_path / "w")
    gallery = smi_hub.default_gallery(tmp_path / "gallery", per_class=1)
    idx = tmp_path / "idx"
    assert cli_main(["index", str(gallery), "-o", str(idx), "--model", str(weights)]) == 0
    query = str(sorted(gallery.rglob("*.png"))[0])
    with pytest.warns(UserWarning, match="nprobe ignored: a flat index"):
        assert cli_main(["search", str(idx), query, "--nprobe", "4"]) == 0


def test_build_progress_on_stderr_and_off_by_choice(vectors, capfd):
    EmbeddingIndex.build(vectors, kind="flat", progress=True)
    err = capfd.readouterr().err
    assert "index Flat" in err and "700/700" in err
    EmbeddingIndex.build(vectors, kind="flat", progress=False)
    EmbeddingIndex.build(vectors, kind="flat")  # small: no bar by default
    assert capfd.readouterr().err == ""


@pytest.mark.slow
def test_a_tiny_ivfpq_is_refused_with_one_clear_message_not_faiss_warnings(vectors, capfd):
    with pytest.raises(ValueError, match=f"at least {PQ_MIN_TRAIN} training vectors.*got 64"):
        EmbeddingIndex.build(vectors[:64], kind="ivfpq")
    assert "WARNING clustering" not in capfd.readouterr().err
    bigger = torch.randn(PQ_MIN_TRAIN, 16, generator=torch.Generator().manual_seed(1))
    EmbeddingIndex.build(bigger, kind="ivfpq", queries=0)
    assert "WARNING clustering" not in capfd.readouterr().err
