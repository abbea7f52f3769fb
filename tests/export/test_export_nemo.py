"""The NeMo 2 export against NeMo itself (``nemo_toolkit`` 2.7.3): ``load_context`` builds the
model config, ``llm.export_ckpt(<our export>, "hf")`` gives back the source weights bit-exactly,
and our weights equal ``llm.import_ckpt``'s of the same Hugging Face folder tensor for tensor.
The same for a stage checkpoint the main environment trained (transformers 5), whose tokenizer
this environment's transformers (4.57) and NeMo must read as the main environment did.

NeMo's pins conflict with the main environment's, so these run in their own: ``.ci/nemo_export``
(the main suite skips them where NeMo is not installed).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest

if importlib.util.find_spec("nemo") is None or importlib.util.find_spec("megatron.core") is None:
    pytest.skip("needs nemo_toolkit 2.7.3 and megatron-core: run .ci/nemo_export", allow_module_level=True)

from _hf_folders import (  # noqa: E402
    main_env_checkpoint,
    safetensors_state,
    tokenizer_expectations,
    tokenizer_expectations_path,
    write_hf_folder,
)
from _ci_skips import in_ci  # noqa: E402
from _nemo_cpu import nemo_on_cpu  # noqa: E402  (before NeMo: it stands in for a removed module)

import torch  # noqa: E402
from nemo.collections import llm  # noqa: E402
from nemo.lightning.io import load_context  # noqa: E402

from fastmath_nemo.config.schema import ExportConfig  # noqa: E402
from fastmath_nemo.export import export_checkpoint  # noqa: E402

pytestmark = [pytest.mark.nemo, pytest.mark.megatron]
ROOT = Path(__file__).resolve().parents[2]

# NeMo's model class and a config instance to pick its importer (the importer builds its own).
NEMO_MODELS = {"qwen2": (llm.Qwen2Model, llm.Qwen2Config500M, "Qwen2Config"),
               "qwen3": (llm.Qwen3Model, llm.Qwen3Config600M, "Qwen3Config"),
               "llama": (llm.LlamaModel, llm.Llama32Config1B, "LlamaConfig")}
# NeMo's Qwen3 importer fixes the head width at 128 (real Qwen3 models' width); here too.
OVERRIDES = {"qwen3": {"head_dim": 128}}


def _plain_tensors(weights: Path) -> dict[str, torch.Tensor]:
    """Every global tensor of a distributed checkpoint, by key."""
    from megatron.core import dist_checkpointing

    from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel, init_model_parallel

    init_model_parallel(1, 1, seed=0)
    try:
        loaded = dist_checkpointing.load_plain_tensors(str(weights))
    finally:
        destroy_model_parallel()
    return {k: v for k, v in loaded.items() if isinstance(v, torch.Tensor)}  # not common.pt's loop state


def _drop_tied_head(returned: dict[str, torch.Tensor], folder: Path) -> None:
    """NeMo 2.7.3's Qwen3 exporter writes an ``lm_head.weight`` it never filled (uninitialised
    memory) beside ``tie_word_embeddings: true``; transformers ties the head to the embedding
    on load, so that tensor is never read. Check the tie and drop it."""
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    returned.pop("lm_head.weight", None)


def _export(source: Path, target: Path) -> Path:
    if source.name.startswith("hf-llama"):  # the README's command line, once
        sys.path.insert(0, str(ROOT / "launch"))
        from run import main

        assert main(["conf=export", f"export.checkpoint={source}", "export.format=nemo", f"export.dir={target}"]) == 0
        return target
    return export_checkpoint(ExportConfig(checkpoint=str(source), format="nemo", dir=str(target)))


@pytest.mark.parametrize("model_type", list(NEMO_MODELS))
def test_nemo_reads_our_export_and_matches_its_own_import(model_type: str, tmp_path: Path) -> None:
    model_cls, config_cls, config_name = NEMO_MODELS[model_type]
    source = write_hf_folder(model_type, tmp_path / f"hf-{model_type}", **OVERRIDES.get(model_type, {}))
    ours = _export(source, tmp_path / "ours")
    assert {p.name for p in (ours / "context").iterdir()} >= {"io.json", "model.yaml", "nemo_tokenizer"}

    hf = safetensors_state(source)
    with nemo_on_cpu():
        model = load_context(ours, subpath="model")
    cfg = model.config
    assert type(cfg).__name__ == config_name
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (len({k.split(".")[2] for k in hf if ".layers." in k}),
                                                                      64, 128)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size) == (4, 2, hf["model.embed_tokens.weight"].shape[0])
    assert cfg.share_embeddings_and_output_weights == ("lm_head.weight" not in hf)
    assert cfg.params_dtype == torch.float32

    with nemo_on_cpu():
        back = llm.export_ckpt(ours, "hf", output_path=tmp_path / "back")
    returned = safetensors_state(Path(back))
    if cfg.share_embeddings_and_output_weights:
        _drop_tied_head(returned, Path(back))
    assert returned.keys() == hf.keys()
    for name, tensor in hf.items():
        assert torch.equal(returned[name], tensor), name

    with nemo_on_cpu():
        theirs = llm.import_ckpt(model_cls(config_cls()), f"hf://{source}", output_path=tmp_path / "theirs")
    ours_tensors, their_tensors = _plain_tensors(ours / "weights"), _plain_tensors(Path(theirs) / "weights")
    assert ours_tensors.keys() == their_tensors.keys()
    for key, tensor in their_tensors.items():
        assert torch.equal(ours_tensors[key], tensor), key


def test_qwen3_head_width_follows_the_hf_config(tmp_path: Path) -> None:
    """head_dim 32 != hidden / heads: NeMo's importer would build 128-wide heads; ours builds 32."""
    source = write_hf_folder("qwen3", tmp_path / "hf-qwen3")
    ours = _export(source, tmp_path / "ours")
    with nemo_on_cpu():
        assert load_context(ours, subpath="model").config.kv_channels == 32
        back = llm.export_ckpt(ours, "hf", output_path=tmp_path / "back")
    returned, hf = safetensors_state(Path(back)), safetensors_state(source)
    _drop_tied_head(returned, Path(back))
    assert returned.keys() == hf.keys() and all(torch.equal(returned[k], hf[k]) for k in hf)


def _unavailable(reason: str) -> NoReturn:
    """A main-environment checkpoint that cannot be had: a failure in CI, else a skip."""
    if in_ci():
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture
def main_env_stage_checkpoint(tmp_path: Path) -> Path:
    """``$FASTMATH_MAIN_ENV_CHECKPOINT`` (``.ci/nemo_export`` trains it first), else one trained
    here by ``$FASTMATH_MAIN_PYTHON`` (default ``python3``), which must be transformers 5's."""
    given = os.environ.get("FASTMATH_MAIN_ENV_CHECKPOINT")
    if given:
        checkpoint = Path(given)
        assert tokenizer_expectations_path(checkpoint).is_file(), f"{checkpoint}: no tokenizer expectations beside it"
    else:
        python = os.environ.get("FASTMATH_MAIN_PYTHON", "python3")
        try:
            checkpoint = main_env_checkpoint(tmp_path / "main_env", python)
        except (OSError, subprocess.SubprocessError) as e:
            _unavailable(f"no main-environment checkpoint: {python} could not train one ({e}); "
                         "set FASTMATH_MAIN_PYTHON or run .ci/nemo_export")
    writer = json.loads(tokenizer_expectations_path(checkpoint).read_text())["transformers"]
    if int(writer.split(".")[0]) < 5:
        message = f"{checkpoint} was written by transformers {writer}, not the main environment's 5.x"
        if given:
            pytest.fail(message)
        _unavailable(message)
    return checkpoint


def test_nemo_exports_a_checkpoint_the_main_environment_trained(main_env_stage_checkpoint: Path,
                                                                tmp_path: Path) -> None:
    """The README's export command, in this environment, on ``<run>/sft/final`` written by the
    main one: both tokenizers (transformers 4.57's and NeMo's) encode as transformers 5 did, and
    our weights equal those of NeMo's own import of the checkpoint, tensor for tensor.

    The embedded model ties its head to the embedding (as Qwen2.5 0.5B to 3B do), and so does
    our export; NeMo 2.7.3's Qwen2 exporter cannot write a tied model back (it requires
    ``output_layer.weight`` and fixes ``tie_word_embeddings=False``), so the weights are checked
    against ``llm.import_ckpt`` (which unties: its head is a copy of the embedding)."""
    from transformers import AutoTokenizer

    checkpoint = main_env_stage_checkpoint
    expected = json.loads(tokenizer_expectations_path(checkpoint).read_text())
    del expected["transformers"]

    def encodings(tokenizer) -> dict:
        return {k: v for k, v in tokenizer_expectations(tokenizer).items() if k != "transformers"}

    assert encodings(AutoTokenizer.from_pretrained(str(checkpoint), local_files_only=True)) == expected

    ours = tmp_path / "nemo"
    sys.path.insert(0, str(ROOT / "launch"))
    from run import main

    assert main(["conf=export", f"export.checkpoint={checkpoint}", "export.format=nemo", f"export.dir={ours}"]) == 0
    hf = safetensors_state(checkpoint)
    hf_config = json.loads((checkpoint / "config.json").read_text())
    with nemo_on_cpu():
        model = load_context(ours, subpath="model")
    cfg = model.config
    assert type(cfg).__name__ == "Qwen2Config"
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (
        2, 64, 128, 2, 2)
    assert cfg.vocab_size == hf["model.embed_tokens.weight"].shape[0] == hf_config["vocab_size"]
    assert cfg.share_embeddings_and_output_weights is True and "lm_head.weight" not in hf
    # Qwen2.5's base, not the 10,000 transformers 4.57 falls back to without the legacy
    # rope_theta beside transformers 5's rope_parameters (checkpoint.portable_folders)
    assert cfg.rotary_base == hf_config["rope_parameters"]["rope_theta"] == 1e6
    assert cfg.params_dtype == torch.float32
    assert encodings(model.tokenizer.tokenizer) == expected  # NeMo's, from context/nemo_tokenizer

    with nemo_on_cpu():
        theirs = llm.import_ckpt(llm.Qwen2Model(llm.Qwen2Config500M()), f"hf://{checkpoint}",
                                 output_path=tmp_path / "theirs")
    ours_tensors, their_tensors = _plain_tensors(ours / "weights"), _plain_tensors(Path(theirs) / "weights")
    untied = their_tensors.pop("module.output_layer.weight")
    assert ours_tensors.keys() == their_tensors.keys()
    for key, tensor in their_tensors.items():
        assert torch.equal(ours_tensors[key], tensor), key
    embedding = ours_tensors["module.embedding.word_embeddings.weight"]
    assert torch.equal(untied, embedding) and torch.equal(embedding, hf["model.embed_tokens.weight"])
