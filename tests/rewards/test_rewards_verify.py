import time

import pytest

from fastmath_nemo.rewards import verify as V
from fastmath_nemo.rewards.verify import verify_answer, verify_many


@pytest.mark.parametrize(
    "completion, gold",
    [
        (r"... so the answer is \boxed{\frac{1}{2}}", "0.5"),
        (r"\boxed{0.5}", r"\frac{1}{2}"),
        (r"\boxed{42}", "42.0"),
        (r"\boxed{42.0}", "42"),
        (r"\boxed{\dfrac12}", r"$\frac{1}{2}$"),
        (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
        (r"\boxed{\{1,2\}}", r"\boxed{\{2,1\}}"),  # gold given with its own box
        (r"</think> The answer is $\boxed{x = 3}$.", "3"),
    ],
)
def test_equivalent_forms(completion, gold):
    assert verify_answer(completion, gold)


def test_wrong_and_missing():
    assert not verify_answer(r"\boxed{43}", "42")
    assert not verify_answer(r"\boxed{\frac{1}{3}}", "0.5")
    assert not verify_answer("the answer is 42", "42")  # no box
    assert not verify_answer(r"\boxed{}", "0")
    assert not verify_answer(r"\boxed{\frac{1}{2}", "0.5")  # unbalanced


def test_fast_path_only_decides_plain_numbers():
    assert V._fast_numeric("007", "7") is True
    assert V._fast_numeric("43", "42") is False
    assert V._fast_numeric("3.1415926", "3.141593") is None  # math_verify's rounding decides
    assert V._fast_numeric(r"\frac{1}{2}", "0.5") is None
    assert verify_answer(r"\boxed{3.1415926}", "3.141593")  # equal to 6 places, like math_verify


def test_verify_many_matches_single_and_dedupes():
    comps = [r"\boxed{1/2}", r"\boxed{0.5}", r"\boxed{7}", "none", r"\boxed{1/2}"]
    golds = [r"\frac12", r"\frac12", "8", "1", r"\frac12"]
    assert verify_many(comps, golds) == [True, True, False, False, True]
    assert verify_many([], []) == []
    with pytest.raises(ValueError):
        verify_many(["a"], [])


def test_pathological_expression_is_bounded():
    t0 = time.monotonic()
    out = verify_many(
        [
            r"\boxed{9^{9^{9^{9^{9}}}}}",
            r"\boxed{" + "(" * 40 + "1+x" + ")^2" * 40 + "}",
            r"\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",  # huge nesting: pre-filtered
            r"\boxed{4}",
        ],
        ["5", "5", "1", "4"],
        timeout_s=2.0,
    )
    assert out == [False, False, False, True]
    assert time.monotonic() - t0 < 10.0  # safety bound, not a speed test


def test_hard_timeout_kills_and_pool_recovers():
    t0 = time.monotonic()
    # 0.3 s is below math_verify's own 1 s alarm, so only the worker kill can stop it.
    assert verify_many([r"\boxed{9^{9^{9^{9^{9}}}}}"], ["5"], timeout_s=0.3) == [False]
    assert time.monotonic() - t0 < 10.0
    assert verify_answer(r"\boxed{\frac{2}{4}}", "0.5")


def test_never_evals_model_output(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        rf"\boxed{{__import__('os').system('touch {marker}')}}",
        rf"\boxed{{(lambda: __import__('os').system('touch {marker}'))()}}",
        rf"\boxed{{exec(\"open('{marker}','w')\")}}",
    ]
    assert verify_many(payloads, ["0", "0", "0"]) == [False, False, False]
    assert not marker.exists()


def test_no_in_process_mode():
    with pytest.raises(ValueError, match="worker processes"):
        V.configure_verifier(0)


@pytest.fixture
def no_in_process_verification(monkeypatch):
    """Fails the test if math_verify runs in this process (workers import their own copy)."""
    monkeypatch.setattr(V, "parse", lambda *a, **k: pytest.fail("math_verify ran in the trainer's process"))
    yield
    V.shutdown_verifier()


# Not plain numbers, so each one needs math_verify (the fast path would decide them in-process).
_COMPS = [r"\boxed{\frac{2}{4}}", r"\boxed{\sqrt{8}}", r"\boxed{\frac{1}{3}}"]
_GOLDS = ["0.5", r"2\sqrt{2}", "0.5"]


def test_workers_killed_while_starting_are_restarted(no_in_process_verification):
    V.shutdown_verifier()
    pool = V._get_pool()
    for w in pool._workers:  # still importing math_verify: dead before they are ready
        w.proc.kill()
    assert verify_many(_COMPS, _GOLDS) == [True, True, False]
    assert V._get_pool() is pool and all(w.proc.poll() is None for w in pool._workers)


def test_workers_that_cannot_restart_stop_the_run(no_in_process_verification, monkeypatch):
    assert verify_many(_COMPS, _GOLDS) == [True, True, False]
    from fastmath_nemo.rewards import _pool

    def no_processes(*args, **kwargs):
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(_pool.subprocess, "Popen", no_processes)
    for w in V._get_pool()._workers:
        w.proc.kill()
        w.proc.wait()
    with pytest.raises(V.VerifierUnavailableError, match=r"cannot be restarted.*Resource temporarily unavailable"):
        verify_many(_COMPS, _GOLDS)
    assert V._pool is None  # the next call tries a fresh pool


def test_works_off_the_main_thread():
    # math_verify's signal.alarm timeouts would raise in a thread; the worker pool does not care.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as ex:
        comps = [r"\boxed{\frac{3}{6}}", r"\boxed{9^{9^{9^{9}}}}"]
        futs = [ex.submit(verify_many, comps, ["0.5", "1"]) for _ in range(2)]
        assert [f.result(timeout=30) for f in futs] == [[True, False], [True, False]]
