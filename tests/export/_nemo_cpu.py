"""NeMo 2.7.3's import, load and export paths on a CPU machine without Transformer Engine:
the redirections NeMo's own code needs there, for the nemo tests only (the export itself needs
just ``nemo_context.config_builds_without_te``). Each was found by running without it.

- Fusions off: NeMo's model configs default to TE / apex fused kernels (RoPE, bias + SwiGLU,
  masked softmax, persistent layer norm, gradient-accumulation fusion); megatron-core refuses
  them without TE, so every ``TransformerConfig`` built inside has them off. The context
  records constructor arguments, not these instance values.
- megatron-core 0.16 (the last for Python 3.11) removed the tensorstore (zarr) strategy that
  NeMo 2.7.3's ``dist_ckpt_io`` imports by name, only to load zarr checkpoints; without the
  name NeMo decides megatron-core is missing and cannot save or load at all. An empty module
  stands in for it: importing this file installs it, so import it before NeMo.
- Layer-norm names: NeMo's importers and exporters map HF's pre-norms to Transformer Engine's
  module names (``linear_qkv.layer_norm_weight``, ``linear_fc1.layer_norm_weight``); the local
  spec NeMo builds without TE names them ``input_layernorm`` / ``pre_mlp_layernorm`` (its
  checkpoint keys are TE's all the same), so NeMo would log "No matches found for source key"
  and silently keep the initial norms. ``io.apply_transforms`` gets the local names instead
  when neither model has TE's.
- megatron-core's own CUDA calls (dist_checkpointing save, model parallel RNG): the project's
  ``policy/megatron/cpu_compat``.
- ``torch.cuda.synchronize()`` and ``torch.cuda.current_device()`` in megatron's asynchronous
  checkpoint calls (NeMo saves asynchronously; its flags are tensors on the current device):
  a no-op and ``"cpu"`` on a CPU build; ``torch.cuda.Stream()``, which NeMo's loader enters
  around the model's parallel set-up: None (``torch.cuda.stream(None)`` does nothing).
- ``nemo.lightning.io.pl._fix_tensors_device`` asserts CUDA is initialised, to move loaded
  CUDA tensors to the current GPU: on a CPU machine there are none, so it returns its input.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

_FUSIONS = ("apply_rope_fusion", "bias_activation_fusion", "bias_dropout_fusion", "masked_softmax_fusion",
            "persist_layer_norm", "gradient_accumulation_fusion", "cross_entropy_loss_fusion")


_TE_TO_LOCAL = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


def _local_norm_names(apply_transforms: Callable[..., Any]) -> Callable[..., Any]:
    def apply(source: Any, target: Any, mapping: dict[str, str], *args: Any, **kwargs: Any) -> Any:
        has_te = any("linear_qkv.layer_norm_weight" in key for model in (source, target)
                     for key in model.state_dict())
        if not has_te:
            def local(name: str) -> str:
                for te, own in _TE_TO_LOCAL.items():
                    name = name.replace(te, own)
                return name

            mapping = {local(k): local(v) for k, v in mapping.items()}
        return apply_transforms(source, target, mapping, *args, **kwargs)

    return apply


def _stand_in_for_tensorstore_strategy() -> None:
    import megatron.core.dist_checkpointing.strategies as strategies

    name = strategies.__name__ + ".tensorstore"
    if not hasattr(strategies, "tensorstore"):
        module = types.ModuleType(name, "stand-in: removed in megatron-core 0.16, imported by NeMo 2.7.3")
        sys.modules[name] = module
        strategies.tensorstore = module


_stand_in_for_tensorstore_strategy()


@contextlib.contextmanager
def nemo_on_cpu() -> Iterator[None]:
    import torch
    from megatron.core.transformer.transformer_config import TransformerConfig
    from nemo.lightning import io as nemo_io
    from nemo.lightning.io import pl as nemo_pl

    from fastmath_nemo.export.nemo_context import config_builds_without_te
    from fastmath_nemo.policy.megatron.cpu_compat import enable_cpu_compat

    enable_cpu_compat()
    original = TransformerConfig.__post_init__

    def post_init(self) -> None:
        for name in _FUSIONS:
            if hasattr(self, name):
                setattr(self, name, False)
        original(self)

    TransformerConfig.__post_init__ = post_init
    apply_transforms, nemo_io.apply_transforms = nemo_io.apply_transforms, _local_norm_names(nemo_io.apply_transforms)
    saved = {name: getattr(torch.cuda, name) for name in ("synchronize", "current_device", "Stream")}
    fix_device, nemo_pl._fix_tensors_device = nemo_pl._fix_tensors_device, lambda checkpoint: checkpoint
    torch.cuda.Stream = lambda *args, **kwargs: None
    torch.cuda.synchronize = lambda *args, **kwargs: None
    torch.cuda.current_device = lambda: "cpu"
    try:
        with config_builds_without_te():
            yield
    finally:
        TransformerConfig.__post_init__ = original
        nemo_io.apply_transforms = apply_transforms
        nemo_pl._fix_tensors_device = fix_device
        for name, value in saved.items():
            setattr(torch.cuda, name, value)
