"""Attention MIL on hand-made bags: masked softmax, ABMIL, the instance loss, bags of features and
the one way every ABMIL of the package trains."""

import math

import pytest
import torch
import torch.nn.functional as F

from mini_kd import MiniKDError, mil
from mini_kd.evaluate import classification_metrics
from mini_kd.mil import (
    ABMIL,
    AttentionPool,
    Bags,
    InstanceClassifier,
    attention_pool,
    bag_ce_loss,
    bag_probabilities,
    bag_validation,
    feature_scale,
    make_bags,
    masked_log_softmax,
    masked_softmax,
    Standardised,
    topk_instance_loss,
    train_abmil,
)
from mini_kd.train import FitConfig


def features(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def model(gated=False, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ABMIL(in_dim=8, n_classes=2, hidden=16, gated=gated, **kwargs).eval()


# -- masked softmax --------------------------------------------------------------------------------
def test_masked_softmax_gives_masked_entries_zero_and_renormalises_the_rest():
    logits = torch.tensor([[math.log(3.0), 0.0, 5.0]])
    alpha = masked_softmax(logits, torch.tensor([[True, True, False]]))
    torch.testing.assert_close(alpha, torch.tensor([[0.75, 0.25, 0.0]]))


def test_masked_softmax_of_an_all_masked_row_is_all_zeros_and_a_single_kept_entry_gets_one():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[False, False, False], [False, True, False]])
    alpha = masked_softmax(logits, mask)
    torch.testing.assert_close(alpha, torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    log_alpha = masked_log_softmax(logits, mask)
    assert not log_alpha.isnan().any() and log_alpha[1, 1] == 0 and log_alpha[0].eq(-math.inf).all()


def test_masked_softmax_does_not_overflow_on_large_logits():
    logits = torch.tensor([[1e4, 1e4 - math.log(3.0), -1e4]])
    alpha = masked_softmax(logits, torch.tensor([[True, True, True]]))
    torch.testing.assert_close(alpha, torch.tensor([[0.75, 0.25, 0.0]]))


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_masked_softmax_gradients_are_finite_and_zero_where_masked():
    """Anomaly mode fails on a NaN anywhere in the backward pass, even one masked out later."""
    logits = torch.tensor([[1e4, -1e4, 3.0], [1.0, 2.0, 3.0], [0.5, 1e4, 0.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False], [False, False, False], [True, False, True]])
    weights = torch.tensor([1.0, 2.0, 3.0])
    with torch.autograd.detect_anomaly():
        (masked_softmax(logits, mask) * weights).sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~mask] == 0).all()


def test_masked_softmax_without_a_mask_is_the_plain_softmax():
    logits = features(3, 5)
    torch.testing.assert_close(masked_softmax(logits, dim=0), torch.softmax(logits, dim=0))


# -- attention pooling and ABMIL -------------------------------------------------------------------
@pytest.mark.parametrize("gated", [False, True])
def test_abmil_attention_sums_to_one_over_real_tiles_and_is_zero_on_padding(gated):
    X = features(2, 5, 8)
    mask = torch.tensor([[True, True, True, False, False], [True] * 5])
    probs, alpha = model(gated).predict(X, mask)
    torch.testing.assert_close(alpha.sum(dim=1), torch.ones(2))
    assert (alpha[~mask] == 0).all() and (alpha[mask] > 0).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("gated", [False, True])
def test_abmil_padding_does_not_change_the_bag_logits(gated):
    net = model(gated)
    bag = features(1, 3, 8)
    padded = torch.cat([bag, 100 * features(1, 2, 8, seed=1)], dim=1)  # garbage in the padding
    mask = torch.tensor([[True, True, True, False, False]])
    alone, with_padding = net(bag), net(padded, mask)
    torch.testing.assert_close(with_padding.logits, alone.logits)
    torch.testing.assert_close(with_padding.bag, alone.bag)


def test_abmil_on_a_single_tile_gives_it_all_the_attention():
    net = model()
    X = features(1, 1, 8)
    _, alpha = net.predict(X)
    torch.testing.assert_close(alpha, torch.ones(1, 1))
    torch.testing.assert_close(net(X).bag, X[:, 0])


def test_abmil_refuses_an_empty_bag():
    net = model()
    with pytest.raises(MiniKDError, match="bag has no tiles"):
        net(torch.zeros(1, 0, 8))
    with pytest.raises(MiniKDError, match="bag has no tiles"):
        net(features(2, 3, 8), torch.tensor([[True, False, False], [False, False, False]]))


def test_abmil_refuses_features_of_the_wrong_size_or_rank():
    net = model()
    with pytest.raises(MiniKDError, match="in_dim"):
        net(features(1, 3, 9))
    with pytest.raises(MiniKDError, match="unsqueeze"):
        net(features(3, 8))


def test_abmil_output_shapes_and_loss():
    net = model()
    X, Y = features(4, 6, 8), torch.tensor([0, 1, 1, 0])
    out = net(X)
    assert out.logits.shape == (4, 2) and out.bag.shape == (4, 8)
    assert out.attention_logits.shape == (4, 6)
    loss, logs = bag_ce_loss(net, {"X": X, "y": Y})
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, Y))
    assert logs == {"ce": pytest.approx(loss.item())}
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_attention_pool_with_branches_scores_and_pools_once_per_branch():
    torch.manual_seed(0)
    pool = AttentionPool(8, hidden=16, gated=True, n_branches=3, bias=True)
    X = features(2, 5, 8)
    z, a = pool(X)
    assert a.shape == (2, 5, 3) and z.shape == (2, 3, 8)
    torch.testing.assert_close(z[:, 1], torch.einsum("bn,bnd->bd", torch.softmax(a[..., 1], 1), X))


def test_attention_pool_lets_each_branch_keep_its_own_tiles_and_an_empty_one_pools_to_zero():
    X = features(1, 4, 8)
    a = features(1, 4, 2, seed=1)
    keep = torch.tensor([[[True, False], [True, False], [False, False], [True, False]]])
    z, alpha = attention_pool(X, a, keep)  # (1, 2, 8), (1, 4, 2)
    torch.testing.assert_close(z[0, 0], torch.softmax(a[0, [0, 1, 3], 0], 0) @ X[0, [0, 1, 3]])
    assert (z[0, 1] == 0).all() and (alpha[..., 1] == 0).all()


def test_abmil_matches_torchmil_given_the_same_weights():
    """torchmil's ABMIL (1.0.2) has the same attention network -- fc1 = V (with bias), tanh,
    [fc_gated = U, sigmoid], fc2 = w (no bias) -- but a binary head with one logit for
    BCE. Our two-class logits are (−l/2, +l/2) of that one logit l (BinaryLinear), so its
    classifier gets our one row; the attention logits and bags must agree exactly, padding
    included."""
    from torchmil.models import ABMIL as TorchmilABMIL

    for gated in (False, True):
        ours = model(gated)
        theirs = TorchmilABMIL(in_shape=(8,), att_dim=16, gated=gated).eval()
        with torch.no_grad():
            theirs.pool.fc1.module.weight.copy_(ours.attention.V.weight)
            theirs.pool.fc1.module.bias.copy_(ours.attention.V.bias)
            theirs.pool.fc2.weight.copy_(ours.attention.w.weight)
            if gated:
                theirs.pool.fc_gated.module.weight.copy_(ours.attention.U.weight)
                theirs.pool.fc_gated.module.bias.copy_(ours.attention.U.bias)
            theirs.classifier.module.weight.copy_(ours.classifier.linear.weight)
            theirs.classifier.module.bias.copy_(ours.classifier.linear.bias)
        X = features(3, 7, 8, seed=2)
        mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3, [True] + [False] * 6])
        out = ours(X, mask)
        logit, attention_logits = theirs(X, mask, return_att=True)
        torch.testing.assert_close(out.logits[:, 1] - out.logits[:, 0], logit)
        torch.testing.assert_close(out.attention_logits, attention_logits)
        torch.testing.assert_close(out.bag, theirs.pool(X, mask))


# -- CLAM-style instance loss ----------------------------------------------------------------------
def test_topk_instance_loss_on_a_bag_of_four_with_known_scores():
    scores = torch.tensor([0.9, 0.1, 0.5, 0.3])       # order: 0 > 2 > 3 > 1
    logits = torch.tensor([[0.0, math.log(3.0)],      # tile 0: P(1) = 3/4
                           [0.0, 0.0],                # tile 1: P(0) = 1/2
                           [math.log(3.0), 0.0],      # tile 2: P(1) = 1/4
                           [0.0, math.log(4.0)]])     # tile 3: P(0) = 1/5
    # k = 1: tile 0 labelled 1, tile 1 labelled 0
    expected_1 = (-math.log(0.75) - math.log(0.5)) / 2
    assert topk_instance_loss(logits, scores, k=1).item() == pytest.approx(expected_1, rel=1e-6)
    # k = 8 is capped at N // 2 = 2: tiles 0, 2 labelled 1; tiles 3, 1 labelled 0
    expected_2 = (-math.log(0.75) - math.log(0.25) - math.log(0.2) - math.log(0.5)) / 4
    assert topk_instance_loss(logits, scores, k=8).item() == pytest.approx(expected_2, rel=1e-6)


def test_topk_instance_loss_is_zero_without_two_tiles_and_trains_the_instance_head():
    head = InstanceClassifier(8)
    assert topk_instance_loss(head(features(1, 8)), torch.tensor([0.3]), k=4).item() == 0.0
    X = features(6, 8)
    loss = topk_instance_loss(head(X), features(6, seed=1), k=2)
    loss.backward()
    assert head(X).shape == (6, 2) and loss > 0 and head.weight.grad.abs().sum() > 0


def test_topk_instance_loss_refuses_mismatched_shapes():
    with pytest.raises(MiniKDError, match=r"\(N, 2\)"):
        topk_instance_loss(torch.zeros(4, 2), torch.zeros(5), k=1)


# -- bags of features, and training ----------------------------------------------------------------
def test_make_bags_gives_one_batch_of_one_bag_per_slide_with_its_extras():
    feats = {"s1": features(3, 8), "s2": features(5, 8, seed=1)}
    guide = {"s1": torch.arange(3.0), "s2": torch.arange(5.0)}
    bags = make_bags(feats, {"s1": 0, "s2": 1}, ["s2", "s1"], guide=guide)
    assert [bag["id"] for bag in bags] == ["s2", "s1"]
    assert bags[0]["X"].shape == (1, 5, 8) and bags[0]["y"].tolist() == [1]
    torch.testing.assert_close(bags[1]["guide"], torch.arange(3.0).unsqueeze(0))
    with pytest.raises(MiniKDError, match="no tile features"):
        make_bags({"s": torch.zeros(0, 8)}, {"s": 1}, ["s"])


def test_bags_yield_only_tensors_in_a_seeded_order_that_changes_every_epoch():
    bags = make_bags({f"s{i}": features(2, 8, seed=i) for i in range(6)},
                     {f"s{i}": i % 2 for i in range(6)}, [f"s{i}" for i in range(6)])
    order = lambda loader: [int(b["X"][0, 0, 0] * 1e4) for b in loader]
    first, again = Bags(bags, seed=3), Bags(bags, seed=3)
    epoch1, epoch2 = order(first), order(first)
    assert epoch1 == order(again) and epoch1 != epoch2 and sorted(epoch1) == sorted(epoch2)
    assert all(set(b) == {"X", "y"} for b in first)  # the slide id stays behind


def toy_bags(n=12, seed=0):
    """Bags of 6 tiles; a class-1 bag holds two tiles whose feature 0 is shifted by 3."""
    g = torch.Generator().manual_seed(seed)
    feats, labels = {}, {}
    for i in range(n):
        X = torch.randn(6, 8, generator=g)
        X[:2, 0] += 3.0 * (i % 2)
        feats[f"s{i}"], labels[f"s{i}"] = X, i % 2
    ids = list(feats)
    return make_bags(feats, labels, ids[:8]), make_bags(feats, labels, ids[8:])


def test_bag_validation_scores_the_whole_set_and_reads_a_one_logit_model_too():
    _, val = toy_bags()
    net = model()
    probs = bag_probabilities(net, val)
    expected = [torch.softmax(net(bag["X"]).logits, -1)[0, 1].item() for bag in val]
    assert probs.tolist() == pytest.approx(expected)
    scores = bag_validation(val)(net)
    y = [int(bag["y"]) for bag in val]
    assert scores["loss"] == pytest.approx(-sum(math.log(p if t else 1 - p) for p, t in zip(probs, y)) / 4)
    one_logit = torch.nn.Sequential(torch.nn.Flatten(0), torch.nn.Linear(6 * 8, 1))  # X -> (1,)
    p = bag_probabilities(one_logit, val[:1])
    assert p[0] == pytest.approx(torch.sigmoid(one_logit(val[0]["X"]))[0].item())


def scaled_bags(n=40, seed=0):
    """Bags of 30 tiles whose 8 features span scales 1e-3 .. 10 around 1; a class-1 bag holds
    three tiles whose feature 0 -- the one of scale 1e-3 -- is shifted by 5 of its units.
    (train, val, test) = 24, 8 and 8 bags."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-3, 1, 8)
    feats, labels = {}, {}
    for i in range(n):
        X = torch.randn(30, 8, generator=g)
        X[:3, 0] += 5.0 * (i % 2)
        feats[f"s{i}"], labels[f"s{i}"] = X * scale + 1.0, i % 2
    ids = list(feats)
    return [make_bags(feats, labels, ids[a:b]) for a, b in ((0, 24), (24, 32), (32, 40))]


def test_train_abmil_learns_keeps_the_best_validation_epoch_and_repeats_with_its_seed():
    train, val, _ = scaled_bags()
    config = FitConfig(epochs=20, lr=1e-2, seed=0, progress=False)
    net, history = train_abmil(train, val, config, hidden=16)
    again, _ = train_abmil(train, val, config, hidden=16)
    assert not net.training and history.best_score == min(history.column("val_loss"))
    assert history.column("val_loss")[-1] < history.column("val_loss")[0]
    assert history.rows[history.best_epoch - 1]["val_auc"] == 1.0
    assert bag_validation(val)(net)["loss"] == pytest.approx(history.best_score)  # val, not train
    for a, b in zip(net.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_train_abmil_builds_the_abmil_asked_for_or_trains_the_model_given():
    train, val = toy_bags()
    config = FitConfig(epochs=1, seed=0, progress=False)
    gated, _ = train_abmil(train, val, config, hidden=4, gated=True, dropout=0.25)
    assert gated.attention.U.out_features == 4 and gated.attention.dropout.p == 0.25
    given = model()
    calls = []

    def loss(m, bag):
        calls.append(bag["X"].shape)
        return bag_ce_loss(m, bag)

    trained, history = train_abmil(train, val, config, given, loss)
    assert trained is given and len(calls) == len(train) and len(history.rows) == 1


def test_train_abmil_standardises_each_feature_with_the_training_tiles():
    train, val, _ = scaled_bags()
    net, _ = train_abmil(train, val, FitConfig(epochs=1, seed=0, progress=False), hidden=16)
    tiles = torch.cat([bag["X"][0] for bag in train])  # (720, 8)
    torch.testing.assert_close(net.mu, tiles.mean(0))
    torch.testing.assert_close(net.sigma, tiles.std(0))
    plain = ABMIL(8, 2, hidden=16).eval()
    plain.load_state_dict({**net.state_dict(), "mu": torch.zeros(8), "sigma": torch.ones(8)})
    X = val[0]["X"]
    torch.testing.assert_close(net(X).logits, plain((X - tiles.mean(0)) / tiles.std(0)).logits)
    assert set(ABMIL(8).state_dict()) >= {"mu", "sigma"}  # saved with the model's checkpoint


def test_a_model_without_our_buffers_is_trained_behind_the_same_standardisation():
    from torchmil.models import ABMIL as TorchmilABMIL

    train, val, _ = scaled_bags()
    theirs = TorchmilABMIL(in_shape=(8,), att_dim=16)

    def bce(m, bag):
        loss = F.binary_cross_entropy_with_logits(m(bag["X"]), bag["y"].float())
        return loss, {"bce": loss.item()}

    trained, _ = train_abmil(train, val, FitConfig(epochs=1, seed=0, progress=False), theirs, bce)
    mu, sigma = feature_scale(train)
    assert isinstance(trained, Standardised) and trained.model is theirs
    X = val[0]["X"]
    torch.testing.assert_close(trained(X), theirs((X - mu) / sigma))


def test_a_signal_in_a_small_scale_feature_is_learned_only_when_standardised(monkeypatch):
    """The real-tissue failure in miniature: the feature that tells the classes apart is 1e4
    times smaller than the largest; the raw features leave ABMIL at chance."""
    train, val, test = scaled_bags()
    config = FitConfig(epochs=20, lr=1e-2, weight_decay=1e-4, seed=0, progress=False)
    y = [int(bag["y"]) for bag in test]
    net, _ = train_abmil(train, val, config, hidden=16)
    assert classification_metrics(y, bag_probabilities(net, test))["auc"] == 1.0
    monkeypatch.setattr(mil, "feature_scale", lambda bags: (torch.zeros(8), torch.ones(8)))
    raw, _ = train_abmil(train, val, config, hidden=16)
    assert classification_metrics(y, bag_probabilities(raw, test))["auc"] <= 0.6


# -- ABMIL trains like torchmil's, not only computes like it (the regression of issue 11) --------
def test_abmil_first_adam_step_moves_the_bag_score_like_torchmils():
    """Same seed, one bag, one Adam step: the bag score l (our logit difference, torchmil's one
    logit) starts and moves the same. With a two-row head nn.Linear(D, 2), l started ~√2 larger
    and moved ~2x faster, and the trained teachers drifted apart."""
    from torchmil.models import ABMIL as TorchmilABMIL

    from mini_kd.runtime import seed_everything

    g = torch.Generator().manual_seed(0)
    X, y = (torch.rand(1, 21, 16, generator=g) * 6), torch.tensor([1])
    X[0, :2, 0] += 4.0
    seed_everything(0)
    ours = ABMIL(16, 2, hidden=8)
    seed_everything(0)
    theirs = TorchmilABMIL(in_shape=(16,), att_dim=8)
    moves = []
    for model, score, loss in (
            (ours, lambda m: m(X).logits[0, 1] - m(X).logits[0, 0],
             lambda m: F.cross_entropy(m(X).logits, y)),
            (theirs, lambda m: m(X)[0],
             lambda m: F.binary_cross_entropy_with_logits(m(X), y.float()))):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
        before = score(model).item()
        loss(model).backward()
        optimizer.step()
        moves.append((before, score(model).item()))
    (ours_before, ours_after), (theirs_before, theirs_after) = moves
    assert ours_after != ours_before
    assert abs(ours_before - theirs_before) < 1e-5 and abs(ours_after - theirs_after) < 1e-5, moves
