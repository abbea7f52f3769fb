"""Progress bars while generating: the PyTorch sampler's over finished completions (vLLM's:
tests/generation/test_vllm_generator.py)."""

from __future__ import annotations

from fastmath_nemo.generation.base import SamplingParams
from fastmath_nemo.generation.torch_generator import TorchGenerator


def test_torch_sampler_shows_a_bar_over_completions_only_when_asked(tiny_task, capsys):
    generator = TorchGenerator(tiny_task.varied_model(seed=0), tiny_task.pad_id, max_rows=4)
    # 3 prompts x 2 samples in chunks of 4 rows; greedy rows that hit EOS stop, the rest hit max_tokens.
    params = SamplingParams(n=2, temperature=0.0, max_tokens=6, stop_token_ids=(int(tiny_task.tokenizer.eos_token_id),))
    quiet = generator.generate(tiny_task.prompts(3), params)
    assert capsys.readouterr().err == ""
    shown = generator.generate(tiny_task.prompts(3), params, progress="model@6")
    err = capsys.readouterr().err
    assert "model@6" in err and "6/6" in err
    assert shown.token_ids == quiet.token_ids  # the bar changes nothing about sampling
