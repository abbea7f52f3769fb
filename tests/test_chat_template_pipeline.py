"""``data.chat_template`` through the pipeline: validation at start-up, the tokenizer every stage
loads, and the template saved with checkpoints so that later stages and runs render the same way.

The template is a DeepSeek-R1-Distill-style one written here (assistant turns keep only the text
after ``</think>``; the generation prompt opens the think block), on the embedded task tokenizer.
Stage functions are called directly on a tiny model (no CLI subprocess).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer  # noqa: E402

from fastmath_nemo import pipeline  # noqa: E402
from fastmath_nemo.checkpoint.manager import CheckpointManager  # noqa: E402
from fastmath_nemo.preflight import ConfigError, load_config  # noqa: E402
from fastmath_nemo.data import chat  # noqa: E402
from fastmath_nemo.data.synthetic import SyntheticTaskConfig, generate_splits  # noqa: E402
from fastmath_nemo.data.tokenizer import CHAT_TEMPLATE, build_task_tokenizer  # noqa: E402
from fastmath_nemo.policy.models import TinyModelConfig, build_tiny_model, load_pretrained  # noqa: E402
from fastmath_nemo.policy.torch_policy import TorchPolicy  # noqa: E402

from _templates import R1_STYLE_TEMPLATE  # noqa: E402  (tests/_templates.py)

TINY = [
    "data.synthetic.n_train=8", "data.synthetic.n_eval=2", "sft.epochs=1", "sft.rows_per_step=4",
    "sft.eval_every_epoch=false", "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.num_generations=2",
    "generation.max_tokens=8", "eval.token_budgets=[8]", "eval.n_samples=2", "eval.k_values=[2]",
    "eval.models=[base]", "model.tiny.hidden_size=64", "model.tiny.num_layers=1",
    "model.tiny.num_attention_heads=2", "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128",
    "policy.device=cpu",
]


# Tiny tensors gain nothing from threads (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def template_file(tmp_path: Path) -> Path:
    path = tmp_path / "r1_style.jinja"
    path.write_text(R1_STYLE_TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder with the embedded task tokenizer (ChatML template) and a tiny model."""
    out = tmp_path_factory.mktemp("model")
    train, _ = generate_splits(SyntheticTaskConfig(seed=5, n_train=16, n_eval=1))
    tokenizer = build_task_tokenizer([f"{r.problem}\n{r.trace}" for r in train], out, vocab_size=300)
    model_cfg = TinyModelConfig(hidden_size=64, num_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=128, max_position_embeddings=256)
    build_tiny_model(model_cfg, tokenizer, seed=0).save_pretrained(str(out), safe_serialization=True)
    return out


def _prompt_text(tokenizer: Any) -> str:
    return tokenizer.decode(chat.prompt_ids(tokenizer, "What is 1 + 1?", None))


def test_load_tokenizer_replaces_the_template_given_as_string_or_file(model_dir: Path, template_file: Path,
                                                                      tmp_path: Path) -> None:
    assert pipeline.load_tokenizer(model_dir).chat_template == CHAT_TEMPLATE
    for value in (R1_STYLE_TEMPLATE, str(template_file)):
        tokenizer = pipeline.load_tokenizer(model_dir, value)
        assert tokenizer.chat_template == R1_STYLE_TEMPLATE
        assert _prompt_text(tokenizer).endswith("<|im_start|>assistant\n<think>\n")

    # A folder whose tokenizer has no template at all is usable once one is configured.
    bare = tmp_path / "bare"
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(str(bare))
    with pytest.raises(ValueError, match="no chat template .*data.chat_template"):
        pipeline.load_tokenizer(bare)
    assert pipeline.load_tokenizer(bare, str(template_file)).chat_template == R1_STYLE_TEMPLATE


def test_checkpoint_saves_the_template_and_the_folder_reloads_it(model_dir: Path, template_file: Path,
                                                                tmp_path: Path) -> None:
    policy = TorchPolicy(load_pretrained(model_dir, "float32"), torch.device("cpu"), 1.0, torch.float32)
    manager = CheckpointManager(tmp_path / "sft", pipeline.load_tokenizer(model_dir, str(template_file)))
    for folder in (manager.save(policy, 1, {}), manager.save_final(policy, {})):
        # transformers 5 writes the template to chat_template.jinja; older ones to tokenizer_config.json
        saved = [f.name for f in folder.iterdir() if f.name in ("chat_template.jinja", "tokenizer_config.json")
                 and R1_STYLE_TEMPLATE in f.read_text(encoding="utf-8")]
        assert saved, sorted(f.name for f in folder.iterdir())
        assert AutoTokenizer.from_pretrained(str(folder), local_files_only=True).chat_template == R1_STYLE_TEMPLATE
        assert pipeline.load_tokenizer(folder).chat_template == R1_STYLE_TEMPLATE


@pytest.mark.parametrize("make_value, reason", [
    (lambda d: str(d / "missing.jinja"), "neither a Jinja template .* nor an existing file"),
    (lambda d: "{% for message in messages %}{{ message['content'] }}", "does not compile .*endfor"),
    (lambda d: str(_write(d / "bad.jinja", "{{ messages | no_such_filter }}")), "does not compile .*no_such_filter"),
], ids=["missing-file", "unclosed-for-string", "unknown-filter-file"])
def test_bad_chat_template_fails_at_config_validation_naming_the_key(tmp_path: Path, make_value: Any,
                                                                     reason: str) -> None:
    cfg = load_config("recipe", [*TINY, f"run.dir={tmp_path / 'run'}"])
    cfg.data.chat_template = make_value(tmp_path)
    from fastmath_nemo.preflight import validate

    with pytest.raises(ConfigError, match=f"config key 'data.chat_template': .*{reason}"):
        validate(cfg)
    if not make_value(tmp_path).startswith("{"):  # a path survives the command line's YAML parsing
        with pytest.raises(ConfigError, match="config key 'data.chat_template'"):
            load_config("recipe", [*TINY, f"data.chat_template={make_value(tmp_path)}"])
    assert not (tmp_path / "run").exists()  # nothing was started


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_sft_grpo_and_eval_render_with_the_configured_template(tmp_path: Path, template_file: Path,
                                                              caplog: pytest.LogCaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """SFT from the embedded base (ChatML) with the R1-style template: examples use the
    rewrite fallback (noted once) and the SFT folder carries the template; GRPO from that folder
    with no template configured (conf=grpo) renders with it and saves it again; evaluation of
    the base folder with the template configured renders its prompts with it."""
    evaluated: list[str] = []
    real_evaluate = pipeline.evaluate

    def spy_evaluate(generator: Any, tokenizer: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        evaluated.append(_prompt_text(tokenizer))
        return real_evaluate(generator, tokenizer, *args, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate", spy_evaluate)
    chat._log_once.cache_clear()
    cfg = load_config("recipe", [*TINY, f"run.dir={tmp_path / 'run'}", f"data.chat_template={template_file}"])
    run = pipeline.start_run(cfg)
    data = pipeline.load_task_data(cfg)
    base = pipeline.base_model_dir(run, data)
    assert pipeline.load_tokenizer(base).chat_template == CHAT_TEMPLATE  # the base keeps its own

    with caplog.at_level(logging.INFO, logger="fastmath_nemo.data.chat"):
        sft_final = pipeline.sft_stage(run, data, base)
    notes = [r.getMessage() for r in caplog.records if "rewrites assistant turns" in r.getMessage()]
    assert len(notes) == 1, notes
    assert AutoTokenizer.from_pretrained(str(sft_final), local_files_only=True).chat_template == R1_STYLE_TEMPLATE

    grpo_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, chat_template=None))
    grpo_run = dataclasses.replace(run, cfg=grpo_cfg, dir=tmp_path / "grpo_run")
    grpo_final = pipeline.grpo_stage(grpo_run, data, sft_final)
    assert AutoTokenizer.from_pretrained(str(grpo_final), local_files_only=True).chat_template == R1_STYLE_TEMPLATE

    rows = pipeline.eval_stage(run, data, {"base": base})
    assert [r.model for r in rows] == ["base"]
    assert evaluated and all(text.endswith("<|im_start|>assistant\n<think>\n") for text in evaluated)
    run.metrics.close()
