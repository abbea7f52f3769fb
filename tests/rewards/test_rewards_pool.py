"""Hard deadline of the worker pool, including a C-level loop that signal.alarm cannot interrupt."""

import os
import signal
import threading
import time

import pytest
from _pool_jobs import failing_init, slow_echo

from fastmath_nemo.rewards._pool import PoolUnavailableError, TimeoutWorkerPool


def test_pool_results_in_order():
    pool = TimeoutWorkerPool(divmod, num_workers=2)
    try:
        assert pool.run([(7, 2), (9, 3), (1, 0)], timeout_s=5.0, default="err") == [(3, 1), (3, 0), "err"]
    finally:
        pool.close()


def test_pool_kills_c_level_loop_and_recovers():
    pool = TimeoutWorkerPool(pow, num_workers=2)
    try:
        pool.run([(2, 3)], timeout_s=30.0)  # wait for workers to be up, so we time only the job
        t0 = time.monotonic()
        # pow(9, 9**9) runs for minutes inside one C call; the small job must still finish.
        out = pool.run([(9, 9**9), (2, 10)], timeout_s=0.5, default=None)
        assert out == [None, 1024]
        assert time.monotonic() - t0 < 10.0
        assert pool.run([(3, 3)], timeout_s=30.0) == [27]  # the killed worker was replaced
    finally:
        pool.close()


def test_pool_survives_worker_crash():
    pool = TimeoutWorkerPool(os._exit, num_workers=1)
    try:
        assert pool.run([(3,), (4,)], timeout_s=30.0, default="dead") == ["dead", "dead"]
    finally:
        pool.close()


def test_pool_rejects_unimportable_fn():
    with pytest.raises(ValueError):
        TimeoutWorkerPool(lambda x: x, num_workers=1)


def _kill_busy_worker(pool: TimeoutWorkerPool, pids: list[int]) -> None:
    """SIGKILL the first worker seen running a job (as the OOM killer would); note its pid."""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        busy = [w for w in pool._workers if w.job is not None]
        if busy:
            pids.append(busy[0].proc.pid)
            os.kill(busy[0].proc.pid, signal.SIGKILL)
            return
        time.sleep(0.01)


def test_job_whose_worker_was_killed_runs_again_on_a_fresh_worker():
    pool = TimeoutWorkerPool(slow_echo, num_workers=1)
    try:
        pool.run([("warm", 0.0)], timeout_s=60.0)
        killed: list[int] = []
        killer = threading.Thread(target=_kill_busy_worker, args=(pool, killed))
        killer.start()
        assert pool.run([("kept", 1.0)], timeout_s=60.0, default="lost") == ["kept"]  # not counted as failed
        killer.join()
        assert killed and pool._workers[0].proc.pid != killed[0]
    finally:
        pool.close()


def test_workers_killed_while_idle_are_restarted():
    pool = TimeoutWorkerPool(divmod, num_workers=2)
    try:
        assert pool.run([(7, 2)], timeout_s=30.0) == [(3, 1)]
        old = [w.proc.pid for w in pool._workers]
        for w in pool._workers:
            w.proc.kill()
            w.proc.wait()
        assert pool.run([(9, 4), (8, 3)], timeout_s=30.0, default="lost") == [(2, 1), (2, 2)]
        assert not set(old) & {w.proc.pid for w in pool._workers}
    finally:
        pool.close()


def test_workers_that_cannot_start_raise_a_clear_error():
    pool = TimeoutWorkerPool(divmod, num_workers=1, initializer=failing_init)
    try:
        with pytest.raises(PoolUnavailableError, match=r"died during start-up 3 times in a row"):
            pool.run([(7, 2)], timeout_s=30.0)
    finally:
        pool.close()
