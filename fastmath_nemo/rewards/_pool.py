"""A tiny persistent process pool with a hard per-job wall-clock deadline.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot cancel a running
job, and killing one of its workers breaks the whole pool. Here each worker owns a
socket; a job that overruns its deadline gets its worker SIGKILLed and replaced,
which bounds even C-level loops (huge ``int`` powers) that ``signal.alarm`` cannot
interrupt. Other in-flight jobs are unaffected.

Workers that die for other reasons (the OOM killer, an operator's ``kill``) are restarted: a
dead idle worker before its next job, a worker that dies during start-up up to
``_MAX_START_FAILURES`` times in a row, and a job whose worker died under it runs once more on
a fresh worker (a second crash counts it as failed: the job itself kills workers). When workers
cannot be started at all, ``run`` raises :class:`PoolUnavailableError`; nothing here ever runs
a job in the calling process.

Workers are fresh interpreters (``python -m fastmath_nemo.rewards._pool``), not
multiprocessing children: fork would copy a CUDA/multithreaded trainer, and
spawn/forkserver re-import the trainer's ``__main__`` in the child.
"""

from __future__ import annotations

import importlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

logger = logging.getLogger(__name__)

_READY = "__ready__"
_FAILED = "__failed__"
_MAX_START_FAILURES = 3  # consecutive deaths before READY, per worker slot
_MAX_CRASHES_PER_JOB = 2  # a job whose worker died under it once is retried once


class PoolUnavailableError(RuntimeError):
    """Worker processes cannot be started (or restarted); the pool cannot run jobs."""


def _qualname(fn: Callable[..., Any] | None) -> str:
    """``module:qualname`` a fresh interpreter can import; lambdas/locals/__main__ are rejected."""
    if fn is None:
        return ""
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not mod or mod == "__main__" or "<" in name:
        raise ValueError(f"{fn!r} must be a module-level function importable by a worker process")
    return f"{mod}:{name}"


def _resolve(spec: str) -> Callable[..., Any] | None:
    if not spec:
        return None
    mod, name = spec.split(":")
    obj: Any = importlib.import_module(mod)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def _worker_main(fd: int, fn_spec: str, init_spec: str) -> None:
    """Worker loop: recv ``(job_id, args)``, send ``(job_id, fn(*args))``; ``None`` or EOF stops it."""
    conn = Connection(fd)
    init = _resolve(init_spec)
    if init is not None:
        init()
    fn = _resolve(fn_spec)
    conn.send(_READY)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # parent went away
            return
        if msg is None:
            return
        job_id, args = msg
        try:
            out = fn(*args)
        except Exception:  # a bad input must not kill the worker
            logger.debug("pool job failed", exc_info=True)
            out = _FAILED
        conn.send((job_id, out))


@dataclass
class _Worker:
    proc: subprocess.Popen
    conn: Connection
    spawned_at: float
    start_failures: int = 0  # consecutive deaths before READY, carried to the replacement
    ready: bool = False
    job: int | None = None
    deadline: float = 0.0


class TimeoutWorkerPool:
    """Run ``fn(*args)`` for many ``args`` in ``num_workers`` persistent worker processes.

    ``fn`` and ``initializer`` must be module-level (imported by name in the worker);
    args and results must be picklable. ``run`` returns one result per job, ``default``
    for jobs that raised, crashed their worker, or exceeded ``timeout_s`` (measured from
    dispatch to a ready worker). Thread-safe (runs are serialised); after ``os.fork`` the
    child must create its own pool.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        num_workers: int,
        initializer: Callable[[], None] | None = None,
        startup_timeout_s: float = 120.0,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self._fn_spec, self._init_spec = _qualname(fn), _qualname(initializer)
        self._startup_timeout_s = startup_timeout_s
        self.pid = os.getpid()
        self._lock = threading.Lock()
        # The worker must resolve imports exactly like this process (e.g. a repo root on sys.path).
        path = [p or os.getcwd() for p in sys.path]
        self._env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
        self._workers: list[_Worker] = []
        try:
            for _ in range(num_workers):
                self._workers.append(self._spawn())
        except PoolUnavailableError:
            self.close()  # the ones already started
            raise

    def _spawn(self, start_failures: int = 0) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), self._fn_spec, self._init_spec],
                pass_fds=(theirs.fileno(),),
                env=self._env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        except OSError as e:  # process limit, out of memory, no interpreter
            ours.close()
            raise PoolUnavailableError(f"cannot start a worker process: {e}") from e
        finally:
            theirs.close()  # only the worker keeps its end, so its death gives us EOF
        return _Worker(proc, Connection(ours.detach()), time.monotonic(), start_failures)

    def _replace(self, w: _Worker, start_failures: int = 0) -> None:
        w.proc.kill()
        w.proc.wait()
        w.conn.close()
        self._workers[self._workers.index(w)] = self._spawn(start_failures)

    def _restart_if_dead(self, w: _Worker) -> bool:
        """Replace an idle worker whose process has exited; True when it was replaced."""
        code = w.proc.poll()
        if code is None:
            return False
        logger.warning("worker %d exited (code %s) while idle; restarting it", w.proc.pid, code)
        self._replace(w)
        return True

    def _startup_failed(self, w: _Worker, why: str) -> None:
        """A worker that never became ready: restart it, or raise after too many in a row."""
        failures = w.start_failures + 1
        if failures >= _MAX_START_FAILURES:
            code = w.proc.poll()
            raise PoolUnavailableError(
                f"worker {why} {failures} times in a row (last exit code {code}; its error, if any, "
                f"is on stderr above): workers cannot be started"
            )
        logger.warning("worker %d %s; restarting it (%d/%d)", w.proc.pid, why, failures, _MAX_START_FAILURES)
        self._replace(w, start_failures=failures)

    def run(self, jobs: Sequence[tuple], timeout_s: float, default: Any = None) -> list[Any]:
        """Results of ``fn(*jobs[i])`` in order; ``default`` on timeout/error/crash."""
        results: list[Any] = [default] * len(jobs)
        crashes = [0] * len(jobs)
        todo = deque(range(len(jobs)))
        with self._lock:
            while todo or any(w.job is not None for w in self._workers):
                now = time.monotonic()
                for w in list(self._workers):
                    if w.ready and w.job is None and todo and not self._restart_if_dead(w):
                        i = todo.popleft()
                        try:
                            w.conn.send((i, jobs[i]))
                        except OSError:  # worker died while idle: retry the job elsewhere
                            todo.appendleft(i)
                            self._replace(w)
                            continue
                        w.job, w.deadline = i, now + timeout_s
                waiting = [w for w in self._workers if not w.ready or w.job is not None]
                if not waiting:
                    continue
                next_deadline = min(w.deadline if w.ready else w.spawned_at + self._startup_timeout_s for w in waiting)
                by_conn = {w.conn: w for w in waiting}
                for conn in wait(list(by_conn), timeout=max(0.0, next_deadline - time.monotonic())):
                    w = by_conn[conn]
                    try:
                        msg = conn.recv()
                    except (EOFError, OSError):
                        if not w.ready:
                            self._startup_failed(w, "died during start-up")
                            continue
                        i = w.job
                        if i is not None:
                            crashes[i] += 1
                            if crashes[i] < _MAX_CRASHES_PER_JOB:  # maybe killed from outside: once more
                                logger.warning("worker died on job %s; running it again on a fresh worker", i)
                                todo.appendleft(i)
                            else:
                                logger.warning("worker died on job %s again; counting it as failed", i)
                        self._replace(w)
                        continue
                    if msg == _READY:
                        w.ready = True
                    else:
                        i, out = msg
                        results[i] = default if isinstance(out, str) and out == _FAILED else out
                        w.job = None
                now = time.monotonic()
                for w in list(self._workers):
                    if w.job is not None and now >= w.deadline:
                        logger.warning("verifier job %s exceeded %.2fs; killing its worker", w.job, timeout_s)
                        self._replace(w)
                    elif not w.ready and now >= w.spawned_at + self._startup_timeout_s:
                        self._startup_failed(w, f"was not ready after {self._startup_timeout_s}s")
        return results

    def close(self) -> None:
        """Stop all workers (graceful, then kill)."""
        if os.getpid() != self.pid:  # inherited via fork: the workers are not ours to stop
            return
        with self._lock:  # let a concurrent run() finish first
            for w in self._workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            for w in self._workers:
                try:
                    w.proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    w.proc.kill()
                    w.proc.wait()
                w.conn.close()
            self._workers = []


if __name__ == "__main__":  # worker entry point: python -m fastmath_nemo.rewards._pool FD FN INIT
    _worker_main(int(sys.argv[1]), sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "")
