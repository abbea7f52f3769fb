#!/usr/bin/env bash
# GPU checks for the PyTorch backend, for a short window on one H100/H200 with no internet:
# packages that the GPU image lacks arrive as wheels in .whl/ (see docs/gpu.md).
#   bash benchmarks/gpu_check.sh            (writes logs to $OUT when set, else ./gpu-logs)
source benchmarks/gpu_env.sh

echo "== CPU + CUDA unit tests (not the slow end-to-end ones)"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests -m "not slow" \
  --ignore=tests/test_resume.py --ignore=tests/test_failures.py 2>&1 | tail -n 15 | tee "$out/pytest.txt"

echo "== SFT throughput, 0.9B Llama-shaped model, bf16, packed 4k rows"
timeout 180 python3 benchmarks/sft_throughput.py --preset 1b --device cuda --dtype bfloat16 --steps 6 2>&1 | tee "$out/throughput.txt"

echo "== the recipe on CUDA (the reduced configuration of tests/test_recipe_functional.py)"
timeout 240 python3 launch/run.py policy.device=cuda run.dir=/tmp/gpu-recipe data.synthetic.n_train=2000 \
  data.synthetic.n_eval=64 sft.epochs=4 grpo.steps=20 grpo.prompts_per_step=8 eval.n_samples=2 eval.k_values=[2] 2>&1 \
  | grep -v "it/s\]" | tail -n 12 | tee "$out/recipe.txt"
