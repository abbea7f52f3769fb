"""The megatron-core half of ``policy.backend=megatron``: model, config, weights, parallel groups.

Modules (import them directly; this package imports nothing, so that importing it does not
pull in megatron-core):

- ``cpu_compat``: the CUDA redirections megatron-core needs on the CPU (gloo).
- ``parallel``: ``init_model_parallel`` / ``destroy_model_parallel`` / ``check_layout``.
- ``config``: HF config -> ``TransformerConfig`` and RoPE settings.
- ``layer_spec``: the one place that decides Transformer Engine, FP8 and the attention path
  (``choose_layer_spec``, called by the validator and the policy) and builds the layer spec.
- ``sdpa_attention``: core attention on torch SDPA (packed rows via a per-document mask).
- ``convert``: HF <-> megatron weights per rank; ``gather_hf_weights`` for export and refit.
- ``model``: ``build_gpt_model`` and ``load_hf_weights``.
- ``policy``: ``MegatronPolicy``. The layout of packed rows is ``fastmath_nemo.batching.documents``.
"""
