"""Hard deadline of the worker pool, including a C-level loop that signal.alarm cannot interrupt."""

import os
import time

import pytest

from fastmath_nemo.rewards._pool import TimeoutWorkerPool


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
