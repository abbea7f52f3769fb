"""Module-level jobs for TimeoutWorkerPool tests (workers import them by name)."""

from __future__ import annotations

import time


def slow_echo(value: object, delay_s: float) -> object:
    """``value`` after ``delay_s`` seconds: long enough to kill the worker running it."""
    time.sleep(delay_s)
    return value


def failing_init() -> None:
    """An initializer that kills every worker during start-up."""
    raise RuntimeError("this worker cannot start")
