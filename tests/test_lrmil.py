"""LRMIL: the 4x4 geometry (on hand-made grids, on real phantom pixels, for every preset), every
loss on hand-computed values, stage 1 end to end on a tiny phantom and with EfficientNet-Lite0,
seeds, fit resumed from its checkpoints, which slides reach which step of the experiment, the
targets, and `mini-kd predict lrmil` on a tiny slide with a tiny checkpoint."""

import csv
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

import mini_kd.methods
from mini_kd import MiniKDError, mil, presets
from mini_kd.cli import main as cli_main
from mini_kd.data import to_tensor
from mini_kd.encoders import block_means, build_encoder, copy_encoder
from mini_kd.experiments import Experiment, splits
from mini_kd.experiments import lrmil as experiment_lrmil
from mini_kd.features import cohort_features, cohort_grids
from mini_kd.methods import lrmil
from mini_kd.phantom import make_cohort, render_slide
from mini_kd.presets import PRESETS
from mini_kd.slides import Slide, open_slide
from mini_kd.tiling import TileGrid, tile_grid

TINY = dict(widths=(8, 8, 8, 8), groups=4)  # a tiny_resnet_gn: 8-d embeddings, fast on a CPU


def tiny_encoder(seed=0):
    torch.manual_seed(seed)
    return build_encoder("tiny_resnet_gn", pretrained=False, **TINY).eval()


def tiny_config(**overrides):
    base = dict(hr_tile=32, lr_tile=32, encoder="tiny_resnet_gn", hidden=8,
                kd_layers=("layer1", "layer2"))
    return lrmil.Config(**{**base, **overrides})


def tiny_schedule(**overrides):
    base = dict(mil_epochs=3, patience=None, stage1_tiles=6, stage1_epochs=2, stage1_batch=3)
    return lrmil.Schedule(**{**base, **overrides})


# -- the 4x4 geometry -------------------------------------------------------------------------------
def hand_made_grids():
    """HR tiles of 8 px at 20x under three LR tiles of 32 px (k = 4):

    LR (0, 0)  all 16 children but (8, 8), which had no tissue (slot 5);
    LR (32, 0) at the slide's right edge: only columns x = 32, 40 exist (8 children);
    LR (0, 32) tissue at 5x but no HR tile kept under it.
    The HR grid lists its tiles in a scrambled order.
    """
    hr = [(x, y) for y in range(0, 32, 8) for x in range(0, 32, 8) if (x, y) != (8, 8)]
    hr += [(x, y) for y in range(0, 32, 8) for x in (32, 40)]
    order = np.random.default_rng(0).permutation(len(hr))
    hr_grid = TileGrid(np.array(hr)[order], 20.0, 8, 8, 20.0, "s")
    lr_grid = TileGrid(np.array([(0, 0), (32, 0), (0, 32)]), 5.0, 8, 32, 20.0, "s")
    return hr_grid, lr_grid


def test_link_grids_puts_each_hr_child_in_its_slot_and_marks_missing_children():
    hr_grid, lr_grid = hand_made_grids()
    children = lrmil.link_grids(hr_grid, lr_grid, k=4)
    assert children.shape == (3, 16)
    index = {tuple(xy): n for n, xy in enumerate(hr_grid.coords.tolist())}
    for slot in range(16):
        row, col = divmod(slot, 4)
        expected = -1 if (row, col) == (1, 1) else index[(8 * col, 8 * row)]
        assert children[0, slot] == expected
    edge = children[1].reshape(4, 4)
    assert (edge[:, 2:] == -1).all()  # off the slide
    assert [index[(32 + 8 * c, 8 * r)] for r in range(4) for c in range(2)] == edge[:, :2].ravel().tolist()
    assert (children[2] == -1).all()  # no HR tile under it
    assert sorted(children[children >= 0].tolist()) == list(range(len(hr_grid)))


def test_teacher_attention_of_each_lr_tile_pools_its_linked_children_on_the_hand_made_grid():
    hr_grid, lr_grid = hand_made_grids()
    a = torch.tensor([float(x + 100 * y) for x, y in hr_grid.coords.tolist()])  # a_n from position
    children = torch.from_numpy(lrmil.link_grids(hr_grid, lr_grid, k=4))[:2]  # drop the childless tile
    full = [x + 100 * y for y in range(0, 32, 8) for x in range(0, 32, 8) if (x, y) != (8, 8)]  # 15
    edge = [x + 100 * y for y in range(0, 32, 8) for x in (32, 40)]  # 8 children
    torch.testing.assert_close(lrmil.teacher_guided_attention(a, children, "mean"),
                               torch.tensor([sum(full) / 15, sum(edge) / 8]))
    torch.testing.assert_close(lrmil.teacher_guided_attention(a, children, "max"),
                               torch.tensor([float(max(full)), float(max(edge))]))
    weights = lrmil.children_weights(a / 100, children)  # softmax over the present children only
    assert (weights[0].reshape(4, 4)[1, 1] == 0) and (weights[1].reshape(4, 4)[:, 2:] == 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(2))


def test_link_grids_refuses_an_lr_grid_that_is_not_k_times_coarser():
    hr_grid, lr_grid = hand_made_grids()
    with pytest.raises(MiniKDError, match="k·8"):
        lrmil.link_grids(hr_grid, lr_grid, k=2)


def test_teacher_guided_attention_pools_over_the_present_children_only():
    logits = torch.tensor([1.0, 3.0, 5.0, -2.0])  # teacher a_n of 4 HR tiles
    children = torch.tensor([[0, 1, -1, 2], [-1, 3, -1, -1]])  # k = 2: an edge tile with 1 child
    torch.testing.assert_close(lrmil.teacher_guided_attention(logits, children, "mean"),
                               torch.tensor([3.0, -2.0]))
    torch.testing.assert_close(lrmil.teacher_guided_attention(logits, children, "max"),
                               torch.tensor([5.0, -2.0]))
    with pytest.raises(MiniKDError, match="mean' or 'max"):
        lrmil.teacher_guided_attention(logits, children, "median")


def test_teacher_guided_attention_refuses_an_lr_tile_without_children_and_an_empty_slide():
    with pytest.raises(MiniKDError, match="no HR child"):
        lrmil.teacher_guided_attention(torch.zeros(2), torch.tensor([[0, 1, -1, -1], [-1] * 4]))
    with pytest.raises(MiniKDError, match="no LR tile"):
        lrmil.teacher_guided_attention(torch.zeros(2), torch.zeros((0, 4), dtype=torch.long))


def test_children_weights_are_the_teacher_softmax_renormalised_over_the_children():
    logits = torch.tensor([1.0, 3.0, 5.0, 0.0])
    children = torch.tensor([[0, 1, -1, 2], [3, -1, -1, -1]])
    weights = lrmil.children_weights(logits, children)
    e = torch.exp(torch.tensor([1.0, 3.0, 5.0]))
    torch.testing.assert_close(weights[0], torch.stack([e[0], e[1], torch.tensor(0.0), e[2]]) / e.sum())
    torch.testing.assert_close(weights[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    torch.testing.assert_close(weights.sum(1), torch.ones(2))


def test_child_blocks_are_block_means_for_any_map_size():
    even = torch.arange(16.0).reshape(1, 1, 4, 4)  # k = 2: 2x2 blocks
    torch.testing.assert_close(block_means(even, 2), torch.tensor([[[2.5], [4.5], [10.5], [12.5]]]))
    odd = torch.arange(9.0).reshape(1, 1, 3, 3)  # 3 rows for k = 2: blocks rows [0, 2) and [1, 3)
    torch.testing.assert_close(block_means(odd, 2), torch.tensor([[[2.0], [3.0], [5.0], [6.0]]]))


@pytest.fixture(scope="module")
def tumour_slide(tmp_path_factory):
    """A phantom tumour slide of 1024 px at 20x (level 0), with 5x and 1.25x levels."""
    folder = tmp_path_factory.mktemp("lrmil_tumour")
    render_slide(folder / "tumour.svs", folder / "tumour.png", seed=3, index=1, is_tumour=True,
                 difficulty=0.5, slide_size=1024)
    return folder / "tumour.svs"


def pixels(tiles):
    """uint8 tiles (B, S, S, 3) -> float RGB images (B, 3, S, S), 0..255."""
    return torch.from_numpy(tiles).permute(0, 3, 1, 2).float()


def test_each_block_of_a_5x_tile_shows_its_linked_20x_child_not_the_transposed_one(tumour_slide):
    """Real pixels: block (i, c) of a 5x tile (block_means of the image) has the mean colour of
    the 20x tile that link_grids puts in slot i*k + c, not that of the tile in slot c*k + i."""
    k = 4
    with open_slide(tumour_slide) as slide:
        hr = tile_grid(slide, 20.0, 32, 0.5)
        lr = tile_grid(slide, 5.0, 32, 0.5)  # a 32-px tile at 5x covers 4 x 4 tiles of 32 px at 20x
        children = lrmil.link_grids(hr, lr, k)
        lr_pixels = pixels(slide.read_tiles(lr.coords, 32, 5.0))  # (N_lr, 3, 32, 32)
        hr_pixels = pixels(slide.read_tiles(hr.coords, 32, 20.0))  # (N_hr, 3, 32, 32)
    block_colour = block_means(lr_pixels, k)  # (N_lr, 16, 3): mean RGB of each 8 x 8 block
    child_colour = hr_pixels.mean(dim=(2, 3))  # (N_hr, 3): mean RGB of each 20x tile
    row, col = np.divmod(np.arange(k * k), k)
    transposed = col * k + row  # slot (i, c) -> slot (c, i)
    linked, swapped = [], []  # mean absolute RGB difference, in grey levels
    for j in range(len(lr)):
        both = (row != col) & (children[j] >= 0) & (children[j, transposed] >= 0)
        for slot in np.flatnonzero(both):
            block = block_colour[j, slot]
            linked.append((block - child_colour[children[j, slot]]).abs().mean().item())
            other = child_colour[children[j, transposed[slot]]]
            swapped.append((block - other).abs().mean().item())
    assert len(linked) >= 100
    assert np.mean(linked) < 2.0  # the 5x level is the 20x level averaged 4 x 4, up to rounding
    assert np.mean(linked) < 0.2 * np.mean(swapped)


# -- stage-1 losses ---------------------------------------------------------------------------------
def test_layer_loss_on_hand_computed_values():
    student = torch.zeros(1, 2, 2, 2)  # k = 2 on a 2x2 map: one position per child
    student[0, 0] = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    teacher = torch.zeros(1, 4, 2)
    present = torch.tensor([[True, True, False, True]])
    # per child: mean over 2 channels of the squared error = 0.5, 2, (absent), 8
    one_layer = lrmil.layer_loss({"a": student}, {"a": teacher}, present, k=2)
    torch.testing.assert_close(one_layer, torch.tensor((0.5 + 2 + 8) / 3))
    two_layers = lrmil.layer_loss({"a": student, "b": torch.zeros(1, 2, 4, 4)},
                                  {"a": teacher, "b": torch.ones(1, 4, 2)}, present, k=2)
    torch.testing.assert_close(two_layers, torch.tensor(((0.5 + 2 + 8) / 3 + 1.0) / 2))


def test_attention_weighted_loss_on_hand_computed_values():
    s = torch.zeros(1, 2)
    u = torch.tensor([[[1.0, 1.0], [2.0, 0.0], [9.0, 9.0], [0.0, 2.0]]])  # child 2 absent
    w = torch.tensor([[0.5, 0.25, 0.0, 0.25]])
    # 0.5·1 + 0.25·2 + 0·81 + 0.25·2
    torch.testing.assert_close(lrmil.attention_weighted_loss(s, u, w), torch.tensor(1.5))


def test_stage1_loss_weighs_its_two_terms():
    maps = {"a": torch.zeros(1, 2, 2, 2), "f": torch.ones(1, 2, 2, 2)}
    batch = {"targets": {"a": torch.full((1, 4, 2), 2.0)}, "final": torch.zeros(1, 4, 2),
             "present": torch.ones(1, 4, dtype=torch.bool), "weights": torch.full((1, 4), 0.25)}
    config = lrmil.Config(k=2, lambda_layer=2.0, lambda_attn=3.0)
    loss, terms = lrmil.stage1_loss(maps, batch, config, final_layer="f")
    assert terms == {"L_layer": 4.0, "L_attn": 1.0}  # (0 - 2)² per block; (1 - 0)² per child
    torch.testing.assert_close(loss, torch.tensor(2.0 * 4.0 + 3.0 * 1.0))  # swapped λ's give 14


# -- stage-2 losses ---------------------------------------------------------------------------------
def test_pre_loss_is_the_cross_entropy_of_the_slide_label():
    logits = torch.tensor([[0.0, math.log(3.0)], [math.log(3.0), 0.0]])  # P(y) = 3/4, then 1/4
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    torch.testing.assert_close(lrmil.pre_loss(logits, torch.tensor([1, 1])), torch.tensor(expected))


def test_bag_kd_loss_on_hand_computed_values():
    z_s, z_t = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]])
    expected_t1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    torch.testing.assert_close(lrmil.bag_kd_loss(z_s, z_t, 1.0), torch.tensor(expected_t1))
    p = math.sqrt(3) / (math.sqrt(3) + 1)  # softmax([ln 3 / 2, 0])[0]
    expected_t2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    torch.testing.assert_close(lrmil.bag_kd_loss(z_s, z_t, 2.0), torch.tensor(expected_t2))


def test_soft_attention_loss_is_a_kl_summed_over_the_bag():
    a_s, guide = torch.zeros(1, 3), torch.tensor([[math.log(2.0), 0.0, 0.0]])
    expected = 0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3)  # p_t = (.5, .25, .25)
    torch.testing.assert_close(lrmil.soft_attention_loss(a_s, guide, 1.0), torch.tensor(expected))


def test_hard_instance_loss_labels_top_k_by_teacher_attention_one_and_bottom_k_zero():
    guide = torch.tensor([0.1, 5.0, -3.0, 0.2])  # top-1: tile 1, bottom-1: tile 2
    logits = torch.zeros(4, 2)
    logits[1] = torch.tensor([0.0, math.log(3.0)])  # P(relevant) = 3/4
    expected = (-math.log(0.75) + math.log(2.0)) / 2
    torch.testing.assert_close(lrmil.hard_instance_loss(logits, guide, topk=1), torch.tensor(expected))


def student_bag(n_tiles=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"X": torch.randn(1, n_tiles, 8, generator=g), "y": torch.tensor([1]),
            "teacher_logits": torch.tensor([[0.0, 2.0]]), "guide": torch.randn(1, n_tiles, generator=g)}


def test_stage2_loss_is_the_lambda_weighted_sum_and_skips_terms_with_zero_weight():
    torch.manual_seed(0)
    model = lrmil.StudentABMIL(8, 2, hidden=8)
    bag = student_bag()
    config = lrmil.Config(lambda_ce=1.0, lambda_bag=0.5, lambda_soft=2.0, lambda_hard=0.25,
                          T_b=2.0, T_a=1.0, topk=1)
    loss, terms = lrmil.stage2_loss(model, bag, config)
    out = model(bag["X"])
    expected = {
        "L_Pre": torch.nn.functional.cross_entropy(out.logits, bag["y"]),
        "L_Bag": lrmil.bag_kd_loss(out.logits, bag["teacher_logits"], 2.0),
        "L_soft": lrmil.soft_attention_loss(out.attention_logits, bag["guide"], 1.0),
        "L_hard": lrmil.hard_instance_loss(model.instance_classifier(bag["X"][0]), bag["guide"][0], 1),
    }
    assert terms == pytest.approx({k: v.item() for k, v in expected.items()})
    total = expected["L_Pre"] + 0.5 * expected["L_Bag"] + 2.0 * expected["L_soft"] + 0.25 * expected["L_hard"]
    torch.testing.assert_close(loss, total)
    _, plain = lrmil.stage2_loss(model, {"X": bag["X"], "y": bag["y"]},
                                 lrmil.Config(lambda_bag=0, lambda_soft=0, lambda_hard=0))
    assert set(plain) == {"L_Pre"}


def test_a_single_tile_bag_has_attention_one_and_zero_attention_losses():
    torch.manual_seed(0)
    model = lrmil.StudentABMIL(8, 2, hidden=8)
    bag = student_bag(n_tiles=1)
    _, alpha = model.predict(bag["X"])
    torch.testing.assert_close(alpha, torch.ones(1, 1))
    loss, terms = lrmil.stage2_loss(model, bag, lrmil.Config(topk=2))
    assert terms["L_soft"] == 0 and terms["L_hard"] == 0 and math.isfinite(loss.item())


def test_an_empty_bag_is_refused_with_a_clear_error():
    with pytest.raises(MiniKDError, match="no tile features"):
        mil.make_bags({"s": torch.zeros(0, 8)}, {"s": 1}, ["s"])
    with pytest.raises(MiniKDError, match="no tiles"):
        lrmil.StudentABMIL(8, 2, hidden=8)(torch.zeros(1, 0, 8))


def test_teacher_attention_logits_are_per_tile_and_their_softmax_sums_to_one():
    features = {f"s{i}": torch.randn(5 + i, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    torch.manual_seed(0)
    teacher = lrmil.ABMIL(8, 2, hidden=8)
    out = lrmil.teacher_outputs(teacher, features, list(features))
    for slide_id, X in features.items():
        assert out[slide_id]["logits"].shape == (2,)
        assert out[slide_id]["attention_logits"].shape == (len(X),)  # one per tile, not the bag vector
        with torch.no_grad():
            direct = teacher(X.unsqueeze(0))
        torch.testing.assert_close(out[slide_id]["attention_logits"], direct.attention_logits[0])
        torch.testing.assert_close(out[slide_id]["logits"], direct.logits[0])
        assert not torch.allclose(out[slide_id]["attention_logits"].sum(), torch.tensor(1.0))  # not α
        torch.testing.assert_close(torch.softmax(out[slide_id]["attention_logits"], 0).sum(), torch.tensor(1.0))


# -- training: seeds -------------------------------------------------------------------------------
def synthetic_bags(n_slides=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = [f"s{i}" for i in range(n_slides)]
    labels = {s: i % 2 for i, s in enumerate(ids)}
    features = {s: torch.randn(6, 8, generator=g) + labels[s] for s in ids}
    split = {"train": ids[:8], "val": ids[8:10], "test": ids[10:]}
    teacher = {s: {"logits": torch.tensor([1.0 - labels[s], float(labels[s])])} for s in ids}
    guides = {s: features[s].mean(1) for s in ids}
    return features, labels, split, teacher, guides


def test_same_seed_gives_the_same_student_and_another_seed_does_not():
    features, labels, split, teacher, guides = synthetic_bags()
    bags = mil.make_bags(features, labels, split["test"])

    def probabilities(seed):
        student = lrmil.train_student(features, labels, split, tiny_config(), tiny_schedule(seed=seed),
                                      teacher, guides)
        return mil.bag_probabilities(student, bags)

    first, again, other = probabilities(0), probabilities(0), probabilities(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


# -- stage 1 end to end on a tiny phantom cohort ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
    cohort = make_cohort(tmp_path_factory.mktemp("lrmil_cohort"), n_slides=6, slide_size=512)
    config = tiny_config()
    hr_grids = cohort_grids(cohort, 20.0, config.hr_tile, config.min_tissue)
    lr_grids = cohort_grids(cohort, 5.0, config.lr_tile, config.min_tissue)
    encoder = tiny_encoder()
    hr_features = cohort_features(cohort, hr_grids, encoder)
    teacher = {s: {"attention_logits": torch.randn(len(hr_grids[s]),
                                                   generator=torch.Generator().manual_seed(i))}
               for i, s in enumerate(cohort.ids())}
    return cohort, config, hr_grids, lr_grids, encoder, hr_features, teacher


def test_stage1_targets_are_the_hr_encoders_own_pooled_outputs_on_the_20x_children(tiny_cohort, tmp_path):
    cohort, config, hr_grids, lr_grids, encoder, hr_features, teacher = tiny_cohort
    ids = cohort.ids("train")
    items = lrmil.stage1_data(cohort, ids, hr_grids, lr_grids, hr_features, teacher, encoder,
                              config, tiny_schedule(), tmp_path / "targets")
    assert len(items) == tiny_schedule().stage1_tiles
    assert list((tmp_path / "targets").rglob("*.h5"))  # cached
    slide_id = next(s for s in ids if len(lr_grids[s]))
    children = torch.from_numpy(lrmil.link_grids(hr_grids[slide_id], lr_grids[slide_id], config.k))
    first = lrmil.stage1_data(cohort, [slide_id], hr_grids, lr_grids, hr_features, teacher, encoder,
                              config, tiny_schedule(stage1_tiles=1), tmp_path / "targets")[0]
    # which LR tile was drawn: the one whose pixels these are
    with open_slide(cohort.slide_path(slide_id)) as slide:
        lr_tiles = slide.read_tiles(lr_grids[slide_id].coords, config.lr_tile, 5.0)
        j = next(j for j in range(len(lr_tiles)) if np.array_equal(lr_tiles[j], first["tiles"].numpy()))
        slots = np.flatnonzero(children[j] >= 0)
        hr_tiles = slide.read_tiles(hr_grids[slide_id].coords[children[j][slots]], config.hr_tile, 20.0)
    with torch.no_grad():
        expected = encoder.embeddings(to_tensor(hr_tiles), ["layer2", "layer4"])
    torch.testing.assert_close(first["targets"]["layer2"][slots], expected["layer2"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(first["final"][slots], expected["layer4"], rtol=1e-4, atol=1e-5)
    assert first["present"].tolist() == (children[j] >= 0).tolist()
    torch.testing.assert_close(first["weights"],
                               lrmil.children_weights(teacher[slide_id]["attention_logits"], children[j:j + 1])[0])


def test_stage1_training_is_repeatable_and_lowers_the_loss(tiny_cohort, tmp_path):
    cohort, config, hr_grids, lr_grids, encoder, hr_features, teacher = tiny_cohort
    schedule = tiny_schedule(stage1_epochs=4, stage1_lr=1e-2)
    hr_weights = {k: v.clone() for k, v in encoder.state_dict().items()}
    items = lrmil.stage1_data(cohort, cohort.ids("train"), hr_grids, lr_grids, hr_features, teacher,
                              encoder, config, schedule, tmp_path / "targets")
    lr_encoder, history = lrmil.train_stage1(encoder, items, config, schedule)
    again, _ = lrmil.train_stage1(encoder, items, config, schedule)
    for a, b in zip(lr_encoder.state_dict().values(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    losses = history.column("train_loss")
    assert min(losses[1:]) < losses[0]
    assert not torch.equal(lr_encoder.stem[0].weight, encoder.stem[0].weight)  # a copy was trained
    for name, value in encoder.state_dict().items():  # the HR encoder itself stays as it was
        torch.testing.assert_close(value, hr_weights[name], rtol=0, atol=0)


def test_stage1_refuses_layers_the_encoder_does_not_have(tiny_cohort, tmp_path):
    cohort, config, hr_grids, lr_grids, encoder, hr_features, teacher = tiny_cohort
    with pytest.raises(MiniKDError, match="not layers of tiny_resnet_gn"):
        lrmil.stage1_data(cohort, cohort.ids("train"), hr_grids, lr_grids, hr_features, teacher,
                          encoder, replace(config, kd_layers=("stage3",)), tiny_schedule(), tmp_path)


def test_stage1_trains_efficientnet_lite0s_weights_with_frozen_batchnorm_and_no_stochastic_depth():
    """The LR copy of EfficientNet-Lite0 learns every weight, yet keeps the ImageNet BatchNorm
    statistics, and in the student's training mode a forward pass is deterministic."""
    hr_encoder = build_encoder("efficientnet_lite0")  # BatchNorm; stochastic depth when training
    g = torch.Generator().manual_seed(0)
    items = [{"tiles": torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g),
              "present": torch.ones(16, dtype=torch.bool), "weights": torch.full((16,), 1 / 16),
              "final": torch.rand(16, 1280, generator=g),  # u_k
              "targets": {"stage3": torch.rand(16, 40, generator=g)}}  # 32-px tile: a 4 x 4 map
             for _ in range(4)]
    config = lrmil.Config(lr_tile=32, kd_layers=("stage3",))
    schedule = lrmil.Schedule(stage1_epochs=2, stage1_batch=2, stage1_lr=1e-3)
    lr_encoder, _ = lrmil.train_stage1(hr_encoder, items, config, schedule)  # 4 optimiser steps

    pretrained = dict(hr_encoder.named_parameters())
    for name, weight in lr_encoder.named_parameters():
        assert not torch.equal(weight, pretrained[name]), name
    statistics = dict(hr_encoder.named_buffers())
    assert sum(name.endswith("running_var") for name in statistics) > 40  # one per BatchNorm
    for name, buffer in lr_encoder.named_buffers():
        assert torch.equal(buffer, statistics[name]), name

    x = to_tensor(torch.stack([item["tiles"] for item in items]))
    student = lrmil.Stage1Student(copy_encoder(hr_encoder)).train()
    plain_copy = copy_encoder(hr_encoder)  # in training mode, as copy_encoder gives it
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(plain_copy(x), plain_copy(x))  # random blocks dropped: the control
        assert torch.equal(student(x, ["head"])["head"], student(x, ["head"])["head"])


# -- the experiment: which slides reach the teacher, stage 1 and the stage-2 sweep ---------------
class SeenSlides:
    """A spy on run_experiment. Per call of a watched step, in call order: the slide ids it
    trained on (``fit``) and the ids it scored to pick an epoch or a setting (``select``)."""

    def __init__(self):
        self.calls, self.active = [], False

    def watch(self, step, function):
        def watched(*args, **kwargs):
            self.calls.append({"step": step, "fit": set(), "select": set()})
            self.active = True
            result = function(*args, **kwargs)
            self.active = False
            return result
        return watched

    def saw(self, role, ids):
        if self.active:
            self.calls[-1][role] |= set(ids)

    def by_split(self):
        """(split index, call) pairs: split r begins with the r-th teacher."""
        r = -1
        for call in self.calls:
            r += call["step"] == "teacher"
            yield r, call


@pytest.fixture(scope="module")
def smoke_experiment_seen(tmp_path_factory):
    """LRMIL's smoke experiment on a tiny cohort (8 slides of 512 px, a tiny encoder, as in
    test_determinism), watched by a SeenSlides."""
    cohort = make_cohort(tmp_path_factory.mktemp("lrmil_smoke"), n_slides=8, slide_size=512)
    seen = SeenSlides()
    train_abmil, bag_probabilities, stage1_data = mil.train_abmil, mil.bag_probabilities, lrmil.stage1_data

    def spy_train_abmil(train_bags, val_bags, *args, **kwargs):
        seen.saw("fit", [bag["id"] for bag in train_bags])
        seen.saw("select", [bag["id"] for bag in val_bags])
        return train_abmil(train_bags, val_bags, *args, **kwargs)

    def spy_bag_probabilities(model, bags):  # what mil.bag_validation scores
        seen.saw("select", [bag["id"] for bag in bags])
        return bag_probabilities(model, bags)

    def spy_stage1_data(cohort, slide_ids, *args, **kwargs):
        seen.saw("fit", slide_ids)
        return stage1_data(cohort, slide_ids, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment_lrmil, "build_encoder", lambda name: tiny_encoder())
        patch.setattr(lrmil, "train_teacher", seen.watch("teacher", lrmil.train_teacher))
        for name, step in (("distil_encoder", "stage 1"), ("sweep_stage2", "sweep")):
            patch.setattr(experiment_lrmil, name, seen.watch(step, getattr(experiment_lrmil, name)))
        for module in (lrmil, experiment_lrmil):
            patch.setattr(module, "train_abmil", spy_train_abmil)
        patch.setattr(mil, "bag_probabilities", spy_bag_probabilities)
        patch.setattr(lrmil, "stage1_data", spy_stage1_data)
        experiment = experiment_lrmil.run_experiment(
            "smoke", cohort, tiny_config(), tiny_schedule(mil_epochs=2, stage1_epochs=1), timing=False)
    return experiment, seen


def test_teacher_and_stage1_learn_from_training_slides_and_the_sweep_scores_validation_slides(
        smoke_experiment_seen):
    experiment, seen = smoke_experiment_seen
    steps = [call["step"] for call in seen.calls]
    assert steps.count("teacher") == steps.count("stage 1") == len(experiment.splits) == 2
    assert "sweep" in steps
    for r, call in seen.by_split():
        split = {part: set(ids) for part, ids in experiment.splits[r].items()}
        if call["step"] == "stage 1":
            assert call["fit"] and call["fit"] <= split["train"] and not call["select"], (r, call)
        else:  # the teacher and the sweep: fit on train, pick the epoch (and setting) on val
            assert call["fit"] == split["train"] and call["select"] == split["val"], (r, call)
        assert call["fit"].isdisjoint(split["test"]) and call["select"].isdisjoint(split["test"])


def test_no_split_uses_a_stage2_setting_chosen_with_its_own_test_slides(smoke_experiment_seen):
    experiment, seen = smoke_experiment_seen
    chosen_with = None  # the slides of the latest sweep: its winner trains the split's students
    for r, split in enumerate(experiment.splits):
        sweeps = [call for s, call in seen.by_split() if s <= r and call["step"] == "sweep"]
        chosen_with = sweeps[-1]["fit"] | sweeps[-1]["select"]
        assert chosen_with.isdisjoint(split["test"]), (r, sorted(chosen_with & set(split["test"])))


def test_each_split_trains_its_stage2_students_with_its_own_sweep_winner(smoke_experiment_seen):
    experiment, _ = smoke_experiment_seen
    extras = experiment.extras
    assert [row["split"] for row in extras["sweep_best"]] == [0, 1]
    for best, setting in zip(extras["sweep_best"], extras["stage2_setting"]):
        rows = [row for row in extras["sweep"] if row["split"] == best["split"]]
        assert best == min(rows, key=lambda row: row["val_ce"])
        assert setting == {"split": best["split"], "lambda_soft": best["lambda_soft"]}


# -- fit: the one interface, resumable -------------------------------------------------------------
def test_fit_resumes_every_step_from_its_checkpoints_and_gives_the_same_lrmil(tmp_path, monkeypatch):
    cohort = make_cohort(tmp_path / "cohort", n_slides=8, slide_size=512)
    split = splits(cohort, 1, 0)[0]
    monkeypatch.setattr(lrmil, "build_encoder", lambda name, **kwargs: tiny_encoder())
    schedule = tiny_schedule(mil_epochs=2, stage1_epochs=2, checkpoint_dir=str(tmp_path / "parts"))
    first = lrmil.fit(cohort, split, tiny_config(), schedule)
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["stage1", "student", "teacher"]
    calls = []
    train_step = lrmil.stage1_loss
    monkeypatch.setattr(lrmil, "stage1_loss", lambda *a: calls.append(1) or train_step(*a))
    again = lrmil.fit(cohort, split, tiny_config(), schedule)  # every step already done: resumed
    assert not calls
    for a, b in ((first.student, again.student), (first.lr_encoder, again.lr_encoder)):
        for name, value in a.state_dict().items():
            torch.testing.assert_close(value, b.state_dict()[name], rtol=0, atol=0)


# -- inference: 5x only, and the CLI ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lrmil_predict")
    slides = folder / "slides"
    slides.mkdir()
    for index in range(2):
        render_slide(slides / f"tiny_{index}.svs", folder / f"tiny_{index}.png", seed=3, index=index,
                     is_tumour=bool(index), difficulty=0.5, slide_size=512)
    torch.manual_seed(0)
    student = lrmil.StudentABMIL(8, 2, hidden=8)
    checkpoint = lrmil.Trained(tiny_config(), tiny_encoder(), student, TINY).save(folder / "tiny.pt")
    return checkpoint, slides


def test_predictor_reads_5x_tiles_only_and_matches_the_student_on_them(tiny_checkpoint):
    checkpoint, slides = tiny_checkpoint
    trained = mini_kd.methods.load(checkpoint, "lrmil")
    path = slides / "tiny_1.svs"
    result = trained.predictor()(path)
    with open_slide(path) as slide:
        grid = tile_grid(slide, 5.0, 32, 0.5)
        tiles = slide.read_tiles(grid.coords, 32, 5.0)
    assert result.details["grid"].mag == 5.0 and result.tiles_read == {5.0: len(grid)}
    with torch.no_grad():
        out = trained.student(trained.lr_encoder(to_tensor(tiles)).unsqueeze(0))
    assert result.probability == pytest.approx(torch.softmax(out.logits, -1)[0, 1].item(), abs=1e-6)
    assert result.details["attention"].sum() == pytest.approx(1.0, abs=1e-6)
    assert set(result.seconds) == {"tissue", "grid", "read", "encode", "MIL"}
    assert result.label == int(result.probability >= 0.5) and result.pixels_decoded > 0


def test_predictor_never_reads_a_20x_pixel_while_hr_abmil_does(tiny_checkpoint, monkeypatch):
    checkpoint, slides = tiny_checkpoint
    path = slides / "tiny_0.svs"
    with open_slide(path) as slide:
        level_5x, level_20x = slide.level_for(slide.downsample(5.0)), slide.level_for(slide.downsample(20.0))
    assert (level_5x, level_20x) == (1, 0)
    levels = []
    read_level = Slide._read_level

    def spy(self, x, y, level, width, height):
        levels.append(level)
        return read_level(self, x, y, level, width, height)

    monkeypatch.setattr(Slide, "_read_level", spy)
    trained = mini_kd.methods.load(checkpoint, "lrmil")
    trained.predictor()(path)
    assert levels and level_20x not in levels and level_5x in levels
    levels.clear()
    hr_abmil = mil.abmil_predictor(trained.lr_encoder, trained.student, 20.0, 32, 0.5)
    hr_abmil(path)
    assert level_20x in levels  # the spy sees 20x reads when there are some


def test_a_saved_lrmil_loads_and_predicts_the_same(tiny_checkpoint, tmp_path):
    checkpoint, slides = tiny_checkpoint
    trained = mini_kd.methods.load(checkpoint, "lrmil")
    prediction = trained.predictor()(slides / "tiny_1.svs")
    assert isinstance(prediction, mini_kd.methods.Prediction)
    again = mini_kd.methods.load(trained.save(tmp_path / "again.pt"), "lrmil").predictor()
    assert again(slides / "tiny_1.svs").probability == pytest.approx(prediction.probability, abs=1e-6)


def test_cli_predicts_a_slide_and_a_folder_to_csv(tiny_checkpoint, tmp_path, capsys):
    checkpoint, slides = tiny_checkpoint
    assert cli_main(["predict", "lrmil", str(checkpoint), str(slides / "tiny_0.svs")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("tiny_0: label ") and ", probability 0." in printed
    assert all(f" {stage} " in printed.split("seconds:")[1] for stage in ("tissue", "grid", "read", "encode", "MIL", "total"))
    out = tmp_path / "predictions.csv"
    assert cli_main(["predict", "lrmil", str(checkpoint), str(slides), "--out", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert [row["slide_id"] for row in rows] == ["tiny_0", "tiny_1"]
    assert {"label", "probability", "tiles_5x", "seconds_read", "seconds_encode", "seconds_MIL"} <= set(rows[0])
    assert all(0.0 <= float(row["probability"]) <= 1.0 for row in rows)


def test_cli_refuses_a_file_that_is_not_an_lrmil_checkpoint(tiny_checkpoint, tmp_path, capsys):
    _, slides = tiny_checkpoint
    bogus = tmp_path / "bogus.pt"
    torch.save({"model": {}}, bogus)
    assert cli_main(["predict", "lrmil", str(bogus), str(slides / "tiny_0.svs")]) == 2
    assert "not a checkpoint of lrmil" in capsys.readouterr().err


@pytest.mark.parametrize("preset", PRESETS)
def test_each_presets_lr_tile_holds_k_by_k_hr_tiles_covering_exactly_its_footprint(preset,
                                                                                   tumour_slide):
    """Grids tiled at the preset's magnifications and tile sizes: LR tile j holds in slot i*k + c
    the HR tile at j's corner + (c, i) HR footprints, every slot filled, every HR tile once."""
    config = presets.config("lrmil", preset)
    with open_slide(tumour_slide) as slide:  # 1024 px: at least one LR tile for every preset
        hr = tile_grid(slide, config.hr_mag, config.hr_tile, min_tissue=0.0)
        lr = tile_grid(slide, config.lr_mag, config.lr_tile, min_tissue=0.0)
    children = lrmil.link_grids(hr, lr, config.k)
    assert lr.footprint == config.k * hr.footprint
    row, col = np.divmod(np.arange(config.k ** 2), config.k)
    offsets = np.stack([col, row], axis=1) * hr.footprint  # (k*k, 2) level-0 (x, y) of each slot
    for corner, slots in zip(lr.coords, children):
        assert (slots >= 0).all()
        np.testing.assert_array_equal(hr.coords[slots], corner + offsets)
    assert sorted(children.ravel().tolist()) == list(range(len(hr)))


# -- the benchmark's JSON and the targets ---------------------------------------------------------
def _timing_row(model, slide_id, read, encode, mil, tiles):
    seconds = {"tissue": 0.1, "grid": 0.1, "read": read, "encode": encode, "MIL": mil}
    return {"model": model, "slide_id": slide_id, "position": 0, "tiles_read": tiles,
            "pixels_decoded": 100 * tiles, **seconds, "total": sum(seconds.values())}


def lrmil_json(hr_auc=1.0, torchmil_auc=1.0):
    aucs = {"hr_abmil": hr_auc, "hr_abmil_torchmil": torchmil_auc, "lr_abmil": 0.8, "lrmil": 0.99}
    runs = [{"split": r, "model": m, "auc": auc, "accuracy": 0.9, "f1": 0.9}
            for r in range(2) for m, auc in aucs.items()]
    timing = [_timing_row("hr_abmil", "a", 1.0, 10.0, 1.0, 160), _timing_row("lrmil", "a", 0.1, 0.8, 0.1, 10),
              _timing_row("lr_abmil", "a", 0.1, 0.8, 0.1, 10)]
    return Experiment("smoke", "cohort", [{"test": ["a"]}] * 2, experiment_lrmil.MODELS, "hr_abmil",
                      runs=runs, timing=timing, timed_as=experiment_lrmil.TIMED_AS,
                      targets=experiment_lrmil.targets).to_json()


def test_the_benchmark_json_has_the_issue_keys_and_computes_the_targets_from_the_rows():
    out = lrmil_json()
    for model in ("hr_abmil", "hr_abmil_torchmil", "lr_abmil", "lrmil"):
        assert {"auc", "accuracy", "seconds_per_slide", "seconds_by_stage"} <= set(out[model])
    assert out["hr_abmil_torchmil"]["seconds_per_slide"] == out["hr_abmil"]["seconds_per_slide"]
    assert out["lrmil"]["auc"] == pytest.approx(0.99) and out["lrmil"]["auc_std"] == 0
    assert out["targets"]["speedup_read_encode_mil"] == pytest.approx(12.0 / 1.0)
    assert out["targets"]["speedup_at_least_12x"] and out["targets"]["hr_abmil_learned"]
    assert out["targets"]["auc_at_least_98pct_of_hr_abmil"] and out["targets"]["auc_above_lr_abmil"]


def test_a_target_against_hr_abmil_is_not_met_when_hr_abmil_did_not_learn():
    """Issue 11: a broken teacher (AUC 0.2 where torchmil's ABMIL reaches 1.0) made "LRMIL ≥ 98 %
    of HR ABMIL" true while both had failed."""
    broken = lrmil_json(hr_auc=0.2, torchmil_auc=1.0)["targets"]
    assert not broken["hr_abmil_learned"] and not broken["auc_at_least_98pct_of_hr_abmil"]
    assert broken["auc_ratio_to_hr"] == pytest.approx(0.99 / 0.2)
    close = lrmil_json(hr_auc=0.96, torchmil_auc=1.0)["targets"]  # within 0.05 of torchmil's
    assert close["hr_abmil_learned"] and close["auc_at_least_98pct_of_hr_abmil"]


def test_a_config_for_more_than_two_classes_is_refused_up_front():
    with pytest.raises(MiniKDError, match="two classes.*n_classes=3"):
        presets.config("lrmil", "smoke", n_classes=3)
