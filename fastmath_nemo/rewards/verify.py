r"""Time-bounded answer verification with ``math_verify``.

Pipeline per (completion, gold):
  1. ``last_boxed_answer(completion)``; no box -> False.
  2. Pre-filter: answers longer than ``max(1000, 4 * len(gold))`` chars -> False (cheap DoS guard).
  3. Fast path: both sides plain integers/decimals -> exact ``Decimal`` comparison in Python.
  4. Otherwise ``math_verify.parse`` + ``math_verify.verify`` in a persistent worker
     process (``TimeoutWorkerPool``), hard-killed after ``timeout_s`` -> False.

Safety: predictions are parsed only with ``LatexExtractionConfig`` (ANTLR LaTeX grammar);
``ExprExtractionConfig`` is never used because it goes through sympy ``parse_expr``,
i.e. ``eval``. Inside workers math_verify's own ``signal.alarm`` timeouts
(``parsing_timeout``/``timeout_seconds``, whole seconds) give a graceful first line of
defence; the pool's SIGKILL is the hard bound, also for C-level loops signals can't stop.

Workers: ``FASTMATH_VERIFY_WORKERS`` env or ``configure_verifier`` (default min(8, cpus)).
math_verify never runs in the trainer's process: its alarms work only in the main thread, so
there it could hang a step without bound. Dead workers are restarted (``_pool``); when they
cannot be, the pool is started afresh once, and if that fails too, :class:`VerifierUnavailableError`
stops the run with the reason.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import sys
import threading
from decimal import Decimal, InvalidOperation
from functools import lru_cache

from math_verify import LatexExtractionConfig, parse, verify

from fastmath_nemo.rewards._pool import PoolUnavailableError, TimeoutWorkerPool
from fastmath_nemo.rewards.extract import last_boxed_answer

__all__ = ["verify_answer", "verify_many", "configure_verifier", "shutdown_verifier", "VerifierUnavailableError"]

logger = logging.getLogger(__name__)

_MAX_ANSWER_CHARS = 1000
_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# Box priority 0: the input is exactly "\boxed{answer}". Default normalisation (handles \dfrac12, units, ...).
_LATEX_ONLY = (LatexExtractionConfig(boxed_match_priority=0),)

_pool: TimeoutWorkerPool | None = None
_pool_lock = threading.Lock()
_num_workers: int = int(os.environ.get("FASTMATH_VERIFY_WORKERS", min(8, os.cpu_count() or 1)))


class VerifierUnavailableError(RuntimeError):
    """math_verify's worker processes cannot be (re)started, so answers cannot be verified."""


# ---------------------------------------------------------------- pure helpers
def _gold_answer(gold: str) -> str:
    r"""Normalise a gold label: inner of its last ``\boxed{}`` if any, else strip ``$...$``."""
    boxed = last_boxed_answer(gold)
    if boxed is not None:
        return boxed.strip()
    g = gold.strip()
    if len(g) >= 2 and g[0] == "$" and g[-1] == "$":
        g = g.strip("$").strip()
    return g


def _fast_numeric(pred: str, gold: str) -> bool | None:
    """Exact decision for plain numbers, None when math_verify must decide.

    Equal values -> True; unequal integers -> False. Unequal decimals are left to
    math_verify so its float rounding (6 places) stays the single source of truth.
    """
    p, g = pred.strip(), gold.strip()
    if not (_NUMBER_RE.fullmatch(p) and _NUMBER_RE.fullmatch(g)):
        return None
    try:
        if Decimal(p) == Decimal(g):
            return True
    except InvalidOperation:
        return None
    return False if ("." not in p and "." not in g) else None


def _soft_timeout(timeout_s: float) -> int:
    """Per-call math_verify alarm (int seconds): about half the hard budget, so a single slow
    step is usually interrupted gracefully before the pool has to kill the worker."""
    return max(1, math.floor(timeout_s / 2))


@lru_cache(maxsize=4096)  # one gold per prompt is verified against every sample of the group
def _parse_gold(gold: str, soft: int | None) -> list:
    return parse(
        "$\\boxed{" + gold + "}$", extraction_config=_LATEX_ONLY, extraction_mode="first_match", parsing_timeout=soft
    )


def _mv_match(pred: str, gold: str, soft: int | None) -> bool:
    """math_verify equivalence of two extracted answers (runs in a worker process)."""
    gold_parsed = _parse_gold(gold, soft)
    if not gold_parsed:
        return False
    pred_parsed = parse(
        "\\boxed{" + pred + "}", extraction_config=_LATEX_ONLY, extraction_mode="first_match", parsing_timeout=soft
    )
    if not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=soft))


def _worker_init() -> None:
    # math_verify logs the whole (possibly huge) expression at WARNING on each timeout.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


# ---------------------------------------------------------------- pool management
def configure_verifier(num_workers: int) -> None:
    """Set the number of worker processes (>= 1); restarts the pool lazily."""
    global _num_workers
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1 (math_verify only runs in worker processes), got {num_workers}")
    shutdown_verifier()
    _num_workers = num_workers


def shutdown_verifier() -> None:
    """Stop the worker processes (they are restarted lazily on the next call)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
        _pool = None


atexit.register(shutdown_verifier)


def _get_pool() -> TimeoutWorkerPool:
    """The running pool, started on first use (PoolUnavailableError when it cannot start)."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool.pid != os.getpid():
            _pool = None  # inherited through fork: those workers belong to the parent
        if _pool is None:
            if _num_workers < 1:
                raise ValueError(f"FASTMATH_VERIFY_WORKERS must be >= 1, got {_num_workers}")
            _pool = TimeoutWorkerPool(_mv_match, _num_workers, _worker_init)
        return _pool


def _run_on_pool(jobs: list[tuple[str, str, int]], timeout_s: float) -> list[bool]:
    """Verdicts from the worker pool; a pool that fails is started afresh once, then the
    failure stops the run (never an unbounded in-process fallback)."""
    try:
        return _get_pool().run(jobs, timeout_s=timeout_s, default=False)
    except PoolUnavailableError as e:
        logger.error("math-verify workers failed (%s); starting a fresh pool", e)
        shutdown_verifier()
    try:
        return _get_pool().run(jobs, timeout_s=timeout_s, default=False)
    except PoolUnavailableError as e:
        shutdown_verifier()
        raise VerifierUnavailableError(
            f"math-verify workers cannot be restarted ({e}; a fresh pool failed too). Stopping rather than "
            f"verifying in the trainer's process, where a pathological answer could hang the run. Check the "
            f"process limit (ulimit -u), free memory, and that `{sys.executable} -m fastmath_nemo.rewards._pool` "
            f"starts here; FASTMATH_VERIFY_WORKERS sets the number of workers (now {_num_workers})"
        ) from e


# ---------------------------------------------------------------- public API
def verify_many(completions: list[str], golds: list[str], timeout_s: float = 2.0) -> list[bool]:
    """Correctness of each completion's last boxed answer vs its gold; shape [N] -> [N].

    Each math_verify check gets at most ``timeout_s`` seconds of wall time (False on
    timeout); identical (answer, gold) pairs are verified once.
    """
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions vs {len(golds)} golds")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    results = [False] * len(completions)
    pending: dict[tuple[str, str], list[int]] = {}
    for i, (text, gold) in enumerate(zip(completions, golds, strict=True)):
        pred = last_boxed_answer(text)
        if pred is None or not pred.strip():
            continue
        g = _gold_answer(gold)
        if not g or len(pred) > max(_MAX_ANSWER_CHARS, 4 * len(g)):
            continue
        fast = _fast_numeric(pred, g)
        if fast is not None:
            results[i] = fast
        else:
            pending.setdefault((pred.strip(), g), []).append(i)
    if not pending:
        return results

    jobs = list(pending)
    soft = _soft_timeout(timeout_s)
    verdicts = _run_on_pool([(p, g, soft) for p, g in jobs], timeout_s)
    for key, ok in zip(jobs, verdicts, strict=True):
        for i in pending[key]:
            results[i] = bool(ok)
    return results


def verify_pairs(pairs: list[tuple[str, str]], timeout_s: float = 2.0) -> list[bool]:
    """:func:`verify_many` of ``(completion, gold)`` pairs (the form a split over ranks takes)."""
    return verify_many([text for text, _ in pairs], [gold for _, gold in pairs], timeout_s)


def verify_answer(completion_text: str, gold: str, timeout_s: float = 2.0) -> bool:
    """True iff the last ``\\boxed{}`` of ``completion_text`` is equivalent to ``gold``."""
    return verify_many([completion_text], [gold], timeout_s)[0]
