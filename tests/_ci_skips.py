"""A pytest plugin (loaded by conftest.py): with ``CI=true`` a skipped test fails, unless its
reason is one no CI machine can remove. CI installs everything else the suite needs (Slurm,
vLLM, megatron-core, NeMo-Run), so a skip there means an install step broke, and a run that
passed by skipping would hide it."""

from __future__ import annotations

import os

import pytest

# What no CI machine has (a GPU, Transformer Engine, which needs CUDA) and the NeMo tests, which
# run in their own environment (.ci/nemo_export, called by .ci/run, fails where NeMo is missing).
SKIPS_ALLOWED_IN_CI = ("needs a CUDA GPU", "needs Transformer Engine", "run .ci/nemo_export")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


def _fail_if_forbidden(report: pytest.CollectReport | pytest.TestReport) -> None:
    if not (report.skipped and in_ci()) or getattr(report, "wasxfail", None) is not None:
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if any(allowed in reason for allowed in SKIPS_ALLOWED_IN_CI):
        return
    report.outcome = "failed"
    report.longrepr = f"CI=true: a skip fails here, since CI installs what the suite needs: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_if_forbidden(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _fail_if_forbidden(outcome.get_result())
