"""The held-out slice of GRPO's checkpoint choice: never the final evaluation set, never a GRPO
training problem, and adding it changes neither of those sets."""

from __future__ import annotations

import json

import pytest

from fastmath_nemo.preflight import load_config
from fastmath_nemo.pipeline import load_task_data

SMALL = ["data.synthetic.n_train=300", "data.synthetic.n_eval=40"]


def test_synthetic_heldout_is_new_problems_and_leaves_the_other_sets_alone():
    without = load_task_data(load_config("recipe", [*SMALL, "grpo.keep=last", "grpo.eval_every_steps=0"]))
    data = load_task_data(load_config("recipe", [*SMALL, "grpo.eval_every_steps=5", "grpo.heldout_problems=24"]))
    assert without.grpo_heldout == [] and len(data.grpo_heldout) == 24
    assert data.eval == without.eval and data.grpo == without.grpo and data.sft == without.sft
    heldout = {r.problem for r in data.grpo_heldout}
    assert not heldout & {r.problem for r in data.eval + data.grpo}


def test_files_heldout_comes_out_of_the_grpo_problems(tmp_path):
    path = tmp_path / "grpo.jsonl"
    path.write_text("".join(json.dumps({"problem": f"What is {i}+1?", "answer": str(i + 1)}) + "\n" for i in range(10)))
    files = ["data.source=files", f"data.sft_path={path}", f"data.grpo_path={path}", f"data.eval_path={path}",
             "data.trace_field=answer", "grpo.eval_every_steps=5"]
    data = load_task_data(load_config("recipe", [*files, "grpo.heldout_problems=3"]))
    assert len(data.grpo) == 7 and len(data.grpo_heldout) == 3
    assert {r.problem for r in data.grpo} | {r.problem for r in data.grpo_heldout} == {
        f"What is {i}+1?" for i in range(10)}
    with pytest.raises(ValueError, match=r"'grpo.heldout_problems': 10 held-out problems leave none of the 10"):
        load_task_data(load_config("recipe", [*files, "grpo.heldout_problems=10"]))
