"""Attention MIL on hand-made bags: masked softmax, ABMIL, the instance loss, bags of features."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from mini_kd import MiniKDError
from mini_kd.data import BagDataset, pad_bags
from mini_kd.mil import (ABMIL, AttentionPool, InstanceClassifier, attention_pool,
                         masked_log_softmax, masked_softmax, topk_instance_loss)


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
    loss, logs = net.compute_loss(Y, X)
    torch.testing.assert_close(loss, F.cross_entropy(out.logits, Y))
    assert set(logs) == {"ce"} and not logs["ce"].requires_grad
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


# -- bags of features ------------------------------------------------------------------------------
def bag_dataset():
    bags = {"s1": features(3, 8), "s2": features(5, 8, seed=1), "s3": features(1, 8, seed=2)}
    return BagDataset(bags, {"s1": 0, "s2": 1, "s3": 1}, ["s1", "s2", "s3"])


def test_bag_dataset_items_are_features_label_and_id():
    X, y, slide_id = bag_dataset()[1]
    assert X.shape == (5, 8) and X.dtype == torch.float32 and y == 1 and slide_id == "s2"


def test_pad_bags_pads_to_the_largest_bag_with_a_mask():
    X, mask, y, ids = next(iter(DataLoader(bag_dataset(), batch_size=3, collate_fn=pad_bags)))
    assert X.shape == (3, 5, 8) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [3, 5, 1] and (X[~mask] == 0).all()
    assert y.tolist() == [0, 1, 1] and ids == ["s1", "s2", "s3"]
    assert model()(X, mask).logits.shape == (3, 2)


def test_bag_dataset_refuses_slides_without_features_or_labels():
    with pytest.raises(MiniKDError, match="no features or no label"):
        BagDataset({"s1": features(3, 8)}, {"s1": 0, "s2": 1}, ["s1", "s2"])


def test_pad_bags_refuses_bags_from_different_encoders():
    with pytest.raises(MiniKDError, match="same encoder"):
        pad_bags([(features(3, 8), 0, "a"), (features(3, 4), 1, "b")])


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
