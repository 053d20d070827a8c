"""The test suite's own rules: no silent skips (tests/conftest.py)."""

from pathlib import Path

import pytest

CONFTEST = Path(__file__).with_name("conftest.py")


def test_a_skip_fails_the_run_unless_marked_gpu(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    pytester.makepyfile(
        test_allowed="""
import pytest

def test_ok():
    pass

@pytest.mark.gpu
def test_needs_cuda():
    pytest.skip("no CUDA")

@pytest.mark.xfail(reason="known", strict=True)
def test_known():
    assert False
"""
    )
    ok = pytester.runpytest("-p", "no:cacheprovider")
    ok.assert_outcomes(passed=1, skipped=1, xfailed=1)
    assert ok.ret == pytest.ExitCode.OK

    pytester.makepyfile(
        test_silent="""
import pytest

def test_missing_dependency():
    pytest.importorskip("no_such_module_anywhere")
"""
    )
    pytester.makepyfile(
        test_module_skip="""
import pytest

pytest.importorskip("no_such_module_anywhere")

def test_never_collected():
    pass
"""
    )
    bad = pytester.runpytest("-p", "no:cacheprovider")
    assert bad.ret == pytest.ExitCode.TESTS_FAILED
    bad.stdout.fnmatch_lines(
        [
            "*skipped tests not marked gpu (the run fails)*",
            "test_module_skip.py: *no_such_module_anywhere*",
            "test_silent.py::test_missing_dependency: *no_such_module_anywhere*",
        ]
    )
