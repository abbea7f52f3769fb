"""Tests for fastmath_nemo.generation.torch_generator.TorchGenerator.

Most tests use ``tiny_task.varied_model()`` (see tests/conftest.py): an untrained model
whose greedy output depends on the context, so padding / cache / stop bugs show up.
"""

from __future__ import annotations

import pytest
import torch

from fastmath_nemo.batching.batch import batch_from_sequences
from fastmath_nemo.generation.base import SamplingParams
from fastmath_nemo.generation.torch_generator import TorchGenerator
from fastmath_nemo.policy.torch_policy import TorchPolicy

from _nucleus import assert_drawn_inside_nucleus

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model(tiny_task):
    return tiny_task.varied_model(seed=0)


@pytest.fixture(scope="module")
def prompts(tiny_task):
    """Three prompts of different lengths, so the batch is left-padded."""
    full = tiny_task.prompts(3)
    out = [full[0], full[1][:25], full[2][:9]]
    assert len({len(p) for p in out}) == 3
    return out


@pytest.fixture(scope="module")
def generator(model, tiny_task):
    return TorchGenerator(model, tiny_task.pad_id)


def greedy_reference(model, prompt: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """Argmax decoding by re-running the full, unpadded sequence each step (no KV cache)."""
    ids = list(prompt)
    tokens, logprobs = [], []
    with torch.no_grad():
        for _ in range(max_tokens):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()
            lp = torch.log_softmax(logits, dim=-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            logprobs.append(float(lp[tok]))
            ids.append(tok)
    return tokens, logprobs


@pytest.fixture(scope="module")
def greedy_free(generator, prompts):
    """Greedy completions with no stop condition (the reference for stop tests)."""
    out = generator.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert out.finish_reasons == ["length"] * len(prompts)
    return out.token_ids


def _sample(generator, prompts, seed, **kw):
    params = dict(n=2, temperature=1.0, top_p=1.0, min_p=0.0, max_tokens=8, seed=seed)
    params.update(kw)
    return generator.generate(prompts, SamplingParams(**params))


def test_same_seed_gives_identical_rollouts(generator, prompts):
    a = _sample(generator, prompts, seed=11)
    b = _sample(generator, prompts, seed=11)
    assert a.token_ids == b.token_ids
    assert a.logprobs == b.logprobs
    assert a.finish_reasons == b.finish_reasons
    assert a.prompt_index == b.prompt_index == [0, 0, 1, 1, 2, 2]


def test_different_seed_gives_different_rollouts(generator, prompts):
    a = _sample(generator, prompts, seed=11)
    b = _sample(generator, prompts, seed=12)
    assert a.token_ids != b.token_ids
    # the n samples of one prompt are not copies of each other either
    assert a.token_ids[0] != a.token_ids[1]


def test_max_tokens_is_respected_with_finish_reason_length(generator, prompts):
    out = _sample(generator, prompts, seed=3, max_tokens=5)
    assert len(out) == 6
    assert [len(t) for t in out.token_ids] == [5] * 6
    assert [len(lp) for lp in out.logprobs] == [5] * 6
    assert out.finish_reasons == ["length"] * 6
    assert all(lp <= 0.0 for row in out.logprobs for lp in row)


def _first_new_token_index(tokens: list[int], start: int = 2) -> int:
    for k in range(start, len(tokens)):
        if tokens[k] not in tokens[:k]:
            return k
    pytest.skip("reference completion has no token that appears first after position 2")


def test_stop_token_ends_completion_and_is_kept(generator, prompts, greedy_free):
    ref = greedy_free[0]
    k = _first_new_token_index(ref)
    stop = ref[k]
    out = generator.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=(stop,))
    )
    assert out.token_ids[0] == ref[: k + 1]
    assert out.token_ids[0][-1] == stop
    assert out.finish_reasons[0] == "stop"
    assert len(out.logprobs[0]) == k + 1
    # every row: cut after the first occurrence of the stop token, else the full greedy text
    for row, free in enumerate(greedy_free):
        if stop in free:
            cut = free.index(stop) + 1
            assert out.token_ids[row] == free[:cut] and out.finish_reasons[row] == "stop"
        else:
            assert out.token_ids[row] == free and out.finish_reasons[row] == "length"


def test_multi_token_stop_sequence(generator, prompts, greedy_free):
    ref = greedy_free[0]
    k = _first_new_token_index(ref, start=3)
    seq = (ref[k - 1], ref[k])
    out = generator.generate(
        prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_sequences=(seq,))
    )
    for row, free in enumerate(greedy_free):
        ends = [j + 1 for j in range(1, len(free)) if tuple(free[j - 1 : j + 1]) == seq]
        if ends:
            assert out.token_ids[row] == free[: ends[0]]
            assert out.finish_reasons[row] == "stop"
        else:
            assert out.token_ids[row] == free
            assert out.finish_reasons[row] == "length"
    assert out.token_ids[0] == ref[: k + 1]
    assert tuple(out.token_ids[0][-2:]) == seq
    # the last token of the sequence alone (without its first token before it) must not stop:
    # a sequence whose first token never occurs leaves every completion at full length
    never = max(max(free) for free in greedy_free) + 1
    unmatched = generator.generate(
        prompts,
        SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_sequences=((never, ref[k]),)),
    )
    assert unmatched.token_ids == greedy_free


def test_greedy_equals_manual_argmax_without_cache(model, generator, prompts):
    out = generator.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    for row, prompt in enumerate(prompts):
        tokens, logprobs = greedy_reference(model, prompt, MAX_TOKENS)
        assert out.token_ids[row] == tokens, f"row {row} (prompt length {len(prompt)})"
        assert out.logprobs[row] == pytest.approx(logprobs, abs=1e-5)
    # the reference completions really differ between prompts (the test can tell them apart)
    assert len({tuple(t) for t in out.token_ids}) == len(prompts)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_rollout_logprobs_match_policy_logprobs(model, generator, prompts, tiny_task, temperature):
    out = generator.generate(
        prompts,
        SamplingParams(n=2, temperature=temperature, top_p=1.0, min_p=0.0, max_tokens=10, seed=5),
    )
    for i, got in enumerate(_policy_logprobs(model, tiny_task, prompts, out, temperature)):
        torch.testing.assert_close(got, torch.tensor(out.logprobs[i]), atol=1e-5, rtol=0.0)


def _policy_logprobs(model, tiny_task, prompts, out, temperature) -> list[torch.Tensor]:
    """The trainer's logprobs of each rollout's completion tokens."""
    seqs = [prompts[p] + toks for p, toks in zip(out.prompt_index, out.token_ids)]
    masks = [[0] * len(prompts[p]) + [1] * len(toks) for p, toks in zip(out.prompt_index, out.token_ids)]
    batch = batch_from_sequences(seqs, masks, tiny_task.pad_id)
    policy_lp = TorchPolicy(model, torch.device("cpu"), temperature=temperature).logprobs(batch)
    return [policy_lp[i, len(prompts[p]) : len(prompts[p]) + len(toks)]
            for i, (p, toks) in enumerate(zip(out.prompt_index, out.token_ids))]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_truncated_sampling_reports_the_trainers_logprob(model, generator, prompts, tiny_task, temperature):
    """With top-p/min-p the tokens come from the truncated distribution, but their logprobs
    are the trainer's (temperature only): the mismatch metric stays at fp32 rounding and TIS
    weights are 1. Reporting the truncated logprob (as before) gave gaps above 1e-2."""
    params = SamplingParams(n=2, temperature=temperature, top_p=0.5, min_p=0.05, max_tokens=10, seed=5)
    out = generator.generate(prompts, params)
    trainer = _policy_logprobs(model, tiny_task, prompts, out, temperature)
    gaps = torch.cat([torch.tensor(out.logprobs[i]) - got for i, got in enumerate(trainer)])
    assert gaps.numel() >= 30 and gaps.abs().max() <= 1e-5
    assert_drawn_inside_nucleus(model, prompts, out, temperature, 0.5, 0.05)  # the truncation still applies


def test_tempered_logprobs_differ_from_untempered(model, generator, prompts, tiny_task):
    """Guards the parity test above: temperature 0.7 logprobs are not the T=1 ones."""
    out = generator.generate(prompts[:1], SamplingParams(temperature=0.7, max_tokens=6, seed=2))
    seq = prompts[0] + out.token_ids[0]
    batch = batch_from_sequences([seq], [[0] * len(prompts[0]) + [1] * 6], tiny_task.pad_id)
    lp_t1 = TorchPolicy(model, torch.device("cpu"), temperature=1.0).logprobs(batch)[0, len(prompts[0]) :]
    assert (lp_t1 - torch.tensor(out.logprobs[0])).abs().max() > 1e-3


def test_rows_finishing_early_do_not_perturb_other_rows(generator, prompts, greedy_free):
    # Stop on a token that ends row 0 early; the other rows keep generating.
    k = _first_new_token_index(greedy_free[0])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, stop_token_ids=(greedy_free[0][k],))
    together = generator.generate(prompts, params)
    alone = [generator.generate([p], params) for p in prompts]
    lengths = [len(t) for t in together.token_ids]
    assert min(lengths) < max(lengths), "no row finished before another: the test proves nothing"
    for row in range(len(prompts)):
        assert together.token_ids[row] == alone[row].token_ids[0]
        assert together.finish_reasons[row] == alone[row].finish_reasons[0]
        assert together.logprobs[row] == pytest.approx(alone[row].logprobs[0], abs=1e-5)


def test_chunking_by_max_rows_does_not_change_greedy_output(model, tiny_task, prompts, greedy_free):
    one_at_a_time = TorchGenerator(model, tiny_task.pad_id, max_rows=1)
    out = one_at_a_time.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    assert out.token_ids == greedy_free
    assert out.prompt_index == [0, 1, 2]


def test_generate_restores_training_mode(model, generator, prompts):
    model.train()
    try:
        generator.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=2))
        assert model.training
    finally:
        model.eval()


def test_update_weights_copies_new_weights(tiny_task, prompts):
    target = tiny_task.varied_model(seed=1)
    source = tiny_task.varied_model(seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    before = TorchGenerator(target, tiny_task.pad_id).generate(prompts, params).token_ids
    expected = TorchGenerator(source, tiny_task.pad_id).generate(prompts, params).token_ids
    assert before != expected
    gen = TorchGenerator(target, tiny_task.pad_id)
    gen.update_weights(source.named_parameters())
    assert gen.generate(prompts, params).token_ids == expected


class _Recorder(torch.nn.Module):
    """Forwards to ``lm``, recording each call's logits shape; ``full_prefill`` drops
    ``logits_to_keep`` (the old prefill, which computed logits for every prompt position)."""

    def __init__(self, lm: torch.nn.Module, full_prefill: bool) -> None:
        super().__init__()
        self.lm, self.full_prefill, self.shapes = lm, full_prefill, []

    def forward(self, **kwargs):
        if self.full_prefill:
            kwargs.pop("logits_to_keep", None)
        out = self.lm(**kwargs)
        self.shapes.append(tuple(out.logits.shape))
        return out


def test_prefill_keeps_only_the_last_logits_and_samples_the_same(model, prompts, tiny_task):
    last_only, full = _Recorder(model, full_prefill=False), _Recorder(model, full_prefill=True)
    a = _sample(TorchGenerator(last_only, tiny_task.pad_id), prompts, seed=5)
    b = _sample(TorchGenerator(full, tiny_task.pad_id), prompts, seed=5)
    vocab = model.config.vocab_size
    rows, width = len(prompts), max(len(p) for p in prompts)
    assert last_only.shapes[0] == (rows, 1, vocab)  # prefill: one position per prompt (n = 2 share it)
    assert last_only.shapes[1] == (2 * rows, 1, vocab)  # then a row per sample
    assert full.shapes[0] == (rows, width, vocab)  # guards the comparison: the old prefill
    assert a.token_ids == b.token_ids
    assert len({tuple(t) for t in a.token_ids}) > 1  # sampled, not one constant completion
    for x, y in zip(a.logprobs, b.logprobs):  # fp32 rounding of different matmul shapes (1.2e-6 seen)
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-5, rtol=0)


def test_a_stop_request_abandons_the_rollout_within_a_few_steps(model, tiny_task, prompts, tmp_path, monkeypatch):
    from fastmath_nemo.checkpoint import preemption
    from fastmath_nemo.generation.base import STOP_CHECK_STEPS

    generator = TorchGenerator(model, tiny_task.pad_id, max_rows=2)  # two chunks: the second is never started
    stop = tmp_path / "stop"
    stop.touch()
    monkeypatch.setenv(preemption.STOP_FILE_ENV, str(stop))
    out = generator.generate(prompts[:2], SamplingParams(n=2, temperature=1.0, max_tokens=400, seed=1))
    assert out.abandoned
    assert len(out) == 2 and out.finish_reasons == ["abandoned", "abandoned"]  # the first chunk, cut short
    assert all(len(t) == STOP_CHECK_STEPS - 1 for t in out.token_ids)  # not 400: within one check interval
    stop.unlink()
    full = generator.generate(prompts[:2], SamplingParams(n=2, temperature=1.0, max_tokens=20, seed=1))
    assert not full.abandoned and len(full) == 4
