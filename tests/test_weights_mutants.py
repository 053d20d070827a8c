"""smi_hub.weights: what its mutation run (docs/testing.md) found untested: the exact error
and warning texts, the inclusive ranges of config.json fields, the defaults, and the layout of
the files written."""

from __future__ import annotations

import hashlib
import json
import sys
import types
import warnings
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import smi_hub
import smi_hub.models as models_module
import smi_hub.weights as weights_module
from smi_hub.errors import ChecksumError, DownloadError, UnsupportedFormatError, WeightsError
from smi_hub.fileio import sha256_file
from smi_hub.models import build_model_from_config, load_weights_folder
from smi_hub.schema import ARCHS, validate_config
from smi_hub.weights import (
    UnverifiedWeightsWarning,
    read_config,
    resolve_hf_folder,
    timm_architecture,
)

# mutmut runs each function of a mutated module through a wrapper (more frames between a
# warning and its caller): there the warnings' stacklevel is checked through a spy instead.
# The warnings come from load_weights_folder (smi_hub/models.py) and check_tensors (weights.py)
UNDER_MUTMUT = any(
    f.__code__.co_filename != module.__file__
    for f, module in (
        (load_weights_folder, models_module),
        (weights_module.check_tensors, weights_module),
    )
)
FIX = (
    ". Fix these fields or re-export the weights folder (smi-hub export / "
    "SMIModel.save_pretrained)."
)


@pytest.fixture(autouse=True)
def _online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    m = smi_hub.SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8])
    return smi_hub.save_weights_folder(m.eval(), tmp_path_factory.mktemp("w") / "tiny")


@pytest.fixture
def folder(saved, tmp_path) -> Path:
    out = tmp_path / "weights"
    out.mkdir()
    for f in saved.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def edit_config(folder: Path, **changes) -> dict:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))
    return cfg


# ---- config.json fields: inclusive ranges and exact messages -----------------------------------

EDGES = {  # field: (values accepted at the edges, values refused just past them)
    "base_width": ([1, 256], [0, 257]),
    "image_size": ([8, 4096], [7, 4097]),
    "mean": ([[-10.0, 0, 10.0], [10, 10, -10]], [[-10.001, 0, 0], [0, 0, 10.001]]),
    "std": ([[1e-9, 1, 10.0], [10, 10, 10]], [[0.0, 1, 1], [1, 1, 10.001]]),
    "projector_dims": ([[], [1, 65536], [8] * 8], [[0], [65537], [8] * 9]),
    "num_classes": ([0, 100_000], [-1, 100_001]),
}


@pytest.mark.parametrize("key", list(EDGES))
def test_config_ranges_are_inclusive(key):
    ok, bad = EDGES[key]
    for value in ok:
        validate_config({"arch": "resnet18", key: value})
    for value in bad:
        with pytest.raises(WeightsError, match=f"{key} = "):
            validate_config({"arch": "resnet18", key: value})


def test_class_names_up_to_the_class_limit():
    validate_config({"arch": "resnet18", "class_names": ["a"] * 100_000})
    validate_config({"arch": "resnet18", "class_names": ("a", "b"), "num_classes": None})
    with pytest.raises(WeightsError, match="class_names = "):
        validate_config({"arch": "resnet18", "class_names": ["a"] * 100_001})


def test_every_bad_field_is_named_with_its_range():
    config = {
        "arch": "resnet1000",
        "base_width": 0,
        "small_stem": "yes",
        "image_size": 4097,
        "mean": [0.5, 0.5],
        "std": [0.0, 1.0, 1.0],
        "projector_dims": [0],
        "num_classes": -1,
        "class_names": [1, 2],
        "weights_sha256": "ABC",
    }
    with pytest.raises(WeightsError) as e:
        validate_config(config, source="cfg.json")
    assert str(e.value) == (
        "cfg.json has invalid values: "
        f"arch = 'resnet1000': must be one of {sorted(ARCHS)}; "
        "base_width = 0: must be an integer from 1 to 256; "
        "small_stem = 'yes': must be true or false; "
        "image_size = 4097: must be an integer from 8 to 4,096; "
        "mean = [0.5, 0.5]: must be 3 finite numbers (one per RGB channel), each >= -10.0 "
        "and <= 10.0; "
        "std = [0.0, 1.0, 1.0]: must be 3 finite numbers (one per RGB channel), each > 0.0 "
        "and <= 10.0; "
        "projector_dims = [0]: must be a list of at most 8 integers from 1 to 65,536 "
        "(empty: no projector); "
        "num_classes = -1: must be an integer from 0 to 100,000; "
        "class_names = [1, 2]: must be a list of at most 100,000 strings; "
        "weights_sha256 = 'ABC': must be 64 lowercase hex digits" + FIX
    )


def test_validate_config_names_config_json_by_default():
    with pytest.raises(WeightsError) as e:
        validate_config({"arch": "resnet18", "base_width": 300})
    assert str(e.value) == (
        "config.json has invalid values: base_width = 300: must be an integer from 1 to 256" + FIX
    )
    with pytest.raises(WeightsError) as e:  # build_model_from_config validates first
        build_model_from_config({"arch": "resnet18", "image_size": 2})
    assert str(e.value).startswith("config.json has invalid values: image_size = 2: ")


def test_long_class_names_are_shown_cut_to_80_characters():
    names = [str(i) for i in range(100)]  # numbers as strings are fine; ints are not
    bad = list(range(100))
    with pytest.raises(WeightsError) as e:
        validate_config({"arch": "resnet18", "class_names": bad})
    shown = str(bad)[:80]
    assert f"class_names = {shown}: must be" in str(e.value)
    validate_config({"arch": "resnet18", "class_names": names})


def test_absent_optional_fields_are_not_checked():
    validate_config({"arch": "resnet18"})
    validate_config({"arch": "resnet18", "num_classes": None, "class_names": None})
    validate_config({"arch": "resnet18", "weights_sha256": None})
    validate_config({"arch": "resnet18", "weights_sha256": "0123456789abcdef" * 4})


def test_an_architecture_the_model_refuses_is_a_weights_error(monkeypatch):
    def refuse(self, **kwargs):
        raise TypeError("unexpected keyword 'x'")

    monkeypatch.setattr(smi_hub.SMIModel, "__init__", refuse)
    with pytest.raises(WeightsError) as e:
        build_model_from_config({"arch": "resnet18"})
    assert str(e.value) == "config.json describes an invalid architecture: unexpected keyword 'x'"


# ---- read_config ---------------------------------------------------------------------------


def test_read_config_messages(tmp_path):
    path = tmp_path / "config.json"
    with pytest.raises(WeightsError) as e:
        read_config(tmp_path)
    assert str(e.value) == (
        f"{path} not found: a weights folder needs config.json next to model.safetensors. "
        "Create one with `smi-hub export CHECKPOINT OUT_DIR` or SMIModel.save_pretrained()."
    )
    path.write_text("{oops")
    try:
        json.loads("{oops")
    except json.JSONDecodeError as err:
        parse_error = str(err)
    with pytest.raises(WeightsError) as e:
        read_config(tmp_path)
    assert (
        str(e.value) == f"{path} is not valid JSON ({parse_error}); re-export the weights folder."
    )
    path.write_text("[1]")
    with pytest.raises(WeightsError) as e:
        read_config(tmp_path)
    assert str(e.value) == f"{path} must hold a JSON object, got list."
    path.write_text(json.dumps({"arch": "resnet18", "format_version": 2}))
    with pytest.raises(UnsupportedFormatError) as e:
        read_config(tmp_path)
    assert str(e.value) == (
        f"{path} has format_version 2 but this smi-hub reads up to 1; upgrade with "
        "`pip install -U smi-hub`."
    )
    path.write_text(json.dumps({"base_width": 4}))
    with pytest.raises(WeightsError) as e:
        read_config(tmp_path)
    assert str(e.value) == (f"{path} lacks the architecture keys ['arch']; re-export the folder.")
    path.write_text(json.dumps({"arch": "resnet18", "base_width": 0}))
    with pytest.raises(WeightsError) as e:
        read_config(tmp_path)
    assert str(e.value).startswith(f"{path} has invalid values: base_width = 0")


def test_read_config_versions(tmp_path):
    path = tmp_path / "config.json"
    for version in (None, 0, 1):  # absent: the current version
        cfg = {"arch": "resnet18"} | ({} if version is None else {"format_version": version})
        path.write_text(json.dumps(cfg))
        assert read_config(tmp_path) == cfg


# ---- load_weights_folder -------------------------------------------------------------------


def test_load_messages(folder, tmp_path):
    with pytest.raises(WeightsError) as e:
        load_weights_folder(tmp_path / "nowhere")
    assert str(e.value) == (
        f"Weights folder {tmp_path / 'nowhere'} does not exist or is not a directory."
    )
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:100])
    got = hashlib.sha256(data[:100]).hexdigest()
    want = hashlib.sha256(data).hexdigest()
    with pytest.raises(ChecksumError) as e:
        load_weights_folder(folder)
    assert str(e.value) == (
        f"sha256 of {weights} is {got}, expected {want}: the file is corrupt, truncated or was "
        "modified. Download or export it again."
    )
    edit_config(folder, weights_sha256=got)  # a consistent but unreadable file
    with pytest.raises(WeightsError) as e:
        load_weights_folder(folder)
    msg = str(e.value)
    assert msg.startswith(f"{weights} is not a readable safetensors file (")
    assert msg.endswith("); it may be truncated or corrupt. Download or export it again.")
    weights.unlink()
    with pytest.raises(WeightsError) as e:
        load_weights_folder(folder)
    assert str(e.value) == (
        f"{weights} not found. Weights must be a safetensors file named model.safetensors; "
        "pickled .pt/.bin files are not loaded (they can run arbitrary code)."
    )


def test_expected_sha256_overrides_the_recorded_one(folder):
    weights = folder / "model.safetensors"
    digest = sha256_file(weights)
    with pytest.raises(ChecksumError, match=f"expected {'1' * 64}:"):
        load_weights_folder(folder, expected_sha256="1" * 64)
    edit_config(folder, weights_sha256="2" * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_weights_folder(folder, expected_sha256=digest)
    assert not model.training and model.weights_config["weights_sha256"] == "2" * 64


def test_load_returns_eval_model_on_the_asked_device(folder):
    model = load_weights_folder(folder, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert not model.training
    model = load_weights_folder(folder)
    assert {p.device.type for p in model.parameters()} == {"cpu"} and not model.training


def _spy_stacklevels(monkeypatch) -> list[int]:
    """The stacklevel of each warning; warnings still point where they did (one frame up)."""
    levels: list[int] = []
    real = warnings.warn

    def spy(message, category=None, stacklevel=1, **kw):
        levels.append(stacklevel)
        real(message, category, stacklevel + 1, **kw)

    monkeypatch.setattr(warnings, "warn", spy)
    return levels


def test_unverified_warning_text_and_location(folder, monkeypatch):
    edit_config(folder, weights_sha256=None)
    levels = _spy_stacklevels(monkeypatch)
    with pytest.warns(UnverifiedWeightsWarning) as record:
        load_weights_folder(folder)
    (w,) = record.list
    assert levels == [2]  # load_weights_folder's caller
    assert UNDER_MUTMUT or w.filename == __file__
    assert str(w.message) == (
        f"{folder / 'config.json'} records no weights_sha256, so {folder / 'model.safetensors'} "
        "cannot be verified (corruption or tampering would go unnoticed). Re-export the folder "
        "(smi-hub export / SMIModel.save_pretrained always record it) or pass sha256=."
    )


def _rewrite(folder: Path, change) -> Path:
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    change(state)
    save_file(state, str(weights))
    edit_config(folder, weights_sha256=sha256_file(weights))
    return weights


def test_wrong_dtypes_listed_five_then_counted(folder):
    names: list[str] = []

    def to_int(state):
        names.extend(sorted(k for k, v in state.items() if v.is_floating_point())[:6])
        for k in names:
            state[k] = state[k].to(torch.int16)

    weights = _rewrite(folder, to_int)
    with pytest.raises(WeightsError) as e:
        load_weights_folder(folder)
    shown = ", ".join(f"{k}: torch.int16 (expected torch.float32)" for k in names[:5])
    assert str(e.value) == (
        f"{weights} holds tensors of the wrong dtype: {shown} (+1 more). Weights must be "
        "floating point (quantized or integer files are not supported); re-export them from a "
        "checkpoint."
    )


def test_exactly_five_wrong_dtypes_have_no_count(folder):
    def to_int(state):
        for k in sorted(k for k, v in state.items() if v.is_floating_point())[:5]:
            state[k] = state[k].to(torch.int16)

    _rewrite(folder, to_int)
    with pytest.raises(WeightsError, match=r"\(expected torch\.float32\)\. Weights must"):
        load_weights_folder(folder)


def test_non_finite_listed_five_then_counted_at_the_callers_line(folder, monkeypatch):
    names: list[str] = []

    def poison(state):
        names.extend(sorted(k for k, v in state.items() if v.is_floating_point())[:6])
        for k in names:
            state[k] = torch.full_like(state[k], float("nan"))

    weights = _rewrite(folder, poison)
    levels = _spy_stacklevels(monkeypatch)
    with pytest.warns(RuntimeWarning) as record:
        load_weights_folder(folder)
    (w,) = record.list
    assert levels == [3]  # check_tensors -> load_weights_folder -> its caller
    assert UNDER_MUTMUT or w.filename == __file__
    assert str(w.message) == (
        f"{weights} holds NaN or infinite values in 6 tensor(s): {', '.join(names[:5])} "
        "(+1 more). The model will produce NaN features; the weights are probably from a "
        "diverged run."
    )


def test_integer_buffers_are_not_reported_as_non_finite(folder):
    """num_batches_tracked is an integer tensor: neither wrong nor non-finite."""
    assert any(
        not v.is_floating_point() for v in load_file(str(folder / "model.safetensors")).values()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_weights_folder(folder)


def test_missing_and_extra_tensors_reach_the_strict_check(folder):
    def rename(state):
        state["extra.weight"] = state.pop("conv1.weight")

    _rewrite(folder, rename)
    with pytest.raises(WeightsError, match=r"missing 1 tensors: conv1\.weight"):
        load_weights_folder(folder)


# ---- resolve_hf_folder: the full texts -------------------------------------------------------

PRE = (
    "pre-download it with `hf download o/m` (`huggingface-cli download o/m` with "
    "huggingface_hub < 0.34) on a machine that is online"
)


def _raising(monkeypatch, exc: BaseException) -> None:
    import huggingface_hub

    def fake(**kw):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)


def _http_error(cls, status: int):
    import importlib

    from huggingface_hub import errors as hf_errors

    client = importlib.import_module(hf_errors.HTTPError.__module__.split(".")[0])
    url = "https://huggingface.co/api/models/o/m"
    response = client.Response(status, request=client.Request("GET", url))
    return cls(f"{status} boom", response=response)


def _message(monkeypatch, exc: BaseException, error=WeightsError, **kw) -> str:
    _raising(monkeypatch, exc)
    with pytest.raises(error) as e:
        resolve_hf_folder("o/m", **kw)
    assert e.value.__cause__ is exc
    return str(e.value)


def test_hf_not_cached_messages(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    exc = LocalEntryNotFoundError("not cached")
    head = (
        "'o/m' is not in the Hugging Face cache and downloading is off (HF_HUB_OFFLINE=1 or "
        "local_files_only=True). To fix it, "
    )
    tail = f" to download it, or {PRE}; or point to a local weights folder."
    only = _message(monkeypatch, exc, local_files_only=True)
    assert only == head + "pass local_files_only=False" + tail
    unset = "unset HF_HUB_OFFLINE (or set HF_HUB_OFFLINE=0)"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert _message(monkeypatch, exc) == head + unset + tail
    assert _message(monkeypatch, exc, local_files_only=True) == head + unset + tail
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert _message(monkeypatch, exc, DownloadError) == (
        "Could not reach the Hugging Face Hub to download 'o/m', and it is not in the local "
        "cache (not cached). Check the network connection (and HF_ENDPOINT / proxy settings) "
        f"and retry, or {PRE}."
    )


def test_hf_error_messages(monkeypatch):
    from huggingface_hub import errors as hf_errors

    with pytest.raises(WeightsError) as e:
        resolve_hf_folder("not a//repo id")
    assert str(e.value).startswith(
        "'not a//repo id' is neither an existing folder nor a valid Hugging Face repo id "
        "('owner/name'): "
    )
    gated = _http_error(hf_errors.GatedRepoError, 403)
    assert _message(monkeypatch, gated) == (
        "The Hugging Face repo 'o/m' is gated: request access at https://huggingface.co/o/m, "
        "then log in (`hf auth login` or HF_TOKEN) or pass token=."
    )
    missing = _http_error(hf_errors.RepositoryNotFoundError, 401)
    assert _message(monkeypatch, missing) == (
        "No Hugging Face model repo 'o/m' could be found: check the id ('owner/name') for "
        "typos; if the repo is private, log in (`hf auth login` or HF_TOKEN) or pass token=. "
        "Or pass a local weights folder."
    )
    revision = _http_error(hf_errors.RevisionNotFoundError, 404)
    assert _message(monkeypatch, revision, revision="v9") == (
        "The Hugging Face repo 'o/m' has no revision 'v9' (branch, tag or commit); check it, "
        "or leave revision unset for the main branch."
    )
    entry = _http_error(hf_errors.RemoteEntryNotFoundError, 404)
    assert _message(monkeypatch, entry) == (
        "The Hugging Face repo 'o/m' lacks a file of the smi-hub weights folder (config.json, "
        f"model.safetensors): {entry}. Re-upload it with smi-hub export / push_to_hub."
    )
    http = _http_error(hf_errors.HfHubHTTPError, 503)
    assert _message(monkeypatch, http, DownloadError) == (
        f"Downloading 'o/m' from the Hugging Face Hub failed: {http}. Retry later; if it "
        f"persists, {PRE}."
    )
    refused = ConnectionError("refused")
    assert _message(monkeypatch, refused, DownloadError) == (
        "Downloading 'o/m' from the Hugging Face Hub failed: network error (ConnectionError: "
        "refused). Check the connection (and HF_ENDPOINT / proxy settings) and retry, or "
        f"{PRE}."
    )


# ---- what save_weights_folder writes ---------------------------------------------------------


def test_timm_architecture_only_for_the_standard_layout():
    assert timm_architecture({"arch": "resnet50"}) == "resnet50"  # width 64, ImageNet stem
    assert timm_architecture({"arch": "resnet18", "base_width": 64, "small_stem": False}) == (
        "resnet18"
    )
    assert timm_architecture({"arch": "resnet18", "base_width": 32}) is None
    assert timm_architecture({"arch": "resnet18", "small_stem": True}) is None


def _json(value):
    return json.loads(json.dumps(value))


@pytest.mark.parametrize("with_projector", [True, False])
def test_saved_config_and_file_contents(tmp_path, with_projector):
    torch.manual_seed(0)
    model = smi_hub.SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8])
    out = smi_hub.save_weights_folder(model, tmp_path / "mine", with_projector=with_projector)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    assert any(k.startswith("projector.") for k in state) == with_projector
    with safe_open(str(weights), "pt") as f:
        assert f.metadata() == {"format": "pt", "smi_hub_format": "1"}
    pretrained = {k: v for k, v in model.pretrained_cfg.items() if k != "weights_sha256"}
    expected = {
        **model.config,
        "projector_dims": [8] if with_projector else [],
        "format_version": 1,
        "library": "smi-hub",
        "num_features": 32,
        "num_params": sum(v.numel() for v in state.values()),
        "weights_sha256": sha256_file(weights),
        "training": {},
        "results": {},
        "pretrained_cfg": pretrained,
    }
    text = (out / "config.json").read_text()
    assert json.loads(text) == _json(expected)
    assert text == json.dumps(json.loads(text), indent=2) + "\n"  # indented, as HF configs are
    assert "\n# mine\n" in (out / "README.md").read_text()  # the folder's name by default


def test_a_model_without_projector_saves_none(tmp_path):
    model = smi_hub.SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[])
    out = smi_hub.save_weights_folder(model, tmp_path / "w", with_projector=True)
    assert json.loads((out / "config.json").read_text())["projector_dims"] == []
    assert load_weights_folder(out).projector is None


def test_provenance_defaults_to_the_loaded_weights(tmp_path):
    model = smi_hub.SMIModel(arch="resnet18", base_width=4, small_stem=True, projector_dims=[8])
    first = smi_hub.save_weights_folder(
        model, tmp_path / "a", training={"epochs": 3}, results={"knn_top1": 50.0}, name="A"
    )
    loaded = load_weights_folder(first)
    assert "weights_sha256" in loaded.pretrained_cfg  # the loaded one, never written back
    again = json.loads(
        (smi_hub.save_weights_folder(loaded, tmp_path / "b") / "config.json").read_text()
    )
    assert again["training"] == {"epochs": 3} and again["results"] == {"knn_top1": 50.0}
    assert "weights_sha256" not in again["pretrained_cfg"]
    explicit = smi_hub.save_weights_folder(loaded, tmp_path / "c", training={}, results={})
    cfg = json.loads((explicit / "config.json").read_text())
    assert cfg["training"] == {} and cfg["results"] == {}
    loaded.weights_config = {"training": None, "results": None}
    cfg = json.loads(
        (smi_hub.save_weights_folder(loaded, tmp_path / "d") / "config.json").read_text()
    )
    assert cfg["training"] == {} and cfg["results"] == {}
    assert "\n# A\n" in (first / "README.md").read_text()


def test_sha256_file_reads_in_chunks(tmp_path):
    data = bytes(range(256)) * 5000  # 1.28 MB: more than one default chunk
    path = tmp_path / "blob"
    path.write_bytes(data)
    want = hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == want and sha256_file(path, chunk_size=1000) == want


# ---- which errors count as network errors, and offline mode ---------------------------------


def _fake_requests() -> types.ModuleType:
    """requests (what huggingface_hub < 1.0 is built on) is not installed here: a stand-in."""
    module = types.ModuleType("requests")
    module.ConnectionError = type("ConnectionError", (OSError,), {})
    module.Timeout = type("Timeout", (OSError,), {})
    return module


@pytest.mark.parametrize("name", ["ConnectionError", "Timeout"])
def test_requests_network_errors_become_download_errors(monkeypatch, name):
    fake = _fake_requests()
    monkeypatch.setitem(sys.modules, "requests", fake)
    exc = getattr(fake, name)("down")
    assert _message(monkeypatch, exc, DownloadError).startswith(
        f"Downloading 'o/m' from the Hugging Face Hub failed: network error ({name}: down)."
    )


def test_a_missing_http_client_does_not_hide_the_others(monkeypatch):
    import httpx

    monkeypatch.setitem(sys.modules, "httpx2", None)  # import httpx2 raises ImportError
    monkeypatch.setitem(sys.modules, "requests", _fake_requests())
    errors = weights_module._network_errors()
    assert httpx.TransportError in errors
    assert sys.modules["requests"].Timeout in errors


def test_offline_mode_without_the_hub_constant(monkeypatch):
    """A huggingface_hub without constants.HF_HUB_OFFLINE: only the variable decides."""
    monkeypatch.delattr(huggingface_hub.constants, "HF_HUB_OFFLINE")
    assert weights_module._hf_offline() is False
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert weights_module._hf_offline() is True


def test_exactly_five_non_finite_have_no_count(folder):
    names: list[str] = []

    def poison(state):
        names.extend(sorted(k for k, v in state.items() if v.is_floating_point())[:5])
        for k in names:
            state[k][...] = float("inf")

    _rewrite(folder, poison)
    with pytest.warns(RuntimeWarning, match=rf"5 tensor\(s\): {', '.join(names)}\. The model"):
        load_weights_folder(folder)
