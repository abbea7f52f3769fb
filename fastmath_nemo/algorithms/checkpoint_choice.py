"""Which GRPO checkpoint the stage outputs: held-out evaluations during GRPO and ``grpo.keep``.

    step 0, every grpo.eval_every_steps, the last step:
        pass@1, mean output tokens on a held-out slice        metrics: grpo_heldout / heldout/*
    keep=last: the last step's weights
    keep=best: fewest held-out mean tokens among the eligible evaluations (step 0 always is:
               GRPO never outputs a model worse than its start on this slice), by
               grpo.keep_eligibility:
                 tolerance: pass@1 at least step 0's minus grpo.keep_tolerance
                 interval:  pass@1's 95% bootstrap interval (evaluation.metrics) overlaps
                            step 0's or lies above it (hi >= step 0's lo): the slice cannot
                            tell the step from its start, or it is better
               evaluations within
               grpo.keep_tokens_tolerance of the fewest tokens count as the shortest, and the
               most accurate of them is kept

As the reference repository saved every 5 steps and picked by evaluation. With keep=best the
best-so-far weights are saved as ``<stage>/candidates/step_N`` when found (the last step's
are the policy itself), and moved to ``<stage>/final`` at the end. The evaluations so far are
part of every checkpoint's loop state, so a resumed run chooses as an uninterrupted one. A
candidate is deleted as soon as nothing can choose it: neither this run (a newer evaluation
beat it, and the best of a growing history never goes back to an older one) nor a run resumed
from the newest complete checkpoint (whose recorded evaluations may name an older best). At
14B a candidate is a 29.5 GB Hugging Face folder: at most two exist at once.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastmath_nemo.checkpoint.atomic import atomic_write_json, is_complete, list_checkpoints
from fastmath_nemo.checkpoint.manager import CheckpointManager
from fastmath_nemo.config.schema import GRPOConfig
from fastmath_nemo.generation.base import Generator
from fastmath_nemo.utils.distributed import barrier, broadcast_object, is_rank0
from fastmath_nemo.utils.metrics_logger import MetricsLogger

logger = logging.getLogger(__name__)
KEPT_FILE = "kept.json"  # <stage dir>/kept.json: the step kept, why, and every held-out evaluation
HELDOUT_STAGE = "grpo_heldout"  # metrics.jsonl stage of the held-out evaluations


@dataclasses.dataclass(frozen=True)
class HeldoutResult:
    """One held-out evaluation of the policy after ``step`` GRPO steps (0: the stage's start)."""

    step: int
    pass_at_1: float
    mean_tokens: float
    ci95: tuple[float, float] | None = None  # pass@1's 95% bootstrap interval (None: recorded before it existed)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "pass@1": self.pass_at_1, "mean_tokens": self.mean_tokens}
        if self.ci95 is not None:
            out["pass@1_ci95"] = list(self.ci95)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "HeldoutResult":
        ci = d.get("pass@1_ci95")
        return cls(int(d["step"]), float(d["pass@1"]), float(d["mean_tokens"]),
                   None if ci is None else (float(ci[0]), float(ci[1])))


def choose(history: list[HeldoutResult], keep: str, tolerance: float, last_step: int,
           tokens_tolerance: float = 0.0, eligibility: str = "tolerance") -> tuple[int, str]:
    """(step to keep, a sentence saying why). ``history`` starts with step 0's evaluation.

    Of the eligible evaluations (``eligibility``: within ``tolerance`` of step 0's pass@1, or
    with a 95% interval that reaches step 0's: the module docstring), those whose mean tokens are
    within ``tokens_tolerance`` (a share) of the fewest are as short as the shortest: 80.84
    against 80.87 tokens must not outweigh 98.4% against 100%. The kept step is the most
    accurate of them, then the shorter, then the later."""
    if keep == "last" or not history:
        return last_step, f"grpo.keep={keep}: the last step's weights"
    start = history[0]
    assert start.step == 0, "the held-out history must start with the GRPO start (step 0)"
    if eligibility == "interval":
        if any(h.ci95 is None for h in history):
            raise ValueError("grpo.keep_eligibility=interval needs every held-out evaluation's pass@1 interval; "
                             "these were recorded without one (resume with keep_eligibility=tolerance)")
        floor = start.ci95[0]  # type: ignore[index]
        eligible = [h for h in history if h.ci95[1] >= floor - 1e-9]  # type: ignore[index]
        rule = (f"whose pass@1 95% interval reaches step 0's ({100 * floor:.1f}-{100 * start.ci95[1]:.1f}%)"  # type: ignore[index]
                f" or lies above it")
    else:
        floor = start.pass_at_1 - tolerance
        eligible = [h for h in history if h.pass_at_1 >= floor - 1e-9]
        rule = f"whose pass@1 stayed within {100 * tolerance:.1f} points of step 0's {100 * start.pass_at_1:.1f}%"
    fewest = min(h.mean_tokens for h in eligible)
    shortest = [h for h in eligible if h.mean_tokens <= fewest * (1 + tokens_tolerance) + 1e-9]
    best = max(shortest, key=lambda h: (h.pass_at_1, -h.mean_tokens, h.step))
    excluded = [h for h in history if h not in eligible]
    if len(shortest) > 1:
        short = (f"is the most accurate ({100 * best.pass_at_1:.1f}%) of the {len(shortest)} evaluations within "
                 f"{100 * tokens_tolerance:.1f}% of the fewest held-out mean tokens ({fewest:.1f}; step "
                 f"{best.step}: {best.mean_tokens:.1f}, step 0: {start.mean_tokens:.1f})")
    else:
        short = (f"has the fewest held-out mean tokens ({best.mean_tokens:.1f}, step 0: {start.mean_tokens:.1f}; "
                 f"pass@1 {100 * best.pass_at_1:.1f}%)")
    reason = f"grpo.keep=best: step {best.step} {short}, among the {len(eligible)} of {len(history)} evaluations {rule}"
    if excluded:
        reason += "; below that: " + ", ".join(f"step {h.step} ({100 * h.pass_at_1:.1f}%)" for h in excluded)
    return best.step, reason


class CheckpointChoice:
    """Held-out evaluations and the kept checkpoint of one GRPO stage (a no-op keeping the
    last step when ``evaluate`` is None). ``evaluate(step)`` returns the summary of
    ``evaluation.runner.evaluate`` (``pass@1``, ``mean_output_tokens``) for the policy's
    current weights, which the generator holds; every rank calls every method."""

    def __init__(self, cfg: GRPOConfig, evaluate: Callable[[int], dict[str, Any]] | None,
                 checkpoints: CheckpointManager, metrics: MetricsLogger) -> None:
        self.cfg = cfg
        self.evaluate = evaluate if cfg.eval_every_steps > 0 else None
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.candidates = checkpoints.stage_dir / "candidates"
        self.history: list[HeldoutResult] = []

    def restore(self, state: dict[str, Any], checkpoint: Path) -> None:
        """The evaluations recorded in a resumed ``checkpoint``'s loop state (:meth:`state`)."""
        self.history = [HeldoutResult.from_dict(d) for d in state.get("heldout", [])]
        self.checkpoints.committed_state = state
        self.metrics.resume(HELDOUT_STAGE, int(state["step"]))  # a killed run's later evaluations are redone
        if self.evaluate is not None and not self.history:
            raise ValueError(f"{checkpoint}: no held-out evaluation of the GRPO start (step 0) in this checkpoint "
                             "(written with grpo.eval_every_steps=0), which grpo.eval_every_steps > 0 compares "
                             "with: resume with grpo.eval_every_steps=0, or start the GRPO stage again")

    def state(self) -> dict[str, Any]:
        """Loop state for a checkpoint: plain lists and numbers (loads with weights_only)."""
        return {"heldout": [h.to_dict() for h in self.history]}

    def _kept(self) -> int:
        return choose(self.history, self.cfg.keep, self.cfg.keep_tolerance, self.cfg.steps,
                      self.cfg.keep_tokens_tolerance, self.cfg.keep_eligibility)[0]

    def after_step(self, step: int, policy: Any, generator: Generator) -> None:
        """Evaluate when ``step`` is due (0, every ``eval_every_steps``, the last) and not yet
        evaluated; with keep=best save the weights when they are the new best."""
        if self.evaluate is None or any(h.step == step for h in self.history):
            return
        if not (step == 0 or step % self.cfg.eval_every_steps == 0 or step == self.cfg.steps):
            return
        generator.wake()
        summary = self.evaluate(step)  # type: ignore[misc]
        generator.sleep()
        # Every rank computed the same summary from all ranks' samples; rank 0's is the one used.
        ci = summary.get("pass@1_ci95")
        result = broadcast_object(HeldoutResult(step, float(summary["pass@1"]), float(summary["mean_output_tokens"]),
                                                None if ci is None else (float(ci[0]), float(ci[1]))))
        assert isinstance(result, HeldoutResult)
        self.history.append(result)
        logged = {"heldout/pass@1": result.pass_at_1, "heldout/mean_tokens": result.mean_tokens}
        if result.ci95 is not None:
            logged.update({"heldout/pass@1_ci95_lo": result.ci95[0], "heldout/pass@1_ci95_hi": result.ci95[1]})
        self.metrics.log(HELDOUT_STAGE, step, logged)
        if self.cfg.keep == "best" and step < self.cfg.steps and self._kept() == step:
            self.checkpoints.save_as(policy, self.candidates / f"step_{step}", {"step": step})
            self.prune_candidates()

    def save_checkpoint(self, policy: Any, step: int) -> Path:
        """A resumable checkpoint with the evaluations so far (once it is complete, the
        candidates only older checkpoints named go: :meth:`prune_candidates`)."""
        path = self.checkpoints.save(policy, step, self.state())
        self.prune_candidates()
        return path

    def prune_candidates(self) -> None:
        """Delete the candidates nothing can choose any more (rank 0; the module docstring says
        which): all but the best so far and the best the newest complete checkpoint records."""
        if not self.history or not is_rank0():
            return
        needed = {self._kept()}
        committed = self.checkpoints.committed_state
        if committed is not None and committed.get("heldout"):
            recorded = [HeldoutResult.from_dict(d) for d in committed["heldout"]]
            needed.add(choose(recorded, self.cfg.keep, self.cfg.keep_tolerance, self.cfg.steps,
                              self.cfg.keep_tokens_tolerance, self.cfg.keep_eligibility)[0])
        for candidate_step, candidate in list_checkpoints(self.candidates):
            if candidate_step not in needed:
                shutil.rmtree(candidate)

    def finish(self, policy: Any) -> Path:
        """Write ``<stage>/final`` with the kept weights and ``<stage>/kept.json``."""
        self.checkpoints.wait()  # a checkpoint still being written is completed first
        steps = self.cfg.steps
        kept, reason = choose(self.history, self.cfg.keep, self.cfg.keep_tolerance, steps,
                              self.cfg.keep_tokens_tolerance, self.cfg.keep_eligibility)
        if self.history and is_rank0():
            # keep=last saves no candidate, and a run shorter than its checkpoint interval has
            # written nothing into the stage directory yet
            self.checkpoints.stage_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.checkpoints.stage_dir / KEPT_FILE, {
                "keep": self.cfg.keep, "step": kept, "of_steps": steps, "reason": reason,
                "keep_eligibility": self.cfg.keep_eligibility,
                "keep_tolerance": self.cfg.keep_tolerance, "keep_tokens_tolerance": self.cfg.keep_tokens_tolerance,
                "heldout": {"problems": self.cfg.heldout_problems, "n_samples": self.cfg.heldout_n_samples,
                            "token_budget": self.cfg.heldout_token_budget},
                "evaluations": [h.to_dict() for h in self.history],
            })
        if self.history:
            logger.info("GRPO output: step %d of %d (%s)", kept, steps, reason)
        if kept == steps:
            final = self.checkpoints.save_final(policy, {"step": steps})
        else:
            final = self.checkpoints.final_dir
            source = self.candidates / f"step_{kept}"
            if not broadcast_object(is_complete(source)):  # every rank stops, not rank 0 alone
                raise RuntimeError(f"{source}: the kept step's weights are missing (grpo.keep=best chose step "
                                   f"{kept}); start the stage again without resume")
            if is_rank0():
                if final.exists():  # never complete here (the stage would have been skipped)
                    shutil.rmtree(final)
                os.replace(source, final)  # same directory tree: an atomic rename, no copy
            barrier()
        if is_rank0():
            shutil.rmtree(self.candidates, ignore_errors=True)
        return final
