"""tests/_ci_skips.py: with CI=true a skip for something CI installs fails the run, a skip for
what no CI machine has (a GPU) stays a skip, and without CI both are skips."""

from __future__ import annotations

from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
pytest_plugins = ["pytester"]

TESTS = '''
import pytest

def test_needs_a_missing_package():
    pytest.importorskip("no_such_package_fastmath")

def test_needs_a_gpu():
    pytest.skip("needs a CUDA GPU")

def test_runs():
    assert True
'''
MODULE_SKIP = '''
import pytest
pytest.importorskip("no_such_package_fastmath")

def test_never_collected():
    pass
'''


@pytest.mark.parametrize("ci, failed, skipped", [("true", 1, 1), ("", 0, 2)])
def test_a_skip_for_a_missing_install_fails_under_ci(pytester: pytest.Pytester, monkeypatch, ci: str, failed: int,
                                                      skipped: int) -> None:
    monkeypatch.setenv("CI", ci)
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    pytester.makepyfile(test_some=TESTS)
    result = pytester.runpytest_subprocess("-p", "_ci_skips", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=failed, skipped=skipped)
    if failed:
        result.stdout.fnmatch_lines(["*CI=true: a skip fails here*no_such_package_fastmath*"])


def test_a_module_skipped_at_collection_fails_under_ci(pytester: pytest.Pytester, monkeypatch) -> None:
    monkeypatch.setenv("CI", "true")
    monkeypatch.setenv("PYTHONPATH", str(TESTS_DIR))
    pytester.makepyfile(test_module=MODULE_SKIP)
    result = pytester.runpytest_subprocess("-p", "_ci_skips", "-p", "no:cacheprovider")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*CI=true: a skip fails here*no_such_package_fastmath*"])
