"""report.png beside report.md / report.json: a valid PNG of the documented size, drawn from the
metrics, embedded in report.md; the GRPO step kept and why in both reports."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from fastmath_nemo.evaluation.report import EvalRow, write_report
from fastmath_nemo.evaluation.report_plot import DPI, SIZE_INCHES

TAB_BLUE = (31, 119, 180)  # matplotlib's first colour: the training curves
TAB_GREEN = (44, 160, 44)  # the kept step's line


def records() -> list[dict]:
    out = [{"stage": "sft", "step": s, "loss": 3.0 / s} for s in range(1, 41)]
    out += [{"stage": "grpo", "step": s, "reward/mean": 0.1 * s, "accuracy": 0.9,
             "completion/mean_tokens": 200.0 - 5 * s} for s in range(1, 21)]
    out += [{"stage": "grpo_heldout", "step": s, "heldout/pass@1": 0.9, "heldout/mean_tokens": 200.0 - 5 * s}
            for s in (0, 10, 20)]
    return out


ROWS = [EvalRow(m, b, {"pass@1": p, "mean_output_tokens": t}) for m, b, p, t in
        [("sft", 256, 0.80, 180.0), ("sft", 512, 0.90, 210.0), ("grpo", 256, 0.85, 110.0), ("grpo", 512, 0.89, 120.0)]]
KEPT = {"keep": "best", "step": 10, "of_steps": 20, "reason": "grpo.keep=best: step 10 has the fewest ..."}


def colour_count(path, rgb) -> int:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"))
    return int((pixels == np.array(rgb, dtype=np.uint8)).all(axis=-1).sum())


def test_png_has_the_documented_size_and_report_md_embeds_it(tmp_path):
    write_report(ROWS, tmp_path, {"run": "t"}, metrics=records(), kept=KEPT)
    with Image.open(tmp_path / "report.png") as image:
        assert image.format == "PNG"
        assert image.size == (int(SIZE_INCHES[0] * DPI), int(SIZE_INCHES[1] * DPI)) == (1500, 800)
    md = (tmp_path / "report.md").read_text()
    assert "](report.png)" in md
    assert "GRPO output: step 10 of 20. grpo.keep=best: step 10 has the fewest ..." in md
    assert json.loads((tmp_path / "report.json").read_text())["meta"]["grpo_kept"]["step"] == 10


def test_the_curves_come_from_the_metrics(tmp_path):
    """With no metrics the panels say so: no training curve (tab:blue) and no kept line."""
    (tmp_path / "full").mkdir()
    (tmp_path / "empty").mkdir()
    write_report(ROWS, tmp_path / "full", {}, metrics=records(), kept=KEPT)
    write_report(ROWS, tmp_path / "empty", {}, metrics=[])
    # SFT loss, reward, accuracy and tokens: four curves of tens to hundreds of pixels each
    assert colour_count(tmp_path / "full" / "report.png", TAB_BLUE) > 400
    assert colour_count(tmp_path / "full" / "report.png", TAB_GREEN) > 50
    # tab:blue stays for the first model's markers in the pass@1 panel only
    assert colour_count(tmp_path / "empty" / "report.png", TAB_BLUE) < \
        colour_count(tmp_path / "full" / "report.png", TAB_BLUE) / 2
    assert colour_count(tmp_path / "empty" / "report.png", TAB_GREEN) == 0


def test_without_metrics_no_png_is_written(tmp_path):
    write_report(ROWS, tmp_path, {})
    assert not (tmp_path / "report.png").exists() and "report.png" not in (tmp_path / "report.md").read_text()
