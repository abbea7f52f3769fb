"""``launch/slurm/fastmath.sbatch`` on a real one-node Slurm cluster (``tests/slurm/cluster.sh``).

- The reduced embedded recipe runs as one node x 2 torchrun workers (gloo) to completion, with
  a log per job and per restart.
- Both jobs run the trainer as a new user would: ``FASTMATH_PYTHON`` a virtual environment's
  python that is not activated, no ``torchrun`` on the job's PATH.
- The same job, sent ``scancel --batch --signal=USR1`` (what ``--signal=B:USR1@N`` does before
  a time limit) in the middle of GRPO, saves a checkpoint, requeues itself, resumes with
  ``resume=true`` and ends with the uninterrupted run's weights (bit for bit) and metrics.

Skipped when the Slurm / munge binaries are absent (``.ci/run`` installs them). Each job takes
about a minute on two cores; the requeued one about two.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from _slurm import ROOT, SBATCH_SCRIPT, Cluster, finished, missing_binaries, unactivated_venv
from safetensors.torch import load_file

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()), reason=f"Slurm not installed (missing {missing_binaries()})"),
]

README = ROOT / "README.md"


def readme_line(prefix: str) -> str:
    """The README's line that starts with ``prefix`` (its "On a Slurm cluster" examples are what
    these tests run, so the two cannot drift apart)."""
    lines = [line.strip() for line in README.read_text().splitlines() if line.strip().startswith(prefix)]
    assert len(lines) == 1, f"README.md: expected one line starting with {prefix!r}, found {len(lines)}"
    return lines[0]


# "FASTMATH_NPROC_PER_NODE=2 sbatch --cpus-per-task=2 launch/slurm/fastmath.sbatch run.dir=... <recipe>": the
# embedded recipe reduced to 64 problems, 1 SFT epoch of 8 steps and GRPO steps of ~0.4 s each (enough
# of them to be signalled in the middle); the tests put run.dir in a temporary folder.
_words = shlex.split(readme_line("FASTMATH_NPROC_PER_NODE=2 sbatch "))
SUBMIT_ENV = dict(w.split("=", 1) for w in _words[: _words.index("sbatch")])
SBATCH_OPTIONS = _words[_words.index("sbatch") + 1 : _words.index(SBATCH_SCRIPT)]
RECIPE = [w for w in _words[_words.index(SBATCH_SCRIPT) + 1 :] if not w.startswith("run.dir=")]
GRPO_STEPS = int(next(w for w in RECIPE if w.startswith("grpo.steps=")).split("=")[1])
SIGNAL_CMD = shlex.split(readme_line("scancel --batch --signal=USR1 <job>"))
# Wall-clock measurements, not results: they differ between any two runs.
TIMING_KEYS = ("time", "generation_s", "tokens_per_s")


@pytest.fixture(scope="module")
def cluster():
    # Not under pytest's tmp_path: its parent is private to root, and munged runs as user munge.
    state = Path(tempfile.mkdtemp(prefix="fastmath-slurm-"))
    cluster = Cluster(state)
    yield cluster
    cluster.stop()
    shutil.rmtree(state, ignore_errors=True)


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The trainer's python in an unactivated virtual environment, and a PATH without torchrun."""
    return unactivated_venv(tmp_path_factory.mktemp("venv") / ".venv")


def job_env(cluster: Cluster, venv: tuple[str, str], log_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    python, path = venv
    env.update(
        **SUBMIT_ENV, SLURM_CONF=cluster.conf, FASTMATH_PYTHON=python, PATH=path, FASTMATH_LOG_DIR=str(log_dir),
        OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
        PYTHONUNBUFFERED="1",
    )
    return env


def submit(cluster: Cluster, venv: tuple[str, str], tmp: Path, run_dir: Path) -> tuple[int, Path]:
    """sbatch the script with the reduced recipe from the repository root; (job id, its batch log)."""
    log_dir = tmp / "logs"
    out = cluster.run("sbatch", "--parsable", *SBATCH_OPTIONS, f"--output={tmp}/%x-%j.out", SBATCH_SCRIPT,
                      f"run.dir={run_dir}", *RECIPE, env=job_env(cluster, venv, log_dir))
    job_id = int(out.strip().split(";")[0])
    return job_id, tmp / f"fastmath-{job_id}.out"


def without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS and not k.startswith("timing/")} for r in records]


def read_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(cluster: Cluster, venv: tuple[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path, Path]:
    """One job of the reduced recipe, run to the end: (job id, run dir, batch log)."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    job_id, log = submit(cluster, venv, tmp, tmp / "run")
    cluster.wait_job(job_id, finished, 300, "end", log)
    return job_id, tmp / "run", log


def test_sbatch_runs_the_recipe_on_two_torchrun_workers(cluster: Cluster, uninterrupted) -> None:
    job_id, run_dir, log = uninterrupted
    info = cluster.job(job_id)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), log.read_text()
    records = read_records(run_dir)
    assert [r["step"] for r in records if r["stage"] == "sft"] == list(range(1, 9))  # logged once (rank 0)
    assert [r["step"] for r in records if r["stage"] == "grpo"] == list(range(1, GRPO_STEPS + 1))
    report = json.loads((run_dir / "report.json").read_text())
    assert [row["model"] for row in report["evaluations"]] == ["base", "sft", "grpo"]
    # The batch log names the nodes, workers and command; the restart's node log holds both ranks.
    text = log.read_text()
    assert "nodes " in text and "2 workers per node" in text and "the run exited with code 0" in text
    node_logs = list((log.parent / "logs" / f"fastmath-{job_id}" / "restart_0").glob("*.log"))
    assert len(node_logs) == 1 and "[rank0]" in node_logs[0].read_text(errors="replace")


def test_signalled_job_checkpoints_requeues_and_resumes_to_the_same_result(
    cluster: Cluster, venv: tuple[str, str], uninterrupted, tmp_path: Path
) -> None:
    _, ref_dir, _ = uninterrupted
    run_dir = tmp_path / "run"
    job_id, log = submit(cluster, venv, tmp_path, run_dir)
    metrics = run_dir / "metrics.jsonl"
    cluster.wait_job(job_id, lambda info: finished(info) or (metrics.exists() and '"grpo"' in metrics.read_text()),
                     240, "first GRPO step", log)
    # As --signal=B:USR1@N does before the time limit: only the batch shell gets it.
    cluster.run(*[str(job_id) if w == "<job>" else w for w in SIGNAL_CMD])

    # It saves and requeues itself; Slurm holds the job for the credential lifetime (the test
    # cluster's cred_expire=5) and starts it again.
    cluster.wait_job(job_id, lambda i: finished(i) or i["Restarts"] == "1", 120, "requeue", log)
    stopped = json.loads((tmp_path / "logs" / f"fastmath-{job_id}" / "restart_0" / "preempted.json").read_text())
    assert stopped["stage"] == "grpo" and 1 <= stopped["step"] < GRPO_STEPS, stopped
    assert Path(stopped["checkpoint"]).name == f"step_{stopped['step']}"
    info = cluster.wait_job(job_id, finished, 300, "end after the requeue", log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (
        f"{log.read_text()}\n{cluster.daemon_logs()}")

    text = log.read_text()
    assert "got SIGUSR1" in text and "requeueing" in text
    assert re.search(r"restart 1\] command: .* resume=true", text)
    node_log = "".join(p.read_text(errors="replace")
                       for p in (tmp_path / "logs" / f"fastmath-{job_id}" / "restart_1").glob("*.log"))
    assert f"resuming GRPO from {stopped['checkpoint']} (step {stopped['step']} of {GRPO_STEPS})" in node_log
    assert "SFT already finished" in node_log

    # Every step once (none lost or repeated by the stop), and the uninterrupted run's numbers.
    records, reference = read_records(run_dir), read_records(ref_dir)
    assert [(r["stage"], r["step"]) for r in records] == [(r["stage"], r["step"]) for r in reference]
    assert without_timing(records) == without_timing(reference)
    report, ref_report = (json.loads((d / "report.json").read_text()) for d in (run_dir, ref_dir))
    assert without_timing(report["evaluations"]) == without_timing(ref_report["evaluations"])
    weights = load_file(str(run_dir / "grpo" / "final" / "model.safetensors"))
    ref_weights = load_file(str(ref_dir / "grpo" / "final" / "model.safetensors"))
    assert weights.keys() == ref_weights.keys()
    assert all(torch.equal(weights[k], ref_weights[k]) for k in weights)
