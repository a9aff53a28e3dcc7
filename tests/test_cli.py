"""The command line a user trains with: extract (also sharded under torchrun), train, evaluate,
predict -- each through ``cli.main`` as a user would call it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mini_kd.cli import main
from mini_kd.phantom import make_cohort

EXTRACT = ["--mag", "5", "--tile-size", "32", "--encoder", "tiny_resnet_gn", "--random-weights"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Six phantom slides of 768 px (three tumour), with labels.csv and tumour masks."""
    return make_cohort(tmp_path_factory.mktemp("cli") / "cohort", n_slides=6, slide_size=768)


def features_in(folder: Path) -> dict:
    """{slide_id: (features, coords)} of every .h5 file below ``folder``."""
    out = {}
    for path in sorted(folder.rglob("*.h5")):
        with h5py.File(path, "r") as f:
            out[path.stem] = (f["features"][()], f["coords"][()])
    return out


def test_extract_writes_clam_layout_features_and_skips_slides_already_done(cohort, tmp_path, capsys):
    out = tmp_path / "features"
    assert main(["extract", str(cohort.root), *EXTRACT, "--out", str(out)]) == 0
    found = features_in(out)
    assert sorted(found) == cohort.ids()
    features, coords = found[cohort.ids()[0]]
    assert features.dtype == np.float32 and features.shape[1] == 256 and coords.shape == (len(features), 2)
    assert "features of 6 slides" in capsys.readouterr().out
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")}
    assert main(["extract", str(cohort.root), *EXTRACT, "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.h5")} == stamps  # nothing re-encoded


def test_extract_under_torchrun_with_two_processes_equals_one_process(cohort, tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert main(["extract", str(cohort.root), *EXTRACT, "--out", str(single)]) == 0
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINI_KD_QUIET": "1"}
    run = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "mini_kd.cli",
                          "extract", str(cohort.root), *EXTRACT, "--out", str(sharded)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "rank 0/2: features of 3 slides" in run.stdout and "rank 1/2: features of 3 slides" in run.stdout
    one, two = features_in(single), features_in(sharded)
    assert sorted(one) == sorted(two) == cohort.ids()
    for slide_id in one:
        np.testing.assert_array_equal(one[slide_id][1], two[slide_id][1])
        np.testing.assert_allclose(one[slide_id][0], two[slide_id][0], rtol=1e-5, atol=1e-6)


def test_extract_reports_a_damaged_slide_in_one_line_and_keeps_the_others(cohort, tmp_path, capsys):
    folder = tmp_path / "slides"
    shutil.copytree(cohort.root / "slides", folder)
    damaged = folder / f"{cohort.ids()[1]}.svs"
    damaged.write_bytes(damaged.read_bytes()[:5000])
    out = tmp_path / "features"
    assert main(["extract", str(folder), *EXTRACT, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 6 slides failed" in err[0] and damaged.name in err[0]
    assert sorted(features_in(out)) == [i for i in cohort.ids() if i != cohort.ids()[1]]
    assert main(["extract", str(tmp_path / "nowhere"), *EXTRACT, "--out", str(out)]) == 2


def cohort_pair(root: Path, slide_size: int) -> dict:
    """Eight phantom slides (train, val and test each hold both classes), and a copy of the same
    folder without its tumour masks, as a user's own cohort would come."""
    with_masks = make_cohort(root / "masks", n_slides=8, slide_size=slide_size).root
    without = shutil.copytree(with_masks, root / "no_masks", ignore=shutil.ignore_patterns("masks"))
    return {"with masks": with_masks, "without masks": without}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    return cohort_pair(tmp_path_factory.mktemp("train"), slide_size=768)


@pytest.fixture(scope="module")
def lrmil_cohorts(tmp_path_factory):
    """Slides large enough for LRMIL's 5x tiles: at the smoke preset a 128-px tile at 5x covers
    512 px at 20x, so a 768-px slide holds one at most."""
    return cohort_pair(tmp_path_factory.mktemp("train_lrmil"), slide_size=1536)


@pytest.mark.parametrize("kind", ["with masks", "without masks"])
@pytest.mark.parametrize("method", ["reskd", "lrmil", "ahdmil"])
def test_train_evaluate_predict_a_cohort_at_the_smoke_preset(method, kind, tmp_path, capsys,
                                                             monkeypatch, request):
    monkeypatch.setenv("MINI_KD_DATA", str(tmp_path / "data"))
    cohorts = request.getfixturevalue("lrmil_cohorts" if method == "lrmil" else "cohorts")
    cohort, checkpoint = cohorts[kind], tmp_path / f"{method}.pt"
    assert main(["train", method, str(cohort), "--preset", "smoke", "--out", str(checkpoint)]) == 0
    assert checkpoint.is_file() and not (tmp_path / f"{method}.pt.parts").exists()
    metrics = tmp_path / "metrics.json"
    assert main(["evaluate", method, str(checkpoint), str(cohort), "--split", "all",
                 "--out", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    assert result["n_slides"] == 8 and len(result["slides"]) == 8
    assert 0.0 <= result["auc"] <= 1.0 and result["auc_ci"][0] <= result["auc"] <= result["auc_ci"][1]
    assert result["seconds_per_slide"] > 0 and result["pixels_decoded"] > 0 and result["tiles_read"]
    out = tmp_path / "predictions.csv"
    assert main(["predict", method, str(checkpoint), str(cohort / "slides"), "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert len(rows) == 9 and rows[0].startswith("slide_id,label,probability")
    err = capsys.readouterr().err
    assert "warning" not in err, err  # nothing left open, nothing to warn about


def test_train_refuses_a_leftover_run_unless_resumed(cohorts, tmp_path, capsys):
    checkpoint = tmp_path / "a.pt"
    (tmp_path / "a.pt.parts").mkdir()
    assert main(["train", "ahdmil", str(cohorts["with masks"]), "--preset", "smoke",
                 "--out", str(checkpoint)]) == 2
    assert "--resume" in capsys.readouterr().err and not checkpoint.exists()


@pytest.mark.parametrize("method", ["reskd", "lrmil", "ahdmil"])
def test_train_fits_on_one_torch_thread_as_the_experiments_do(method, cohorts, tmp_path,
                                                             monkeypatch, capsys):
    """The thread policy of mini_kd.runtime: the course's small networks train on one thread on
    the CPU (AHDMIL's step-1 epoch on the real book cohort: ~100 s on two threads, ~7 s on one)."""
    import torch

    from mini_kd.errors import MiniKDError
    from mini_kd.methods import method_module

    seen = []

    def fit(cohort, split, config, schedule):
        seen.append(torch.get_num_threads())
        raise MiniKDError("stopped after the thread count was seen")

    monkeypatch.setattr(method_module(method), "fit", fit)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert main(["train", method, str(cohorts["with masks"]), "--preset", "smoke",
                     "--out", str(tmp_path / "m.pt")]) == 2
        assert seen == [1] and torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(before)
    assert "stopped after" in capsys.readouterr().err
