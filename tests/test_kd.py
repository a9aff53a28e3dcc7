"""Distillation losses against numbers worked out by hand on two- and three-class examples."""

import math

import pytest
import torch
import torch.nn.functional as F

from mini_kd import MiniKDError
from mini_kd.kd import attention_kl_loss, feature_map_loss, resize_feature_map, soft_target_loss

# softmax([ln 3, 0]) = [3/4, 1/4] against the uniform [1/2, 1/2]
KL_THREE_QUARTERS = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)


# -- soft targets ----------------------------------------------------------------------------------
def test_soft_target_loss_is_the_kl_from_teacher_to_student_averaged_over_the_batch():
    z_t = torch.tensor([[math.log(3.0), 0.0], [1.0, 1.0]])
    z_s = torch.tensor([[0.0, 0.0], [5.0, 5.0]])   # second sample: both uniform, KL = 0
    loss = soft_target_loss(z_s, z_t)
    assert loss.item() == pytest.approx(KL_THREE_QUARTERS / 2, rel=1e-6)


def test_soft_target_loss_with_temperature_two_softens_both_and_scales_by_four():
    z_t = torch.tensor([[math.log(3.0), 0.0]])
    z_s = torch.tensor([[0.0, 0.0]])
    p = math.sqrt(3.0) / (math.sqrt(3.0) + 1.0)    # softmax([ln 3, 0] / 2) = [√3, 1] / (√3 + 1)
    expected = 4.0 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    assert soft_target_loss(z_s, z_t, T=2.0).item() == pytest.approx(expected, rel=1e-6)


def test_soft_target_loss_is_zero_when_student_equals_teacher():
    z = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    assert soft_target_loss(z.clone(), z, T=3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_soft_target_loss_gives_gradients_to_the_student_only():
    z_s = torch.zeros(1, 2, requires_grad=True)
    z_t = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    soft_target_loss(z_s, z_t).backward()
    assert z_t.grad is None
    # d KL / d z_s = p_s − p_t = [1/2 − 3/4, 1/2 − 1/4]
    torch.testing.assert_close(z_s.grad, torch.tensor([[-0.25, 0.25]]))


def test_soft_target_loss_refuses_mismatched_or_non_finite_logits():
    with pytest.raises(MiniKDError, match="same shape"):
        soft_target_loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(MiniKDError, match="NaN or inf"):
        soft_target_loss(torch.zeros(1, 2), torch.tensor([[float("nan"), 0.0]]))
    with pytest.raises(MiniKDError, match=r"\(B, C\)"):
        soft_target_loss(torch.zeros(2), torch.zeros(2))
    with pytest.raises(MiniKDError, match="positive"):
        soft_target_loss(torch.zeros(1, 2), torch.zeros(1, 2), T=0.0)


# -- feature maps ----------------------------------------------------------------------------------
def teacher_map():
    return (torch.arange(16.0) ** 2 / 7).view(1, 1, 4, 4)  # (1, 1, 4, 4), not linear: bicubic matters


def bicubic_4_to_2(image):
    """4 -> 2 bicubic by hand: samples at 0.5 and 2.5 (align_corners=False), Keys kernel a = −0.75
    at distances 1.5, 0.5, 0.5, 1.5, indices outside 0..3 clamped to the border."""
    weights = [-0.09375, 0.59375, 0.59375, -0.09375]
    W = torch.zeros(2, 4)
    for row, taps in enumerate([(-1, 0, 1, 2), (1, 2, 3, 4)]):
        for weight, tap in zip(weights, taps):
            W[row, min(max(tap, 0), 3)] += weight
    return W @ image @ W.T  # (2, 2)


def test_resize_by_max_pooling_takes_the_maximum_of_each_2x2_block():
    F_t = teacher_map()
    expected = F_t[0, 0].view(2, 2, 2, 2).amax(dim=(1, 3))  # (2, 2) block maxima
    torch.testing.assert_close(resize_feature_map(F_t, (2, 2), "maxpool")[0, 0], expected)


def test_resize_bicubic_matches_the_hand_computed_kernel():
    F_t = teacher_map()
    torch.testing.assert_close(resize_feature_map(F_t, (2, 2), "bicubic")[0, 0],
                               bicubic_4_to_2(F_t[0, 0]))


def test_resize_both_is_the_average_of_max_pooling_and_bicubic():
    F_t = teacher_map()
    maxpool = F_t[0, 0].view(2, 2, 2, 2).amax(dim=(1, 3))
    both = resize_feature_map(F_t, (2, 2), "both")[0, 0]
    torch.testing.assert_close(both, 0.5 * (maxpool + bicubic_4_to_2(F_t[0, 0])))
    assert not torch.allclose(both, 0.5 * maxpool)  # the published code's result


@pytest.mark.parametrize("mode", ["maxpool", "bicubic", "both"])
def test_feature_map_loss_is_the_mean_squared_or_absolute_error_to_the_resized_teacher(mode):
    F_t = teacher_map()
    F_s = torch.tensor([[[[1.0, -2.0], [3.0, 0.5]]]])
    target = {"maxpool": F_t[0, 0].view(2, 2, 2, 2).amax(dim=(1, 3)),
              "bicubic": bicubic_4_to_2(F_t[0, 0])}
    target["both"] = 0.5 * (target["maxpool"] + target["bicubic"])
    difference = F_s[0, 0] - target[mode]
    assert feature_map_loss(F_s, F_t, mode, "l2").item() == pytest.approx(
        difference.pow(2).mean().item(), rel=1e-5)
    assert feature_map_loss(F_s, F_t, mode, "l1").item() == pytest.approx(
        difference.abs().mean().item(), rel=1e-5)


def test_feature_map_loss_gives_gradients_to_the_student_only():
    F_s = torch.zeros(2, 3, 2, 2, requires_grad=True)
    F_t = torch.randn(2, 3, 8, 8, requires_grad=True)
    feature_map_loss(F_s, F_t).backward()
    assert F_t.grad is None and F_s.grad.abs().sum() > 0


def test_feature_map_loss_refuses_maps_whose_channels_differ_and_unknown_options():
    with pytest.raises(MiniKDError, match="channels"):
        feature_map_loss(torch.zeros(1, 128, 2, 2), torch.zeros(1, 256, 8, 8))
    with pytest.raises(MiniKDError, match=r"\(B, C, h, w\)"):
        feature_map_loss(torch.zeros(128, 2, 2), torch.zeros(128, 8, 8))
    with pytest.raises(MiniKDError, match="resize mode"):
        feature_map_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 8, 8), mode="maxpool+bicubic")
    with pytest.raises(MiniKDError, match="feature loss"):
        feature_map_loss(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 8, 8), norm="cosine")
    with pytest.raises(MiniKDError, match="NaN or inf"):
        feature_map_loss(torch.full((1, 4, 2, 2), float("inf")), torch.zeros(1, 4, 8, 8))


# -- attention -------------------------------------------------------------------------------------
def two_bags():
    """Bag 1 has two tiles and one padding slot; bag 2 has three tiles."""
    a_t = torch.tensor([[math.log(3.0), 0.0, 99.0], [math.log(2.0), 0.0, 0.0]])
    a_s = torch.tensor([[0.0, 0.0, -5.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    return a_s, a_t, mask


def test_attention_kl_sums_over_each_bags_tiles_and_averages_over_bags():
    a_s, a_t, mask = two_bags()
    # bag 1: [3/4, 1/4] vs [1/2, 1/2]; bag 2: [1/2, 1/4, 1/4] vs [1/3, 1/3, 1/3]
    bag_2 = 0.5 * math.log(0.5 * 3) + 2 * 0.25 * math.log(0.25 * 3)
    expected = (KL_THREE_QUARTERS + bag_2) / 2   # not divided by the bag sizes 2 and 3
    assert attention_kl_loss(a_s, a_t, mask=mask).item() == pytest.approx(expected, rel=1e-6)


def test_attention_kl_ignores_whatever_the_padding_holds():
    a_s, a_t, mask = two_bags()
    reference = attention_kl_loss(a_s, a_t, mask=mask)
    a_s[0, 2], a_t[0, 2] = float("nan"), -1e4
    torch.testing.assert_close(attention_kl_loss(a_s, a_t, mask=mask), reference)


def test_attention_kl_on_full_bags_equals_the_soft_target_loss_over_instances():
    generator = torch.Generator().manual_seed(1)
    a_s, a_t = torch.randn(3, 7, generator=generator), torch.randn(3, 7, generator=generator)
    torch.testing.assert_close(attention_kl_loss(a_s, a_t, T=2.0), soft_target_loss(a_s, a_t, T=2.0))


def test_attention_kl_gradients_are_finite_zero_on_padding_and_absent_for_the_teacher():
    a_s, a_t, mask = two_bags()
    a_s.requires_grad_(True)
    a_t.requires_grad_(True)
    attention_kl_loss(a_s, a_t, T=2.0, mask=mask).backward()
    assert a_t.grad is None
    assert torch.isfinite(a_s.grad).all() and a_s.grad[0, 2] == 0


def test_attention_kl_refuses_an_empty_bag():
    a_s, a_t, mask = two_bags()
    mask[0] = False
    with pytest.raises(MiniKDError, match="bag has no tiles"):
        attention_kl_loss(a_s, a_t, mask=mask)


def test_soft_target_loss_matches_torch_kl_div_on_probabilities():
    generator = torch.Generator().manual_seed(2)
    z_s, z_t = torch.randn(4, 5, generator=generator), torch.randn(4, 5, generator=generator)
    reference = F.kl_div(F.log_softmax(z_s, -1), F.softmax(z_t, -1), reduction="batchmean")
    torch.testing.assert_close(soft_target_loss(z_s, z_t), reference)
