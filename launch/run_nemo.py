"""Runs a stage through NeMo-Run: ``python launch/run_nemo.py local|slurm [options] conf=NAME key=value ...``

The same ``conf=`` and overrides as ``launch/run.py``, run as a NeMo-Run experiment on this
machine (torchrun) or on Slurm (from the login node; with preemption and requeue). Waits for
the job, prints ``<conf>: <state>`` and exits 0 only when NeMo-Run reports SUCCEEDED. Needs
NeMo-Run's environment (README "With NeMo-Run").
"""

from __future__ import annotations

import argparse
import sys

import nemo_run as run

from fastmath_nemo import nemo_run as fm
from fastmath_nemo.config.errors import ConfigError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("executor", choices=["local", "slurm"])
    parser.add_argument("args", nargs="*", help="conf=NAME and key=value overrides, as for launch/run.py")
    parser.add_argument("--nproc-per-node", type=int, default=1, help="torchrun workers per node")
    parser.add_argument("--name", default="fastmath", help="experiment name")
    slurm = parser.add_argument_group("slurm")
    slurm.add_argument("--account", default="fastmath")
    slurm.add_argument("--partition")
    slurm.add_argument("--nodes", type=int, default=1)
    slurm.add_argument("--gpus-per-node", type=int)
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--time", default="04:00:00")
    slurm.add_argument("--preemption-warning-s", type=int, default=300,
                       help="SIGUSR1 this long before the time limit; 0: no preemption plugin")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(sys.argv[1:] if argv is None else argv)
    confs = [a.split("=", 1)[1] for a in opts.args if a.startswith("conf=")]
    conf = confs[-1] if confs else "recipe"
    try:
        task = fm.stage(conf, *[a for a in opts.args if not a.startswith("conf=")])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plugins: list[run.Plugin] = []
    if opts.executor == "local":
        executor = fm.local_executor(nproc_per_node=opts.nproc_per_node)
    else:
        executor = fm.slurm_executor(account=opts.account, partition=opts.partition, nodes=opts.nodes,
                                     nproc_per_node=opts.nproc_per_node, gpus_per_node=opts.gpus_per_node,
                                     cpus_per_task=opts.cpus_per_task, time=opts.time)
        if opts.preemption_warning_s > 0:
            plugins.append(fm.SlurmPreemption(warning_s=opts.preemption_warning_s))
    with run.Experiment(opts.name) as exp:
        exp.add(task, executor=executor, plugins=plugins, name=conf)
        exp.run(detach=False)
    state = exp.jobs[0].state
    print(f"{conf}: {state.name}")
    return 0 if state.name == "SUCCEEDED" else 1


if __name__ == "__main__":  # NeMo-Run imports the driver's module again: start nothing on import
    sys.exit(main())
