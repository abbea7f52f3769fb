"""NeMo-Run (``fastmath_nemo/nemo_run.py``, ``launch/run_nemo.py``) with the real ``nemo_run``
package, run in its own environment (``.venv-nemo-run``; README "With NeMo-Run").

- Recipes validate their overrides before anything is submitted; the preemption plugin refuses
  what it cannot serve.
- The README's local command: the reduced recipe through ``run.LocalExecutor(launcher="torchrun",
  ntasks_per_node=2)``, reported SUCCEEDED by NeMo-Run.
- The README's Slurm command on the one-node test cluster with accounting: SIGUSR1 to the job
  in the middle of GRPO, as ``--signal=USR1@N`` sends it before the time limit; the run saves,
  the batch script requeues, the job resumes and NeMo-Run reports SUCCEEDED.
- Both run the trainer as a new user would: ``FASTMATH_PYTHON`` a virtual environment's python
  (not the driver's) that is not activated, no ``torchrun`` on PATH; the executors start that
  python's own torchrun.

Skipped without that environment (the README's test command creates it) or, for the last, the
Slurm, slurmdbd and MariaDB programs.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from _slurm import ROOT, Cluster, finished, missing_binaries, unactivated_venv

NEMO_RUN_PYTHON = Path(os.environ.get("FASTMATH_NEMO_RUN_PYTHON", ROOT / ".venv-nemo-run" / "bin" / "python"))
README_PYTHON = ".venv-nemo-run/bin/python"

pytestmark = pytest.mark.skipif(
    not NEMO_RUN_PYTHON.exists(),
    reason=f"no NeMo-Run environment at {NEMO_RUN_PYTHON} (python -m venv --system-site-packages .venv-nemo-run "
           "&& .venv-nemo-run/bin/pip install -c requirements/cpu.txt -e '.[nemo-run]')")


def readme_command(executor: str, run_dir: Path) -> list[str]:
    """The README's ``launch/run_nemo.py <executor>`` line with this machine's NeMo-Run python and
    ``run.dir`` in a temporary folder."""
    prefix = f"{README_PYTHON} launch/run_nemo.py {executor} "
    lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"README.md: expected one line starting with {prefix!r}, found {len(lines)}"
    words = shlex.split(lines[0])
    assert sum(w.startswith("run.dir=") for w in words) == 1
    return [str(NEMO_RUN_PYTHON), *[f"run.dir={run_dir}" if w.startswith("run.dir=") else w for w in words[1:]]]


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """The trainer's python in an unactivated virtual environment, and a PATH without torchrun."""
    return unactivated_venv(tmp_path_factory.mktemp("venv") / ".venv")


def driver_env(tmp: Path, venv: tuple[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    python, path = venv
    # Not ".../nemo_run...": NeMo-Run 0.11.1 rewrites every "/nemo_run" in its batch script.
    env.update(NEMORUN_HOME=str(tmp / "nemorun_home"), FASTMATH_PYTHON=python, PATH=path, OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    return env | extra


def assert_recipe_done(run_dir: Path, grpo_steps: int) -> list[dict]:
    """Every SFT and GRPO step logged once, and the report of the three models; the records."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["stage"] == "sft"] == list(range(1, 9))
    assert [r["step"] for r in records if r["stage"] == "grpo"] == list(range(1, grpo_steps + 1))
    report = json.loads((run_dir / "report.json").read_text())
    assert [row["model"] for row in report["evaluations"]] == ["base", "sft", "grpo"]
    return records


def test_recipes_validate_at_once_and_the_plugin_refuses_other_executors(tmp_path: Path, venv) -> None:
    snippet = textwrap.dedent("""
        import json
        import nemo_run as run
        from fastmath_nemo import nemo_run as fm
        from fastmath_nemo.config.errors import ConfigError

        out = {}
        try:
            fm.recipe("policy.backend=jax")
        except ConfigError as err:
            out["config"] = str(err)
        try:
            fm.export("export.format=onnx")
        except ConfigError as err:
            out["export"] = str(err)
        task = fm.sft("sft.epochs=2")
        out["argv"] = task.metadata["argv"]
        for name, executor, plugin in [
            ("local", fm.local_executor(2), fm.SlurmPreemption()),
            ("warning", fm.slurm_executor("acct", nproc_per_node=2), fm.SlurmPreemption(warning_s=0)),
        ]:
            try:
                plugin.setup(task, executor)
            except (TypeError, ValueError) as err:
                out[name] = str(err)
        executor = fm.slurm_executor("acct", nproc_per_node=2)
        fm.SlurmPreemption(warning_s=120).setup(task, executor)
        out["signal"], out["srun_args"], out["env"] = executor.signal, executor.srun_args, executor.env_vars
        out["inline"] = task.inline
        out["local_env"] = fm.local_executor(2).env_vars
        print(json.dumps(out))
    """)
    done = subprocess.run([str(NEMO_RUN_PYTHON), "-c", snippet], capture_output=True, text=True, cwd=ROOT,
                          env=driver_env(tmp_path, venv, FASTMATH_PYTHON=".venv/bin/python"), timeout=300)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["config"].startswith("config key 'policy.backend'"), out["config"]
    assert out["export"].startswith("config key 'export.format'"), out["export"]
    assert out["argv"] == ["conf=sft", "sft.epochs=2"]
    assert "needs a run.SlurmExecutor, got LocalExecutor" in out["local"]
    assert "warning_s must be > 0 (got 0)" in out["warning"]
    # Slurm signals 120 s before the time limit; torchrun starts behind the signal shield; the
    # stop and preempted files are per restart; the requeued job resumes.
    assert out["signal"] == "USR1@120"
    assert out["srun_args"][-1].endswith("launch/slurm/ignore_preemption_signals.sh")
    assert out["env"]["FASTMATH_PREEMPTED_FILE"].endswith("/fastmath_restart_${SLURM_RESTART_COUNT:-0}/preempted.json")
    assert out["env"]["FASTMATH_STOP_FILE"].endswith("/fastmath_restart_${SLURM_RESTART_COUNT:-0}/stop_requested")
    assert out["inline"].endswith("conf=sft sft.epochs=2 'resume=${oc.env:FASTMATH_RESUME,false}'\n")
    # Both jobs find launch/bin/torchrun first (torchx appends the driver's PATH to the local one;
    # the batch script expands $PATH) and the driver's relative FASTMATH_PYTHON as an absolute path.
    assert out["local_env"] == {"PATH": f"{ROOT}/launch/bin", "FASTMATH_PYTHON": f"{ROOT}/.venv/bin/python"}
    assert (out["env"]["PATH"], out["env"]["FASTMATH_PYTHON"]) == (f"{ROOT}/launch/bin:$PATH",
                                                                   f"{ROOT}/.venv/bin/python")


@pytest.mark.slow
def test_local_executor_runs_the_readme_recipe_on_two_torchrun_workers(tmp_path: Path, venv) -> None:
    run_dir = tmp_path / "run"
    cmd = readme_command("local", run_dir)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=driver_env(tmp_path, venv), timeout=900)
    assert done.returncode == 0 and "recipe: SUCCEEDED" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
    assert_recipe_done(run_dir, grpo_steps=int(next(w for w in cmd if w.startswith("grpo.steps=")).split("=")[1]))
    # Two workers: torchrun's per-rank logs in NeMo-Run's experiment folder.
    rank_logs = list((tmp_path / "nemorun_home" / "experiments").rglob("attempt_0/*/stderr.log"))
    assert sorted(p.parent.name for p in rank_logs) == ["0", "1"]


@pytest.fixture(scope="module")
def accounting_cluster():
    if missing_binaries(accounting=True):
        pytest.skip(f"Slurm accounting not installed (missing {missing_binaries(accounting=True)})")
    state = Path(tempfile.mkdtemp(prefix="fastmath-slurmdbd-"))  # munged and mysql must reach it
    cluster = Cluster(state, accounting=True)
    yield cluster
    cluster.stop()
    shutil.rmtree(state, ignore_errors=True)


def _wait(cond, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.5)


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_executor_preempted_requeued_resumed_and_reported_succeeded(accounting_cluster: Cluster,
                                                                          tmp_path: Path, venv) -> None:
    cluster, run_dir = accounting_cluster, tmp_path / "run"
    cmd = readme_command("slurm", run_dir)
    grpo_steps = int(next(w for w in cmd if w.startswith("grpo.steps=")).split("=")[1])
    log = tmp_path / "driver.log"
    with log.open("w") as out:
        driver = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                  env=driver_env(tmp_path, venv, SLURM_CONF=cluster.conf))
        try:
            metrics = run_dir / "metrics.jsonl"
            _wait(lambda: driver.poll() is not None or (metrics.exists() and '"grpo"' in metrics.read_text()),
                  300, "first GRPO step", log)
            jobs = cluster.run("squeue", "-h", "-o", "%i").split()
            assert len(jobs) == 1, (f"expected the driver's one job, squeue shows {jobs}:\n{log.read_text()[-3000:]}\n"
                                    f"{cluster.daemon_logs()}")
            job_id = int(jobs[0])
            # What --signal=USR1@N does before the time limit: SIGUSR1 to the job's processes.
            cluster.run("scancel", "--signal=USR1", str(job_id))
            driver.wait(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()
    text = log.read_text(errors="replace")
    assert driver.returncode == 0 and "recipe: SUCCEEDED" in text, f"{text[-4000:]}\n{cluster.daemon_logs()}"
    info = cluster.job(job_id)
    assert finished(info) and (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), info

    job_folder = next((tmp_path / "nemorun_home" / "experiments").rglob("fastmath_restart_0")).parent
    stopped = json.loads((job_folder / "fastmath_restart_0" / "preempted.json").read_text())
    assert stopped["stage"] == "grpo" and 1 <= stopped["step"] < grpo_steps, stopped
    batch_log = next(job_folder.glob(f"sbatch_*_{job_id}.out")).read_text(errors="replace")
    assert "fastmath: requeueing; the next run continues with resume=true" in batch_log
    resumed = next(job_folder.glob(f"log-*_{job_id}_1.out")).read_text(errors="replace")
    assert f"resuming GRPO from {stopped['checkpoint']} (step {stopped['step']} of {grpo_steps})" in resumed
    assert_recipe_done(run_dir, grpo_steps)  # every step once: none lost or repeated by the stop
