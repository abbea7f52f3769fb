#!/usr/bin/env bash
# GPU check of the Megatron backend, for a ~10-minute window on one H100/H200 with no internet
# (Python 3.12 and CUDA torch preinstalled). Missing packages arrive as wheels in .whl/:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       megatron-core==0.19.2 omegaconf antlr4-python3-runtime==4.13.2 math-verify latex2sympy2_extended \
#       datasets dill multiprocess
#   bash tests/gpu/megatron_gpu_check.sh      (logs to $OUT when set, else ./gpu-logs)
# It runs the megatron tests on CUDA (tests/policy/megatron/test_megatron_device.py: parity
# with the CPU PyTorch backend, bf16, checkpoints; Transformer Engine spec and FP8 where TE is
# installed), then the multi-rank ones on CPU ranks with gloo (one GPU cannot hold two NCCL
# ranks), then the bf16 SFT benchmark of the Megatron backend against the PyTorch one on a
# 0.9B Llama-shaped model with packed 4k rows, and FP8 against bf16 where TE is installed.
# Transformer Engine itself cannot be carried: transformer-engine-cu13 2.20.2 is a 276 MB
# wheel (over the 64 MiB a window takes) and transformer-engine-torch has no wheel at all.
source benchmarks/gpu_env.sh
python3 -c "import megatron.core as m; print('megatron-core', m.__version__)" | tee -a "$out/device.txt"

echo "== megatron tests on CUDA"
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/policy/megatron/test_megatron_device.py 2>&1 \
  | tail -n 15 | tee "$out/megatron_cuda_tests.txt"

echo "== megatron tests on CPU ranks (gloo)"
CUDA_VISIBLE_DEVICES= timeout 240 python3 -m pytest -q -p no:cacheprovider -m megatron tests/policy/megatron \
  --deselect tests/policy/megatron/test_megatron_stages.py 2>&1 | tail -n 15 | tee "$out/megatron_tests.txt"

echo "== SFT throughput: Megatron backend vs PyTorch backend, 0.9B, bf16, packed 4k rows"
timeout 300 python3 benchmarks/megatron_sft_throughput.py --preset 1b --device cuda --dtype bfloat16 --steps 6 2>&1 \
  | grep -v -i warn | tee "$out/megatron_throughput.txt"
