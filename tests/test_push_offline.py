"""push_to_hub without a network raises smi-hub's error (as ``smi_hub.load`` does), not a raw
httpx/requests exception."""

from __future__ import annotations

import socket

import pytest
from huggingface_hub import constants

import smi_hub
from smi_hub import DownloadError, SMIModel
from smi_hub.errors import UploadError

# about 1.5 s each; not on make test-fast's critical paths
pytestmark = pytest.mark.slow


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny() -> SMIModel:
    return SMIModel(arch="resnet18", base_width=4, small_stem=True, image_size=28).eval()


def test_push_to_an_unreachable_hub_raises_upload_error(tiny, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    with pytest.raises(UploadError, match="Could not reach the Hugging Face Hub to upload") as e:
        tiny.push_to_hub("me/smi-tiny", token="hf_x")
    assert isinstance(e.value, DownloadError)  # one except for every failed transfer
    assert "'me/smi-tiny'" in str(e.value) and "save_pretrained" in str(e.value)


def test_push_in_offline_mode_says_so(tiny, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UploadError, match="HF_HUB_OFFLINE=1 forbids uploads"):
        tiny.push_to_hub("me/smi-tiny", token="hf_x")
    assert smi_hub.errors.UploadError is UploadError
