"""Transformer Engine, FP8 and the attention path, decided in one place (``layer_spec.py``).

``choose_layer_spec`` needs no megatron-core (the validator calls it before anything is
imported), so these run everywhere; this machine's TE and GPU are replaced by the answers each
case needs.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fastmath_nemo.config.errors import ConfigError
from fastmath_nemo.config.schema import MegatronConfig, PackedAttention
from fastmath_nemo.policy.megatron import layer_spec


@pytest.fixture
def machine(monkeypatch):
    """``machine(te=..., fp8_gpu=...)`` sets what this machine has."""

    def set_machine(*, te: bool, fp8_gpu: bool = False) -> None:
        monkeypatch.setattr(layer_spec, "transformer_engine_installed", lambda: te)
        monkeypatch.setattr(layer_spec, "fp8_gpu", lambda: fp8_gpu)

    return set_machine


@pytest.mark.parametrize(("te", "attention", "packed_format"), [(False, "sdpa", "mask"), (True, "te", "thd")])
def test_auto_takes_transformer_engine_where_it_is_installed(machine, te, attention, packed_format) -> None:
    machine(te=te)
    choice = layer_spec.choose_layer_spec(MegatronConfig())
    assert (choice.attention, choice.packed_format, choice.fp8) == (attention, packed_format, None)
    # per-document attention is the SDPA core attention's; TE's thd segments are their own path
    assert choice.per_document(PackedAttention.per_document) is (attention == "sdpa")
    assert choice.per_document(PackedAttention.dense) is False


def test_fp8_on_transformer_engine_sets_the_transformer_config(machine) -> None:
    machine(te=True, fp8_gpu=True)
    choice = layer_spec.choose_layer_spec(MegatronConfig(fp8="hybrid", fp8_recipe="tensorwise"))
    tcfg = SimpleNamespace(fp8=None, fp8_recipe="delayed")
    choice.configure(tcfg)
    assert (choice.attention, tcfg.fp8, tcfg.fp8_recipe) == ("te", "hybrid", "tensorwise")
    assert type(tcfg.fp8) is str  # megatron-core compares plain strings
    untouched = SimpleNamespace(fp8=None, fp8_recipe="delayed")
    layer_spec.choose_layer_spec(MegatronConfig()).configure(untouched)
    assert (untouched.fp8, untouched.fp8_recipe) == (None, "delayed")


@pytest.mark.parametrize(
    ("te", "fp8_gpu", "settings", "key", "words"),
    [
        # FP8 asked with a local spec would have been silently ignored: it is refused
        (True, True, {"fp8": "e4m3", "attention_backend": "sdpa"}, "policy.megatron.fp8", "attention_backend=sdpa"),
        (False, True, {"fp8": "e4m3"}, "policy.megatron.fp8", "Transformer Engine"),
        (True, False, {"fp8": "e4m3"}, "policy.megatron.fp8", "compute capability >= 8.9"),
        (False, False, {"attention_backend": "te"}, "policy.megatron.attention_backend", "needs Transformer Engine"),
        (False, False, {"transformer_impl": "transformer_engine"}, "policy.megatron.transformer_impl",
         "needs Transformer Engine"),
        (True, False, {"transformer_impl": "local", "attention_backend": "te"}, "policy.megatron.attention_backend",
         "transformer_impl=local"),
        # auto resolves to TE where it is installed, and context parallelism runs on SDPA only
        (True, False, {"context_parallel_size": 2}, "policy.megatron.context_parallel_size", "attention_backend=sdpa"),
        (False, False, {"context_parallel_size": 2, "attention_backend": "unfused"},
         "policy.megatron.context_parallel_size", "attention_backend=sdpa"),
    ],
)
def test_what_cannot_run_names_the_key(machine, te, fp8_gpu, settings, key, words) -> None:
    machine(te=te, fp8_gpu=fp8_gpu)
    with pytest.raises(ConfigError, match=f"config key '{key}'") as err:
        layer_spec.choose_layer_spec(MegatronConfig(**settings))
    assert words in str(err.value)


def test_context_parallelism_on_sdpa_is_chosen(machine) -> None:
    machine(te=True)
    choice = layer_spec.choose_layer_spec(MegatronConfig(context_parallel_size=2, attention_backend="sdpa"))
    assert choice.attention == "sdpa" and choice.packed_format == "mask"
