"""The side-by-side comparison's bookkeeping: gathering on the same folds, the issue's JSON rows,
the Pareto front and the calibration targets (the whole run is notebook 05's smoke test)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from mini_kd.experiments import Experiment, compare


def entry(auc, ci, seconds=None, speedup=None):
    out = {"auc": auc, "auc_ci": ci, "accuracy": 0.8, "accuracy_ci": [0.7, 0.9], "f1": 0.8,
           "f1_ci": [0.7, 0.9]}
    if seconds is not None:
        out.update(seconds_per_slide=seconds, seconds_by_stage={"read": seconds / 2},
                   tiles_read=100, pixels_decoded=10**6, speedup=speedup)
    return out


def comparison_json():
    return {"preset": "smoke", "cohort": "c", "n_splits": 2, "n_test_slides": [4, 4],
            "hr_abmil": entry(0.90, [0.84, 0.96], 2.0, 1.0),
            "lr_abmil": entry(0.75, [0.6, 0.9], 0.2, 10.0),
            "lrmil": entry(0.85, [0.75, 0.95], 0.25, 8.0),
            "stage1_only": entry(0.80, [0.7, 0.9]),  # timed as lrmil
            "encoder_gflops_per_slide": {"hr_abmil": 50.0, "lr_abmil": 3.0, "lrmil": 3.0}}


def test_rows_carry_the_issue_keys_and_share_the_cost_of_the_pipeline_they_run():
    out = comparison_json()
    out["stage1_only"].update({k: out["lrmil"][k] for k in ("seconds_per_slide", "speedup")})
    result = compare.to_rows(out)
    assert [row["method"] for row in result["rows"]] == ["hr_abmil", "lr_abmil", "stage1_only",
                                                         "lrmil"]  # the order of ROWS
    keys = {"method", "magnifications", "auc", "auc_ci", "accuracy", "f1", "seconds_per_slide",
            "seconds_by_stage", "tiles_read", "pixels_decoded", "speedup_vs_hr_abmil"}
    assert all(keys <= set(row) for row in result["rows"])
    rows = {row["method"]: row for row in result["rows"]}
    assert rows["stage1_only"]["encoder_gflops_per_slide"] == 3.0  # lrmil's pipeline
    assert rows["lr_abmil"]["magnifications"] == "5x" and rows["hr_abmil"]["speedup_vs_hr_abmil"] == 1
    assert result["folds"] == 2 and result["slides"] == 8
    shown = {row["method"]: row for row in compare.table(result)}
    assert shown["hr_abmil"]["AUC [95 % CI]"] == "0.900 [0.84, 0.96]"
    assert shown["hr_abmil"]["Mpx decoded"] == 1.0 and shown["lrmil"]["speed-up"] == 8.0


def test_the_pareto_front_keeps_only_rows_no_other_beats_on_both_axes():
    rows = [{"method": "slow_best", "auc": 0.9, "seconds_per_slide": 2.0},
            {"method": "fast_worse", "auc": 0.75, "seconds_per_slide": 0.2},
            {"method": "dominated", "auc": 0.7, "seconds_per_slide": 0.3},
            {"method": "middle", "auc": 0.85, "seconds_per_slide": 0.25},
            {"method": "untimed", "auc": 0.99, "seconds_per_slide": None}]
    assert compare.pareto_front(rows) == ["slow_best", "fast_worse", "middle"]


def test_the_calibration_targets_read_the_pooled_interval():
    calibrated = compare.targets(comparison_json())
    assert calibrated["hr_abmil_auc_below_0.97"] and calibrated["ci_narrower_than_0.07"]
    assert calibrated["lr_abmil_at_least_0.08_below"]
    assert calibrated["hr_abmil_ci_half_width"] == pytest.approx(0.06)
    saturated = comparison_json()
    saturated["hr_abmil"] = entry(1.0, [0.85, 1.0])
    saturated["lr_abmil"] = entry(0.95, [0.9, 1.0])
    targets = compare.targets(saturated)
    assert not targets["hr_abmil_auc_below_0.97"] and not targets["ci_narrower_than_0.07"]
    assert not targets["lr_abmil_at_least_0.08_below"]


def test_gathered_rows_keep_their_folds_and_other_folds_are_refused():
    folds = [{"train": ["a"], "val": ["b"], "test": ["c", "d"]},
             {"train": ["c"], "val": ["d"], "test": ["a", "b"]}]
    experiment = Experiment("smoke", "cohort", folds, {k: v[0] for k, v in compare.ROWS.items()})
    predictions = [{"split": r, "model": model, "slide_id": s, "label": y, "probability": p}
                   for model in ("dmin_all", "ahdmil", "abmil") for r, fold in enumerate(folds)
                   for s, y, p in zip(fold["test"], (0, 1), (0.2, 0.7))]
    compare.gather(experiment, "ahdmil", {"splits": folds, "predictions": predictions})
    # DMIN on every tile is the row "dmin"; AHDMIL's own ABMIL baseline is not a row
    assert {row["model"] for row in experiment.predictions} == {"dmin", "ahdmil"}
    dmin = [row for row in experiment.predictions if row["model"] == "dmin"]
    assert sorted(row["slide_id"] for row in dmin) == ["a", "b", "c", "d"]
    assert experiment.pooled()["dmin"]["auc"] == 1.0
    with pytest.raises(ValueError, match="other folds"):
        compare.gather(experiment, "ahdmil", {"splits": folds[::-1], "predictions": predictions})


def test_the_benchmark_script_writes_one_json_per_cohort(tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
    import compare as script

    seen = []

    class Run:
        def __init__(self, cohort):
            self.cohort = cohort

        def to_json(self):
            out = comparison_json()
            out["cohort"] = self.cohort
            return out

    monkeypatch.setattr(script, "run_comparison", lambda preset, cohort: seen.append(cohort) or Run(cohort))
    monkeypatch.setattr(script.presets, "phantom_cohort", lambda preset: "phantom-cohort")
    monkeypatch.setattr(script.presets, "real_cohort", lambda preset: "real-cohort")
    script.main(["--preset", "smoke", "--out", str(tmp_path / "compare.json")])
    assert seen == ["phantom-cohort", "real-cohort"]
    for name in ("phantom", "real"):
        written = json.loads((tmp_path / f"compare-{name}.json").read_text())
        assert written["cohort"] == f"{name}-cohort" and written["pareto_front"] == ["hr_abmil", "lr_abmil", "lrmil"]
        assert np.isfinite(written["wall_seconds"])
