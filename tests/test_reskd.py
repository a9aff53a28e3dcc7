"""ResKD: paired views, the losses in the method, label-free distillation, FLOPs, the CLI."""

import numpy as np
import pytest
import torch

from mini_kd import MiniKDError
from mini_kd.data import PairedViews, downsample_views, paired_transform, region_views
from mini_kd.encoders import TinyResNetGN
from mini_kd.evaluate import count_flops
from mini_kd.kd import feature_map_loss, soft_target_loss
from mini_kd.methods import reskd
from mini_kd.methods.reskd import Regions, ResKDConfig, TeacherTargets
from mini_kd.phantom import make_cohort
from mini_kd.slides import open_slide


def _config(tmp_path, **overrides) -> ResKDConfig:
    """32-px regions, one ÷2 student: every step runs in well under a second."""
    settings = dict(preset="smoke", device="cpu", region_size=32, factors=(2,), unlabeled_factor=2, epochs=1,
                    teacher_epochs=1, batch_size=4, accumulate=1, n_views=1, bootstrap=200,
                    checkpoint_dir=str(tmp_path / "checkpoints"))
    return ResKDConfig(**{**settings, **overrides})


def _regions(n=8, size=32, factor=2, seed=0, labels=True) -> Regions:
    """n random regions with an HR view and its ÷factor box-filtered view."""
    rng = np.random.default_rng(seed)
    hr = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return Regions(np.array(["s"] * n), np.zeros((n, 2), np.int64),
                   rng.integers(0, 3, n) if labels else None,
                   {1: hr, factor: downsample_views(hr, factor)})


class LabelsForbidden(Regions):
    """Regions whose labels cannot be read: reading them fails the test."""

    @property
    def labels(self):
        raise AssertionError("the labels were read")

    @labels.setter
    def labels(self, value):
        pass


def _teacher(seed=1):
    torch.manual_seed(seed)
    return TinyResNetGN(n_classes=3)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# -- paired views ------------------------------------------------------------------------------------
def test_one_transform_call_gives_hr_and_lr_the_same_flips_and_jitter():
    rng = np.random.default_rng(0)
    lr = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    hr = lr.repeat(4, axis=1).repeat(4, axis=2)  # (6, 32, 32, 3): each LR pixel a 4x4 block
    views = PairedViews([hr, lr], transform=paired_transform(), seed=0)
    for i in range(len(views)):
        hr_out, lr_out = views[i]
        assert not torch.equal(hr_out, torch.from_numpy(hr[i]))  # the transform did something
        # shared flips and jitter: the augmented HR view, shrunk, is the augmented LR view
        shrunk = downsample_views(hr_out.numpy()[None], 4)[0].astype(int)
        assert np.abs(shrunk - lr_out.numpy().astype(int)).max() <= 2
    # two separate calls draw two sets of parameters: the views no longer agree
    alone_hr = PairedViews([hr], transform=paired_transform(), seed=0)[0][0]
    alone_lr = PairedViews([lr], transform=paired_transform(), seed=1)[0][0]
    shrunk = downsample_views(alone_hr.numpy()[None], 4)[0].astype(int)
    assert np.abs(shrunk - alone_lr.numpy().astype(int)).max() > 2


def test_paired_views_with_a_seed_repeat_and_without_labels_carry_none():
    hr = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    views = PairedViews([hr, downsample_views(hr, 2)], transform=paired_transform(), seed=5)
    first, again = views[1], views[1]
    assert len(first) == 2 and first[0].shape == (16, 16, 3) and first[1].shape == (8, 8, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    labeled = PairedViews([hr], labels=[2, 0, 1])
    assert labeled[0][1].item() == 2
    with pytest.raises(MiniKDError, match="labels for"):
        PairedViews([hr], labels=[0, 1])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("phantom"), n_slides=6, slide_size=512, seed=0)


def test_region_views_from_the_pyramid_and_by_resizing(cohort):
    with open_slide(cohort.slide_path(cohort.ids()[0])) as slide:
        coords = np.array([[128, 128], [256, 192]])
        pyramid = region_views(slide, coords, 64, (2, 4, 16))
        resized = region_views(slide, coords, 64, (2, 4, 16), source="resize")
    assert [v.shape for v in pyramid] == [(2, 64, 64, 3), (2, 32, 32, 3), (2, 16, 16, 3), (2, 4, 4, 3)]
    assert np.array_equal(pyramid[0], resized[0])  # the same HR pixels
    # 5x is a stored level (its own JPEG): close to, but not the same as, the resized view
    assert 25 < reskd.psnr(pyramid[2], resized[2]) < np.inf
    with pytest.raises(MiniKDError, match="divisor"):
        region_views(slide, coords, 64, (3,))


def test_labeled_regions_come_from_their_split_with_label_map_classes(cohort, tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_KD_DATA", str(tmp_path))
    config = _config(tmp_path, region_size=64, factors=(2, 8), purity=0.5, regions_per_class=4)
    regions = reskd.labeled_regions(cohort, "train", config)
    assert set(regions.slide_ids) <= set(cohort.ids("train"))
    assert set(regions.views) == {1, 2, 8} and regions.views[8].shape[1:] == (8, 8, 3)
    for slide_id, (x, y), label in zip(regions.slide_ids, regions.coords, regions.labels):
        fractions = cohort.tile_fractions(slide_id, [(x, y)], 64)[0]
        assert fractions[label + 1] >= 0.5
    again = reskd.labeled_regions(cohort, "train", config)  # from the cache
    assert np.array_equal(again.views[2], regions.views[2])


# -- bad input -------------------------------------------------------------------------------------
def test_a_region_below_the_students_minimum_input_is_refused():
    assert reskd.check_input_size(128, 16) == 8
    with pytest.raises(MiniKDError, match="minimum input of 8 px"):
        reskd.check_input_size(64, 16)
    with pytest.raises(MiniKDError, match="divisible by 3"):
        reskd.check_input_size(128, 3)
    with pytest.raises(MiniKDError, match="minimum input"):
        ResKDConfig(region_size=64, factors=(2, 16))


def test_a_nan_loss_stops_distillation_with_a_clear_error(tmp_path):
    config = _config(tmp_path)
    regions = _regions()
    targets = reskd.teacher_targets(_teacher(), regions.views[1], config)
    targets.logits[3] = float("nan")
    with pytest.raises(MiniKDError, match="NaN"):
        reskd.distill(regions, targets, 2, config)


def test_targets_must_match_the_regions(tmp_path):
    config = _config(tmp_path)
    regions = _regions()
    targets = reskd.teacher_targets(_teacher(), regions.views[1][:5], config)
    with pytest.raises(MiniKDError, match="teacher targets"):
        reskd.distill(regions, targets, 2, config)


# -- the losses, as the method uses them -----------------------------------------------------------
def test_the_student_objective_is_soft_plus_pixel_loss_and_nothing_else(tmp_path):
    torch.manual_seed(0)
    student_map, teacher_map = torch.randn(4, 256, 2, 2), torch.randn(4, 256, 4, 4)
    student_logits, teacher_logits = torch.randn(4, 3), torch.randn(4, 3)
    config = _config(tmp_path, temperature=2.0, resize="bicubic", feature_loss="l1")
    losses = reskd.L_KD(student_map, student_logits, teacher_map, teacher_logits, config)
    soft = soft_target_loss(student_logits, teacher_logits, 2.0)
    pix = feature_map_loss(student_map, teacher_map, mode="bicubic", norm="l1")
    torch.testing.assert_close(losses["soft"], soft)
    torch.testing.assert_close(losses["pix"], pix)
    torch.testing.assert_close(losses["kd"], soft + pix)
    # the config's temperature and resizing are the ones used
    other = reskd.L_KD(student_map, student_logits, teacher_map, teacher_logits, _config(tmp_path))
    assert not torch.isclose(other["soft"], losses["soft"]) and not torch.isclose(other["pix"], losses["pix"])


def test_kd_step_compares_the_students_lr_outputs_with_the_teachers_targets(tmp_path):
    config = _config(tmp_path)
    regions = _regions(n=4)
    targets = reskd.teacher_targets(_teacher(), regions.views[1], config)
    student = _teacher(seed=2)
    loss, metrics = reskd.kd_step(student, (torch.from_numpy(regions.views[2]), targets.logits,
                                            targets.maps), config)
    from mini_kd.data import to_tensor
    student_map, student_logits = student(to_tensor(regions.views[2]))
    assert student_map.shape == (4, 256, 1, 1) and targets.maps.shape == (4, 256, 1, 1)
    expected = soft_target_loss(student_logits, targets.logits) + feature_map_loss(
        student_map, targets.maps, mode="both", norm="l2")
    torch.testing.assert_close(loss, expected)
    assert metrics["soft"] + metrics["pix"] == pytest.approx(loss.item(), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in student.parameters())


def test_ce_step_is_cross_entropy_with_the_labels():
    torch.manual_seed(0)
    model = TinyResNetGN(n_classes=3)
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 1, 0])
    loss, metrics = reskd.ce_step(model, (images, labels))
    from mini_kd.data import to_tensor
    logits = model(to_tensor(images))[1]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, labels))
    assert 0.0 <= metrics["accuracy"] <= 1.0


# -- label-free distillation -----------------------------------------------------------------------
def test_the_teacher_stays_frozen_during_distillation(tmp_path):
    config = _config(tmp_path, epochs=2)
    regions = _regions()
    teacher = _teacher()
    before = _weights(teacher)
    targets = reskd.teacher_targets(teacher, regions.views[1], config)
    assert targets.logits.grad_fn is None and targets.maps.grad_fn is None
    student, history = reskd.distill(regions, targets, 2, config)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert len(history.rows) == 2 and any(p.requires_grad for p in student.parameters())


def test_distillation_never_reads_a_label(tmp_path):
    config = _config(tmp_path)
    labeled = _regions()
    regions = LabelsForbidden(labeled.slide_ids, labeled.coords, None, labeled.views)
    with pytest.raises(AssertionError, match="labels were read"):
        regions.labels  # the trap works
    targets = reskd.teacher_targets(_teacher(), regions.views[1], config)
    val = _regions(n=4, seed=1)
    val_targets = reskd.teacher_targets(_teacher(), val.views[1], config)
    val_trap = LabelsForbidden(val.slide_ids, val.coords, None, val.views)
    student, history = reskd.distill(regions, targets, 2, config, val=val_trap, val_targets=val_targets)
    assert history.monitor == "val_kd_loss" and np.isfinite(history.rows[0]["val_kd_loss"])


def test_same_seed_gives_the_same_student_on_cpu(tmp_path):
    regions = _regions()
    targets = reskd.teacher_targets(_teacher(), regions.views[1], _config(tmp_path))
    first, _ = reskd.distill(regions, targets, 2, _config(tmp_path / "a", epochs=2))
    second, _ = reskd.distill(regions, targets, 2, _config(tmp_path / "b", epochs=2))
    other, _ = reskd.distill(regions, targets, 2, _config(tmp_path / "c", epochs=2, seed=1))
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_batch_of_one_with_accumulation_equals_one_batch(tmp_path):
    """The paper's path (one image at a time, gradients of 4 accumulated) = a batch of 4.

    GroupNorm normalises each image alone and both losses are batch means, so the mean of four
    one-image gradients is the gradient of the four-image batch.
    """
    config = _config(tmp_path)
    regions = _regions(n=4)
    targets = reskd.teacher_targets(_teacher(), regions.views[1], config)
    images = torch.from_numpy(regions.views[2])
    student = _teacher(seed=2)
    reskd.kd_step(student, (images, targets.logits, targets.maps), config)[0].backward()
    whole = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()
    for i in range(4):
        loss, _ = reskd.kd_step(student, (images[i:i + 1], targets.logits[i:i + 1],
                                          targets.maps[i:i + 1]), config)
        (loss / 4).backward()
    for accumulated, expected in zip((p.grad for p in student.parameters()), whole):
        assert (accumulated - expected).norm() <= 1e-4 * expected.norm() + 1e-8  # float32 rounding
    # through the fit loop: one Adam step either way (Adam moves each weight by about lr = 1e-3)
    batch, _ = reskd.distill(regions, targets, 2, _config(tmp_path / "a", batch_size=4, accumulate=1))
    accumulated, _ = reskd.distill(regions, targets, 2, _config(tmp_path / "b", batch_size=1, accumulate=4))
    single, _ = reskd.distill(regions, targets, 2, _config(tmp_path / "c", batch_size=1, accumulate=1))
    gap = max((accumulated.state_dict()[k] - v).abs().max().item() for k, v in batch.state_dict().items())
    steps = max((single.state_dict()[k] - v).abs().max().item() for k, v in batch.state_dict().items())
    assert gap < 3e-4 < 1e-3 < steps  # four separate steps move the weights much further


def test_distillation_resumes_from_its_checkpoint(tmp_path):
    regions = _regions()
    targets = reskd.teacher_targets(_teacher(), regions.views[1], _config(tmp_path))
    straight, _ = reskd.distill(regions, targets, 2, _config(tmp_path / "a", epochs=2))
    reskd.distill(regions, targets, 2, _config(tmp_path / "b", epochs=1))  # interrupted after 1
    resumed, history = reskd.distill(regions, targets, 2, _config(tmp_path / "b", epochs=2))
    assert [row["epoch"] for row in history.rows] == [1, 2]
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def test_the_ce_student_and_teacher_train_on_labels(tmp_path):
    config = _config(tmp_path, epochs=2, teacher_epochs=2)
    regions, val = _regions(), _regions(n=6, seed=1)
    teacher, history = reskd.train_ce(regions, 1, config, val=val)
    assert history.monitor == "val_balanced_accuracy" and history.best_epoch in (1, 2)
    student, history = reskd.train_ce(regions, 2, config)
    assert reskd.predict(student, regions.views[2]).shape == (8, 3)


def test_augment_makes_copies_with_shared_parameters(tmp_path):
    config = _config(tmp_path, n_views=3)
    lr = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    hr = lr.repeat(4, axis=1).repeat(4, axis=2)
    regions = Regions(np.array(["s"] * 4), np.zeros((4, 2), np.int64), np.arange(4) % 3, {1: hr, 4: lr})
    bank = reskd.augment(regions, config)
    assert len(bank) == 12 and bank.labels.tolist() == [0, 1, 2, 0] * 3
    shrunk = downsample_views(bank.views[1], 4).astype(int)
    assert np.abs(shrunk - bank.views[4].astype(int)).max() <= 2
    assert not np.array_equal(bank.views[1][:4], bank.views[1][4:8])  # copies differ


# -- cost ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_the_students_flops_are_the_teachers_over_n_squared(factor):
    model = TinyResNetGN(n_classes=3)
    teacher = count_flops(model, torch.zeros(1, 3, 256, 256))
    student = count_flops(model, torch.zeros(1, 3, 256 // factor, 256 // factor))
    assert teacher / student == pytest.approx(factor ** 2, rel=0.01)


def test_a_one_by_one_last_map_saves_less_than_n_squared():
    model = TinyResNetGN(n_classes=3)
    ratio = reskd.measure_flops(model, 128) / reskd.measure_flops(model, 8)  # ÷16 of a 128-px region
    assert 16 < ratio < 16 ** 2


def test_flop_reductions_skip_views_below_the_minimum_input():
    rows = reskd.flop_reductions(region_sizes=(64, 256), factors=(2, 8, 16))
    assert [(r["region_px"], r["factor"]) for r in rows] == [(64, 2), (64, 8), (256, 2), (256, 8), (256, 16)]
    by = {(r["region_px"], r["factor"]): r["flop_reduction"] for r in rows}
    assert by[(256, 8)] == pytest.approx(64, rel=0.01) and by[(64, 8)] < 64


def test_check_targets_reads_the_x8_row_and_compares_kd_with_ce():
    results = {"teacher": {"accuracy": 0.90},
               "students": [{"factor": 4, "kd_accuracy": 0.85, "ce_accuracy": 0.86, "flop_reduction": 16.0},
                            {"factor": 8, "kd_accuracy": 0.885, "ce_accuracy": 0.80, "flop_reduction": 63.9}]}
    met = reskd.check_targets(results)
    assert met["x8_at_least_64x_fewer_flops"] and met["x8_within_2_points_of_teacher"]
    assert met["x8_gap_to_teacher"] == pytest.approx(0.015)
    assert met["kd_at_or_above_ce"] == {4: False, 8: True}
    results["students"][1]["flop_reduction"] = 41.7
    assert not reskd.check_targets(results)["x8_at_least_64x_fewer_flops"]


# -- the command line ------------------------------------------------------------------------------
def test_predict_classifies_a_phantom_slide_from_the_command_line(cohort, tmp_path, capsys):
    from mini_kd import cli

    config = _config(tmp_path, region_size=64, factors=(4,), unlabeled_factor=4)
    path = reskd.save_predictor(tmp_path / "predictor.pt", _teacher(), 4, config)
    slide = cohort.slide_path(cohort.ids()[0])
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", "reskd", str(path), str(slide), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert cohort.ids()[0] in printed and "seconds" in printed
    assert out.read_text().splitlines()[0].startswith("slide_id,label,probability")
    row = reskd.load_predictor(path)(slide)
    assert row["label"] in (0, 1) and 0.0 <= row["probability"] <= 1.0
    assert row["regions"] > 0 and set(row["seconds"]) == {"grid", "read", "classify"}
    with pytest.raises(MiniKDError, match="no ResKD checkpoint"):
        reskd.load_predictor(tmp_path / "missing.pt")


def test_regions_of_a_cohort_without_tile_labels_are_refused_up_front(cohort, tmp_path):
    from mini_kd.phantom import load_cohort

    public = tmp_path / "public"
    (public / "slides").mkdir(parents=True)
    slide_id = cohort.ids()[0]
    (public / "slides" / f"{slide_id}.svs").write_bytes(cohort.slide_path(slide_id).read_bytes())
    (public / "labels.csv").write_text(f"slide_id,label,split\n{slide_id},1,train\n")
    with pytest.raises(MiniKDError, match="slide labels only.*tile-level"):
        reskd.labeled_regions(load_cohort(public), "train", _config(tmp_path))
