"""AHDMIL: the Gumbel-sigmoid mask, the student's per-class weights, L_SD and L_AD on hand-computed
values, cross-EMA, the 1:1 crop geometry, the nothing-kept fallback, DMIN in eval mode while it
makes DB-LIPN's targets, seeds, `mini-kd predict ahdmil` reading only the kept 20x tiles, and the
interface: fit -> save -> load -> predictor, on cohorts with and without label maps, and the
smoke experiment's JSON."""

import csv
import math
import shutil
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from torch import nn

from mini_kd import MiniKDError
from mini_kd import methods, presets
from mini_kd.cli import main as cli_main
from mini_kd.data import downsample_views, to_tensor
from mini_kd.encoders import LIPNBranch, build_encoder, stride_schedule
from mini_kd.experiments import JSON_KEYS, Experiment
from mini_kd.experiments import ahdmil as experiment
from mini_kd.methods import Prediction, ahdmil
from mini_kd.phantom import load_cohort, make_cohort, render_slide
from mini_kd.presets import GEOMETRY, PRESETS
from mini_kd.runtime import torch_threads
from mini_kd.slides import Slide, open_slide
from mini_kd.tiling import cut_crops, read_from_level, same_footprint, tile_grid

TINY = dict(widths=(8, 8, 8, 8), groups=4)  # a tiny_resnet_gn: 8-d embeddings, fast on a CPU
TINY_GEOMETRY = dict(hr_mag=20.0, hr_tile=64, screen_mag=1.25)  # 4-px crops at 1.25x


@pytest.fixture(autouse=True)
def one_thread():
    """DB-LIPN's many small convolutions crawl on two busy threads."""
    with torch_threads(1):
        yield


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- the mask: Gumbel-sigmoid with a straight-through estimator ------------------------------------
def test_gumbel_sigmoid_is_exactly_0_or_1_forward_with_the_soft_gradient():
    S = torch.tensor([[2.0, -1.0], [0.1, -0.3]], requires_grad=True)
    noise = torch.tensor([[-2.5, 0.5], [0.0, 0.4]])
    m = ahdmil.gumbel_sigmoid(S, tau=0.7, noise=noise)
    # (S + noise) / τ = [[-0.714, -0.714], [0.143, 0.143]]
    assert m.tolist() == [[0.0, 0.0], [1.0, 1.0]]
    m.sum().backward()
    y = torch.sigmoid((S.detach() + noise) / 0.7)
    torch.testing.assert_close(S.grad, y * (1 - y) / 0.7)  # ∂y_soft/∂S
    assert S.grad[0, 0].item() == pytest.approx(sigmoid(-0.5 / 0.7) * (1 - sigmoid(-0.5 / 0.7)) / 0.7)


def test_gumbel_sigmoid_at_eval_is_the_threshold_at_zero_without_gradient():
    S = torch.tensor([[2.0, -1.0], [0.0, 1e-3]], requires_grad=True)
    m = ahdmil.gumbel_sigmoid(S, training=False)
    assert m.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert not m.requires_grad


@pytest.mark.parametrize("tau", [0.7, 2.0])
def test_gumbel_sigmoid_keeps_a_tile_with_probability_sigmoid_of_its_logit(tau):
    torch.manual_seed(0)
    S = torch.tensor([-1.0, 0.0, 2.0]).repeat(40_000, 1)  # (40000, 3)
    frequency = ahdmil.gumbel_sigmoid(S, tau=tau).mean(dim=0)
    expected = torch.tensor([sigmoid(-1.0), 0.5, sigmoid(2.0)])
    torch.testing.assert_close(frequency, expected, atol=0.01, rtol=0)


def test_keep_rate_is_the_union_over_classes_with_a_straight_through_gradient():
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [0.0, 1.0]], requires_grad=True)
    rho = ahdmil.keep_rate(mask)
    assert rho.item() == pytest.approx(3 / 4)  # rows 0, 1, 3; row 1 counts once
    rho.backward()
    torch.testing.assert_close(mask.grad, torch.full((4, 2), 1 / 4))  # through Σ_c m_{n,c}


# -- the student's weights: a masked softmax per class ---------------------------------------------
def test_student_weights_are_a_softmax_over_each_classs_kept_tiles():
    S = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.5, 1.0]])
    m = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    beta = ahdmil.student_weights(S, m)
    e = math.exp
    expected = torch.tensor([[e(1) / (e(1) + e(3)), e(2) / (e(2) + e(1))],
                             [e(3) / (e(1) + e(3)), 0.0],
                             [0.0, e(1) / (e(2) + e(1))]])
    torch.testing.assert_close(beta, expected)


def test_student_weights_of_an_all_masked_class_are_zero_and_a_single_kept_tile_gets_one():
    S = torch.tensor([[1.0, 2.0], [3.0, 0.0], [0.5, 1.0]], requires_grad=True)
    m = torch.tensor([[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    beta = ahdmil.student_weights(S, m)
    assert beta.tolist() == [[0.0, 0.0], [0.0, 1.0], [0.0, 0.0]]
    (beta * torch.randn(3, 2)).sum().backward()
    assert torch.isfinite(S.grad).all() and torch.isfinite(m.grad).all()


def test_student_weights_are_finite_for_huge_logits_and_reach_unkept_tiles_mask_entries():
    # the kept tile's α underflows to 0 next to a logit of 1e4: no overflow, no 0/0
    S = torch.tensor([[-1e4], [1e4], [0.0]], requires_grad=True)
    m = torch.tensor([[1.0], [0.0], [1.0]], requires_grad=True)
    beta = ahdmil.student_weights(S, m)
    torch.testing.assert_close(beta, torch.tensor([[0.0], [0.0], [1.0]]))
    (beta * torch.tensor([[1.0], [2.0], [3.0]])).sum().backward()
    assert torch.isfinite(S.grad).all() and torch.isfinite(m.grad).all()
    S = torch.tensor([[-1e4], [1e4]])  # now only the underflowing tile is kept
    m = torch.tensor([[1.0], [0.0]], requires_grad=True)
    beta = ahdmil.student_weights(S, m)
    assert beta.tolist() == [[1.0], [0.0]]
    # moderate logits: the straight-through estimator needs ∂β/∂m where m = 0
    S = torch.tensor([[0.0], [1.0]])
    m = torch.tensor([[1.0], [0.0]], requires_grad=True)
    ahdmil.student_weights(S, m)[0, 0].backward()
    alpha = torch.softmax(S, dim=0)
    assert m.grad[1, 0].item() == pytest.approx(-alpha[1, 0].item() / alpha[0, 0].item())


def test_dmin_classify_pools_each_class_over_its_own_kept_tiles():
    torch.manual_seed(0)
    dmin = ahdmil.DMIN(6, n_classes=2, hidden=8, attention_hidden=4, degree=3).eval()
    X = torch.randn(5, 6)
    keep = torch.tensor([[True, False], [False, True], [True, False], [False, False], [True, False]])
    with torch.no_grad():
        H, S = dmin.embed(X)
        z1 = H[1]  # class 1 keeps one tile: it gets all the weight
        torch.testing.assert_close(dmin.classify(X, keep)[1], dmin.classifiers[1](z1)[0])
        rows = keep.any(dim=1)  # attention is per tile: scoring only the kept tiles is the same
        torch.testing.assert_close(dmin.classify(X, keep), dmin.classify(X[rows], keep[rows]))
        alpha0 = torch.softmax(S[[0, 2, 4], 0], dim=0)
        torch.testing.assert_close(dmin.classify(X, keep)[0],
                                   dmin.classifiers[0](alpha0 @ H[[0, 2, 4]])[0])


# -- the losses on hand-made tensors ---------------------------------------------------------------
def hand_made_output(**changes):
    out = ahdmil.DMINOutput(
        teacher_logits=torch.tensor([0.0, math.log(3.0)], requires_grad=True),  # p_T = (1/4, 3/4)
        student_logits=torch.tensor([0.0, 0.0], requires_grad=True),            # p_S = (1/2, 1/2)
        S=torch.zeros(4, 2), mask=torch.zeros(4, 2),
        keep_rate=torch.tensor(0.5),
        Z_teacher=torch.ones(2, 3), Z_student=torch.zeros(2, 3, requires_grad=True),
        H=torch.zeros(4, 3))
    return out._replace(**changes)


def test_sd_loss_is_the_weighted_sum_of_its_five_terms():
    out = hand_made_output()
    config = ahdmil.Config(mask_ratio=0.6)
    loss, terms = ahdmil.L_SD(out, torch.tensor(1), torch.tensor(0.2), config)
    ce = -math.log(0.75)
    kl = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)  # KL(teacher ‖ student)
    mse, rate = 1.0, (0.5 - 0.6) ** 2
    assert terms["ce"] == pytest.approx(ce) and terms["kl"] == pytest.approx(kl)
    assert terms["feat"] == pytest.approx(mse) and terms["rate"] == pytest.approx(rate)
    assert loss.item() == pytest.approx(0.7 * ce + 0.3 * 0.2 + 0.5 * kl + 0.5 * mse + 2 * rate)
    loss.backward()  # nothing is detached: both paths learn from the KL and the feature term
    assert out.teacher_logits.grad.abs().sum() > 0 and out.student_logits.grad.abs().sum() > 0
    torch.testing.assert_close(out.Z_student.grad, torch.full((2, 3), 0.5 * 2 * (0 - 1) / 6))


def test_sd_loss_pulls_the_keep_rate_towards_mask_ratio_the_fraction_kept():
    config = ahdmil.Config(mask_ratio=0.6)
    rho = torch.tensor(0.2, requires_grad=True)
    loss, _ = ahdmil.L_SD(hand_made_output(keep_rate=rho), torch.tensor(1), torch.tensor(0.0), config)
    loss.backward()
    assert rho.grad.item() == pytest.approx(2 * 2 * (0.2 - 0.6))  # negative: keep more


P = [[2.0, -1.0], [-3.0, 0.5], [-1.0, -2.0]]  # one branch's logits: q = [[1, 0], [0, 1], [0, 0]]


def test_hard_ad_loss_is_the_l1_of_binarised_predictions_plus_the_rate_mse():
    p = torch.tensor(P, requires_grad=True)
    M = torch.tensor([[1, 0], [1, 0], [0, 0]])
    loss = ahdmil.L_AD_hard(p, M)  # |q − M| = [[0, 0], [1, 1], [0, 0]], ρ(q) = ρ(M) = 2/3
    assert loss.item() == pytest.approx(2 / 6)
    loss.backward()  # straight through: sign(q − M) / 6 · sigm'(p)
    d = lambda x: sigmoid(x) * (1 - sigmoid(x))  # noqa: E731
    expected = torch.tensor([[0.0, 0.0], [-d(-3.0) / 6, d(0.5) / 6], [0.0, 0.0]])
    torch.testing.assert_close(p.grad, expected)
    M = torch.tensor([[1, 0], [0, 0], [0, 0]])  # ρ(M) = 1/3
    assert ahdmil.L_AD_hard(torch.tensor(P), M).item() == pytest.approx(1 / 6 + (2 / 3 - 1 / 3) ** 2)


def test_soft_ad_loss_regresses_dmins_logits_plus_the_rate_mse():
    p = torch.tensor(P)
    S = torch.tensor([[1.5, -0.5], [0.5, 1.0], [-2.0, -1.0]])  # 1[S > 0] keeps rows 0, 1
    assert ahdmil.L_AD_soft(p, S).item() == pytest.approx(7 / 6)  # |p − S| sums to 7
    S = torch.tensor([[1.5, -0.5], [-0.5, -1.0], [-2.0, -1.0]])  # keeps row 0 only; |p − S|: 7
    assert ahdmil.L_AD_soft(p, S).item() == pytest.approx(7 / 6 + (2 / 3 - 1 / 3) ** 2)


def test_ad_loss_averages_the_branches_and_never_trains_the_teacher():
    p = torch.stack([torch.tensor(P), -torch.tensor(P)]).requires_grad_(True)  # (B=2, N, C)
    S = torch.tensor([[1.5, -0.5], [0.5, 1.0], [-2.0, -1.0]], requires_grad=True)
    for soft, branch_loss in ((False, ahdmil.L_AD_hard), (True, ahdmil.L_AD_soft)):
        target = S if soft else S > 0
        loss = ahdmil.L_AD(p, S, soft)
        expected = (branch_loss(p[0], target) + branch_loss(p[1], target)) / 2
        assert loss.item() == pytest.approx(expected.item())
        loss.backward()
    assert S.grad is None and p.grad.abs().sum() > 0


# -- cross-EMA between the branches ----------------------------------------------------------------
def branches_with(*values):
    branches = nn.ModuleList(nn.Linear(1, 1) for _ in values)
    with torch.no_grad():
        for branch, (w, b) in zip(branches, values):
            branch.weight.fill_(w)
            branch.bias.fill_(b)
    return branches


def test_cross_ema_mixes_each_branch_with_the_mean_of_the_others_before_the_update():
    branches = branches_with((0.0, 1.0), (1.0, 3.0))
    ahdmil.cross_ema(branches, 0.5)
    # from pre-update copies: both become the midpoint (updated copies would give 0.75 for b = 1)
    assert [(b.weight.item(), b.bias.item()) for b in branches] == [(0.5, 2.0), (0.5, 2.0)]
    branches = branches_with((0.0, 0.0), (3.0, 6.0), (6.0, 3.0))
    ahdmil.cross_ema(branches, 0.2)
    weights = [b.weight.item() for b in branches]
    assert weights == pytest.approx([0.8 * 0 + 0.2 * 4.5, 0.8 * 3 + 0.2 * 3.0, 0.8 * 6 + 0.2 * 1.5])


def test_cross_ema_with_lambda_zero_or_one_branch_changes_nothing():
    branches = branches_with((0.0, 1.0), (1.0, 3.0))
    ahdmil.cross_ema(branches, 0.0)
    assert [b.weight.item() for b in branches] == [0.0, 1.0]
    single = branches_with((2.0, 2.0))
    ahdmil.cross_ema(single, 0.2)
    assert single[0].weight.item() == 2.0


# -- DB-LIPN and the 1:1 geometry ------------------------------------------------------------------
def test_lipn_branch_keeps_the_papers_map_sizes_on_16_and_8_px_crops():
    assert stride_schedule(16) == (2, 2, 2, 2, 2)
    assert stride_schedule(8) == (1, 2, 2, 2, 2)
    for crop in (16, 8):
        branch = LIPNBranch(2, crop, norm="batch")
        assert sum(p.numel() for p in branch.parameters()) == 33_898  # "about 34 k"
        sizes, x = [], torch.zeros(3, 3, crop, crop)
        for layer in branch.features:
            x = layer(x)
            sizes.append(x.shape[-1])
        assert sizes == [8, 4, 4, 2, 2, 1, 1, 1, 1]
    lipn = ahdmil.DBLIPN(2, crop_size=8, num_branches=2)
    crops = torch.zeros(5, 3, 8, 8)
    assert lipn(crops).shape == (2, 5, 2) and lipn.fused(crops).shape == (5, 2)


def test_every_preset_reads_one_screen_crop_per_20x_tile_with_the_same_footprint(tiny_slides):
    screen_tile = {128: 8, 256: 16}  # 20x / 1.25x = 16: a 128-px 20x tile is 8 px at 1.25x
    with open_slide(tiny_slides / "tiny_1.svs") as slide:  # 512 x 512 px at 20x
        for preset in PRESETS:
            g = GEOMETRY[preset]
            assert g["screen_tile"] == screen_tile[g["hr_tile"]]
            grid = tile_grid(slide, g["hr_mag"], g["hr_tile"], min_tissue=0.25)  # gpu: all 4 tiles
            crops = read_from_level(slide, same_footprint(grid, g["screen_mag"]))
            assert len(grid) > 1 and crops.shape == (len(grid), g["screen_tile"], g["screen_tile"], 3)
            shrunk = downsample_views(slide.read_tiles(grid.coords, g["hr_tile"], g["hr_mag"]),
                                      g["hr_tile"] // g["screen_tile"])
            distance = np.abs(crops[:, None].astype(float) - shrunk[None].astype(float)).mean(axis=(2, 3, 4))
            assert (distance.argmin(axis=1) == np.arange(len(grid))).all()  # crop n looks like tile n


@pytest.fixture(scope="module")
def tiny_slides(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ahdmil_slides")
    slides = folder / "slides"
    slides.mkdir()
    for index in range(2):
        render_slide(slides / f"tiny_{index}.svs", folder / f"tiny_{index}.png", seed=3,
                     index=index, is_tumour=bool(index), difficulty=0.5, slide_size=512)
    return slides


def test_screen_crops_cover_the_same_tissue_as_their_20x_tiles(tiny_slides):
    with open_slide(tiny_slides / "tiny_1.svs") as slide:
        grid = tile_grid(slide, 20.0, 64)
        lr_grid = same_footprint(grid, 1.25)
        crops = read_from_level(slide, lr_grid)
        assert lr_grid.tile_size == 4 and np.array_equal(lr_grid.coords, grid.coords)
        np.testing.assert_array_equal(crops, slide.read_tiles(lr_grid.coords, 4, 1.25))
        shrunk = downsample_views(slide.read_tiles(grid.coords, 64, 20.0), 16)  # (N, 4, 4, 3)
    distance = np.abs(crops[:, None].astype(float) - shrunk[None].astype(float)).mean(axis=(2, 3, 4))
    assert (distance.argmin(axis=1) == np.arange(len(grid))).all()  # crop n looks like tile n


def test_cut_crops_pads_with_white_beyond_the_image():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    crops = cut_crops(image, np.array([[0, 0], [2, 2], [3, 0]]), 2)
    np.testing.assert_array_equal(crops[1], image[2:4, 2:4])
    np.testing.assert_array_equal(crops[2][:, 0], image[0:2, 3])
    assert (crops[2][:, 1] == 255).all()


# -- the nothing-kept fallback ---------------------------------------------------------------------
def test_keep_mask_keeps_the_best_tile_of_a_class_that_keeps_nothing():
    scores = torch.tensor([[-1.0, 2.0], [-0.5, -1.0], [-3.0, 0.5]])
    assert ahdmil.keep_mask(scores).tolist() == [[False, True], [True, False], [False, True]]
    assert ahdmil.keep_mask(scores, min_keep=2)[:, 0].tolist() == [True, True, False]
    assert not ahdmil.keep_mask(scores, min_keep=0)[:, 0].any()


def silent_lipn(n_classes=2, crop_size=4):
    """A DB-LIPN whose every logit is −10: nothing is kept without the fallback."""
    lipn = ahdmil.DBLIPN(n_classes, crop_size)
    with torch.no_grad():
        for branch in lipn.branches:
            branch.classifier.weight.zero_()
            branch.classifier.bias.fill_(-10.0)
    return lipn


def test_a_slide_where_db_lipn_keeps_nothing_still_trains_and_classifies():
    torch.manual_seed(0)
    dmin = ahdmil.DMIN(6, hidden=8, attention_hidden=4, degree=3)
    model = ahdmil.AHDMIL(dmin, silent_lipn())
    crops = torch.randn(7, 3, 4, 4)
    keep = model.screen(crops)
    assert keep.sum(dim=0).tolist() == [1, 1]  # one tile per class, the best-scored
    batch = {"features": torch.randn(7, 6), "crops": crops, "label": torch.tensor(1)}
    loss, metrics = ahdmil.finetune_step(model, batch)
    assert torch.isfinite(loss) and 0 < metrics["keep_rate"] <= 2 / 7
    loss.backward()
    logits, _ = model.eval()(batch["features"], crops)
    assert torch.isfinite(logits).all()
    with torch.no_grad():  # without the fallback a class pools over nothing: z = 0, still finite
        assert torch.isfinite(dmin.classify(batch["features"], torch.zeros(7, 2, dtype=torch.bool))).all()


# -- ours: the screen's operating threshold when DMIN's mask is sparse -----------------------------
def test_recall_threshold_keeps_r_of_the_masked_tiles_and_is_never_stricter_than_the_papers_zero():
    P = torch.tensor([[-3.0, 2.0], [-1.0, 1.0], [-2.0, 0.5], [-0.5, -4.0], [-5.0, -1.0]])
    M = torch.tensor([[1, 1], [1, 1], [0, 1], [1, 0], [0, 0]], dtype=torch.bool)
    t = ahdmil.recall_threshold(P, M, 0.6)  # class 0: keep 2 of its 3 masked tiles (-1, -0.5)
    assert t[0].item() == pytest.approx(-1.0) and t[0] < -1.0 and t[1] == 0.0  # class 1: 1[P > 0]
    assert (P - t > 0).tolist() == [[False, True], [True, True], [False, True], [True, False],
                                    [False, False]]
    assert ahdmil.recall_threshold(P, M, 1.0)[0].item() == pytest.approx(-3.0)
    assert ahdmil.recall_threshold(P, torch.zeros_like(M), 0.95).tolist() == [0.0, 0.0]


class SparseTeacher(ahdmil.DMIN):
    """DMIN whose attention logits are fixed by the features: a tumour tile (feature 0 above 1)
    has S = (−4, 4), every other tile S = (−4, −4): the mask keeps 1 tile in 10."""

    def embed(self, X):
        tumour = X[:, 0] > 1  # (N,)
        S = torch.stack([torch.full_like(X[:, 0], -4.0), torch.where(tumour, 4.0, -4.0)], dim=1)
        return self.projection(X), S


def sparse_bags(n_slides=6, n_tiles=20):
    """Slides of label 1 have 2 tumour tiles (rows 0, 1) of 20, with red crops."""
    g = torch.Generator().manual_seed(0)
    bags = []
    for i in range(n_slides):
        features = torch.randn(n_tiles, 6, generator=g).clamp(-1, 1)
        crops = torch.rand(n_tiles, 3, 4, 4, generator=g) * 0.2
        tumour = torch.arange(n_tiles) < 2 * (i % 2)
        features[tumour, 0], crops[tumour, 0] = 2.0, 1.0
        bags.append(ahdmil.Bag(f"s{i}", features, crops, i % 2))
    return bags


@pytest.mark.parametrize("recall", [None, 0.95], ids=["paper", "ours"])
def test_on_a_sparse_mask_the_papers_screen_collapses_and_the_operating_threshold_keeps_the_tumour(recall):
    bags = sparse_bags()
    torch.manual_seed(0)
    dmin = SparseTeacher(6, hidden=8, attention_hidden=4, degree=3)
    config, schedule = tiny(attn_ratio=1.0, step2_epochs=1, step2_restarts=0, screen_recall=recall)
    model, _, _ = ahdmil.train_step2(dmin, bags[:4], bags[4:], config, schedule)
    with torch.no_grad():
        keep = model.screen(bags[5].crops)  # (20, 2), a tumour slide of the validation slides
    if recall is None:  # the collapse: every P < 0, the fallback keeps one tile per class
        assert keep.sum(dim=0).tolist() == [1, 1] and model.threshold.tolist() == [0.0, 0.0]
    else:
        assert keep[:2, 1].all() and model.threshold[1] < 0 and keep.any(dim=1).sum() < 20


def test_the_threshold_is_saved_and_screens_after_loading(tiny_checkpoint, tmp_path):
    trained = methods.load(tiny_checkpoint, "ahdmil")
    trained.model.threshold.fill_(-50.0)  # keeps every tile
    loaded = methods.load(trained.save(tmp_path / "thresholded.pt"), "ahdmil")
    assert loaded.model.threshold.tolist() == [-50.0, -50.0]
    assert loaded.model.screen(torch.rand(7, 3, 4, 4)).all()


# -- the training steps ----------------------------------------------------------------------------
def tiny_bags(n_slides=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n_slides):
        n = 5 + i
        features = torch.randn(n, 6, generator=g) + (i % 2)  # label 1 slides are brighter
        bags.append(ahdmil.Bag(f"s{i}", features, torch.randn(n, 3, 4, 4, generator=g), i % 2))
    return bags


def tiny_tumour(bags):
    """Slides of label 1 have 2 tumour tiles each (rows 0, 1)."""
    return {bag.slide_id: np.arange(len(bag.features)) < bag.label * 2 for bag in bags}


def tiny(**overrides):
    """(Config, Schedule) of tiny networks and short steps; ``overrides`` go to either."""
    base = dict(hidden=8, attention_hidden=4, degree=3, k_sample=2, epochs=2, min_epochs=1,
                patience=None, step2_epochs=2, step2_patience=None, lipn_lr=1e-2, dmin_lr=1e-3,
                keep_bounds=(0.0, 1.0))
    base.update(overrides)
    names = {f.name for f in fields(ahdmil.Config)}
    return (ahdmil.Config(**{k: v for k, v in base.items() if k in names}),
            ahdmil.Schedule(**{k: v for k, v in base.items() if k not in names}))


def test_dmin_makes_db_lipn_targets_in_eval_mode_and_goes_back_to_training():
    torch.manual_seed(0)
    model = ahdmil.AHDMIL(ahdmil.DMIN(6, hidden=8, attention_hidden=4, degree=3, dropout=0.9),
                          ahdmil.DBLIPN(2, 4)).train()
    seen = []
    model.dmin.projection.register_forward_hook(lambda module, i, o: seen.append(module.training))
    bag = tiny_bags()[1].item()
    losses = [ahdmil.lipn_step(model, bag, tiny(attn_ratio=1.0)[0])[0].item() for _ in range(2)]
    assert seen == [False, False] and model.dmin.training and model.lipn.training
    assert losses[0] == losses[1]  # dropout 0.9 left on would make the targets differ


def test_lipn_step_skips_a_slide_whose_loss_is_not_finite():
    model = ahdmil.AHDMIL(ahdmil.DMIN(6, hidden=8, attention_hidden=4, degree=3), ahdmil.DBLIPN(2, 4))
    bag = tiny_bags()[1].item()
    bag["crops"] = torch.full_like(bag["crops"], float("nan"))
    assert ahdmil.lipn_step(model, bag, tiny()[0]) is None


def parameters_of(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def moved(before, after):
    return {name for name in before if not torch.equal(before[name], after[name])}


def test_step2_moves_only_db_lipn_in_its_step_and_only_dmin_in_the_fine_tuning_step(monkeypatch):
    """Per slide, the DB-LIPN update (L_AD) leaves DMIN as it is, and DMIN's update (CE) DB-LIPN."""
    seen = []  # (step, parameters, parameters holding a gradient) as each step starts

    def recording(name, step):
        def run(model, batch, *args):
            waiting = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.any()}
            seen.append((name, parameters_of(model), waiting))
            return step(model, batch, *args)
        return run

    monkeypatch.setattr(ahdmil, "lipn_step", recording("lipn", ahdmil.lipn_step))
    monkeypatch.setattr(ahdmil, "finetune_step", recording("dmin", ahdmil.finetune_step))
    bags = tiny_bags()
    torch.manual_seed(0)
    dmin = ahdmil.DMIN(6, hidden=8, attention_hidden=4, degree=3)
    ahdmil._step2_try(dmin, bags[:3], bags[4:], *tiny(step2_epochs=1, weight_decay=1e-2))
    assert [name for name, _, _ in seen] == ["lipn", "dmin"] * 3  # 3 slides, DB-LIPN first
    assert [waiting for _, _, waiting in seen] == [set()] * 6  # no gradient left for the other step
    for (name, before, _), (_, after, _) in zip(seen, seen[1:]):  # cross-EMA comes after the last
        changed = moved(before, after)
        if name == "lipn":
            assert {"lipn.branches.0.classifier.weight", "lipn.branches.1.classifier.weight"} <= changed
            assert {n for n in changed if not n.startswith("lipn.")} == set()
        else:
            assert {"dmin.projection.0.weight", "dmin.attention.V.weight"} <= changed
            assert {n for n in changed if not n.startswith("dmin.")} == set()


def test_finetune_step_is_the_cross_entropy_of_dmin_pooled_per_class_over_the_kept_tiles():
    torch.manual_seed(0)
    dmin = ahdmil.DMIN(6, hidden=8, attention_hidden=4, head="linear", dropout=0.0)
    model = ahdmil.AHDMIL(dmin, ahdmil.DBLIPN(2, 4)).train()
    modes = []

    def screen(crops):  # DB-LIPN stand-in: class c's logit is red pixel (0, c) of the crop
        modes.append(model.lipn.training)
        return crops[:, 0, 0, :2]

    model.lipn.fused = screen
    crops = torch.full((5, 3, 4, 4), -1.0)
    crops[[0, 2], 0, 0, 0] = 1.0  # class 0 keeps tiles 0 and 2
    crops[1, 0, 0, 1] = 1.0       # class 1 keeps tile 1; no class keeps tiles 3 and 4
    features = torch.randn(5, 6)

    def finetune(features):
        return ahdmil.finetune_step(model, {"features": features, "crops": crops, "label": torch.tensor(1)})

    loss, metrics = finetune(features)
    assert modes == [False] and model.lipn.training  # DB-LIPN screens in eval mode
    assert metrics["keep_rate"] == pytest.approx(3 / 5)
    with torch.no_grad():
        H, S = dmin.embed(features)
        e0, e2 = S[0, 0].exp(), S[2, 0].exp()
        z0 = (e0 * H[0] + e2 * H[2]) / (e0 + e2)  # class 0: softmax over tiles 0 and 2
        z1 = H[1]                                  # class 1: its one tile gets all the weight
        head0, head1 = dmin.classifiers
        logit0 = head0.weight[0] @ z0 + head0.bias[0]
        logit1 = head1.weight[0] @ z1 + head1.bias[0]
        ce = -logit1 + torch.log(logit0.exp() + logit1.exp())  # −log softmax(logits)[label = 1]
    assert loss.item() == pytest.approx(ce.item(), rel=1e-5)
    unkept, kept = features.clone(), features.clone()
    unkept[3:] += 5.0
    kept[2] += 5.0
    with torch.no_grad():
        assert finetune(unkept)[0].item() == loss.item()
        assert abs(finetune(kept)[0].item() - loss.item()) > 1e-3


def test_step1_keeps_the_epoch_with_the_lowest_validation_loss_from_min_epochs_on(monkeypatch):
    """Scripted validation losses: epoch 1 is lowest but before min_epochs = 2, so epoch 3 is kept."""
    scripted = {1: 0.1, 2: 0.6, 3: 0.4, 4: 0.5}
    bags = tiny_bags()
    train, val = bags[:4], bags[4:]
    weights, calls, real_val_step = {}, [], ahdmil.dmin_val_step

    def val_step(dmin, batch, min_keep=1):
        epoch = len(calls) // len(val) + 1
        calls.append(epoch)
        weights[epoch] = {name: value.clone() for name, value in dmin.state_dict().items()}
        return {**real_val_step(dmin, batch, min_keep), "loss": scripted[epoch]}

    monkeypatch.setattr(ahdmil, "dmin_val_step", val_step)
    dmin, history = ahdmil.train_step1(train, val, *tiny(epochs=4, min_epochs=2))
    assert history.column("val_loss") == pytest.approx([0.1, 0.6, 0.4, 0.5])
    assert history.best_epoch == 3 and history.best_score == pytest.approx(0.4)
    for name, value in dmin.state_dict().items():
        torch.testing.assert_close(value, weights[3][name], rtol=0, atol=0)
    assert moved(weights[3], weights[4]) and moved(weights[1], weights[3])  # epochs really differ


def test_step1_validates_on_dmins_eval_path_its_own_mask_with_dropout_off():
    """The history's best validation loss is the CE of the returned DMIN pooled over 1[S > 0]."""
    bags = tiny_bags()
    train, val = bags[:4], bags[4:]
    dmin, history = ahdmil.train_step1(train, val, *tiny(epochs=3, min_epochs=2, dropout=0.9))
    losses = []
    with torch.no_grad():
        for bag in val:
            S = dmin.embed(bag.features)[1]  # (N, 2)
            keep = S > 0
            for c in range(2):  # a class that keeps nothing keeps its best tile
                keep[S[:, c].argmax(), c] |= not keep[:, c].any()
            logits = dmin.classify(bag.features, keep)
            losses.append((torch.logsumexp(logits, 0) - logits[bag.label]).item())
    best = history.rows[history.best_epoch - 1]
    assert history.best_epoch >= 2
    assert best["val_loss"] == min(row["val_loss"] for row in history.rows if row["epoch"] >= 2)
    assert best["val_loss"] == pytest.approx(np.mean(losses), rel=1e-5)


def test_same_seed_gives_the_same_numbers_and_another_seed_does_not():
    bags = tiny_bags()
    train, val = bags[:4], bags[4:]

    def run(seed):
        config, schedule = tiny(seed=seed)
        dmin, history1 = ahdmil.train_step1(train, val, config, schedule)
        model, history2, _ = ahdmil.train_step2(dmin, train, val, config, schedule)
        return model.state_dict(), history1.column("train_loss") + history2.column("train_loss")

    (first, losses), (again, losses_again), (other, _) = run(0), run(0), run(1)
    assert losses == losses_again
    for name in first:
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def test_step2_tries_fresh_screens_then_warns_and_keeps_the_last_weights_when_no_epoch_passes_the_gate():
    bags = tiny_bags()
    dmin, _ = ahdmil.train_step1(bags[:4], bags[4:], *tiny())
    config, schedule = tiny(keep_bounds=(2.0, 3.0), step2_restarts=2)
    with pytest.warns(UserWarning, match="3 tries had a validation keep rate"):
        model, history, tries = ahdmil.train_step2(dmin, bags[:4], bags[4:], config, schedule)
    assert tries == 3 and history.best_epoch is None and len(history.rows) == 2
    assert not torch.equal(model.dmin.projection[0].weight, dmin.projection[0].weight)  # fine-tuned copy
    last, _ = ahdmil._step2_try(dmin, bags[:4], bags[4:], config, schedule, attempt=3)
    for name, value in last.lipn.state_dict().items():  # the third try is the run with seed + 2
        torch.testing.assert_close(model.lipn.state_dict()[name], value, rtol=0, atol=0)
    other, _ = ahdmil._step2_try(dmin, bags[:4], bags[4:], config, replace(schedule, seed=2))
    assert all(torch.equal(other.lipn.state_dict()[n], v) for n, v in last.lipn.state_dict().items())
    row = experiment.gate_row(3, "ahdmil", history, tries, bags[4:], dmin, config)
    own = experiment.score_bags(bags[4:], experiment.predict_dmin_own_mask(dmin))["keep_rate"]
    assert row == {"split": 3, "model": "ahdmil", "screen_recall": None, "gate": [2.0, 3.0],
                   "tries": 3, "best_epoch": None, "gate_passed": False,
                   "val_keep_rate_last": history.rows[-1]["val_keep_rate"],
                   "dmin_own_mask_val_keep_rate": own}


def test_score_bags_reports_keep_rate_and_the_recall_of_tumour_tiles_among_kept_ones():
    bags = tiny_bags(4)  # slides 1 and 3 have 2 tumour tiles each (rows 0, 1)
    tumour = tiny_tumour(bags)

    def predict(bag):
        kept = torch.zeros(len(bag.features), dtype=torch.bool)
        kept[1] = True  # keeps one of the two tumour tiles
        return torch.tensor([0.3, 0.7]) if bag.label else torch.tensor([0.6, 0.4]), kept

    metrics = experiment.score_bags(bags, predict, tumour)
    assert metrics["tumour_recall"] == pytest.approx(2 / 4)
    assert metrics["keep_rate"] == pytest.approx(np.mean([1 / 5, 1 / 6, 1 / 7, 1 / 8]))
    np.testing.assert_allclose(metrics["probability"], [0.4, 0.7, 0.4, 0.7])
    without_maps = experiment.score_bags(bags, predict)  # a cohort without label maps
    assert "tumour_recall" not in without_maps and without_maps["keep_rate"] == metrics["keep_rate"]


# -- inference from the slide file -----------------------------------------------------------------
def tiny_encoder():
    torch.manual_seed(0)
    return build_encoder("tiny_resnet_gn", pretrained=False, **TINY).eval()


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_slides, tmp_path_factory):
    """An untrained AHDMIL on a tiny encoder, saved by Trained.save."""
    torch.manual_seed(0)
    model = ahdmil.AHDMIL(ahdmil.DMIN(8, hidden=8, attention_hidden=4, degree=3),
                          ahdmil.DBLIPN(2, crop_size=4))
    config = ahdmil.Config(encoder="tiny_resnet_gn", hidden=8, attention_hidden=4, degree=3,
                           **TINY_GEOMETRY)
    trained = ahdmil.Trained(config, model, tiny_encoder(), TINY)
    return trained.save(tmp_path_factory.mktemp("ahdmil_ckpt") / "tiny.pt")


class ReadCounter:
    """Records every tile read of :class:`~mini_kd.slides.Slide` and every tile encoded."""

    def __init__(self, monkeypatch, encoder):
        self.tiles, self.encoded = [], 0
        read_tiles = Slide.read_tiles

        def counting_read_tiles(slide, coords, size, mag):
            self.tiles.append((mag, np.asarray(coords).copy()))
            return read_tiles(slide, coords, size, mag)

        def no_single_reads(*args, **kwargs):
            raise AssertionError("a tile was read on its own")

        monkeypatch.setattr(Slide, "read_tiles", counting_read_tiles)
        monkeypatch.setattr(Slide, "read", no_single_reads)
        encoder.register_forward_pre_hook(lambda module, args: self._count(args[0]))

    def _count(self, x):
        self.encoded += len(x)

    def at(self, mag):
        found = [coords for m, coords in self.tiles if m == mag]
        return np.concatenate(found) if found else np.empty((0, 2), np.int64)


def brightness_screen(crops):
    """DB-LIPN stand-in: keep (for class 1) the tiles darker than the median, i.e. more tissue."""
    darkness = -crops.mean(dim=(1, 2, 3))  # (N,)
    logits = darkness - darkness.median()
    return torch.stack([torch.full_like(logits, -1.0), logits], dim=1)  # (N, 2)


def test_predict_reads_and_encodes_only_the_kept_20x_tiles(tiny_checkpoint, tiny_slides, monkeypatch):
    trained = methods.load(tiny_checkpoint, "ahdmil")
    trained.model.lipn.fused = brightness_screen
    path = tiny_slides / "tiny_1.svs"
    with open_slide(path) as slide:
        grid = tile_grid(slide, 20.0, 64)
        crops = read_from_level(slide, same_footprint(grid, 1.25))
        kept = (brightness_screen(to_tensor(crops))[:, 1] > 0).numpy()
        kept_tiles = slide.read_tiles(grid.coords[kept], 64, 20.0)
    assert 0 < kept.sum() < len(grid)
    counter = ReadCounter(monkeypatch, trained.encoder)
    result = trained.predictor()(path)
    np.testing.assert_array_equal(counter.at(20.0), grid.coords[kept])  # each kept tile, once
    assert len(counter.at(1.25)) == 0  # the 1.25x crops are cut from one read of the level
    assert counter.encoded == kept.sum() == result.tiles_read[20.0]
    assert result.tiles_read == {1.25: len(grid), 20.0: kept.sum()} and result.pixels_decoded > 0
    assert result.details["keep_rate"] == pytest.approx(kept.mean())
    assert len(result.details["grid"]) == len(grid)
    assert set(result.seconds) == {"tissue", "grid", "read_lr", "screen", "read", "encode", "dmin"}
    with torch.no_grad():
        keep = torch.from_numpy(result.details["keep"][kept])
        logits = trained.model.dmin.classify(trained.encoder(to_tensor(kept_tiles)), keep)
    assert result.probability == pytest.approx(torch.softmax(logits, -1)[1].item(), abs=1e-6)


def test_predict_without_the_screen_reads_every_tissue_tile(tiny_checkpoint, tiny_slides, monkeypatch):
    trained = methods.load(tiny_checkpoint, "ahdmil")
    counter = ReadCounter(monkeypatch, trained.encoder)
    result = trained.predictor(screen=False)(tiny_slides / "tiny_1.svs")
    with open_slide(tiny_slides / "tiny_1.svs") as slide:
        grid = tile_grid(slide, 20.0, 64)
    np.testing.assert_array_equal(counter.at(20.0), grid.coords)
    assert result.details["keep_rate"] == 1.0 and counter.encoded == len(grid)
    assert result.tiles_read == {20.0: len(grid)} and "screen" not in result.seconds


def test_predict_reads_only_the_fallback_tiles_when_db_lipn_keeps_nothing(tiny_checkpoint, tiny_slides,
                                                                          monkeypatch):
    trained = methods.load(tiny_checkpoint, "ahdmil")
    trained.model.lipn = silent_lipn()
    counter = ReadCounter(monkeypatch, trained.encoder)
    result = trained.predictor()(tiny_slides / "tiny_1.svs")
    assert 1 <= result.tiles_read[20.0] == counter.encoded == len(counter.at(20.0)) <= 2
    assert 0.0 <= result.probability <= 1.0


def test_cli_predicts_a_slide_and_a_folder_with_the_tiles_read(tiny_checkpoint, tiny_slides, tmp_path,
                                                               capsys):
    assert cli_main(["predict", "ahdmil", str(tiny_checkpoint), str(tiny_slides / "tiny_0.svs")]) == 0
    printed = capsys.readouterr().out
    assert "tiny_0: label" in printed and "tiles at 1.25x" in printed and "read_lr" in printed
    out = tmp_path / "predictions.csv"
    assert cli_main(["predict", "ahdmil", str(tiny_checkpoint), str(tiny_slides), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [row["slide_id"] for row in rows] == ["tiny_0", "tiny_1"]
    assert {"tiles_20x", "tiles_1.25x", "pixels_decoded", "seconds_screen", "seconds_read",
            "seconds_encode"} <= set(rows[0])
    assert all(int(row["tiles_20x"]) <= int(row["tiles_1.25x"]) for row in rows)


def test_load_refuses_a_missing_file_a_foreign_one_and_another_methods(tmp_path, tiny_checkpoint):
    with pytest.raises(MiniKDError, match="no ahdmil checkpoint"):
        methods.load(tmp_path / "missing.pt", "ahdmil")
    torch.save({"model": {}}, tmp_path / "bogus.pt")
    with pytest.raises(MiniKDError, match=r"bogus.pt is not .*ahdmil.*KeyError"):
        methods.load(tmp_path / "bogus.pt", "ahdmil")
    with pytest.raises(MiniKDError, match="ahdmil.*lrmil"):
        methods.load(tiny_checkpoint, "lrmil")
    saved = torch.load(tiny_checkpoint, weights_only=True)
    del saved["state"]["model"]
    torch.save(saved, tmp_path / "damaged.pt")
    with pytest.raises(MiniKDError, match=r"damaged.pt is not .*ahdmil.*KeyError"):
        methods.load(tmp_path / "damaged.pt", "ahdmil")


def test_config_refuses_an_unknown_head_preset_or_norm():
    with pytest.raises(MiniKDError, match="head"):
        ahdmil.DMIN(6, head="mlp")
    with pytest.raises(MiniKDError, match="preset"):
        presets.config("ahdmil", "huge")
    with pytest.raises(MiniKDError, match="norm"):
        ahdmil.DBLIPN(norm="layer")
    with pytest.raises(MiniKDError, match=r"\(N, 6\)"):
        ahdmil.DMIN(6)(torch.zeros(1, 4, 6))


def test_presets_apply_their_geometry_values_and_schedule_on_the_papers_defaults():
    paper = ahdmil.Config()
    assert (paper.hr_tile, paper.mask_ratio, paper.attn_ratio, paper.screen_recall) == (256, 0.6, 0.4, None)
    assert (ahdmil.Schedule().epochs, ahdmil.Schedule().lipn_lr) == (200, 1e-5)
    config, schedule = presets.config("ahdmil", "book"), presets.schedule("ahdmil", "book")
    assert (config.hr_tile, config.screen_mag) == (128, 1.25)
    assert (config.mask_ratio, config.attn_ratio, config.keep_bounds) == (0.45, 1.0, (0.1, 1.0))
    assert config.screen_recall == 0.95 and presets.config("ahdmil", "smoke").degree == 6
    assert (config.degree, presets.config("ahdmil", "gpu").degree) == (3, 12)
    assert (schedule.epochs, schedule.step2_epochs, schedule.lipn_lr) == (10, 4, 1e-3)
    assert (schedule.step2_restarts, ahdmil.Schedule().step2_restarts) == (0, 2)
    assert presets.config("ahdmil", "book", mask_ratio=0.6).mask_ratio == 0.6  # overrides last


class Stop(Exception):
    pass


def test_mini_kd_train_fits_with_the_presets_config_and_schedule_as_the_notebook_does(
        tiny_cohort, tmp_path, monkeypatch):
    seen = {}

    def fit(cohort, split, config, schedule):
        seen.update(config=config, schedule=schedule)
        raise Stop

    monkeypatch.setattr(ahdmil, "fit", fit)
    with pytest.raises(Stop):
        cli_main(["train", "ahdmil", str(tiny_cohort.root), "--preset", "book", "--out",
                  str(tmp_path / "a.pt")])
    assert seen["config"] == presets.config("ahdmil", "book")  # what notebook 04 runs
    assert replace(seen["schedule"], checkpoint_dir=None) == presets.schedule("ahdmil", "book")


# -- the benchmark's JSON --------------------------------------------------------------------------
def test_the_benchmark_json_has_the_issue_keys_and_computes_the_targets_from_the_rows():
    stages = dict.fromkeys(("tissue", "grid", "read_lr", "screen", "read", "encode", "dmin"), 0.0)
    timing = [{"model": "dmin_all", "slide_id": "a", "tiles_read": 100, "pixels_decoded": 10,
               **{**stages, "encode": 3.0, "read": 1.0}, "total": 4.0},
              {"model": "ahdmil", "slide_id": "a", "tiles_read": 20, "pixels_decoded": 2,
               **{**stages, "encode": 0.6, "read": 0.2, "screen": 0.2}, "total": 1.0}]
    measured = Experiment("smoke", "cohort", [{"test": ["a", "b"]}] * 2, experiment.MODELS,
                          base="dmin_all", timing=timing, targets=experiment.targets)
    for r, (rate, recall) in enumerate([(0.2, 1.0), (0.1, 0.9)]):
        measured.record(r, "dmin_all", ["a", "b"], [0, 1], [0.2, 0.8])
        measured.record(r, "ahdmil", ["a", "b"], [0, 1], [0.3, 0.9], keep_rate=rate,
                        tumour_recall=recall)
    out = measured.to_json()
    assert set(JSON_KEYS) <= set(out["dmin_all"]) and set(JSON_KEYS) <= set(out["ahdmil"])
    assert {"keep_rate", "tumour_recall"} <= set(out["ahdmil"])
    assert out["ahdmil"]["keep_rate"] == pytest.approx(0.15) and out["ahdmil"]["tumour_recall"] == pytest.approx(0.95)
    assert out["ahdmil"]["tiles_read"] == 20 and out["ahdmil"]["seconds_by_stage"]["screen"] == pytest.approx(0.2)
    assert out["targets"] == {"speedup": pytest.approx(4.0), "speedup_at_least_2x": True,
                              "dmin_all_learned": True, "auc_at_least_dmin_all": True,
                              "tumour_recall_at_least_95pct": True}
    unlearned = Experiment("smoke", "cohort", [{"test": ["a", "b"]}] * 2, experiment.MODELS,
                           base="dmin_all", targets=experiment.targets)
    for r in range(2):  # DMIN far below gated ABMIL did not learn: beating it says nothing
        unlearned.record(r, "abmil", ["a", "b"], [0, 1], [0.1, 0.9])
        unlearned.record(r, "dmin_all", ["a", "b"], [0, 1], [0.8, 0.2])
        unlearned.record(r, "ahdmil", ["a", "b"], [0, 1], [0.6, 0.4])
    assert unlearned.to_json()["targets"] == {"dmin_all_learned": False, "auc_at_least_dmin_all": False}
    measured.runs[-1]["tumour_recall"] = 0.8
    assert not measured.to_json()["targets"]["tumour_recall_at_least_95pct"]
    for run in measured.runs:  # a cohort without label maps: no recall, no recall target
        run.pop("tumour_recall", None)
    assert "tumour_recall_at_least_95pct" not in measured.to_json()["targets"]


# -- the interface on a cohort: fit -> save -> load -> predict, and the smoke experiment ------------
@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    """A phantom cohort of 8 slides of 512 px (label maps included)."""
    return make_cohort(tmp_path_factory.mktemp("ahdmil_cohort") / "cohort", n_slides=8, slide_size=512)


@pytest.fixture
def tiny_encoders(monkeypatch):
    """Every encoder the method builds (to fit, to load) is the tiny one."""
    monkeypatch.setattr(ahdmil, "build_encoder", lambda name, pretrained=True, **kwargs: tiny_encoder())


def tiny_fit(cohort, **overrides):
    config, schedule = tiny(encoder="tiny_resnet_gn", k_sample=2, **overrides)
    config = replace(config, **TINY_GEOMETRY)
    split = {"train": cohort.ids()[:4], "val": cohort.ids()[4:6], "test": cohort.ids()[6:]}
    return ahdmil.fit(cohort, split, config, schedule), split


def test_fit_save_load_predict_gives_the_same_prediction_and_fit_resumes(tiny_cohort, tmp_path,
                                                                         tiny_encoders):
    trained, split = tiny_fit(tiny_cohort, checkpoint_dir=str(tmp_path / "parts"))
    assert trained.history["step1"].best_epoch is not None and trained.history["tries"] >= 1
    slide = tiny_cohort.slide_path(split["test"][0])
    before = trained.predictor()(slide)
    loaded = methods.load(trained.save(tmp_path / "ahdmil.pt"), "ahdmil")
    assert isinstance(loaded, ahdmil.Trained) and loaded.config == trained.config
    after = loaded.predictor()(slide)
    assert isinstance(after, Prediction) and after.slide_id == split["test"][0]
    assert set(after.tiles_read) == {1.25, 20.0} and after.pixels_decoded > 0
    assert 0 < after.tiles_read[20.0] <= after.tiles_read[1.25] == len(after.details["grid"])
    assert after.probability == before.probability and after.tiles_read == before.tiles_read
    np.testing.assert_array_equal(after.details["keep"], before.details["keep"])
    # every step checkpointed its epochs in its own folder: a second fit finds them all done
    assert {p.name for p in (tmp_path / "parts").iterdir()} >= {"step1", "step2_try1"}
    again, _ = tiny_fit(tiny_cohort, checkpoint_dir=str(tmp_path / "parts"))
    assert again.history["step1"].rows == trained.history["step1"].rows
    for name, value in trained.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[name], value), name


def test_fit_runs_on_a_cohort_folder_without_label_maps(tiny_cohort, tmp_path, tiny_encoders):
    folder = shutil.copytree(tiny_cohort.root, tmp_path / "no_masks",
                             ignore=shutil.ignore_patterns("masks"))
    cohort = load_cohort(folder)
    assert not cohort.has_label_maps
    trained, split = tiny_fit(cohort)
    prediction = trained.predictor()(cohort.slide_path(split["test"][0]))
    assert 0.0 <= prediction.probability <= 1.0 and prediction.tiles_read[20.0] > 0


def test_the_smoke_experiment_on_a_tiny_cohort_gives_the_json_keys(tiny_cohort, tmp_path, tiny_encoders):
    config = presets.config("ahdmil", "smoke", encoder="tiny_resnet_gn", hidden=8, attention_hidden=4,
                            degree=3, k_sample=2, **TINY_GEOMETRY)
    measured = experiment.run_experiment("smoke", tiny_cohort, config,
                                         checkpoint_path=tmp_path / "ahdmil.pt")
    assert isinstance(measured, Experiment) and len(measured.splits) == 2
    out = measured.to_json()
    for model in ("dmin_all", "ahdmil"):  # the timed pipelines
        assert set(JSON_KEYS) <= set(out[model]), model
    assert set(experiment.MODELS) <= set(out) and "tumour_recall" in out["ahdmil"]
    assert {"speedup", "auc_at_least_dmin_all", "tumour_recall_at_least_95pct"} <= set(out["targets"])
    assert [(row["split"], row["model"], row["screen_recall"]) for row in out["step2_gate_by_split"]] == [
        (0, "ahdmil", 0.95), (0, "ahdmil_paper_screen", None), (1, "ahdmil", 0.95),
        (1, "ahdmil_paper_screen", None)]
    assert {"keep_rate", "tumour_recall", "auc"} <= set(out["ahdmil_paper_screen"])
    assert isinstance(methods.load(measured.checkpoint, "ahdmil"), ahdmil.Trained)
    kept = measured.models["kept"]
    assert len(kept["ahdmil"]) == len(kept["dmin_own_mask"]) == len(kept["grid"])
