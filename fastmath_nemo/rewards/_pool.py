"""A tiny persistent process pool with a hard per-job wall-clock deadline.

Why not ``concurrent.futures.ProcessPoolExecutor``: it cannot cancel a running
job, and killing one of its workers breaks the whole pool. Here each worker owns a
socket; a job that overruns its deadline gets its worker SIGKILLed and replaced,
which bounds even C-level loops (huge ``int`` powers) that ``signal.alarm`` cannot
interrupt. Other in-flight jobs are unaffected.

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
        self._workers = [self._spawn() for _ in range(num_workers)]

    def _spawn(self) -> _Worker:
        ours, theirs = socket.socketpair()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", __name__, str(theirs.fileno()), self._fn_spec, self._init_spec],
                pass_fds=(theirs.fileno(),),
                env=self._env,
                stdin=subprocess.DEVNULL,
                close_fds=True,
            )
        finally:
            theirs.close()  # only the worker keeps its end, so its death gives us EOF
        return _Worker(proc, Connection(ours.detach()), time.monotonic())

    def _replace(self, w: _Worker) -> None:
        w.proc.kill()
        w.proc.wait()
        w.conn.close()
        self._workers[self._workers.index(w)] = self._spawn()

    def run(self, jobs: Sequence[tuple], timeout_s: float, default: Any = None) -> list[Any]:
        """Results of ``fn(*jobs[i])`` in order; ``default`` on timeout/error/crash."""
        results: list[Any] = [default] * len(jobs)
        todo = deque(range(len(jobs)))
        with self._lock:
            while todo or any(w.job is not None for w in self._workers):
                now = time.monotonic()
                for w in list(self._workers):
                    if w.ready and w.job is None and todo:
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
                            raise RuntimeError("verifier worker died during startup") from None
                        logger.warning("verifier worker crashed on job %s; counting it as failed", w.job)
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
                        raise RuntimeError(f"verifier worker not ready after {self._startup_timeout_s}s")
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
