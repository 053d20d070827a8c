"""Shared test setup. Real images come from installed packages (see docs/data.md).

Nothing skips silently: a skipped test fails the run unless it is marked ``gpu`` (it needs
CUDA, which CI's CPU machine lacks). A missing dev dependency or dataset is an error.
"""

import json
import os
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from huggingface_hub import constants as hf_constants

import smi_hub
from smi_hub import fashion_mnist, script_modules

# No test may depend on telemetry: gradio_client's Client (and gradio) send usage pings through
# huggingface_hub to HF_ENDPOINT, from background threads at a time no test controls; in
# tests/test_reliability_demo.py that endpoint is a recorder of every request. huggingface_hub
# reads its variable at import, so its constant is set too; subprocesses inherit the variables.
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
hf_constants.HF_HUB_DISABLE_TELEMETRY = True

pytest_plugins = ["pytester"]
_unexpected_skips: list[str] = []


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def fmnist_test():
    """Fashion-MNIST test split (images N x 28 x 28 uint8, labels), from Debian's package."""
    try:
        return fashion_mnist.load_arrays("test")
    except FileNotFoundError as e:  # a missing install step is an error, not a skip
        pytest.fail(str(e))


DEMO = Path(__file__).resolve().parents[1] / "demo"


def load_demo_module(name: str) -> ModuleType:
    """``demo/<name>.py`` (no gradio), the very module ``demo/app.py`` and ``demo/engine.py`` use:
    loaded once per process by ``smi_hub.script_modules.load_demo_module``."""
    return script_modules.load_demo_module(name, DEMO)


def load_demo_engine() -> ModuleType:
    """``demo/engine.py`` (no gradio), the very module ``demo/app.py`` uses as ``.core``."""
    return load_demo_module("engine")


class _LazyModule:
    """A module loaded on first attribute access (reads, writes and ``monkeypatch`` pass
    through): gradio, which ``demo/app.py`` imports, costs seconds, so a demo test module costs
    nothing at collection when its tests are deselected (``make test-fast``)."""

    def __init__(self, load: Callable[[], ModuleType]) -> None:
        object.__setattr__(self, "_load", load)
        object.__setattr__(self, "_module", None)

    def _get(self) -> ModuleType:
        if self._module is None:
            object.__setattr__(self, "_module", self._load())
        return self._module

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # collection probes every module global (__test__, _mock_name)
            raise AttributeError(name)
        return getattr(self._get(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._get(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._get(), name)


def load_demo_app(name: str) -> Any:
    """``demo/app.py`` loaded by path as module ``name``, as ``smi-hub demo`` does (its engine,
    ``demo/engine.py``, is ``.core``, the module :func:`load_demo_engine` gives), on first use.
    Fails (no skip) without gradio."""

    def load() -> ModuleType:
        try:
            import gradio  # noqa: F401
        except ImportError as e:  # a missing install step is an error, not a skip
            pytest.fail(f"{e}: the demo needs gradio: pip install -e '.[demo]'", pytrace=False)
        module = script_modules.load_file_module(name, DEMO / "app.py", register=False)
        assert module.core is load_demo_engine()
        return module

    return _LazyModule(load)


def demo_model(seed: int, base_width: int, projector_dims: list[int]) -> smi_hub.SMIModel:
    """A small 28 px ``SMIModel`` (eval mode) with non-trivial BN statistics: different seeds,
    different features."""
    torch.manual_seed(seed)
    model = smi_hub.SMIModel(
        arch="resnet18",
        base_width=base_width,
        small_stem=True,
        projector_dims=projector_dims,
        image_size=28,
        mean=[0.286] * 3,
        std=[0.353] * 3,
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: single-image forwards are faster so, above all on a
    busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def png_header_only(width: int, height: int, bit_depth: int = 1, color_type: int = 0) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with one empty data chunk: a bomb
    candidate that costs nothing to write."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00"))
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def demo_argv(monkeypatch, tmp_path) -> Callable[[], list[str]]:
    """Points ``smi-hub demo`` at a stand-in ``demo/app.py`` whose ``main`` records its
    arguments; returns a function that reads what it was given."""
    import smi_hub.cli_demo as cli_demo

    fake = tmp_path / "demo" / "app.py"
    fake.parent.mkdir()
    record = tmp_path / "argv.json"
    fake.write_text(
        "import json\n"
        f"def main(argv):\n    open({str(record)!r}, 'w').write(json.dumps(argv))\n    return 0\n"
    )
    monkeypatch.setattr(cli_demo, "demo_app_path", lambda: fake)
    return lambda: json.loads(record.read_text())


@pytest.fixture
def deny_listing(monkeypatch) -> Callable[[Path], None]:
    """``deny(folder)``: listing ``folder`` raises PermissionError from then on, as after
    ``chmod 000`` (which root, running the tests in CI containers, ignores)."""
    import os

    denied: set[Path] = set()
    scandir = os.scandir

    def guarded(path: Any = "."):
        if Path(path) in denied:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", guarded)
    return denied.add


@pytest.fixture
def run_checkpoint(tmp_path) -> Callable[[torch.nn.Module], Path]:
    """``save(model)``: a minimal training checkpoint of ``model`` (what ``smi-hub export``
    reads) at ``tmp_path/run/checkpoints/last.pt``; returns its path."""

    def save(model: torch.nn.Module) -> Path:
        ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
        ckpt.parent.mkdir(parents=True)
        torch.save(
            {
                "format": "smi-hub-checkpoint",
                "version": 1,
                "model": model.state_dict(),
                "model_config": model.config,
                "config": {"loss": {"name": "smi"}, "train": {"epochs": 1}},
                "epoch": 1,
                "step": 10,
            },
            ckpt,
        )
        return ckpt

    return save


def _record_skip(report: pytest.TestReport | pytest.CollectReport) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail") and "gpu" not in report.keywords:
        _record_skip(report)


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a module-level skip (importorskip at import time)
        _record_skip(report)


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected_skips:
        terminalreporter.section("skipped tests not marked gpu (the run fails)", red=True)
        for line in _unexpected_skips:
            terminalreporter.line(line)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _unexpected_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
