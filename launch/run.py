"""Command line: ``python launch/run.py conf=NAME key.sub=value ...`` (no arguments: conf=recipe).

Parses the configuration and dispatches to the stage; nothing else lives here.
"""

from __future__ import annotations

import sys

from fastmath_nemo.checkpoint.preemption import PREEMPTED_EXIT_CODE, Preempted, preemption_signals
from fastmath_nemo.config.errors import ConfigError
from fastmath_nemo.data.chat import ChatTemplateError
from fastmath_nemo.data.loading import DataError
from fastmath_nemo.pipeline import run_stage
from fastmath_nemo.preflight import check_model_folders, load_config
from fastmath_nemo.utils.distributed import destroy_distributed, is_collective_failure, rank, setup_logging


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    name, overrides = "recipe", []
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r}: expected conf=NAME or key=value")
        if arg.startswith("conf="):
            name = arg.split("=", 1)[1]
        else:
            overrides.append(arg)
    return name, overrides


def main(argv: list[str] | None = None) -> int:
    try:
        name, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        cfg = load_config(name, overrides)
        check_model_folders(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    setup_logging(cfg.run.log_level)
    # SIGUSR1 / SIGTERM (Slurm's warning before a time limit or preemption) now mean: finish
    # the step, save a checkpoint on every rank, exit with PREEMPTED_EXIT_CODE.
    try:
        with preemption_signals():
            run_stage(cfg)
    except (ConfigError, DataError, ChatTemplateError, FileNotFoundError) as err:  # bad input: say what and where
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Preempted as stop:
        print(f"{stop} (exit code {PREEMPTED_EXIT_CODE})", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except RuntimeError as err:
        if not is_collective_failure(err):
            raise
        print(f"error: rank {rank()}: a collective failed ({str(err).splitlines()[0]}): another rank died or "
              f"waited longer than run.distributed_timeout_s={cfg.run.distributed_timeout_s:g} s (the first rank "
              "to fail says why); resume=true continues from the last checkpoint", file=sys.stderr)
        return 1
    finally:
        # Under torchrun: gloo's threads still running at interpreter exit abort the process
        # (exit code -6 after a finished run), so the process group goes first.
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
