"""NeMo-Run recipes, executors and a preemption plugin for the stages of ``launch/run.py``.

Recipes (``sft``, ``grpo``, ``recipe``, ``eval``, ``export``, or ``stage(conf, ...)`` for any ``conf/*.yaml``)
are ``run.Script`` tasks that run ``launch/run.py`` with ``conf=NAME`` and dotlist overrides,
the command line of every other launch path. Each factory first validates those arguments into the
typed :class:`~fastmath_nemo.config.schema.Config` (``load_config``), so a bad key stops the
driver naming it, before anything is submitted; the validated config rides along as YAML in
``recipe.metadata["config"]``. A Script rather than a ``run.Partial`` because the workers then
need nothing of NeMo-Run: ``nemo-run==0.11.1`` pins ``leptonai==0.27.3``, whose own pins (anyio
<= 4.9, httpx 0.27, starlette < 1, urllib3 < 1.27 through torchx) conflict with vLLM's, so
NeMo-Run lives in its own environment (README "With NeMo-Run") and only the driver imports it.

Executors: :func:`local_executor` (``torchrun`` with N workers on this machine) and
:func:`slurm_executor` (one ``torchrun`` per node through NeMo-Run's own sbatch script). Both
start the trainer's own torchrun, ``$FASTMATH_PYTHON -m torch.distributed.run``, whether or not
its environment is activated: NeMo-Run's launcher runs the command ``torchrun``, so they put
``launch/bin`` (whose ``torchrun`` does that) first on the job's PATH.

:class:`SlurmPreemption` carries ``launch/slurm/fastmath.sbatch``'s preemption settings onto a
``SlurmExecutor``: a signal before the time limit, the stop-file / preempted-file environment of
``fastmath_nemo.checkpoint.preemption``, torchrun shielded from the signal, and a requeue when (and
only when) the run recorded a checkpoint; the requeued job resumes (``resume=true``).
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import nemo_run as run

from fastmath_nemo.checkpoint.preemption import PREEMPTED_FILE_ENV, STOP_FILE_ENV
from fastmath_nemo.config.loader import to_yaml
from fastmath_nemo.preflight import load_config

ROOT = Path(__file__).resolve().parents[1]
RUN_PY = ROOT / "launch" / "run.py"
IGNORE_SIGNALS = ROOT / "launch" / "slurm" / "ignore_preemption_signals.sh"
TORCHRUN_DIR = ROOT / "launch" / "bin"  # its torchrun: $FASTMATH_PYTHON -m torch.distributed.run


def stage(conf: str, *overrides: str) -> run.Script:
    """``launch/run.py conf=<conf> <overrides>`` as a NeMo-Run task; raises ``ConfigError``
    naming the key when the configuration cannot run."""
    if not RUN_PY.is_file():
        raise FileNotFoundError(f"{RUN_PY} not found: the NeMo-Run recipes need a checkout of the "
                                "repository (pip install -e .), not a wheel")
    cfg = load_config(conf, list(overrides))
    argv = [f"conf={conf}", *overrides]
    return run.Script(inline=_command(argv), entrypoint="bash", metadata={"argv": argv, "config": to_yaml(cfg)})


def _command(argv: list[str]) -> str:
    """The script each torchrun worker runs. An inline script rather than ``Script(path=run.py,
    args=...)``: NeMo-Run shell-quotes a script's arguments for its torchrun command line, and
    LocalExecutor passes them to torchrun without a shell, so ``eval.token_budgets=[24]`` arrived
    with its quotes. ``$FASTMATH_PYTHON``: the trainer's interpreter, as in fastmath.sbatch."""
    return f'exec "${{FASTMATH_PYTHON:-python3}}" {shlex.quote(str(RUN_PY))} {shlex.join(argv)}\n'


def sft(*overrides: str) -> run.Script:
    """Stage 1 alone (``conf/sft.yaml``)."""
    return stage("sft", *overrides)


def grpo(*overrides: str) -> run.Script:
    """Stage 2 alone (``conf/grpo.yaml``; set ``grpo.init_from``)."""
    return stage("grpo", *overrides)


def recipe(*overrides: str) -> run.Script:
    """SFT, then GRPO, then evaluation of the three models (``conf/recipe.yaml``)."""
    return stage("recipe", *overrides)


def eval(*overrides: str) -> run.Script:  # noqa: A001 - the stage's name, as conf=eval
    """Evaluation of one checkpoint (``conf/eval.yaml``; set ``eval.checkpoint``)."""
    return stage("eval", *overrides)


def export(*overrides: str) -> run.Script:
    """A stage checkpoint in another format (``conf/export.yaml``: ``export.checkpoint``,
    ``export.format``, ``export.dir``); one worker is enough."""
    return stage("export", *overrides)


def local_executor(nproc_per_node: int = 2, env_vars: dict[str, str] | None = None) -> run.LocalExecutor:
    """``torchrun --nproc-per-node <nproc_per_node>`` on this machine."""
    return run.LocalExecutor(ntasks_per_node=nproc_per_node, launcher="torchrun",
                             env_vars=_trainer_env(env_vars, shell=False))


def slurm_executor(account: str, partition: str | None = None, nodes: int = 1, nproc_per_node: int = 1,
                   gpus_per_node: int | None = None, time: str = "04:00:00",
                   env_vars: dict[str, str] | None = None, **kwargs: object) -> run.SlurmExecutor:
    """One ``torchrun`` per node with ``nproc_per_node`` workers (NeMo-Run's torchrun launcher
    turns ``ntasks_per_node`` into torchrun's workers). Submits from this machine
    (``LocalTunnel``: run the driver on the cluster's login node) with NeMo-Run's plain
    packager: the job runs this checkout in place, so it must be on a file system every node
    sees. ``kwargs`` go to ``run.SlurmExecutor`` (``mem``, ``exclusive``, ``container_image``...)."""
    # LocalTunnel copies nothing: its job_dir must be where NeMo-Run writes the experiment.
    tunnel = run.LocalTunnel(job_dir=os.path.join(run.config.get_nemorun_home(), "experiments"))
    return run.SlurmExecutor(account=account, partition=partition, nodes=nodes, ntasks_per_node=nproc_per_node,
                             gpus_per_node=gpus_per_node, time=time, launcher="torchrun", tunnel=tunnel,
                             packager=run.Packager(), env_vars=_trainer_env(env_vars, shell=True), **kwargs)


def _trainer_env(env_vars: dict[str, str] | None, shell: bool) -> dict[str, str]:
    """``env_vars`` with ``launch/bin`` first on PATH, so that the job's ``torchrun`` is the trainer's,
    and a relative ``$FASTMATH_PYTHON`` (``.venv/bin/python``) made absolute: the Slurm job runs in
    its own folder. ``shell``: values for NeMo-Run's batch script, which exports them unquoted
    (``$PATH`` expands there); else torchx's local scheduler, which appends the driver's PATH itself."""
    env = dict(env_vars or {})
    quote = shlex.quote if shell else str
    python = env.get("FASTMATH_PYTHON", os.environ.get("FASTMATH_PYTHON", ""))
    if os.sep in python and not os.path.isabs(python):
        env["FASTMATH_PYTHON"] = quote(os.path.abspath(python))  # not realpath: a venv's python is a symlink
    rest = env.get("PATH", "$PATH" if shell else "")
    env["PATH"] = os.pathsep.join(filter(None, [quote(str(TORCHRUN_DIR)), rest]))
    return env


@dataclass(kw_only=True)
class SlurmPreemption(run.Plugin):
    """Preemption and requeue for a ``SlurmExecutor``, as ``launch/slurm/fastmath.sbatch`` does.

    - ``--signal=USR1@<warning_s>``: Slurm sends SIGUSR1 to the job's processes ``warning_s``
      seconds before the time limit (a preemption sends SIGTERM). Not ``B:`` (the batch shell
      only) as in fastmath.sbatch: NeMo-Run's script runs ``srun`` in the foreground, and bash
      runs a trap only after the foreground command ends.
    - torchrun ignores USR1 and TERM (``launch/slurm/ignore_preemption_signals.sh`` between
      ``srun`` and ``torchrun``, the executor's ``launch/bin/torchrun``: SIG_IGN survives both
      execs; ``PET_SIGNALS_TO_HANDLE`` keeps torchrun from installing its SIGTERM handler), so
      it keeps supervising the workers while they finish the step, save it on every rank and
      exit with code 75.
    - ``$FASTMATH_STOP_FILE`` / ``$FASTMATH_PREEMPTED_FILE`` per restart in the job's folder:
      touching the stop file asks the same stop; rank 0 records the saved step in the other.
    - On exit, the batch script requeues the job when the run recorded a checkpoint and fewer
      than ``max_restarts`` restarts happened; NeMo-Run submits with ``--requeue``, and the
      requeued job runs with ``resume=true`` (``SLURM_RESTART_COUNT`` > 0). A failed run is not
      requeued (unless the executor's own ``retries`` say so).
    """

    warning_s: int = 300
    max_restarts: int = 20

    def setup(self, task: run.Partial | run.Script, executor: run.Executor) -> None:
        if not isinstance(executor, run.SlurmExecutor):
            raise TypeError(f"SlurmPreemption: needs a run.SlurmExecutor, got {type(executor).__name__}")
        if not isinstance(task, run.Script) or "argv" not in task.metadata:
            raise TypeError("SlurmPreemption: the task must be one of fastmath_nemo.nemo_run's recipes")
        if self.warning_s <= 0 or self.max_restarts < 0:
            raise ValueError(f"SlurmPreemption: warning_s must be > 0 (got {self.warning_s}) and "
                             f"max_restarts >= 0 (got {self.max_restarts})")
        executor.signal = f"USR1@{self.warning_s}"
        executor.srun_args = [*(executor.srun_args or []), str(IGNORE_SIGNALS)]  # the last: it precedes torchrun
        # NeMo-Run exports env_vars unquoted in its batch script, so ${...} expands there.
        folder = os.path.join(executor.tunnel.job_dir, Path(executor.job_dir).name)
        restart_dir = f"{folder}/fastmath_restart_${{SLURM_RESTART_COUNT:-0}}"
        executor.env_vars.update({
            STOP_FILE_ENV: f"{restart_dir}/stop_requested",
            PREEMPTED_FILE_ENV: f"{restart_dir}/preempted.json",
            "PET_SIGNALS_TO_HANDLE": "SIGINT,SIGHUP,SIGQUIT",
        })
        executor.setup_lines = "\n".join(filter(None, [executor.setup_lines, _requeue_lines(self.max_restarts)]))
        # A requeued job reruns the same command; the batch script sets FASTMATH_RESUME=true then
        # (NeMo-Run quotes the arguments, so the config loader's oc.env reads it, not the shell).
        task.metadata["argv"] = [*task.metadata["argv"], "resume=${oc.env:FASTMATH_RESUME,false}"]
        task.inline = _command(task.metadata["argv"])


def _requeue_lines(max_restarts: int) -> str:
    """Batch-script lines: a clean per-restart folder, and an EXIT trap that requeues the job
    when ``$FASTMATH_PREEMPTED_FILE`` exists (the run saved a checkpoint and stopped)."""
    return "\n".join([
        f'mkdir -p "$(dirname "${PREEMPTED_FILE_ENV}")"; rm -f "${STOP_FILE_ENV}" "${PREEMPTED_FILE_ENV}"',
        "fastmath_requeue() {",
        f'    [[ -f ${PREEMPTED_FILE_ENV} ]] || return 0',
        f'    echo "fastmath: the run saved a checkpoint and stopped: $(tr -d "\\n " < "${PREEMPTED_FILE_ENV}")"',
        f"    if (( ${{SLURM_RESTART_COUNT:-0}} >= {max_restarts} )); then",
        f'        echo "fastmath: not requeued: max_restarts={max_restarts} reached"; return 0; fi',
        '    echo "fastmath: requeueing; the next run continues with resume=true"',
        '    scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "}",
        "trap fastmath_requeue EXIT",
        "if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then export FASTMATH_RESUME=true; else export FASTMATH_RESUME=false; fi",
    ])

