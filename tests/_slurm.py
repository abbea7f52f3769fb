"""Test helpers for the real one-node Slurm cluster of ``tests/slurm/cluster.sh``: start/stop
it, submit ``launch/slurm/fastmath.sbatch``, read a job's state, wait for states; the trainer in
a virtual environment that is not activated, as the launchers' jobs get it."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SH = ROOT / "tests" / "slurm" / "cluster.sh"
SBATCH_SCRIPT = "launch/slurm/fastmath.sbatch"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue")
ACCOUNTING = ("slurmdbd", "sacct", "mariadbd", "mariadb-install-db")


def unactivated_venv(dir: Path) -> tuple[str, str]:
    """A new user's virtual environment at ``dir``, not activated: this interpreter's packages
    (the trainer's dependencies), this checkout as ``pip install -e .`` would add it, no scripts.
    (Its python, absolute but not resolved: a venv's python is a symlink to the base one; a PATH
    without any ``torchrun``: this process's PATH less the folders that hold one.)"""
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(dir)],
                   check=True, timeout=120)
    site_dirs = site.getsitepackages() if sys.prefix != sys.base_prefix else []  # a venv's venv sees only the base's
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(dir), "platbase": str(dir)}))
    (purelib / "fastmath_nemo_test.pth").write_text(
        "".join(f"import site; site.addsitedir({d!r})\n" for d in site_dirs) + f"{ROOT}\n")
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if d and shutil.which("torchrun", path=d) is None)
    assert shutil.which("torchrun", path=path) is None, path
    return str(dir.absolute() / "bin" / "python"), path


def missing_binaries(accounting: bool = False) -> list[str]:
    """The Slurm and munge programs not on PATH (the tests skip when any is missing); with
    ``accounting``, also slurmdbd's and MariaDB's."""
    return [name for name in DAEMONS + (ACCOUNTING if accounting else ()) if shutil.which(name) is None]


class Cluster:
    """A running cluster whose state lives in ``dir``; ``env`` carries its ``SLURM_CONF``."""

    def __init__(self, dir: Path, accounting: bool = False) -> None:
        """``accounting``: also MariaDB and slurmdbd, so that ``sacct`` answers (NeMo-Run needs it)."""
        self.dir = dir
        cmd = [str(CLUSTER_SH), "start", str(dir), *(["accounting"] if accounting else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        if done.returncode != 0:
            raise RuntimeError(f"cluster.sh start failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        self.conf = str(dir / "etc" / "slurm.conf")

    def stop(self) -> None:
        subprocess.run([str(CLUSTER_SH), "stop", str(self.dir)], check=True, timeout=120)

    def run(self, *cmd: str, env: dict[str, str] | None = None, check: bool = True) -> str:
        """A client command's stdout (``scontrol ...``, ``scancel ...``) against this cluster."""
        full_env = {**(env or os.environ), "SLURM_CONF": self.conf}
        done = subprocess.run(list(cmd), capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr}")
        return done.stdout

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, Reason, ...)."""
        line = self.run("scontrol", "show", "job", "-o", str(job_id)).strip()
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def daemon_logs(self, lines: int = 40) -> str:
        """The last ``lines`` of slurmctld's and slurmd's logs, for failure messages."""
        tails = []
        for name in ("slurmctld", "slurmd"):
            path = self.dir / "log" / f"{name}.log"
            text = path.read_text(errors="replace").splitlines()[-lines:] if path.exists() else ["(no log)"]
            tails.append(f"--- {path}\n" + "\n".join(text))
        return "\n".join(tails)

    def wait_job(self, job_id: int, done: Callable[[dict[str, str]], bool], timeout: float, what: str,
                 log: Path | None = None) -> dict[str, str]:
        """Poll the job until ``done(info)``; AssertionError naming ``what`` (with ``log``'s tail) on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if done(info):
                return info
            if time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""
                raise AssertionError(f"job {job_id}: no {what} within {timeout} s; now {info.get('JobState')}"
                                     f" (Restarts={info.get('Restarts')}):\n{tail}\n{self.daemon_logs()}")
            time.sleep(0.25)


def finished(info: dict[str, str]) -> bool:
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
