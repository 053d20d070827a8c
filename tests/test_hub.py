"""Loaders: registry, local folders, Hugging Face cache (offline), URLs; and their errors."""

from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import zipfile
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

import smi_hub
from smi_hub import (
    ChecksumError,
    DownloadError,
    SMIModel,
    UnsupportedFormatError,
    WeightsError,
    WeightsNotPublishedError,
)
from smi_hub.fileio import sha256_file
from smi_hub.hub import entry_info
from smi_hub.registry import REGISTRY, get_entry
from smi_hub.script_modules import load_file_module

REPO = Path(__file__).resolve().parents[1]
FMNIST = {"image_size": 28, "mean": [0.286] * 3, "std": [0.353] * 3}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SMI_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SMI_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HUB_OFFLINE into its constants at import: CI exports it
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def tiny(**kw) -> SMIModel:
    cfg = dict(arch="resnet18", base_width=4, small_stem=True, projector_dims=[16, 8], **FMNIST)
    cfg.update(kw)
    return SMIModel(**cfg).eval()


@pytest.fixture
def folder(tmp_path) -> Path:
    model = tiny()
    with torch.no_grad():  # non-trivial BN statistics, so a wrong load would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return smi_hub.save_weights_folder(model, tmp_path / "w", name="tiny")


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/www; yields (root dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_Quiet, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


# --- registry -----------------------------------------------------------------------------


def test_list_models_and_entries():
    names = smi_hub.list_models()
    assert names[0] == "smi_resnet18_fmnist"
    assert set(names) == {
        "smi_resnet18_fmnist",
        "smi_resnet50_imagenet",
        "barlow_twins_resnet50_imagenet",
        "vicreg_resnet50_imagenet",
    }
    for name in names:
        entry = get_entry(name)
        assert (REPO / entry.recipe).is_file(), entry.recipe
        assert entry.url is None  # nothing invented
        info = entry_info(entry)
        assert info["preprocessing"]["center_crop"] == entry.model_config["image_size"]
        assert info["backbone_params"] > 0
    r50 = entry_info(get_entry("smi_resnet50_imagenet"))
    assert r50["backbone_params"] == sum(
        p.numel() for k, p in _torchvision_r50_state().items() if not k.startswith("fc.")
    )
    with pytest.raises(KeyError, match="known models"):
        get_entry("nope")


def _torchvision_r50_state():
    import torchvision

    with torch.device("meta"):
        return torchvision.models.resnet50().state_dict()


def test_embedded_default_entry_matches_its_folder():
    entry = REGISTRY["smi_resnet18_fmnist"]
    folder = entry.weights_folder
    assert entry.sha256 == sha256_file(folder / "model.safetensors"), (
        "set ModelEntry.sha256 in smi_hub/registry.py to the committed file's sha256"
    )
    cfg = json.loads((folder / "config.json").read_text())
    for key, value in entry.model_config.items():
        assert cfg[key] == value, key
    model = smi_hub.load()
    assert model.config == {k: cfg[k] for k in model.config}


def test_missing_embedded_default_says_how_to_build_it(monkeypatch, tmp_path):
    from smi_hub import registry

    monkeypatch.setattr(registry, "WEIGHTS_ROOT", tmp_path)  # an install without the folder
    with pytest.raises(WeightsNotPublishedError) as e:
        smi_hub.load()
    msg = str(e.value)
    assert "missing" in msg and "training/configs/fmnist_resnet18_smi.yaml" in msg
    assert "smi-hub export" in msg


@pytest.mark.slow
def test_not_published_entries():
    for name in ("smi_resnet50_imagenet", "barlow_twins_resnet50_imagenet"):
        with pytest.raises(WeightsNotPublishedError) as e:
            smi_hub.load(name)
        assert "python -m training.pretrain --config training/configs/imagenet_resnet50_" in str(
            e.value
        )
        assert "smi-hub export" in str(e.value)
    model = smi_hub.load("vicreg_resnet50_imagenet", pretrained=False)
    assert model.arch == "resnet50" and model.num_features == 2048 and not model.training


def test_default_architecture_without_weights():
    model = smi_hub.load(pretrained=False)
    assert model.config["arch"] == "resnet18" and model.config["image_size"] == 28


# --- transforms ---------------------------------------------------------------------------


def test_get_transforms_matches_manual_reference():
    from skimage import data

    model = tiny(image_size=32, mean=[0.4, 0.5, 0.6], std=[0.2, 0.25, 0.3])
    tfm = smi_hub.get_transforms(model)
    gray = Image.fromarray(data.camera())  # 512 x 512 grayscale photo
    x = tfm(gray)
    assert x.shape == (3, 32, 32)
    assert torch.allclose(x[0] * 0.2 + 0.4, x[1] * 0.25 + 0.5, atol=1e-6)  # gray replicated
    ref = gray.convert("RGB").resize((32, 32), Image.BICUBIC)
    ref = torch.from_numpy(np.array(ref)).permute(2, 0, 1).float() / 255
    ref = (ref - torch.tensor([0.4, 0.5, 0.6])[:, None, None]) / torch.tensor([0.2, 0.25, 0.3])[
        :, None, None
    ]
    assert (x - ref).abs().mean() < 0.02  # PIL vs torchvision antialiased bicubic
    rgba = Image.fromarray(data.astronaut()).convert("RGBA")
    assert tfm(rgba).shape == (3, 32, 32)


def test_get_transforms_for_names_and_folders(folder):
    assert smi_hub.get_transforms("smi_resnet50_imagenet").transforms[1].size == 256
    assert smi_hub.get_transforms("smi_resnet18_fmnist").transforms[2].size == (28, 28)
    assert smi_hub.get_transforms(str(folder)).transforms[2].size == (28, 28)
    with pytest.raises(KeyError):
        smi_hub.get_transforms("not-a-model")


# --- local folders and errors -------------------------------------------------------------


def test_load_folder_roundtrip(folder):
    original = tiny()
    loaded = smi_hub.load(folder)
    assert not loaded.training
    assert loaded.config == original.config
    again = smi_hub.load(str(folder / "model.safetensors"))  # the file's folder
    assert same_weights(loaded, again)
    blank = smi_hub.load(folder, pretrained=False)
    assert blank.config == loaded.config and not same_weights(blank, loaded)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert torch.allclose(loaded(x), again(x))


def test_truncated_weights(folder):
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    with pytest.raises(ChecksumError, match="corrupt, truncated"):
        smi_hub.load(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("weights_sha256")  # without a recorded hash the parser must still refuse it
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="not a readable safetensors"):
        smi_hub.load(folder)


def test_tampered_weights(folder):
    w = folder / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the last tensor
    w.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        smi_hub.load(folder)


def test_explicit_sha256_mismatch(folder):
    with pytest.raises(ChecksumError):
        smi_hub.load(folder, sha256="0" * 64)
    assert smi_hub.load(folder, sha256=sha256_file(folder / "model.safetensors"))


def test_wrong_architecture(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["arch"] = "resnet34"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="do not match the resnet34"):
        smi_hub.load(folder)


def test_arch_check(folder):
    with pytest.raises(WeightsError, match="resnet50 was requested"):
        smi_hub.load(folder, arch="resnet50")


def test_config_newer_than_library(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedFormatError, match="upgrade"):
        smi_hub.load(folder)


def test_missing_files(folder, tmp_path):
    (folder / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors not found"):
        smi_hub.load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(WeightsError, match="config.json not found"):
        smi_hub.load(folder)
    with pytest.raises(WeightsError, match="does not exist"):
        smi_hub.load(tmp_path / "nowhere")
    with pytest.raises(WeightsError, match="Unknown model"):
        smi_hub.load("no_such_model")


# --- Hugging Face: from_pretrained and the offline cache ----------------------------------


def _fake_hf_cache(hf_home: Path, repo_id: str, folder: Path) -> Path:
    """Lay out a populated Hugging Face hub cache the way huggingface_hub writes it:
    blobs/<hash>, refs/main -> commit, snapshots/<commit>/<file> -> ../../blobs/<hash>."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copy(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    return snap


@pytest.mark.slow
def test_hf_offline_from_populated_cache(folder, tmp_path):
    hf_home = tmp_path / "hf"
    _fake_hf_cache(hf_home, "smi-hub/tiny-test", folder)
    script = """
import sys, torch, smi_hub
from smi_hub import SMIModel, WeightsError
ref = smi_hub.load(sys.argv[1])
a = smi_hub.load("smi-hub/tiny-test")
b = SMIModel.from_pretrained("smi-hub/tiny-test")
assert all(torch.equal(a.state_dict()[k], ref.state_dict()[k]) for k in ref.state_dict())
assert all(torch.equal(b.state_dict()[k], ref.state_dict()[k]) for k in ref.state_dict())
try:
    smi_hub.load("smi-hub/not-cached")
except WeightsError as e:
    assert "HF_HUB_OFFLINE" in str(e), e
else:
    raise SystemExit("no error for an uncached repo")
print("ok")
"""
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run(
        [sys.executable, "-c", script, str(folder)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_save_pretrained_writes_our_format(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path / "sp", with_projector=True)  # default: backbone only
    assert {p.name for p in (tmp_path / "sp").iterdir()} >= {
        "model.safetensors",
        "config.json",
        "README.md",
    }
    assert same_weights(SMIModel.from_pretrained(str(tmp_path / "sp")), model)


# --- URLs ---------------------------------------------------------------------------------


def test_url_folder_download_and_cache(folder, server, tmp_path):
    root, base = server
    shutil.copytree(folder, root / "tiny")
    sha = sha256_file(folder / "model.safetensors")
    model = smi_hub.load(f"{base}/tiny/#sha256={sha}", progress=False)
    assert same_weights(model, smi_hub.load(folder))
    cached = list((tmp_path / "cache" / "url").glob("*/model.safetensors"))
    assert len(cached) == 1 and sha256_file(cached[0]) == sha
    assert not list((tmp_path / "cache").rglob("*.part"))  # no temporary files left
    shutil.rmtree(root / "tiny")  # served no more: the cache answers, also offline
    os.environ["SMI_HUB_OFFLINE"] = "1"
    try:
        assert same_weights(smi_hub.load(f"{base}/tiny/", progress=False), model)
    finally:
        del os.environ["SMI_HUB_OFFLINE"]


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_url_archive(folder, server, kind):
    root, base = server
    archive = root / f"tiny.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(archive, "w") as zf:
            for f in folder.iterdir():
                zf.write(f, f"tiny/{f.name}")
    else:
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(folder, arcname="tiny")
    sha = sha256_file(archive)
    model = smi_hub.load(f"{base}/tiny.{kind}", sha256=sha, progress=False)
    assert same_weights(model, smi_hub.load(folder))


def test_url_errors(folder, server, tmp_path):
    root, base = server
    shutil.copytree(folder, root / "tiny")
    with pytest.raises(DownloadError, match="HTTP 404"):
        smi_hub.load(f"{base}/absent/", progress=False)
    with pytest.raises(ChecksumError, match="Nothing was cached"):
        smi_hub.load(f"{base}/tiny/#sha256={'a' * 64}", progress=False)
    assert not list((tmp_path / "cache").rglob("model.safetensors"))
    with pytest.raises(DownloadError, match="64 hex"):
        smi_hub.load(f"{base}/tiny/#sha256=abc", progress=False)
    with pytest.raises(DownloadError, match="failed"):
        smi_hub.load("http://127.0.0.1:1/tiny/", progress=False)  # nothing listens on port 1
    with pytest.raises(DownloadError, match="valid"):
        smi_hub.load("http:///no-host", progress=False)
    os.environ["SMI_HUB_OFFLINE"] = "1"
    try:
        with pytest.raises(DownloadError, match="offline"):
            smi_hub.load(f"{base}/tiny/", progress=False)
    finally:
        del os.environ["SMI_HUB_OFFLINE"]
    # a tampered file on the server (config.json still records the original hash)
    w = root / "tiny" / "model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        smi_hub.load(f"{base}/tiny/", progress=False)


# --- torch.hub ----------------------------------------------------------------------------


def test_hubconf_entries_cover_registry():
    hubconf = load_file_module("hubconf_under_test", REPO / "hubconf.py", register=False)
    entries = [n for n in dir(hubconf) if callable(getattr(hubconf, n)) and not n.startswith("_")]
    assert all(__import__("importlib").util.find_spec(d) for d in hubconf.dependencies)
    for name in [*REGISTRY, "smi_default", "smi_resnet18", "smi_resnet50"]:
        assert name in entries, name


@pytest.mark.slow
def test_torch_hub_local(folder, server):
    model = torch.hub.load(str(REPO), "smi_default", source="local")
    assert same_weights(model, smi_hub.load())
    blank = torch.hub.load(str(REPO), "smi_resnet50", source="local", pretrained=False)
    assert blank.arch == "resnet50"
    with pytest.raises(WeightsNotPublishedError):
        torch.hub.load(str(REPO), "vicreg_resnet50_imagenet", source="local")
    root, base = server
    shutil.copytree(folder, root / "tiny")
    url = f"{base}/tiny/#sha256={sha256_file(folder / 'model.safetensors')}"
    model = torch.hub.load(str(REPO), "smi_resnet18", source="local", weights=url, progress=False)
    assert same_weights(model, smi_hub.load(folder))
    with pytest.raises(WeightsError, match="resnet50 was requested"):
        torch.hub.load(str(REPO), "smi_resnet50", source="local", weights=url, progress=False)


# --- Hugging Face download errors become smi-hub errors naming the repo ------------------


def _hf_http_error(cls, status: int, repo: str = "smi-hub/missing"):
    """An HfHubHTTPError subclass built as the installed huggingface_hub builds it:
    ``cls(message, response=...)`` with a response of its HTTP client (httpx2 / httpx)."""
    import importlib

    from huggingface_hub import errors as hf_errors

    client = importlib.import_module(hf_errors.HTTPError.__module__.split(".")[0])
    url = f"https://huggingface.co/api/models/{repo}"
    response = client.Response(status, request=client.Request("GET", url))
    return cls(f"{status} Client Error for url: {url}", response=response)


def _raising_snapshot_download(monkeypatch, exc: BaseException) -> list[dict]:
    import huggingface_hub

    calls: list[dict] = []

    def fake(**kw):
        calls.append(kw)
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return calls


def test_hf_download_arguments_are_passed_through(monkeypatch, folder, tmp_path):
    import huggingface_hub

    from smi_hub.weights import resolve_hf_folder

    calls: list[dict] = []
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw) or str(folder)
    )
    assert resolve_hf_folder("smi-hub/tiny") == folder
    got = resolve_hf_folder(
        "smi-hub/tiny", revision="v1", cache_dir=tmp_path / "c", force_download=True,
        local_files_only=True, token="hf_x",
    )  # fmt: skip
    assert got == folder
    files = ["config.json", "model.safetensors", "README.md"]  # nothing else is downloaded
    assert calls == [
        {"repo_id": "smi-hub/tiny", "revision": None, "cache_dir": None, "force_download": False,
         "local_files_only": False, "token": None, "allow_patterns": files},
        {"repo_id": "smi-hub/tiny", "revision": "v1", "cache_dir": tmp_path / "c",
         "force_download": True, "local_files_only": True, "token": "hf_x", "allow_patterns": files},
    ]  # fmt: skip


@pytest.mark.parametrize("client", ["httpx", "httpx2"])
def test_http_client_transport_errors_become_download_errors(monkeypatch, client):
    import importlib

    from smi_hub.weights import resolve_hf_folder

    module = importlib.import_module(client)
    _raising_snapshot_download(monkeypatch, module.ConnectError("refused"))
    with pytest.raises(DownloadError, match=r"'smi-hub/missing'.*ConnectError"):
        resolve_hf_folder("smi-hub/missing")


def test_hf_offline_read_from_huggingface_hub_constants(monkeypatch):
    """HF_HUB_OFFLINE exported before huggingface_hub was imported (its constants say so)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    from smi_hub.weights import resolve_hf_folder

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    _raising_snapshot_download(monkeypatch, LocalEntryNotFoundError("not cached"))
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE=0"):
        resolve_hf_folder("smi-hub/not-cached")


def test_hf_not_cached_offline_says_how_to_fix(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    from smi_hub.weights import resolve_hf_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _raising_snapshot_download(monkeypatch, LocalEntryNotFoundError("not cached"))
    with pytest.raises(WeightsError) as e:
        resolve_hf_folder("smi-hub/not-cached")
    msg = str(e.value)
    assert "'smi-hub/not-cached'" in msg and "HF_HUB_OFFLINE=0" in msg and "unset" in msg
    assert "hf download smi-hub/not-cached" in msg
    assert "huggingface-cli download smi-hub/not-cached" in msg


def test_hf_not_cached_local_files_only_real_cache(tmp_path):
    """The real snapshot_download on an empty cache with local_files_only (no network)."""
    from smi_hub.weights import resolve_hf_folder

    with pytest.raises(WeightsError, match=r"'smi-hub/nothing-here'.*local_files_only=False"):
        resolve_hf_folder("smi-hub/nothing-here", cache_dir=tmp_path, local_files_only=True)


def _hf_exception(kind: str) -> BaseException:
    from huggingface_hub import errors as hf_errors

    http = {
        "repo_not_found": ("RepositoryNotFoundError", 401),
        "gated": ("GatedRepoError", 403),
        "revision_not_found": ("RevisionNotFoundError", 404),
        "entry_not_found": ("RemoteEntryNotFoundError", 404),
        "http_503": ("HfHubHTTPError", 503),
    }
    if kind in http:
        name, status = http[kind]
        return _hf_http_error(getattr(hf_errors, name), status)
    if kind == "unreachable_not_cached":  # what snapshot_download raises when online but cut off
        return hf_errors.LocalEntryNotFoundError(
            "An error happened ... Please check your internet connection and try again."
        )
    if kind == "connection_error":
        return ConnectionError("Connection refused")
    return TimeoutError("timed out")


@pytest.mark.parametrize(
    "kind, error, pattern",
    [
        (
            "repo_not_found",
            WeightsError,
            r"No Hugging Face model repo 'smi-hub/missing'.*typos.*private.*token",
        ),
        ("gated", WeightsError, r"'smi-hub/missing' is gated.*https://huggingface.co/smi-hub/"),
        ("revision_not_found", WeightsError, r"'smi-hub/missing' has no revision 'v9'"),
        ("entry_not_found", WeightsError, r"'smi-hub/missing' lacks a file"),
        ("http_503", DownloadError, r"Downloading 'smi-hub/missing' from the Hugging .* 503"),
        (
            "unreachable_not_cached",
            DownloadError,
            r"Could not reach the Hugging Face Hub to download 'smi-hub/missing'.*hf download",
        ),
        (
            "connection_error",
            DownloadError,
            r"'smi-hub/missing'.*network error \(ConnectionError: Connection refused\)",
        ),
        ("timeout", DownloadError, r"'smi-hub/missing'.*network error \(TimeoutError"),
    ],
)
def test_hf_errors_become_smi_hub_errors(monkeypatch, kind, error, pattern):
    from smi_hub.weights import resolve_hf_folder

    calls = _raising_snapshot_download(monkeypatch, _hf_exception(kind))
    with pytest.raises(error, match=pattern) as e:
        resolve_hf_folder("smi-hub/missing", revision="v9")
    assert calls and calls[0]["repo_id"] == "smi-hub/missing"
    assert isinstance(e.value, smi_hub.SMIHubError)


def test_hf_http_client_connect_error_becomes_download_error(monkeypatch):
    """The HTTP client's own transport error (httpx2 / httpx ConnectError), as raised while
    files are being downloaded."""
    import importlib

    from huggingface_hub import errors as hf_errors

    client = importlib.import_module(hf_errors.HTTPError.__module__.split(".")[0])
    assert hasattr(client, "ConnectError"), f"{client.__name__} has no ConnectError"
    _raising_snapshot_download(monkeypatch, client.ConnectError("[Errno 111] refused"))
    with pytest.raises(DownloadError, match=r"'smi-hub/missing'.*ConnectError"):
        smi_hub.load("smi-hub/missing")  # the same path smi_hub.load takes for repo ids
