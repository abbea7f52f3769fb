"""Between stages the finished stage's policy, optimizer and generator are released before the
next stage builds its own: at 14B an SFT policy left alive would hold its weights and optimizer
states while GRPO allocates its policy and vLLM's share."""

from __future__ import annotations

import gc
import importlib.util
import weakref
from pathlib import Path

import pytest
from _cli import TINY_RECIPE

from fastmath_nemo import pipeline
from fastmath_nemo.preflight import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["torch", "megatron"])
def backend(request):
    if request.param == "megatron":
        if importlib.util.find_spec("megatron.core") is None:
            pytest.skip("needs megatron-core")
        yield request.param
        from fastmath_nemo.policy.megatron.parallel import destroy_model_parallel

        destroy_model_parallel()  # the process group the policy made: later tests expect none
        return
    yield request.param


def test_the_sft_policy_is_gone_before_the_grpo_policy_is_built(tmp_path: Path, monkeypatch, backend: str) -> None:
    built: list[tuple[str, weakref.ref]] = []  # (stage, policy or generator)
    events: list[str] = []  # "build <stage>" and "release", in order
    stage = ["sft"]
    real_load_policy, real_make_generator = pipeline.load_policy, pipeline.make_generator
    real_release = pipeline.release_device_memory

    def load_policy(*args, **kwargs):
        alive = [name for name, ref in built if name != stage[0] and ref() is not None]
        assert alive == [], f"building a {stage[0]} policy while {alive} objects of earlier stages live"
        events.append(f"build {stage[0]}")
        policy = real_load_policy(*args, **kwargs)
        built.append((stage[0], weakref.ref(policy)))
        return policy

    def release_device_memory():
        events.append("release")
        real_release()

    def make_generator(*args, **kwargs):
        generator = real_make_generator(*args, **kwargs)
        built.append((stage[0], weakref.ref(generator)))
        return generator

    def entering(name: str, real):
        def run(*args, **kwargs):
            stage[0] = name
            return real(*args, **kwargs)
        return run

    monkeypatch.setattr(pipeline, "load_policy", load_policy)
    monkeypatch.setattr(pipeline, "make_generator", make_generator)
    monkeypatch.setattr(pipeline, "release_device_memory", release_device_memory)
    monkeypatch.setattr(pipeline, "grpo_stage", entering("grpo", pipeline.grpo_stage))
    monkeypatch.setattr(pipeline, "eval_stage", entering("eval", pipeline.eval_stage))
    cfg = load_config("recipe", [*TINY_RECIPE, f"run.dir={tmp_path}", f"policy.backend={backend}", "sft.epochs=1",
                                 "eval.models=[sft]",
                                 "grpo.eval_every_steps=0", "grpo.keep=last", "sft.eval_every_epoch=true"])
    # Only the pipeline's own release may free reference cycles (a DDP wrapper and its model
    # form some): with automatic collection on, the verdict would depend on when it happens to run.
    gc.disable()
    try:
        pipeline.run_stage(cfg)
    finally:
        gc.enable()
    assert {name for name, _ in built} == {"sft", "grpo", "eval"}  # each stage built what it needed
    # the device memory is released after a stage and before the next one builds anything
    first_grpo, first_eval = events.index("build grpo"), events.index("build eval")
    assert "release" in events[events.index("build sft"):first_grpo]
    assert "release" in events[first_grpo:first_eval]
    assert [name for name, ref in built if ref() is not None] == []  # and nothing outlives the run
