"""Test helpers: start a CLI run and SIGKILL it once it has written a checkpoint of a given step,
and check that nothing the run started outlives it."""

from __future__ import annotations

import signal
import subprocess
import time
import uuid
from pathlib import Path

import psutil

from fastmath_nemo.checkpoint.atomic import list_checkpoints


MARKER_ENV = "FASTMATH_TEST_MARKER"  # every process a run starts inherits it


def processes_started_with(marker: str) -> list[psutil.Process]:
    """The live processes whose environment carries ``MARKER_ENV=marker``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARKER_ENV) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def assert_none_left(marker: str, within_s: float = 30) -> None:
    """Within ``within_s`` seconds no process of the run is left (a killed run's checkpoint
    writer may finish its file first)."""
    deadline = time.monotonic() + within_s
    while (left := processes_started_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, [(p.pid, p.cmdline()[:4]) for p in left]


def sigkill_after_checkpoint(cmd: list[str], cwd: Path, env: dict[str, str], checkpoints: Path, log: Path,
                             min_step: int = 3, timeout: float = 300) -> None:
    """Run ``cmd`` (output to ``log``) until a complete checkpoint of step >= ``min_step`` is in
    ``checkpoints``, then SIGKILL it. Raises AssertionError with the log's tail if the run exits
    first, finishes before it can be killed, or writes no such checkpoint within ``timeout`` s.
    (Any step >= ``min_step`` will do: older ones may already be pruned when we look.) Then
    checks that no process the run started is left."""
    marker = uuid.uuid4().hex
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env, MARKER_ENV: marker}, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not any(step >= min_step for step, _ in list_checkpoints(checkpoints)):
                assert proc.poll() is None, (f"the run exited (rc={proc.returncode}) before checkpoint step_{min_step}:"
                                             f"\n{log.read_text(errors='replace')[-3000:]}")
                assert time.monotonic() < deadline, f"no checkpoint step_{min_step} within {timeout} s"
                time.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run had finished before it could be killed; make it longer"
    assert_none_left(marker)
