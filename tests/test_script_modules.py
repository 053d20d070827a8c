"""smi_hub.script_modules: files that are no package (demo/, benchmarks/, hubconf.py) loaded by
path."""

from __future__ import annotations

import sys

import pytest

from smi_hub import script_modules


def test_registered_module_runs_once_and_is_shared(tmp_path, monkeypatch):
    (tmp_path / "counter.py").write_text(
        "import builtins\nbuiltins._smi_runs = getattr(builtins, '_smi_runs', 0) + 1\n"
    )
    monkeypatch.delitem(sys.modules, "smi_hub_demo_counter", raising=False)
    import builtins

    monkeypatch.setattr(builtins, "_smi_runs", 0, raising=False)
    first = script_modules.load_demo_module("counter", tmp_path)
    second = script_modules.load_demo_module("counter", tmp_path)
    assert first is second is sys.modules["smi_hub_demo_counter"]
    assert builtins._smi_runs == 1
    monkeypatch.delitem(sys.modules, "smi_hub_demo_counter")


def test_unregistered_module_runs_each_time_and_stays_out_of_sys_modules(tmp_path):
    (tmp_path / "app.py").write_text("VALUE = 3\n")
    a = script_modules.load_file_module("smi_hub_test_app", tmp_path / "app.py", register=False)
    b = script_modules.load_file_module("smi_hub_test_app", tmp_path / "app.py", register=False)
    assert a is not b and a.VALUE == b.VALUE == 3
    assert "smi_hub_test_app" not in sys.modules


def test_a_module_that_fails_is_not_left_half_loaded(tmp_path):
    (tmp_path / "broken.py").write_text("X = 1\nraise RuntimeError('boom')\n")
    with pytest.raises(RuntimeError, match="boom"):
        script_modules.load_demo_module("broken", tmp_path)
    assert "smi_hub_demo_broken" not in sys.modules
    (tmp_path / "broken.py").write_text("X = 2\n")  # fixed: the next load runs it again
    try:
        assert script_modules.load_demo_module("broken", tmp_path).X == 2
    finally:
        sys.modules.pop("smi_hub_demo_broken", None)
