"""A batched KV-cache sampler over a transformers causal LM (the PyTorch Generator).

It shares the policy's module (colocated, no copy), so ``update_weights`` only copies
tensors when it was given a different model. A prompt's ``n`` samples share one prefill (its
KV cache rows are copied ``n`` times), and rows that finish are dropped from the batch and
the KV cache as they go, so long-tailed lengths do not cost full-batch steps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, PreTrainedModel

from fastmath_nemo.checkpoint.preemption import stop_requested_here
from fastmath_nemo.generation.base import STOP_CHECK_STEPS, Rollouts, SamplingParams
from fastmath_nemo.generation.sampling import ends_with_any, sample_top_p_min_p

logger = logging.getLogger(__name__)


class TorchGenerator:
    def __init__(
        self, model: PreTrainedModel, pad_id: int, max_rows: int = 512, compute_dtype: torch.dtype = torch.float32
    ) -> None:
        self.model = model
        self.pad_id = pad_id
        self.max_rows = max_rows
        self.compute_dtype = compute_dtype  # the policy's, so sampler and trainer logprobs agree

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress: str | None = None) -> Rollouts:
        """``params.n`` completions per prompt, ``max_rows`` rows decoded at once; ``progress``
        labels a bar that advances as completions finish (None: no bar)."""
        rows = [(p, ids) for p, ids in enumerate(prompt_ids) for _ in range(params.n)]
        rng = torch.Generator(device=self.device)
        rng.manual_seed(params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item()))
        rollouts = Rollouts()
        was_training = self.model.training
        self.model.eval()
        bar = tqdm(total=len(rows), desc=progress, unit="completion", disable=progress is None, dynamic_ncols=True)
        try:
            for start in range(0, len(rows), self.max_rows):
                chunk = rows[start : start + self.max_rows]
                with torch.autocast(self.device.type, dtype=self.compute_dtype,
                                    enabled=self.compute_dtype != torch.float32):
                    tokens, logprobs, reasons = self._generate_chunk([ids for _, ids in chunk], params, rng, bar)
                rollouts.prompt_index.extend(p for p, _ in chunk)
                rollouts.token_ids.extend(tokens)
                rollouts.logprobs.extend(logprobs)
                rollouts.finish_reasons.extend(reasons)
                if "abandoned" in reasons:
                    rollouts.abandoned = True  # a stop request: the rest is not worth generating
                    break
        finally:
            bar.close()
            self.model.train(was_training)
        return rollouts

    @torch.no_grad()
    def _generate_chunk(
        self, prompts: list[list[int]], params: SamplingParams, rng: torch.Generator, bar: tqdm
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        device, n = self.device, len(prompts)
        # The n samples of a prompt are consecutive rows: prefill each distinct prompt once.
        unique: list[list[int]] = []
        source: list[int] = []  # row -> its prompt's index in unique
        for p in prompts:
            if not unique or unique[-1] != p:
                unique.append(p)
            source.append(len(unique) - 1)
        width = max(len(p) for p in unique)
        # Left padding keeps every row's next token in the last column.
        input_ids = torch.full((len(unique), width), self.pad_id, dtype=torch.long, device=device)
        attention = torch.zeros((len(unique), width), dtype=torch.long, device=device)
        for i, p in enumerate(unique):
            input_ids[i, width - len(p) :] = torch.tensor(p, device=device)
            attention[i, width - len(p) :] = 1
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        # Only the last position's logits are sampled from: logits_to_keep=1 makes the prefill
        # hold [U, 1, V] instead of [U, width, V] (width x V x 4 bytes per row at fp32).
        logits = self.model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, past_key_values=cache,
            use_cache=True, logits_to_keep=1,
        ).logits[:, -1]
        rows = torch.tensor(source, device=device)
        cache.batch_select_indices(rows)  # [U, ...] -> [n, ...]: each sample its own copy
        logits, attention, positions = logits[rows], attention[rows], positions[rows]

        out_tokens: list[list[int]] = [[] for _ in range(n)]
        out_logprobs: list[list[float]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        active = torch.arange(n, device=device)  # original row of each live batch row
        next_pos = positions[:, -1] + 1
        stop_ids = set(params.stop_token_ids)
        for decoded in range(params.max_tokens):
            if decoded % STOP_CHECK_STEPS == STOP_CHECK_STEPS - 1 and stop_requested_here():
                for row in active.tolist():
                    reasons[row] = "abandoned"
                return out_tokens, out_logprobs, reasons
            token, token_logprob = self._sample(logits, params, rng)
            finished = []
            for j, (row, tok, lp) in enumerate(zip(active.tolist(), token.tolist(), token_logprob.tolist())):
                out_tokens[row].append(tok)
                out_logprobs[row].append(lp)
                if tok in stop_ids or ends_with_any(out_tokens[row], params.stop_sequences):
                    reasons[row] = "stop"
                    finished.append(j)
            if finished:
                bar.update(len(finished))
                keep = torch.ones(len(active), dtype=torch.bool, device=device)
                keep[finished] = False
                if not keep.any():
                    break
                idx = keep.nonzero().squeeze(-1)
                cache.batch_select_indices(idx)
                active, token, attention, next_pos = active[idx], token[idx], attention[idx], next_pos[idx]
            attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=-1)
            logits = self.model(
                input_ids=token[:, None],
                attention_mask=attention,
                position_ids=next_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
        bar.update(reasons.count("length"))  # the rows cut by max_tokens finish here
        return out_tokens, out_logprobs, reasons

    @staticmethod
    def _sample(
        logits: torch.Tensor, params: SamplingParams, rng: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits [B, V] -> (token [B], logprob [B]). The token is drawn from the tempered,
        min-p/top-p-truncated, renormalised distribution; its logprob is reported under the
        trainer's distribution, ``log softmax(logits / temperature)`` without truncation (see
        ``Rollouts.logprobs``). Greedy decoding reports the untempered logprob."""
        logits = logits.float()
        if params.temperature <= 0.0:
            logprobs = torch.log_softmax(logits, dim=-1)
            token = logprobs.argmax(dim=-1)
            return token, logprobs.gather(-1, token[:, None]).squeeze(-1)
        logprobs = torch.log_softmax(logits / params.temperature, dim=-1)
        token = sample_top_p_min_p(logprobs.exp(), params.top_p, params.min_p, rng)
        return token, logprobs.gather(-1, token[:, None]).squeeze(-1)

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights:
                target = params[name]
                if target.data_ptr() != tensor.data_ptr():
                    target.copy_(tensor)

    def sleep(self) -> None:  # the sampler holds no memory beyond the shared model
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        pass
