"""cpu_compat: megatron-core's RNG tracker and training step on the CPU, and a no-op on GPUs."""

from __future__ import annotations

import pytest

pytest.importorskip("megatron.core")

import torch  # noqa: E402
from _megatron_tiny import tiny_hf_model  # noqa: E402
from megatron.core import tensor_parallel  # noqa: E402

from fastmath_nemo.policy.megatron import cpu_compat  # noqa: E402
from fastmath_nemo.policy.megatron.config import transformer_config_from_hf  # noqa: E402
from fastmath_nemo.policy.megatron.layer_spec import gpt_layer_spec  # noqa: E402
from fastmath_nemo.policy.megatron.model import build_gpt_model, load_hf_weights  # noqa: E402
from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel, init_model_parallel  # noqa: E402

pytestmark = [
    pytest.mark.megatron,
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
]
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="the redirections are CPU-only")


@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    init_model_parallel(1, 1, seed=0)
    yield
    destroy_model_parallel()


def test_does_nothing_when_cuda_is_available(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_compat.enable_cpu_compat() is False


@CPU_ONLY
def test_idempotent() -> None:
    assert cpu_compat.enable_cpu_compat() and cpu_compat.enable_cpu_compat()
    assert cpu_compat.cpu_compat_enabled()


@CPU_ONLY
def test_rng_tracker_forks_the_cpu_generator_and_restores_it() -> None:
    """fork() draws from the tracked model-parallel stream and puts the default one back;
    re-seeding replays the tracked stream."""
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        first = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)
    with tracker.fork():
        second = torch.rand(4)
    assert not torch.equal(first, second)  # the tracked stream advanced
    tensor_parallel.model_parallel_cuda_manual_seed(123)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first)


@pytest.mark.parametrize(("dtype", "distributed_optimizer"), [(torch.float32, False), (torch.bfloat16, True)])
def test_a_training_step_with_megatron_ddp_and_optimizer(dtype: torch.dtype, distributed_optimizer: bool) -> None:
    """Forward/backward through the schedule, DDP grad buffers, clipping and Adam all run."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.pipeline_parallel import get_forward_backward_func

    hf = tiny_hf_model("qwen3")
    tcfg = transformer_config_from_hf(hf.config, params_dtype=dtype)
    model = build_gpt_model(hf.config, tcfg, gpt_layer_spec("sdpa", tcfg.qk_layernorm))
    load_hf_weights(model, hf.state_dict(), hf.config)
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=distributed_optimizer)
    ddp = DistributedDataParallel(tcfg, ddp_config, model)
    tcfg.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.1, params_dtype=dtype, bf16=dtype == torch.bfloat16,
                        use_distributed_optimizer=distributed_optimizer),
        [ddp],
    )
    ids = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))

    def forward_step(data_iterator, model):
        logits = model(next(data_iterator), torch.arange(8).expand(2, 8), None)
        return logits, lambda out: (out.float().logsumexp(-1).mean(), {})

    before = model.decoder.layers[0].mlp.linear_fc1.weight.detach().clone()
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter([ids]), model=[ddp],
                                num_microbatches=1, seq_length=8, micro_batch_size=2)
    updated, grad_norm, _ = optimizer.step()
    assert updated and grad_norm > 0.1  # > clip_grad: the CPU clipping path ran
    assert not torch.equal(model.decoder.layers[0].mlp.linear_fc1.weight, before)
