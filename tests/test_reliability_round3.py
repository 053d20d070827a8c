"""Issue 18, items 6, 7, 8, 10, 11, 12 and the long tail: integrity end to end, non-finite
values, escaped output, fine-tuning data and every argument checked before any work.

Each case table below is also a table of docs/reliability.md (``python
tests/test_reliability_round3.py`` prints them): ``(case id, input, outcome)``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import export
from smi_hub.argtypes import printable
from smi_hub.cli import main
from smi_hub.errors import CheckpointError, NonFiniteError, SMIHubError
from smi_hub.feature_store import FeatureStore
from smi_hub.index import EmbeddingIndex
from smi_hub.models import SMIModel
from smi_hub.store_manifest import FeatureStoreError, manifest_checksum

FMNIST = {"image_size": 28, "mean": [0.286] * 3, "std": [0.353] * 3}


def tiny(seed: int = 0, **kw) -> SMIModel:
    torch.manual_seed(seed)
    return SMIModel(arch="resnet18", base_width=4, small_stem=True, **FMNIST, **kw).eval()


def vectors(n: int = 40, d: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---- item 6: export verifies what resume verifies ------------------------------------------


def _saved_checkpoint(tmp_path: Path, model: torch.nn.Module, config: dict) -> Path:
    from training.checkpoint import save_checkpoint

    state = {"model": model.state_dict(), "model_config": model.config, "config": config}
    return save_checkpoint({**state, "epoch": 1, "step": 3}, tmp_path / "run" / "checkpoints")


def _flip_tensor_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # the middle of the archive: tensor bytes
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])
    (path.parent / (path.name + ".sha256")).unlink()


def _garble_sidecar(path: Path) -> None:
    (path.parent / (path.name + ".sha256")).write_text("not a digest\n")


EXPORT_CASES = [
    ("export_flipped_tensor_byte", "one byte flipped inside a tensor; `.sha256` sidecar intact",
     "`CheckpointError` 'does not match its checksum', exit 1, no output folder",
     _flip_tensor_byte, "does not match its checksum"),
    ("export_sidecar_not_a_digest", "the `.sha256` sidecar holds no digest",
     "`CheckpointError` 'does not hold a SHA-256 digest', exit 1, no output folder",
     _garble_sidecar, "does not hold a SHA-256 digest"),
    ("export_truncated_without_sidecar", "truncated to 100 bytes, sidecar removed",
     "`CheckpointError` 'is not a torch checkpoint archive', exit 1, no output folder",
     _truncate, "is not a torch checkpoint archive"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage,message", [c[3:] for c in EXPORT_CASES], ids=[c[0] for c in EXPORT_CASES]
)
def test_export_verifies_the_checkpoint_as_resume_does(tmp_path, capsys, damage, message):
    from training import checkpoint as training_checkpoint

    ckpt = _saved_checkpoint(tmp_path, tiny(), {"loss": {"name": "smi"}})
    damage(ckpt)
    with pytest.raises(CheckpointError, match=message):
        training_checkpoint.load_checkpoint(ckpt)  # what resume does
    out = tmp_path / "w"
    assert main(["export", str(ckpt), str(out)]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert training_checkpoint.verify_checkpoint is export.verify_checkpoint  # one function


@pytest.mark.slow
def test_export_of_an_intact_checkpoint_still_works(tmp_path):
    ckpt = _saved_checkpoint(tmp_path, tiny(), {"loss": {"name": "smi"}})
    out = export.export_checkpoint(ckpt, tmp_path / "w")
    assert smi_hub.load(out).num_features == tiny().num_features


@pytest.mark.slow
def test_export_of_a_finetuning_checkpoint(tmp_path):
    """Long tail: a fine-tuning checkpoint (its config's ``data`` is a string) exports into a
    classifier folder instead of an AttributeError."""
    from training.finetune_data import FinetuneConfig

    model = tiny()
    model.reset_classifier(3, class_names=["a", "b", "c"])
    ckpt = _saved_checkpoint(tmp_path, model, FinetuneConfig(out="x").to_dict())
    out = export.export_checkpoint(ckpt, tmp_path / "w")
    loaded = smi_hub.load(out)
    assert loaded.num_classes == 3 and loaded.class_names == ["a", "b", "c"]
    training = json.loads((out / "config.json").read_text())["training"]
    assert training["task"] == "finetune" and training["dataset"] == "fashion_mnist"


# ---- item 7 and the long tail: index.json of every shape -----------------------------------


def _shuffled_v1(info: dict, folder: Path) -> dict:
    """Rows shuffled, format_version set to 1 and the checksum dropped: the downgrade attack."""
    from safetensors.torch import load_file, save_file

    path = folder / "embeddings.safetensors"
    emb = load_file(str(path))["embeddings"]
    save_file({"embeddings": emb.flip(0).contiguous()}, str(path))
    return {**info, "format_version": 1, "files": {}}


def _shuffled_v1_old_sha(info: dict, folder: Path) -> dict:
    _shuffled_v1(info, folder)
    return {**info, "format_version": 1}


INDEX_CASES = [
    ("index_json_list", "index.json is a JSON list", "top level", lambda i, f: [i]),
    ("index_json_string", "index.json is a JSON string", "top level", lambda i, f: "index"),
    ("index_json_null", "index.json is `null`", "top level", lambda i, f: None),
    ("index_format_missing", "no `format`", "not an smi-hub index",
     lambda i, f: {k: v for k, v in i.items() if k != "format"}),
    ("index_version_missing", "no `format_version`", "version None",
     lambda i, f: {k: v for k, v in i.items() if k != "format_version"}),
    ("index_version_zero", "`format_version: 0`", "version 0", lambda i, f: {**i, "format_version": 0}),
    ("index_version_bool", "`format_version: true`", "version True",
     lambda i, f: {**i, "format_version": True}),
    ("index_version_string", "`format_version: '2'`", "version '2'",
     lambda i, f: {**i, "format_version": "2"}),
    ("index_version_newer", "`format_version: 3`", "version 3", lambda i, f: {**i, "format_version": 3}),
    ("index_downgrade_v1_no_checksum", "`format_version: 1` and no `files` record",
     "does not hold the sha256", lambda i, f: {**i, "format_version": 1, "files": {}}),
    ("index_downgrade_v1_shuffled_rows", "rows of embeddings.safetensors shuffled, version 1, "
     "record dropped", "does not hold the sha256", _shuffled_v1),
    ("index_v1_shuffled_rows_old_record", "rows shuffled, version 1, the old sha256 kept",
     "sha256 differs", _shuffled_v1_old_sha),
    ("index_files_list", "`files` is a list", "files", lambda i, f: {**i, "files": ["x"]}),
    ("index_files_not_hex", "`files` sha256 is not 64 hex digits", "files",
     lambda i, f: {**i, "files": {"embeddings.safetensors": "xyz"}}),
    ("index_kind_missing", "no `kind`", "kind", lambda i, f: {k: v for k, v in i.items() if k != "kind"}),
    ("index_kind_auto", "`kind: auto`", "kind", lambda i, f: {**i, "kind": "auto"}),
    ("index_kind_number", "`kind: 3`", "kind", lambda i, f: {**i, "kind": 3}),
    ("index_count_missing", "no `count`", "count",
     lambda i, f: {k: v for k, v in i.items() if k != "count"}),
    ("index_count_negative", "`count: -1`", "count", lambda i, f: {**i, "count": -1}),
    ("index_count_string", "`count: '6'`", "count", lambda i, f: {**i, "count": "6"}),
    ("index_count_bool", "`count: true`", "count", lambda i, f: {**i, "count": True}),
    ("index_dim_missing", "no `dim`", "dim", lambda i, f: {k: v for k, v in i.items() if k != "dim"}),
    ("index_dim_zero", "`dim: 0`", "dim", lambda i, f: {**i, "dim": 0}),
    ("index_dim_float", "`dim: 8.5`", "dim", lambda i, f: {**i, "dim": 8.5}),
    ("index_labels_missing", "no `labels`", "labels",
     lambda i, f: {k: v for k, v in i.items() if k != "labels"}),
    ("index_labels_dict", "`labels` is an object", "labels", lambda i, f: {**i, "labels": {"a": 1}}),
    ("index_labels_short", "one label fewer than `count`", "labels",
     lambda i, f: {**i, "labels": i["labels"][:-1]}),
    ("index_factory_missing", "no `factory`", "factory",
     lambda i, f: {k: v for k, v in i.items() if k != "factory"}),
    ("index_factory_number", "`factory: 5`", "factory", lambda i, f: {**i, "factory": 5}),
    ("index_nprobe_zero", "`nprobe: 0`", "nprobe", lambda i, f: {**i, "nprobe": 0}),
    ("index_nprobe_string", "`nprobe: 'many'`", "nprobe", lambda i, f: {**i, "nprobe": "many"}),
    ("index_ef_search_negative", "`ef_search: -3`", "ef_search", lambda i, f: {**i, "ef_search": -3}),
    ("index_metadata_list", "`metadata` is a list", "metadata", lambda i, f: {**i, "metadata": [1]}),
]  # fmt: skip


@pytest.fixture
def flat_index(tmp_path) -> Path:
    return EmbeddingIndex().add(vectors(6), labels=list("abcdef")).save(tmp_path / "idx")


@pytest.mark.parametrize(
    "message,edit", [c[2:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES]
)
def test_malformed_index_json_is_refused_with_the_field(flat_index, message, edit):
    path = flat_index / "index.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()), flat_index)))
    with pytest.raises(SMIHubError) as e:
        EmbeddingIndex.load(flat_index)
    assert message in str(e.value)
    assert type(e.value) is SMIHubError  # not a KeyError / TypeError from deep inside


def test_a_version_one_index_with_its_checksum_is_verified_and_loads(flat_index):
    path = flat_index / "index.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 1}))
    assert EmbeddingIndex.load(flat_index).labels == list("abcdef")


def test_search_cli_on_a_downgraded_index_exits_1_with_the_reason(flat_index, capsys, tmp_path):
    path = flat_index / "index.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "format_version": 1, "files": {}}))
    Image.new("L", (28, 28)).save(tmp_path / "q.png")
    assert main(["search", str(flat_index), str(tmp_path / "q.png")]) == 1
    assert "does not hold the sha256" in capsys.readouterr().err


# ---- item 8: the feature store's manifest --------------------------------------------------


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("store") / "feats"
    x = torch.rand(10, 3, 28, 28)
    smi_hub.extract_features(tiny(), x, out=out, shard_size=4, progress=False)
    return out


def _resum(m: dict) -> dict:
    m = {k: v for k, v in m.items() if k != "manifest_sha256"}
    return {**m, "manifest_sha256": manifest_checksum(m)}


def _shard(m: dict, k: int, **changes) -> dict:
    m = copy.deepcopy(m)
    m["shards"][k].update(changes)
    return _resum(m)


def _symlink_out(m: dict, folder: Path) -> dict:
    outside = folder.parent / "elsewhere.safetensors"
    shutil.copyfile(folder / "shard-00000.safetensors", outside)
    (folder / "shard-00000.safetensors").unlink()
    (folder / "shard-00000.safetensors").symlink_to(outside)
    return m


def _dtype_half(m: dict, folder: Path) -> dict:
    return _resum({**m, "dtype": "float16"})


STORE_CASES = [
    ("store_manifest_list", "manifest.json is a JSON list", "top level", lambda m, f: [m]),
    ("store_manifest_number", "manifest.json is `42`", "top level", lambda m, f: 42),
    ("store_format_other", "`format: other`", "not a feature store", lambda m, f: _resum({**m, "format": "other"})),
    ("store_version_newer", "`format_version: 3`", "version 3", lambda m, f: _resum({**m, "format_version": 3})),
    ("store_downgrade_v1", "`format_version: 1`, checksum removed", "manifest_sha256",
     lambda m, f: {k: v for k, v in m.items() if k != "manifest_sha256"} | {"format_version": 1}),
    ("store_checksum_missing", "`manifest_sha256` removed", "manifest_sha256",
     lambda m, f: {k: v for k, v in m.items() if k != "manifest_sha256"}),
    ("store_paths_edited", "`paths` reordered, checksum not updated", "manifest_sha256 differs",
     lambda m, f: {**m, "paths": m["paths"][::-1]}),
    ("store_file_dotdot", "`shards[0].file: ../../x`", "shards[0].file", lambda m, f: _shard(m, 0, file="../../x")),
    ("store_file_absolute", "`shards[0].file: /etc/passwd`", "shards[0].file",
     lambda m, f: _shard(m, 0, file="/etc/passwd")),
    ("store_file_swapped", "shards 0 and 1 named each other's file", "shards[0].file",
     lambda m, f: _shard(_shard(m, 0, file="shard-00001.safetensors"), 1, file="shard-00000.safetensors")),
    ("store_file_symlink_out", "shard 0 is a symlink to a copy outside the store", "a link",
     _symlink_out),
    ("store_rows_more", "`rows` one more than the shards hold (paths padded)", "rows",
     lambda m, f: _resum({**m, "rows": m["rows"] + 1, "paths": [*m["paths"], 99]})),
    ("store_shard_rows_less", "`shards[1].rows` one fewer", "shards[1].rows",
     lambda m, f: _shard(m, 1, rows=3)),
    ("store_shard_rows_string", "`shards[1].rows: '4'`", "shards[1]", lambda m, f: _shard(m, 1, rows="4")),
    ("store_row_shape_wrong", "`row_shape: [16]` (the shards hold 32)", "row_shape",
     lambda m, f: _resum({**m, "row_shape": [16]})),
    ("store_row_shape_string", "`row_shape: '32'`", "row_shape", lambda m, f: _resum({**m, "row_shape": "32"})),
    ("store_row_shape_zero", "`row_shape: [0]`", "row_shape", lambda m, f: _resum({**m, "row_shape": [0]})),
    ("store_dtype_float16", "`dtype: float16`", "dtype", _dtype_half),
    ("store_paths_extra", "one path more than `rows`", "paths",
     lambda m, f: _resum({**m, "paths": [*m["paths"], "x"]})),
    ("store_paths_missing", "one path fewer than `rows`", "paths", lambda m, f: _resum({**m, "paths": m["paths"][1:]})),
    ("store_paths_not_list", "`paths` is an object", "paths", lambda m, f: _resum({**m, "paths": {}})),
    ("store_failed_bad_entry", "`failed: [1]`", "failed", lambda m, f: _resum({**m, "failed": [1]})),
    ("store_inputs_wrong", "`inputs` one more than rows + failed", "inputs",
     lambda m, f: _resum({**m, "inputs": m["inputs"] + 1})),
    ("store_shard_size_zero", "`shard_size: 0`", "shard_size", lambda m, f: _resum({**m, "shard_size": 0})),
    ("store_shard_size_other", "`shard_size: 5` (written with 4)", "shards",
     lambda m, f: _resum({**m, "shard_size": 5})),
    ("store_shards_dropped", "the last shard's entry removed", "shards",
     lambda m, f: _resum({**m, "shards": m["shards"][:-1]})),
    ("store_shards_not_list", "`shards` is a string", "shards", lambda m, f: _resum({**m, "shards": "all"})),
    ("store_shard_not_object", "`shards[0]` is a number", "shards[0]",
     lambda m, f: _resum({**m, "shards": [0, *m["shards"][1:]]})),
    ("store_shard_inputs_shifted", "`shards[1].inputs` shifted by one", "shards[1].inputs",
     lambda m, f: _shard(m, 1, inputs=[5, 9])),
    ("store_shard_bytes_wrong", "`shards[2].bytes` off by one", "wrong size",
     lambda m, f: _shard(m, 2, bytes=m["shards"][2]["bytes"] + 1)),
    ("store_model_number", "`model: 4`", "model", lambda m, f: _resum({**m, "model": 4})),
    ("store_layer_number", "`layer: 4`", "layer", lambda m, f: _resum({**m, "layer": 4})),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "field,edit", [c[2:] for c in STORE_CASES], ids=[c[0] for c in STORE_CASES]
)
def test_tampered_manifest_is_refused_naming_the_field(store_template, tmp_path, field, edit):
    folder = tmp_path / "feats"
    shutil.copytree(store_template, folder)
    FeatureStore.open(folder)  # the template is sound
    path = folder / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()), folder)))
    with pytest.raises(FeatureStoreError) as e:
        FeatureStore.open(folder)
    assert field in str(e.value) and "xtract" in str(e.value)  # names the field and the fix


@pytest.mark.slow
def test_a_sound_store_has_a_manifest_checksum(store_template):
    m = json.loads((store_template / "manifest.json").read_text())
    assert m["format_version"] == 2 and m["manifest_sha256"] == manifest_checksum(m)
    assert len(FeatureStore.open(store_template)) == 10


# ---- item 11: non-finite vectors are refused where they enter ------------------------------

BAD_VALUES = {"nan": math.nan, "inf": math.inf, "neg_inf": -math.inf}


def _with(value: float) -> torch.Tensor:
    x = vectors()
    x[7, 3] = value
    return x


NONFINITE_CASES = [
    (f"{where}_{name}", f"{where}: row 7 holds {name}", "`NonFiniteError` naming row 7", where, v)
    for where in ("add", "build_flat", "build_ivf", "build_store_flat", "build_store_ivf")
    for name, v in BAD_VALUES.items()
]


def _store_of(folder: Path, x: torch.Tensor, shard_size: int = 4) -> FeatureStore:
    """A store of ``x`` written by hand (extract_features refuses non-finite features)."""
    from smi_hub.feature_store import StoreWriter

    writer = StoreWriter(folder, "synthetic", {"model": "synthetic"}, shard_size)
    writer.prepare()
    for k in range(-(-len(x) // shard_size)):
        rows = list(range(k * shard_size, min(len(x), (k + 1) * shard_size)))
        writer.write_shard(k, x[rows], rows, [], rows, [])
    return writer.finish(len(x))


@pytest.mark.parametrize(
    "where,value", [c[3:] for c in NONFINITE_CASES], ids=[c[0] for c in NONFINITE_CASES]
)
def test_non_finite_vectors_are_refused_on_entry(where, value, tmp_path):
    x = _with(value)
    with pytest.raises(NonFiniteError, match="rows 7"):
        if where == "add":
            EmbeddingIndex().add(x)
        elif where.startswith("build_store"):
            store = _store_of(tmp_path / "s", x.repeat(40, 1), shard_size=300)
            EmbeddingIndex.build(store, kind=where.split("_")[2], queries=0)
        else:
            EmbeddingIndex.build(x.repeat(40, 1), kind=where.split("_")[1], queries=0)


QUERY_CASES = [
    (f"query_{name}_{backend}", f"search query holding {name} ({backend} backend)",
     "`NonFiniteError` naming the query row", backend, v)
    for backend in ("torch", "faiss")
    for name, v in {**BAD_VALUES, "zero": 0.0}.items()
]  # fmt: skip


@pytest.mark.parametrize(
    "backend,value", [c[3:] for c in QUERY_CASES], ids=[c[0] for c in QUERY_CASES]
)
def test_non_finite_or_zero_queries_are_refused(backend, value):
    index = EmbeddingIndex(backend=backend).add(vectors())
    q = vectors(3, seed=1)
    q[1] = value if value == 0 else q[1]
    q[1, 0] = value
    with pytest.raises(NonFiniteError, match="rows 1"):
        index.search(q, k=3)


def test_torch_and_faiss_backends_agree_on_what_gets_in():
    x, q = vectors(200, 16), vectors(20, 16, seed=5)
    a = EmbeddingIndex(backend="torch").add(x).search(q, k=5)
    b = EmbeddingIndex(backend="faiss").add(x).search(q, k=5)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.scores, b.scores)


def test_a_saved_index_with_nan_rows_is_refused_on_load(flat_index):
    from safetensors.torch import load_file, save_file

    path = flat_index / "embeddings.safetensors"
    emb = load_file(str(path))["embeddings"]
    emb[2] = math.nan
    save_file({"embeddings": emb}, str(path))
    info = json.loads((flat_index / "index.json").read_text())
    info["files"]["embeddings.safetensors"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (flat_index / "index.json").write_text(json.dumps(info))
    with pytest.raises(NonFiniteError, match="rows 2"):
        EmbeddingIndex.load(flat_index)


@pytest.mark.slow
def test_extract_with_a_nan_weight_names_the_tensor(tmp_path, capsys):
    model = tiny()
    with torch.no_grad():
        model.layer2[0].conv1.weight[0, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"layer2\.0\.conv1\.weight"):
        smi_hub.extract_features(model, torch.rand(4, 3, 28, 28), progress=False)
    with pytest.warns(RuntimeWarning):  # the loader's warning comes first
        folder = smi_hub.save_weights_folder(model, tmp_path / "w")
        gallery = smi_hub.default_gallery(tmp_path / "g", per_class=1)
        assert main(["index", str(gallery), "-o", str(tmp_path / "i"), "--model", str(folder)]) == 1
    assert "layer2.0.conv1.weight" in capsys.readouterr().err
    assert not (tmp_path / "i").exists()


@pytest.mark.slow
def test_extract_of_nan_input_tensors_names_the_input():
    x = torch.rand(4, 3, 28, 28)
    x[2, 0, 0, 0] = math.nan
    with pytest.raises(NonFiniteError, match="input tensors hold NaN"):
        smi_hub.extract_features(tiny(), x, progress=False)


# ---- item 10: text from files is escaped when printed ------------------------------------

PRINTABLE_CASES = [
    ("escape_csi", "class name `\\x1b[2J\\x1b[31mred`", "printed as `\\x1b[2J\\x1b[31mred`", "\x1b[2J\x1b[31mred"),
    ("escape_osc_title", "`\\x1b]0;pwned\\x07` (sets the window title)", "escaped", "\x1b]0;pwned\x07"),
    ("carriage_return", "`ok\\rspoofed`", "escaped", "ok\rspoofed"),
    ("newline", "`a\\nb` (forges an output line)", "escaped", "a\nb"),
    ("backspace", "`abc\\x08\\x08x`", "escaped", "abc\x08\x08x"),
    ("delete", "`a\\x7f`", "escaped", "a\x7f"),
    ("c1_csi", "`\\x9b31m` (8-bit CSI)", "escaped", "\x9b31m"),
    ("bidi_override", "`\\u202egnp.exe` (right-to-left override)", "escaped", "\u202egnp.exe"),
]  # fmt: skip


@pytest.mark.parametrize(
    "text", [c[3] for c in PRINTABLE_CASES], ids=[c[0] for c in PRINTABLE_CASES]
)
def test_printable_escapes_control_characters(text):
    shown = printable(text)
    assert shown.isprintable() and "\\" in shown
    assert printable("Ankle boot é 猫") == "Ankle boot é 猫"  # ordinary text is untouched


@pytest.mark.slow
def test_predict_and_search_print_class_names_escaped(tmp_path, capsys):
    evil = "\x1b[2J\x1b[31mred"
    model = tiny()
    model.reset_classifier(2, class_names=[evil, "b\rx"])
    folder = smi_hub.save_weights_folder(model, tmp_path / "w")
    Image.new("L", (28, 28), 128).save(tmp_path / "q.png")
    assert main(["predict", str(folder), str(tmp_path / "q.png")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\\x1b[2J\\x1b[31mred" in out
    index = EmbeddingIndex(metadata={"model": str(folder)})
    index.add(smi_hub.extract_features(model, [tmp_path / "q.png"], progress=False).features,
              labels=[evil])  # fmt: skip
    index.save(tmp_path / "idx")
    assert main(["search", str(tmp_path / "idx"), str(tmp_path / "q.png"), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[31mred" in out


# ---- item 12 and the long tail: fine-tuning ----------------------------------------------

FINETUNE_ARG_CASES = [
    ("ft_checkpoint_every_steps_0", ["--checkpoint-every-steps", "0"], "--checkpoint-every-steps"),
    ("ft_hflip_prob_5", ["--hflip-prob", "5"], "--hflip-prob"),
    ("ft_hflip_prob_nan", ["--hflip-prob", "nan"], "--hflip-prob"),
    ("ft_label_smoothing_2", ["--label-smoothing", "2"], "--label-smoothing"),
    ("ft_label_smoothing_1", ["--label-smoothing", "1"], "--label-smoothing"),
    ("ft_label_smoothing_negative", ["--label-smoothing", "-0.1"], "--label-smoothing"),
    ("ft_num_workers_negative", ["--num-workers", "-1"], "--num-workers"),
    ("ft_weight_decay_negative", ["--weight-decay", "-0.0001"], "--weight-decay"),
    ("ft_weight_decay_inf", ["--weight-decay", "inf"], "--weight-decay"),
    ("ft_warmup_negative", ["--warmup-steps", "-5"], "--warmup-steps"),
    ("ft_crop_scale_zero", ["--crop-scale", "0", "0"], "--crop-scale"),
    ("ft_crop_scale_reversed", ["--crop-scale", "0.9", "0.2"], "--crop-scale"),
    ("ft_crop_scale_above_one", ["--crop-scale", "0.5", "1.5"], "--crop-scale"),
    ("ft_lr_zero", ["--lr", "0"], "--lr"),
    ("ft_lr_nan", ["--lr", "nan"], "--lr"),
    ("ft_backbone_lr_negative", ["--backbone-lr", "-0.1"], "--backbone-lr"),
    ("ft_layer_decay_zero", ["--layer-decay", "0"], "--layer-decay"),
    ("ft_epochs_zero", ["--epochs", "0"], "--epochs"),
    ("ft_batch_size_zero", ["--batch-size", "0"], "--batch-size"),
    ("ft_max_steps_zero", ["--max-steps", "0"], "--max-steps"),
    ("ft_train_subset_zero", ["--train-subset", "0"], "--train-subset"),
    ("ft_labels_per_class_zero", ["--labels-per-class", "0"], "--labels-per-class"),
    ("ft_seed_negative", ["--seed", "-1"], "--seed"),
    ("ft_device_tpu", ["--device", "tpu"], "--device"),
    ("ft_device_cuda_without_gpu", ["--device", "cuda"], "no CUDA GPU"),
]


@pytest.mark.parametrize(
    "argv,message", [c[1:] for c in FINETUNE_ARG_CASES], ids=[c[0] for c in FINETUNE_ARG_CASES]
)
def test_finetune_settings_are_refused_before_any_work(
    tmp_path, capsys, monkeypatch, argv, message
):
    from training import finetune as ft
    from training import finetune_loop

    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setattr(finetune_loop, "build_source", lambda *a, **k: pytest.fail("work started"))
    out = tmp_path / "out"
    assert ft.main(["--out", str(out), "--no-progress", *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def _folder(root: Path, classes: dict[str, int], test: bool = True) -> Path:
    images = np.random.default_rng(0).integers(0, 255, (64, 28, 28), dtype=np.uint8)
    for split in ("train", "test") if test else ("train",):
        for c, n in classes.items():
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(images[i]).save(root / split / c / f"{i}.png")
    return root


FINETUNE_DATA_CASES = [
    ("ft_no_test_folder", "ImageFolder with train/ only, default --test-split test",
     "`FinetuneError` 'no test/ folder ... --test-split none'; nothing trained or written",
     {"a": 3, "b": 3}, False, None, "has no test/ folder"),
    ("ft_one_class", "ImageFolder with one class folder",
     "`FinetuneError` 'a classifier needs at least 2'", {"a": 4}, True, None, "at least 2"),
    ("ft_empty_class_folder", "ImageFolder with an empty class folder `c/`",
     "`FinetuneError` naming the class with no image", {"a": 3, "b": 3, "c": 0}, True, None,
     "['c'] have no image"),
    ("ft_out_inside_data", "`--out DATA/train/run`",
     "`FinetuneError` '--out ... lies inside --data-path'", {"a": 3, "b": 3}, True,
     "train/run", "lies inside --data-path"),
]  # fmt: skip


@pytest.mark.parametrize(
    "classes,test,out_in,message", [c[3:] for c in FINETUNE_DATA_CASES],
    ids=[c[0] for c in FINETUNE_DATA_CASES],
)  # fmt: skip
def test_finetune_refuses_unusable_data(tmp_path, monkeypatch, classes, test, out_in, message):
    from training import finetune as ft
    from training import finetune_loop
    from training.finetune_data import FinetuneConfig, FinetuneError

    monkeypatch.setattr(finetune_loop, "build_model", lambda *a, **k: pytest.fail("work started"))
    data = _folder(tmp_path / "data", classes, test)
    out = data / out_in if out_in else tmp_path / "out"
    cfg = FinetuneConfig(out=str(out), data="imagefolder", data_path=str(data), progress=False)
    with pytest.raises(FinetuneError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ft.finetune(cfg)
    assert not out.exists()


def test_finetune_on_a_datasets_row_without_label_names_the_row(tmp_path, capsys):
    """Long tail: a ``datasets`` row whose label is None (was a raw TypeError from int())."""
    import datasets

    from training import finetune as ft

    images = [Image.new("RGB", (28, 28), (i * 40, 0, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0, 1, None, 1]})
    ds = ds.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "ds"))
    argv = ["--data", "hf", "--data-path", str(tmp_path / "ds"), "--out", str(tmp_path / "o")]
    assert ft.main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "1 row(s) have no 'label' (None; first: row 2)" in err and "Traceback" not in err


# ---- the long tail: smi-hub arguments checked while parsing, before any work ---------------

CLI_ARG_CASES = [
    ("index_nprobe_zero", ["index", "F", "-o", "O", "--nprobe", "0"], "--nprobe"),
    ("index_nprobe_negative", ["index", "F", "-o", "O", "--nprobe", "-4"], "--nprobe"),
    ("index_nprobe_text", ["index", "F", "-o", "O", "--nprobe", "many"], "--nprobe"),
    ("index_ef_search_zero", ["index", "F", "-o", "O", "--ef-search", "0"], "--ef-search"),
    ("index_ef_search_float", ["index", "F", "-o", "O", "--ef-search", "1.5"], "--ef-search"),
    ("index_target_recall_5", ["index", "F", "-o", "O", "--target-recall", "5"], "--target-recall"),
    ("index_target_recall_nan", ["index", "F", "-o", "O", "--target-recall", "nan"], "--target-recall"),
    ("index_target_recall_negative", ["index", "F", "-o", "O", "--target-recall", "-0.5"], "--target-recall"),
    ("index_target_recall_inf", ["index", "F", "-o", "O", "--target-recall", "inf"], "--target-recall"),
    ("index_memory_budget_banana", ["index", "F", "-o", "O", "--memory-budget", "banana"], "--memory-budget"),
    ("index_memory_budget_zero", ["index", "F", "-o", "O", "--memory-budget", "0"], "--memory-budget"),
    ("index_memory_budget_negative", ["index", "F", "-o", "O", "--memory-budget", "-2GB"], "--memory-budget"),
    ("search_nprobe_zero", ["search", "I", "q.png", "--nprobe", "0"], "--nprobe"),
    ("search_ef_search_negative", ["search", "I", "q.png", "--ef-search", "-3"], "--ef-search"),
    ("extract_shard_size_zero", ["extract", "F", "-o", "O", "--shard-size", "0"], "--shard-size"),
    ("extract_batch_size_nan", ["extract", "F", "-o", "O", "--batch-size", "nan"], "--batch-size"),
    ("extract_workers_negative", ["extract", "F", "-o", "O", "--workers", "-1"], "--workers"),
]  # fmt: skip


@pytest.mark.parametrize(
    "argv,flag", [c[1:] for c in CLI_ARG_CASES], ids=[c[0] for c in CLI_ARG_CASES]
)
def test_cli_arguments_are_refused_while_parsing(capsys, monkeypatch, argv, flag):
    import smi_hub.features

    monkeypatch.setattr(smi_hub.features, "extract_features", lambda *a, **k: pytest.fail("work"))
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and "Traceback" not in err


LIBRARY_ARG_CASES = [
    ("lib_nprobe_zero", "`EmbeddingIndex(nprobe=0)`", lambda: EmbeddingIndex(nprobe=0), "nprobe"),
    ("lib_ef_search_float", "`EmbeddingIndex(ef_search=2.5)`", lambda: EmbeddingIndex(ef_search=2.5), "ef_search"),
    ("lib_search_nprobe_negative", "`index.search(q, nprobe=-1)`",
     lambda: EmbeddingIndex().add(vectors()).search(vectors(1), nprobe=-1), "nprobe"),
    ("lib_target_recall_5", "`EmbeddingIndex.build(x, target_recall=5)`",
     lambda: EmbeddingIndex.build(vectors(), target_recall=5), "target_recall"),
    ("lib_target_recall_nan", "`EmbeddingIndex.build(x, target_recall=nan)`",
     lambda: EmbeddingIndex.build(vectors(), target_recall=math.nan), "target_recall"),
    ("lib_queries_negative", "`EmbeddingIndex.build(x, queries=-1)`",
     lambda: EmbeddingIndex.build(vectors(), queries=-1), "queries"),
    ("lib_chunk_size_zero", "`EmbeddingIndex.build(x, chunk_size=0)`",
     lambda: EmbeddingIndex.build(vectors(), chunk_size=0), "chunk_size"),
    ("lib_memory_budget_zero", "`EmbeddingIndex(memory_budget=0)`",
     lambda: EmbeddingIndex(memory_budget=0), "memory_budget"),
    ("lib_memory_budget_zero_text", "`EmbeddingIndex(memory_budget='0GB')`",
     lambda: EmbeddingIndex(memory_budget="0GB"), "no memory"),
]  # fmt: skip


@pytest.mark.parametrize(
    "call,message", [c[2:] for c in LIBRARY_ARG_CASES], ids=[c[0] for c in LIBRARY_ARG_CASES]
)
def test_library_arguments_are_range_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- docs/reliability.md rows ------------------------------------------------------------


def _plain(c: tuple) -> tuple[str, str, str]:
    return c[0], c[1], c[2] if c[2].startswith("`") else f"`SMIHubError` naming {c[2]!r}"


def _store(c: tuple) -> tuple[str, str, str]:
    return c[0], c[1], f"`FeatureStoreError` naming {c[2]!r} and the fix (extract again)"


def _ft_arg(c: tuple) -> tuple[str, str, str]:
    return (
        c[0],
        f"`python -m training.finetune {' '.join(c[1])}`",
        (f"exit 2, 'Error: ...' naming {c[2]!r} and the allowed range; no data read, no --out"),
    )


def _cli_arg(c: tuple) -> tuple[str, str, str]:
    return (
        c[0],
        f"`smi-hub {' '.join(c[1])}`",
        (f"exit 2 from argparse 'argument {c[2]}: ...' with the allowed range; nothing computed"),
    )


def _lib_arg(c: tuple) -> tuple[str, str, str]:
    return c[0], c[1], f"`ValueError` naming {c[3]!r} and the allowed range"


TABLES = {
    "Integrity: export verifies the checkpoint": (
        EXPORT_CASES, "test_export_verifies_the_checkpoint_as_resume_does", _plain),
    "Integrity: index.json": (
        INDEX_CASES, "test_malformed_index_json_is_refused_with_the_field", _plain),
    "Integrity: feature store manifest": (
        STORE_CASES, "test_tampered_manifest_is_refused_naming_the_field", _store),
    "Non-finite values: vectors entering an index": (
        NONFINITE_CASES, "test_non_finite_vectors_are_refused_on_entry", _plain),
    "Non-finite values: queries": (
        QUERY_CASES, "test_non_finite_or_zero_queries_are_refused", _plain),
    "Escaped output": (
        PRINTABLE_CASES, "test_printable_escapes_control_characters", _plain),
    "Fine-tuning settings": (
        FINETUNE_ARG_CASES, "test_finetune_settings_are_refused_before_any_work", _ft_arg),
    "Fine-tuning data": (FINETUNE_DATA_CASES, "test_finetune_refuses_unusable_data", _plain),
    "smi-hub arguments": (
        CLI_ARG_CASES, "test_cli_arguments_are_refused_while_parsing", _cli_arg),
    "Library arguments": (
        LIBRARY_ARG_CASES, "test_library_arguments_are_range_checked", _lib_arg),
}  # fmt: skip

if __name__ == "__main__":
    rows = 0
    for title, (cases, test, row) in TABLES.items():
        print(f"\n### {title}\n\n| case | input | outcome | test |\n|---|---|---|---|")
        for c in cases:
            case, given, outcome = row(c)
            print(f"| `{case}` | {given} | {outcome} | `test_reliability_round3.py::{test}` |")
            rows += 1
    print(f"\n{rows} rows", file=sys.stderr)
