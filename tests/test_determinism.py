"""Same seed, same numbers: the timing order, LRMIL's and AHDMIL's whole smoke experiments run
twice on a tiny phantom cohort, and fits of the methods' own steps interrupted and resumed."""

import shutil

import numpy as np
import pytest
import torch

import mini_kd.encoders
import mini_kd.presets
from mini_kd.encoders import build_encoder
from mini_kd.errors import MiniKDError
from mini_kd.experiments import time_pipelines
from mini_kd.experiments import ahdmil as ahdmil_experiment
from mini_kd.experiments import lrmil as lrmil_experiment
from mini_kd.methods import Prediction, ahdmil, lrmil
from mini_kd.evaluate import kfold_splits
from mini_kd.runtime import map_jobs, torch_threads
from mini_kd.phantom import make_cohort
from mini_kd.train import FitConfig, fit

TINY = dict(widths=(8, 8, 8, 8), groups=4)  # a tiny_resnet_gn: 8-d embeddings, fast on a CPU


def tiny_encoder():
    torch.manual_seed(0)
    return build_encoder("tiny_resnet_gn", pretrained=False, **TINY).eval()


# -- time_pipelines: a seeded order per slide ------------------------------------------------------
class Recorder:
    """A stand-in predictor that logs its name and the slide it was given."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def __call__(self, path):
        self.log.append((self.name, path))
        return Prediction("s", 0, 0.5, tiles_read={20.0: 3, 1.25: 1}, pixels_decoded=7,
                          seconds={"read": 1.0, "encode": 2.0})


def timed_order(seed, n_slides=8):
    log = []
    paths = {f"s{i}": f"/slides/s{i}.svs" for i in range(n_slides)}
    rows = time_pipelines(paths, {"hr": Recorder("hr", log), "lr": Recorder("lr", log)}, seed)
    return log, rows


def test_time_pipelines_warms_up_then_shuffles_the_order_per_slide_with_a_seed():
    log, rows = timed_order(seed=0)
    assert log[:2] == [("hr", "/slides/s0.svs"), ("lr", "/slides/s0.svs")]  # warm-up, untimed
    runs = log[2:]
    assert len(runs) == len(rows) == 16
    firsts = [runs[2 * i][0] for i in range(8)]  # who opened each slide first
    assert set(firsts) == {"hr", "lr"}  # both orders occur
    assert [(row["model"], row["slide_id"], row["position"]) for row in rows] == [
        (name, path.split("/")[-1][:-4], i % 2) for i, (name, path) in enumerate(runs)]
    assert rows[0]["total"] == 3.0 and rows[0]["tiles_read"] == 4 and rows[0]["pixels_decoded"] == 7
    assert timed_order(seed=0)[0] == log  # the same seed, the same orders
    assert timed_order(seed=1)[0] != log


# -- whole experiments twice: bit-identical predictions --------------------------------------------
@pytest.fixture(scope="module")
def tiny_cohort_folder(tmp_path_factory):
    """A tiny phantom cohort (8 slides of 512 px), never used directly: copies of it are."""
    return make_cohort(tmp_path_factory.mktemp("determinism") / "cohort", n_slides=8,
                       slide_size=512).root


def fresh_cohort(folder, tmp_path):
    """A copy without caches, so that the second run recomputes everything (features, stage 1)."""
    from mini_kd.phantom import load_cohort

    return load_cohort(shutil.copytree(folder, tmp_path))


def lrmil_run(cohort, monkeypatch):
    """LRMIL's smoke experiment on ``cohort``: every test probability, and the saved student."""
    probabilities = []
    real = lrmil_experiment.bag_probabilities

    def recording(model, bags):
        probs = real(model, bags)
        probabilities.append(probs)
        return probs

    config = lrmil.Config(hr_tile=32, lr_tile=32, encoder="tiny_resnet_gn", hidden=8,
                          kd_layers=("layer1", "layer2"))
    schedule = lrmil.Schedule(mil_epochs=3, patience=None, stage1_tiles=6, stage1_epochs=1,
                              stage1_batch=3)
    with monkeypatch.context() as patch:
        patch.setattr(lrmil_experiment, "build_encoder", lambda name: tiny_encoder())
        patch.setattr(lrmil_experiment, "bag_probabilities", recording)
        with torch_threads(1):  # small networks: one thread is faster than two
            experiment = lrmil_experiment.run_experiment("smoke", cohort, config, schedule,
                                                         timing=False)
    return np.concatenate(probabilities), torch.load(experiment.checkpoint, weights_only=True)


def test_lrmils_smoke_experiment_gives_bit_identical_predictions_twice(tiny_cohort_folder, tmp_path,
                                                                      monkeypatch):
    first, saved = lrmil_run(fresh_cohort(tiny_cohort_folder, tmp_path / "a"), monkeypatch)
    again, saved_again = lrmil_run(fresh_cohort(tiny_cohort_folder, tmp_path / "b"), monkeypatch)
    assert len(first) == 2 * 6 * 4  # per fold: 6 models x 4 test slides (8 slides, 2 folds)
    np.testing.assert_array_equal(first, again)
    saved, saved_again = saved["state"], saved_again["state"]  # methods.Trained.save's layout
    for part, states in (("encoder", lambda s: s["encoder"]), ("student", lambda s: s["student"]["state_dict"])):
        for name, value in states(saved).items():
            assert torch.equal(value, states(saved_again)[name]), (part, name)


def ahdmil_run(cohort, monkeypatch):
    """AHDMIL's smoke experiment on ``cohort``: every test probability and keep mask."""
    outputs = []
    real = ahdmil_experiment.score_bags

    def recording(bags, predict, tumour=None):
        def predict_and_record(bag):
            p, kept = predict(bag)
            outputs.append((p.numpy().copy(), None if kept is None else kept.numpy().copy()))
            return p, kept
        return real(bags, predict_and_record, tumour)

    config = mini_kd.presets.config("ahdmil", "smoke", encoder="tiny_resnet_gn", hidden=8,
                                    attention_hidden=4, degree=3, k_sample=2)
    with monkeypatch.context() as patch:
        patch.setattr(ahdmil, "build_encoder", lambda name, **kwargs: tiny_encoder())
        patch.setattr(ahdmil_experiment, "score_bags", recording)
        patch.setattr(ahdmil_experiment, "ABMIL_HIDDEN", 4)
        ahdmil_experiment.run_experiment("smoke", cohort, config, timing=False)
    return outputs


def test_ahdmils_smoke_experiment_gives_bit_identical_predictions_twice(tiny_cohort_folder,
                                                                       tmp_path, monkeypatch):
    first = ahdmil_run(fresh_cohort(tiny_cohort_folder, tmp_path / "a"), monkeypatch)
    again = ahdmil_run(fresh_cohort(tiny_cohort_folder, tmp_path / "b"), monkeypatch)
    # per fold: 7 models x 4 test slides, and DMIN's own mask on 2 validation slides (the gate
    # rows of both screen rules)
    assert len(first) == len(again) == 2 * (7 * 4 + 2 * 2)
    for (p, kept), (p_again, kept_again) in zip(first, again):
        np.testing.assert_array_equal(p, p_again)
        assert (kept is None and kept_again is None) or np.array_equal(kept, kept_again)


# -- folds in worker processes ----------------------------------------------------------------------
def test_map_jobs_keeps_the_order_of_the_jobs_and_raises_a_workers_error(monkeypatch):
    monkeypatch.setenv("MINI_KD_WORKERS", "2")
    assert map_jobs(int, ["3", "1", "2"]) == [3, 1, 2]
    with pytest.raises(ValueError, match="invalid literal"):
        map_jobs(int, ["1", "not a number"])
    monkeypatch.setenv("MINI_KD_WORKERS", "two")
    with pytest.raises(MiniKDError, match="MINI_KD_WORKERS"):
        map_jobs(int, ["1"])


def test_folds_in_two_worker_processes_give_what_one_fold_after_another_gives(monkeypatch):
    bags = {bag.slide_id: bag for bag in tiny_bags(8)}
    drawn = kfold_splits(list(bags), [bag.label for bag in bags.values()], 2, 0)
    config = mini_kd.presets.config("ahdmil", "smoke", hidden=8, attention_hidden=4, degree=3,
                                    k_sample=2)
    jobs, args = list(enumerate(drawn)), (bags, None, config, mini_kd.presets.schedule("ahdmil", "smoke"), 2)
    runs = {}
    for workers in ("1", "2"):
        monkeypatch.setenv("MINI_KD_WORKERS", workers)
        runs[workers] = map_jobs(ahdmil_experiment.train_fold, jobs, *args)
    for one, two in zip(runs["1"], runs["2"]):
        assert one["scores"].keys() == two["scores"].keys() and one["gates"] == two["gates"]
        for name, scores in one["scores"].items():
            np.testing.assert_array_equal(scores["probability"], two["scores"][name]["probability"])
    assert runs["1"][1]["models"] is None
    for name, value in runs["1"][0]["models"]["dmin"].state_dict().items():
        assert torch.equal(value, runs["2"][0]["models"]["dmin"].state_dict()[name]), name


# -- interrupted and resumed fits of the methods' own steps ---------------------------------------
class Interrupt(Exception):
    pass


def interrupted_after(epochs_done, steps_per_epoch, step):
    """``step``, raising once ``epochs_done`` epochs of ``steps_per_epoch`` calls have run."""
    calls = 0

    def wrapped(model, batch):
        nonlocal calls
        calls += 1
        if calls > epochs_done * steps_per_epoch:
            raise Interrupt
        return step(model, batch)

    return wrapped


def tiny_bags(n_slides=6):
    g = torch.Generator().manual_seed(0)
    return [ahdmil.Bag(f"s{i}", torch.randn(5 + i, 6, generator=g) + i % 2,
                       torch.randn(5 + i, 3, 4, 4, generator=g), i % 2) for i in range(n_slides)]


def step1_fit(checkpoint_dir=None, interrupt_after=None):
    """AHDMIL step 1 (Gumbel noise, dropout, a weighted sampler) for 4 epochs."""
    config = ahdmil.Config(hidden=8, attention_hidden=4, degree=3, k_sample=2)
    bags = tiny_bags()
    dmin = ahdmil.new_dmin(6, config, seed=0)
    step = lambda m, b: ahdmil.sd_step(m, b, config)  # noqa: E731
    if interrupt_after is not None:
        step = interrupted_after(interrupt_after, len(bags[:4]), step)
    fit(dmin, step, ahdmil.slide_loader(bags[:4], seed=0),
        FitConfig(epochs=4, lr=1e-2, checkpoint_dir=checkpoint_dir),
        val_step=ahdmil.dmin_val_step, val_data=[bag.item() for bag in bags[4:]])
    return dmin


def step2_fit(checkpoint_dir=None, interrupt_after=None):
    """AHDMIL step 2 (two steps, two optimisers, random soft/hard mode, cross-EMA) for 4 epochs."""
    config = ahdmil.Config(hidden=8, attention_hidden=4, degree=3, attn_ratio=0.5)
    bags = tiny_bags()
    model = ahdmil.AHDMIL(ahdmil.new_dmin(6, config, seed=0), ahdmil.DBLIPN(2, 4))
    lipn = lambda m, b: ahdmil.lipn_step(m, b, config)  # noqa: E731
    if interrupt_after is not None:
        lipn = interrupted_after(interrupt_after, len(bags[:4]), lipn)

    def optimizers(m):
        return {"lipn": torch.optim.Adam(m.lipn.parameters(), 1e-2),
                "dmin": torch.optim.Adam(m.dmin.parameters(), 1e-3)}

    with torch_threads(1):  # DB-LIPN's small convolutions crawl on two busy threads
        fit(model, {"lipn": lipn, "dmin": ahdmil.finetune_step}, ahdmil.slide_loader(bags[:4], 1),
            FitConfig(epochs=4, checkpoint_dir=checkpoint_dir), optimizer=optimizers,
            val_step=ahdmil.ahdmil_val_step, val_data=[bag.item() for bag in bags[4:]],
            on_epoch_end=lambda m, epoch: ahdmil.cross_ema(m.lipn.branches, 0.2))
    return model


@pytest.mark.parametrize("run", [step1_fit, step2_fit], ids=["step1", "step2"])
def test_a_fit_interrupted_after_epoch_2_and_resumed_ends_with_the_uninterrupted_weights(run, tmp_path):
    straight = run().state_dict()
    with pytest.raises(Interrupt):
        run(checkpoint_dir=tmp_path, interrupt_after=2)
    resumed = run(checkpoint_dir=tmp_path).state_dict()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    fresh = run(checkpoint_dir=tmp_path / "other", interrupt_after=None).state_dict()
    assert all(torch.equal(fresh[name], value) for name, value in straight.items())
