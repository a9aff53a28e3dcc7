"""torchmil's CLAM-SB, DSMIL and TransMIL as the package trains and serves them: they learn a bag
problem from a few shifted tiles, repeat with their seed, train on their own losses of the
standardised bag, and run as a slide pipeline."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mini_kd import MiniKDError, baselines
from mini_kd.encoders import tiny_resnet_gn
from mini_kd.evaluate import classification_metrics
from mini_kd.methods import Prediction
from mini_kd.mil import (
    Standardised,
    abmil_predictor,
    bag_probabilities,
    make_bags,
    read_bags,
)
from mini_kd.phantom import render_slide
from mini_kd.runtime import torch_threads
from mini_kd.train import FitConfig

NAMES = sorted(baselines.MODELS)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as train_abmil trains: bags this small gain nothing from more, and on a
    shared CPU TransMIL's many small matrix products wait on each other."""
    with torch_threads(1, "cpu"):
        yield


EPOCHS = {"clam_sb": 8, "dsmil": 10, "transmil": 3}  # enough for each to learn the toy problem


def shifted_bags(shuffle_labels=False, seed=0):
    """72 bags of 20-40 tiles of 32 Gaussian features; a class-1 bag holds 2-4 tiles whose first 4
    features are shifted by 4. (train, val, test) = 48, 8 and 16 bags (on 24 training bags
    CLAM-SB's 512 ReLU units memorise the bags about one seed in two)."""
    g = torch.Generator().manual_seed(seed)
    features, labels = {}, {}
    for i in range(72):
        X = torch.randn(int(torch.randint(20, 41, (1,), generator=g)), 32, generator=g)
        X[:int(torch.randint(2, 5, (1,), generator=g)), :4] += 4.0 * (i % 2)
        features[f"s{i}"], labels[f"s{i}"] = X, i % 2
    ids = list(features)
    if shuffle_labels:
        order = torch.randperm(len(ids), generator=g).tolist()
        labels = {slide: labels[ids[j]] for slide, j in zip(ids, order)}
    return [make_bags(features, labels, ids[a:b]) for a, b in ((0, 48), (48, 56), (56, 72))]


def trained_auc(name, shuffle_labels):
    train, val, test = shifted_bags(shuffle_labels)
    config = FitConfig(epochs=EPOCHS[name], lr=1e-3, seed=0, progress=False)
    model = baselines.train(name, train, val, config)
    assert not model.training and next(model.parameters()).device.type == "cpu"
    return classification_metrics([int(bag["y"]) for bag in test], bag_probabilities(model, test))["auc"]


@pytest.mark.parametrize("name", NAMES)
def test_each_baseline_learns_a_few_shifted_tiles_but_not_shuffled_labels(name):
    assert trained_auc(name, shuffle_labels=False) >= 0.9
    assert trained_auc(name, shuffle_labels=True) < 0.8


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_gives_the_same_probabilities(name):
    train, val, test = (bags[:6] for bags in shifted_bags())
    probs = [bag_probabilities(baselines.train(name, train, val, FitConfig(epochs=1, seed=seed,
                                                                           progress=False)), test)
             for seed in (0, 0, 1)]
    np.testing.assert_array_equal(probs[0], probs[1])
    assert not np.array_equal(probs[0], probs[2])


@pytest.mark.parametrize("name", NAMES)
def test_the_loss_is_the_models_own_weighted_as_its_paper_on_the_standardised_bag(name):
    torch.manual_seed(0)
    mu, sigma = torch.full((8,), 3.0), torch.full((8,), 0.5)
    model = Standardised(baselines.NETWORKS[name](8), mu, sigma).eval()  # no dropout draws
    bag = {"X": torch.randn(1, 12, 8) * 0.5 + 3.0, "y": torch.tensor([1])}
    weights = baselines.LOSS_WEIGHTS[name]
    total, terms = baselines.weighted_loss(weights)(model, bag)
    _, own = model.model.compute_loss(torch.tensor([1.0]), (bag["X"] - mu) / sigma)
    assert set(terms) == set(own) == set(weights) and total.requires_grad
    assert terms == pytest.approx({t: own[t].item() for t in own})
    assert total.item() == pytest.approx(sum(weights[t] * own[t].item() for t in own))


def test_clam_instance_loss_is_the_cross_entropy_of_its_pseudo_labels_even_far_apart():
    """torchmil's default SmoothTop1SVM raises once two instance logits are ~7 apart."""
    clam = baselines.NETWORKS["clam_sb"](8).eval()
    logits = torch.tensor([[30.0, -30.0], [-2.0, 1.0], [0.5, 0.0]])
    targets = torch.tensor([[1.0], [1.0], [0.0]])
    expected = F.cross_entropy(logits, torch.tensor([1, 1, 0]))
    torch.testing.assert_close(clam.inst_loss_fn(logits, targets), expected)
    with torch.no_grad():
        clam.inst_classifiers[1].module.weight.mul_(1e3)
    _, terms = clam.compute_loss(torch.tensor([1.0]), torch.randn(1, 20, 8))
    assert torch.isfinite(terms["InstLoss"]) and terms["InstLoss"] > 0


@pytest.mark.parametrize("name", NAMES)
def test_read_bags_gives_each_baselines_probability_and_attention(name):
    torch.manual_seed(0)
    mu, sigma = torch.full((8,), 1.0), torch.full((8,), 2.0)
    model = Standardised(baselines.NETWORKS[name](8), mu, sigma).eval()
    X = torch.randn(1, 9, 8)
    probability, attention = read_bags(model, X)
    with torch.no_grad():  # DSMIL's bag score: torchmil's predict, the mean of its two streams
        Z = (X - mu) / sigma
        logit = model.model.predict(Z, return_inst_pred=False) if name == "dsmil" else model.model(Z)
    torch.testing.assert_close(probability, torch.sigmoid(logit))
    if name == "transmil":
        assert attention is None
    else:
        assert attention.shape == (1, 9) and attention.sum().item() == pytest.approx(1.0)


def test_an_unknown_baseline_is_refused_with_the_choices():
    with pytest.raises(MiniKDError, match="clam_sb"):
        baselines.train("clam_mb", [], [], FitConfig())


@pytest.mark.parametrize("name", NAMES)
def test_each_baseline_serves_as_the_slide_pipeline(name, tmp_path):
    slide = tmp_path / "slide.svs"
    render_slide(slide, tmp_path / "mask.png", seed=3, index=1, is_tumour=True, difficulty=0.5,
                 slide_size=512)
    torch.manual_seed(0)
    encoder = tiny_resnet_gn(widths=(8, 8, 8, 8), groups=4)
    model = Standardised(baselines.NETWORKS[name](8), torch.zeros(8), torch.ones(8))
    prediction = abmil_predictor(encoder, model, 20.0, 64, device="cpu")(slide)
    assert isinstance(prediction, Prediction) and 0.0 <= prediction.probability <= 1.0
    assert {"tissue", "grid", "read", "encode", "MIL"} <= set(prediction.seconds)
    attention, grid = prediction.details["attention"], prediction.details["grid"]
    assert len(grid) > 8
    assert attention is None if name == "transmil" else attention.shape == (len(grid),)
