"""Test helper: start a CLI run and SIGKILL it once it has written a checkpoint of a given step."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from fastmath_nemo.checkpoint.atomic import list_checkpoints


def sigkill_after_checkpoint(cmd: list[str], cwd: Path, env: dict[str, str], checkpoints: Path, log: Path,
                             min_step: int = 3, timeout: float = 300) -> None:
    """Run ``cmd`` (output to ``log``) until a complete checkpoint of step >= ``min_step`` is in
    ``checkpoints``, then SIGKILL it. Raises AssertionError with the log's tail if the run exits
    first, finishes before it can be killed, or writes no such checkpoint within ``timeout`` s.
    (Any step >= ``min_step`` will do: older ones may already be pruned when we look.)"""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
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
