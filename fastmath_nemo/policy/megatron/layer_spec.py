"""The layer spec a ``MegatronConfig`` builds: Transformer Engine and FP8 are decided here, and
only here, as megatron-core confines them to the choice of a ``ModuleSpec``.

:func:`choose_layer_spec` turns ``policy.megatron.{attention_backend, transformer_impl, fp8,
fp8_recipe, context_parallel_size}`` into a :class:`LayerSpecChoice`, or a ``ConfigError``
naming the key that cannot run on this machine. The validator (``fastmath_nemo.preflight``)
calls it before any work starts; the policy calls it again to build what it chose
(:func:`gpt_layer_spec`, :meth:`LayerSpecChoice.configure`).

This module imports megatron-core only inside :func:`gpt_layer_spec`, so the validator can
tell a user without megatron-core what to install.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastmath_nemo.config.errors import config_error
from fastmath_nemo.config.schema import (
    FP8Format,
    FP8Recipe,
    MegatronAttention,
    MegatronConfig,
    PackedAttention,
    TransformerImpl,
)

if TYPE_CHECKING:
    from megatron.core.transformer.spec_utils import ModuleSpec

MEGATRON_INSTALL = "pip install -e '.[megatron]' (megatron-core>=0.16.1; 0.16.1 is the last for Python 3.11)"
TE_INSTALL = "pip install -e '.[te]' on a CUDA machine (Transformer Engine does not import without a GPU driver)"
ATTENTION_BACKENDS = ("unfused", "sdpa", "te")  # what a spec is built for (MegatronAttention less auto)


@dataclass(frozen=True)
class LayerSpecChoice:
    """What the megatron policy builds.

    attention: ``te`` (Transformer Engine's spec: fused norms and linears, FP8-capable),
        ``sdpa`` (megatron's local spec, core attention on torch SDPA) or ``unfused``
        (megatron's local spec with its own attention, the reference numerics).
    fp8 / fp8_recipe: FP8 GEMMs of the TE spec, or None.
    """

    attention: str
    fp8: FP8Format | None = None
    fp8_recipe: FP8Recipe = FP8Recipe.delayed

    @property
    def packed_format(self) -> str:
        """How packed rows reach attention: megatron's ``thd`` format (TE's fused kernels take
        no mask tensor, see ``thd.py``) or a per-row ``mask`` (the local specs)."""
        return "thd" if self.attention == "te" else "mask"

    def per_document(self, packed_attention: PackedAttention) -> bool:
        """Whether packed rows attend one document at a time: the SDPA core attention's path;
        megatron's unfused attention (a reference backend) takes only the dense mask."""
        return packed_attention == PackedAttention.per_document and self.attention == "sdpa"

    def configure(self, tcfg: Any) -> None:
        """Set the precision fields of megatron's ``TransformerConfig`` (FP8 recipe), which the
        TE spec's modules read; nothing for the local specs."""
        if self.fp8 is not None:
            tcfg.fp8, tcfg.fp8_recipe = str(self.fp8), str(self.fp8_recipe)


def transformer_engine_installed() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def fp8_gpu() -> bool:
    """Whether this machine's GPU has FP8 tensor cores (compute capability >= 8.9)."""
    import torch

    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def resolve_attention_backend(name: str, transformer_impl: str = TransformerImpl.auto) -> str:
    """The spec to build: Transformer Engine's (``te``) when asked for by either key or, for
    ``auto``, where TE is installed (and ``transformer_impl`` is not ``local``); else SDPA."""
    if transformer_impl == TransformerImpl.transformer_engine:
        return "te"
    if name != MegatronAttention.auto:
        return str(name)
    return "te" if transformer_engine_installed() and transformer_impl != TransformerImpl.local else "sdpa"


def choose_layer_spec(m: MegatronConfig) -> LayerSpecChoice:
    """The spec and precision ``m`` asks for, or ``ConfigError`` naming the key when this
    machine or the combination cannot run it (no silent fallback to another spec)."""
    impl, asked = m.transformer_impl, m.attention_backend
    if impl == TransformerImpl.local and asked == MegatronAttention.te:
        raise config_error("policy.megatron.attention_backend",
                           "'te' is Transformer Engine's layer spec; transformer_impl=local asks for megatron's own")
    attention = resolve_attention_backend(asked, impl)
    wants_te = impl == TransformerImpl.transformer_engine or asked == MegatronAttention.te
    if wants_te and not transformer_engine_installed():
        key = "transformer_impl" if impl == TransformerImpl.transformer_engine else "attention_backend"
        raise config_error(f"policy.megatron.{key}", f"needs Transformer Engine: {TE_INSTALL}")
    if m.fp8 is not None:
        if attention != "te":
            raise config_error("policy.megatron.fp8", "FP8 runs through Transformer Engine's layer spec, not "
                               f"attention_backend={asked} / transformer_impl={impl}: {TE_INSTALL}")
        if not fp8_gpu():
            raise config_error("policy.megatron.fp8", "FP8 needs a GPU with FP8 tensor cores (compute capability "
                               ">= 8.9: Ada, Hopper, Blackwell); this machine has none")
    if m.context_parallel_size > 1 and attention != "sdpa":
        raise config_error("policy.megatron.context_parallel_size", "> 1 runs on policy.megatron.attention_backend=sdpa "
                           "(keys and values all-gathered over the context-parallel ranks), not "
                           f"attention_backend={asked} / transformer_impl={impl}")
    return LayerSpecChoice(attention, m.fp8, m.fp8_recipe)


def gpt_layer_spec(attention: str, qk_layernorm: bool) -> ModuleSpec:
    """The transformer layer spec for ``attention`` (a :class:`LayerSpecChoice`'s):

    - ``unfused``: megatron-core's local spec with its own ``DotProductAttention``
      (materialises [b, h, s, s] scores; reference numerics).
    - ``sdpa``: the local spec with core attention replaced by :class:`SDPAAttention`
      (``torch.nn.functional.scaled_dot_product_attention``).
    - ``te``: Transformer Engine's spec (fused norms/linears, FP8-capable); needs
      ``transformer_engine`` importable.

    The local specs' norms are :class:`SequenceParallelRMSNorm` (megatron's ``WrappedTorchNorm``
    refuses sequence parallelism).
    """
    if attention not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend {attention!r} not in {ATTENTION_BACKENDS}")
    if attention == "te":
        try:
            import transformer_engine  # noqa: F401
        except Exception as exc:  # TE raises more than ImportError when no GPU driver is present
            raise ValueError(
                "attention_backend='te' needs Transformer Engine: pip install "
                "transformer-engine[pytorch] on a CUDA machine (or use 'sdpa' / 'unfused'); "
                f"importing it failed with: {exc!r}"
            ) from exc
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from fastmath_nemo.policy.megatron.norm import SequenceParallelRMSNorm

    spec = get_gpt_layer_local_spec(qk_layernorm=qk_layernorm, normalization="RMSNorm")
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = SequenceParallelRMSNorm
    if qk_layernorm:
        attention_modules = spec.submodules.self_attention.submodules
        attention_modules.q_layernorm = attention_modules.k_layernorm = SequenceParallelRMSNorm
    if attention == "sdpa":
        from fastmath_nemo.policy.megatron.sdpa_attention import SDPAAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAAttention
    return spec
