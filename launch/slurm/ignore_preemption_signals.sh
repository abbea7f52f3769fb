#!/bin/bash
# Runs "$@" (torchrun: launch/bin/torchrun, first on the job's PATH, i.e. $FASTMATH_PYTHON -m
# torch.distributed.run) with SIGUSR1 and SIGTERM ignored: when Slurm signals every process of a
# step (--signal=USR1@N, a preemption's SIGTERM), torchrun keeps supervising its workers while
# they finish the step and save a checkpoint (fastmath_nemo/checkpoint/preemption.py installs its own
# handlers over the inherited SIG_IGN). Used by fastmath_nemo.nemo_run.SlurmPreemption: NeMo-Run
# puts srun_args unquoted into its batch script, so an inline `bash -c '...'` cannot go there.
trap "" USR1 TERM
exec "$@"
