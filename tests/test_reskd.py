"""ResKD: paired views, the losses in the method, label-free distillation, FLOPs, fit / save /
load / predict, weak labels without label maps, the experiment, the CLI."""

from dataclasses import fields, replace

import numpy as np
import pytest
import torch

from mini_kd import MiniKDError, methods
from mini_kd.data import PairedViews, downsample_views, paired_transform, region_views
from mini_kd.encoders import TinyResNetGN
from mini_kd.evaluate import count_flops
from mini_kd.experiments import reskd as experiment
from mini_kd.methods import reskd
from mini_kd.methods.reskd import Regions
from mini_kd.phantom import load_cohort, make_cohort
from mini_kd.slides import open_slide

CONFIG_FIELDS = {f.name for f in fields(reskd.Config)}


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as the experiment runs: on a shared 2-core machine two threads made
    these small networks' steps up to 25x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(tmp_path, **overrides) -> tuple[reskd.Config, reskd.Schedule]:
    """64-px regions, one ÷2 student (teacher maps 2 x 2, student maps 1 x 1): every step runs in
    well under a second. ``overrides`` go to the Config or the Schedule, whichever has the field."""
    settings = {**dict(device="cpu", region_size=64, factors=(2,), unlabeled_factor=2, epochs=1,
                       teacher_epochs=1, batch_size=4, accumulate=1, n_views=1, bootstrap=200,
                       checkpoint_dir=str(tmp_path / "checkpoints")), **overrides}
    return (reskd.Config(**{k: v for k, v in settings.items() if k in CONFIG_FIELDS}),
            reskd.Schedule(**{k: v for k, v in settings.items() if k not in CONFIG_FIELDS}))


def _regions(n=8, size=64, factor=2, seed=0, labels=True) -> Regions:
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


def _targets(teacher, images):
    return reskd.teacher_targets(teacher, images, "cpu")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class FixedOutputs(torch.nn.Module):
    """A network whose outputs are its own parameters, the same for every image: a one-channel
    feature map and three logits. Its gradients are the losses' gradients, by hand."""

    def __init__(self, feature_map, logits):
        super().__init__()
        self.feature_map = torch.nn.Parameter(torch.as_tensor(feature_map, dtype=torch.float32))
        self.logits = torch.nn.Parameter(torch.as_tensor(logits, dtype=torch.float32))

    def forward(self, x):
        return (self.feature_map.expand(len(x), 1, *self.feature_map.shape),  # (B, 1, h, w)
                self.logits.expand(len(x), -1))  # (B, 3)


# F_t: a 4 x 4 teacher map 0..15, z_t = (0, 0, ln 2): p_t = softmax(z_t) = (1/4, 1/4, 1/2)
TEACHER_MAP = torch.arange(16.0).reshape(1, 1, 4, 4)
TEACHER_LOGITS = torch.tensor([[0.0, 0.0, np.log(2.0)]])


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


@pytest.fixture(scope="module")
def unmasked(cohort, tmp_path_factory):
    """The same cohort without its label maps (``masks/`` deleted): slide labels only."""
    import shutil

    root = tmp_path_factory.mktemp("unmasked") / "cohort"
    shutil.copytree(cohort.root, root, ignore=shutil.ignore_patterns("grids", "features"))
    shutil.rmtree(root / "masks")
    return load_cohort(root)


def _split(cohort):
    return {name: cohort.ids(name) for name in ("train", "val", "test")}


def test_region_views_from_the_pyramid_and_by_resizing(cohort):
    with open_slide(cohort.slide_path(cohort.ids()[0])) as slide:
        coords = np.array([[128, 128], [256, 192]])
        pyramid = region_views(slide, coords, 64, (2, 4, 16))
        resized = region_views(slide, coords, 64, (2, 4, 16), source="resize")
    assert [v.shape for v in pyramid] == [(2, 64, 64, 3), (2, 32, 32, 3), (2, 16, 16, 3), (2, 4, 4, 3)]
    assert np.array_equal(pyramid[0], resized[0])  # the same HR pixels
    # 5x is a stored level (its own JPEG): close to, but not the same as, the resized view
    assert 25 < experiment.psnr(pyramid[2], resized[2]) < np.inf
    with pytest.raises(MiniKDError, match="divisor"):
        region_views(slide, coords, 64, (3,))


def test_labeled_regions_come_from_their_slides_with_label_map_classes(cohort, tmp_path):
    config, schedule = _setup(tmp_path, region_size=64, purity=0.5, regions_per_class=4)
    regions = reskd.labeled_regions(cohort, cohort.ids("train"), config, schedule, (2, 8))
    assert set(regions.slide_ids) <= set(cohort.ids("train"))
    assert set(regions.views) == {1, 2, 8} and regions.views[8].shape[1:] == (8, 8, 3)
    for slide_id, (x, y), label in zip(regions.slide_ids, regions.coords, regions.labels):
        fractions = cohort.tile_fractions(slide_id, [(x, y)], 64)[0]
        assert fractions[label + 1] >= 0.5


def test_the_experiment_caches_regions_on_disk_and_builds_them_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MINI_KD_DATA", str(tmp_path))
    built = []

    def build():
        built.append(1)
        return _regions(n=3)

    first = experiment._cached_regions("k", build)
    again = experiment._cached_regions("k", build)
    assert len(built) == 1 and np.array_equal(again.views[2], first.views[2])
    assert np.array_equal(again.labels, first.labels) and again.slide_ids.tolist() == ["s"] * 3


def _cohort_with_label_map(cohort, root, label_map):
    """A copy of ``cohort`` whose first slide's label map is ``label_map`` (codes, 1/4 of level 0)."""
    import shutil

    from PIL import Image

    shutil.copytree(cohort.root, root, ignore=shutil.ignore_patterns("grids", "features"))
    Image.fromarray(label_map).save(root / "masks" / f"{cohort.ids()[0]}.png")
    return load_cohort(root)


def test_class_candidates_are_the_lattice_squares_that_one_class_fills(cohort, tmp_path):
    # a 512-px slide: label map 128 x 128, all normal but a tumour square over level-0 [0, 64)²
    label_map = np.ones((128, 128), np.uint8)
    label_map[:16, :16] = 3
    edited = _cohort_with_label_map(cohort, tmp_path / "edited", label_map)
    config, schedule = _setup(tmp_path, region_size=64, region_stride=32, purity=0.6)
    corners, classes = reskd.class_candidates(edited, edited.ids()[0], config, schedule)
    # corners 0, 32, ..., 448 on both axes: 15 x 15; (0, 0) is all tumour, (32, 0) and (0, 32)
    # half tumour (pure in nothing), (32, 32) three quarters normal; the other 221 all normal
    assert corners[classes == 2].tolist() == [[0, 0]]
    assert (classes == 0).sum() == 15 * 15 - 3 and (classes == 1).sum() == 0
    assert [32, 0] not in corners.tolist() and [32, 32] in corners[classes == 0].tolist()


def test_with_min_tumour_a_square_that_much_tumour_is_tumour_and_one_with_less_is_left_out(cohort,
                                                                                          tmp_path):
    label_map = np.ones((128, 128), np.uint8)
    label_map[:16, :16] = 3  # tumour over level-0 [0, 64)², as above
    edited = _cohort_with_label_map(cohort, tmp_path / "edited", label_map)
    config, schedule = _setup(tmp_path, region_size=64, region_stride=32, min_tumour=0.3)
    corners, classes = reskd.class_candidates(edited, edited.ids()[0], config, schedule)
    # (0, 0) all tumour, (32, 0) and (0, 32) half: tumour; (32, 32) a quarter: left out
    assert corners[classes == 2].tolist() == [[0, 0], [32, 0], [0, 32]]
    assert [32, 32] not in corners.tolist() and (classes == 0).sum() == 15 * 15 - 4


def test_the_slides_take_turns_so_a_rare_class_fills_its_quota_from_the_slides_that_hold_it(tmp_path):
    _, schedule = _setup(tmp_path, regions_per_class=3)
    corners = lambda n, x0: np.column_stack([np.arange(x0, x0 + n), np.zeros(n)]).astype(np.int64)
    candidates = [(corners(5, 0), np.array([2, 2, 2, 2, 0])),   # slide 0: four tumour, one normal
                  (corners(1, 100), np.array([2])),             # slide 1: one tumour
                  (corners(2, 200), np.array([0, 0]))]          # slide 2: two normal
    picks = reskd.round_robin(candidates, 3, schedule)  # (M, 4) slide, class, x, y
    tumour = picks[picks[:, 1] == 2]
    # turn 1: one tumour from slide 0 and slide 1's only one; turn 2: a second from slide 0
    assert sorted(tumour[:, 0].tolist()) == [0, 0, 1] and [1, 2, 100, 0] in picks.tolist()
    assert sorted(picks[picks[:, 1] == 0, 0].tolist()) == [0, 2, 2]  # all three normal ones
    assert (picks[:, 1] == 1).sum() == 0 and picks[:, 0].tolist() == sorted(picks[:, 0].tolist())
    assert len({tuple(row) for row in picks.tolist()}) == len(picks)  # no candidate twice


# -- weak labels: a cohort without label maps ------------------------------------------------------
def test_without_label_maps_every_tissue_region_takes_its_slides_label(unmasked, tmp_path):
    assert not unmasked.has_label_maps and reskd.classes_of(unmasked) == ("normal", "tumour")
    config, schedule = _setup(tmp_path, regions_per_class=1000)
    ids = unmasked.ids()
    regions = reskd.labeled_regions(unmasked, ids, config, schedule, (2,))
    label_of = dict(zip(ids, unmasked.labels(ids)))
    assert regions.labels.tolist() == [label_of[s] for s in regions.slide_ids]
    assert set(regions.labels.tolist()) == {0, 1}
    with open_slide(unmasked.slide_path(ids[0])) as slide:  # all tissue regions of a slide, no more
        from mini_kd.tiling import tile_grid
        grid = tile_grid(slide, 20.0, 64, config.min_tissue)
    assert sorted(map(tuple, regions.coords[regions.slide_ids == ids[0]].tolist())) == sorted(
        map(tuple, grid.coords.tolist()))


def test_fit_runs_on_a_cohort_without_label_maps_with_two_weak_classes(unmasked, tmp_path):
    config, schedule = _setup(tmp_path, factor=2, regions_per_class=8)
    trained = reskd.fit(unmasked, _split(unmasked), config, schedule)
    assert trained.classes == ("normal", "tumour") and trained.network.classifier.out_features == 2
    prediction = trained.predictor("cpu")(unmasked.slide_path(unmasked.ids("test")[0]))
    assert 0.0 <= prediction.probability <= 1.0 and prediction.tiles_read == {10.0: len(
        prediction.details["grid"])}


# -- bad input -------------------------------------------------------------------------------------
def test_a_region_below_the_students_minimum_input_is_refused():
    assert reskd.check_input_size(128, 16) == 8
    with pytest.raises(MiniKDError, match="minimum input of 8 px"):
        reskd.check_input_size(64, 16)
    with pytest.raises(MiniKDError, match="divisible by 3"):
        reskd.check_input_size(128, 3)
    with pytest.raises(MiniKDError, match="minimum input"):
        reskd.Schedule(region_size=64, factors=(2, 16))
    with pytest.raises(MiniKDError, match="at least 1"):
        reskd.Config(top_k=0)


def test_a_nan_loss_stops_distillation_with_a_clear_error(tmp_path):
    regions = _regions()
    targets = _targets(_teacher(), regions.views[1])
    targets.logits[3] = float("nan")
    with pytest.raises(MiniKDError, match="NaN"):
        reskd.distill(regions, targets, 2, *_setup(tmp_path))


def test_targets_must_match_the_regions(tmp_path):
    regions = _regions()
    targets = _targets(_teacher(), regions.views[1][:5])
    with pytest.raises(MiniKDError, match="teacher targets"):
        reskd.distill(regions, targets, 2, *_setup(tmp_path))


@pytest.mark.parametrize("content, match", [(b"PK\x03\x04truncated", "not a readable"),
                                            (None, "no reskd checkpoint")])
def test_a_damaged_or_missing_checkpoint_is_one_clear_error(tmp_path, content, match):
    path = tmp_path / "reskd.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(MiniKDError, match=match):
        methods.load(path, "reskd")


def test_a_checkpoint_without_the_network_is_one_clear_error(tmp_path):
    trained = reskd.Trained(reskd.Config(), _teacher(), 64)
    path = trained.save(tmp_path / "reskd.pt")
    saved = torch.load(path, weights_only=False)
    del saved["state"]["network"]
    torch.save(saved, path)
    with pytest.raises(MiniKDError, match="reskd"):
        methods.load(path, "reskd")


# -- the losses, as the method uses them -----------------------------------------------------------
def test_the_student_objective_by_hand_with_the_configs_temperature_resizing_and_norm():
    student_map, student_logits = torch.zeros(1, 1, 2, 2), torch.zeros(1, 3)  # q = (1/3, 1/3, 1/3)
    config = reskd.Config(temperature=2.0, resize="maxpool", feature_loss="l1")
    losses = reskd.L_KD(student_map, student_logits, TEACHER_MAP, 2 * TEACHER_LOGITS, config)
    # T = 2: softmax(2 z_t / 2) = p_t; T² KL(p_t ‖ q) = 4 (½ ln ¾ + ½ ln 3/2) = 2 ln(9/8)
    assert losses["soft"].item() == pytest.approx(2 * np.log(9 / 8), rel=1e-6)
    # g = 2 x 2 max-pool of F_t = [[5, 7], [13, 15]]; l1 against zeros: (5 + 7 + 13 + 15) / 4
    assert losses["pix"].item() == pytest.approx(10.0)
    assert losses["kd"].item() == pytest.approx(10.0 + 2 * np.log(9 / 8), rel=1e-6)
    # l2: (25 + 49 + 169 + 225) / 4; T = 1: KL(p_t ‖ q) = ½ ln(9/8)
    l2 = reskd.L_KD(student_map, student_logits, TEACHER_MAP, TEACHER_LOGITS,
                    reskd.Config(resize="maxpool"))
    assert l2["pix"].item() == pytest.approx(117.0) and l2["soft"].item() == pytest.approx(
        0.5 * np.log(9 / 8), rel=1e-6)


def test_kd_step_by_hand_resizes_the_larger_teacher_map_and_trains_the_student_only():
    """F_t is 4 x 4, F_s 2 x 2: L_pix compares F_s with the teacher's map shrunk to 2 x 2."""
    config = reskd.Config(resize="maxpool")
    student = FixedOutputs(torch.zeros(2, 2), torch.zeros(3))
    teacher_map = TEACHER_MAP.repeat(2, 1, 1, 1).requires_grad_()  # (2, 1, 4, 4), a batch of two
    teacher_logits = TEACHER_LOGITS.repeat(2, 1).requires_grad_()  # (2, 3)
    images = torch.zeros(2, 32, 32, 3, dtype=torch.uint8)
    loss, metrics = reskd.kd_step(student, (images, teacher_logits, teacher_map), config)
    assert metrics["pix"] == pytest.approx(117.0)  # mean of (0 - [[5, 7], [13, 15]])²
    assert metrics["soft"] == pytest.approx(0.5 * np.log(9 / 8), rel=1e-6)  # KL(p_t ‖ q)
    assert loss.item() == pytest.approx(117.0 + 0.5 * np.log(9 / 8), rel=1e-6)
    loss.backward()
    # dL_pix/dF_s = 2 (F_s - g(F_t)) / 4 = -g / 2; dL_soft/dz_s = q - p_t = (1/12, 1/12, -1/6)
    torch.testing.assert_close(student.feature_map.grad, torch.tensor([[-2.5, -3.5], [-6.5, -7.5]]))
    torch.testing.assert_close(student.logits.grad, torch.tensor([1 / 12, 1 / 12, -1 / 6]))
    assert teacher_map.grad is None and teacher_logits.grad is None  # the teacher is a target
    # with the roles swapped (F_s blown up to 4 x 4, KL(q ‖ p_t)) the numbers differ: 77.5, ⅓ ln(32/27)
    swapped_pix = reskd.L_pix(TEACHER_MAP, torch.zeros(1, 1, 2, 2), "maxpool").item()
    swapped_soft = reskd.L_soft(TEACHER_LOGITS, torch.zeros(1, 3)).item()
    assert swapped_pix == pytest.approx(77.5) and swapped_soft == pytest.approx(np.log(32 / 27) / 3)


def test_kd_step_on_real_networks_gives_gradients_to_every_student_weight_and_none_to_the_teacher():
    regions = _regions(n=2, size=128)
    teacher, student = _teacher(seed=1), _teacher(seed=2)
    from mini_kd.data import to_tensor
    teacher_map, teacher_logits = teacher(to_tensor(regions.views[1]))  # not detached on purpose
    assert teacher_map.shape == (2, 256, 4, 4) and student(to_tensor(regions.views[2]))[0].shape == (2, 256, 2, 2)
    loss, _ = reskd.kd_step(student, (torch.from_numpy(regions.views[2]), teacher_logits, teacher_map),
                            reskd.Config())
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_ce_step_by_hand():
    model = FixedOutputs(torch.zeros(1, 1), TEACHER_LOGITS[0])  # softmax = (1/4, 1/4, 1/2) for all
    images = torch.zeros(2, 16, 16, 3, dtype=torch.uint8)
    loss, metrics = reskd.ce_step(model, (images, torch.tensor([2, 0])))
    assert loss.item() == pytest.approx((np.log(2) + np.log(4)) / 2)  # -(ln ½ + ln ¼) / 2
    assert metrics["accuracy"] == 0.5  # both are called class 2


# -- label-free distillation -----------------------------------------------------------------------
def test_the_teacher_stays_frozen_during_distillation(tmp_path):
    regions = _regions()
    teacher = _teacher()
    before = _weights(teacher)
    targets = _targets(teacher, regions.views[1])
    assert targets.logits.grad_fn is None and targets.maps.grad_fn is None
    student, history = reskd.distill(regions, targets, 2, *_setup(tmp_path, epochs=2))
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not teacher.training
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert len(history.rows) == 2 and any(p.requires_grad for p in student.parameters())


def test_distillation_never_reads_a_label(tmp_path):
    labeled = _regions()
    regions = LabelsForbidden(labeled.slide_ids, labeled.coords, None, labeled.views)
    with pytest.raises(AssertionError, match="labels were read"):
        regions.labels  # the trap works
    targets = _targets(_teacher(), regions.views[1])
    val = _regions(n=4, seed=1)
    val_targets = _targets(_teacher(), val.views[1])
    val_trap = LabelsForbidden(val.slide_ids, val.coords, None, val.views)
    student, history = reskd.distill(regions, targets, 2, *_setup(tmp_path), val=val_trap,
                                     val_targets=val_targets)
    assert history.monitor == "val_kd_loss" and np.isfinite(history.rows[0]["val_kd_loss"])


def test_same_seed_gives_the_same_student_on_cpu(tmp_path):
    regions = _regions()
    targets = _targets(_teacher(), regions.views[1])
    first, _ = reskd.distill(regions, targets, 2, *_setup(tmp_path / "a", epochs=2))
    second, _ = reskd.distill(regions, targets, 2, *_setup(tmp_path / "b", epochs=2))
    other, _ = reskd.distill(regions, targets, 2, *_setup(tmp_path / "c", epochs=2, seed=1))
    assert all(torch.equal(v, second.state_dict()[k]) for k, v in first.state_dict().items())
    assert not all(torch.equal(v, other.state_dict()[k]) for k, v in first.state_dict().items())


def test_batch_of_one_with_accumulation_equals_one_batch(tmp_path):
    """The paper's path (one image at a time, gradients of 4 accumulated) = a batch of 4.

    GroupNorm normalises each image alone and both losses are batch means, so the mean of four
    one-image gradients is the gradient of the four-image batch.
    """
    config = reskd.Config()
    regions = _regions(n=4)
    targets = _targets(_teacher(), regions.views[1])
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
    batch, _ = reskd.distill(regions, targets, 2, *_setup(tmp_path / "a", batch_size=4, accumulate=1))
    accumulated, _ = reskd.distill(regions, targets, 2, *_setup(tmp_path / "b", batch_size=1, accumulate=4))
    single, _ = reskd.distill(regions, targets, 2, *_setup(tmp_path / "c", batch_size=1, accumulate=1))
    gap = max((accumulated.state_dict()[k] - v).abs().max().item() for k, v in batch.state_dict().items())
    steps = max((single.state_dict()[k] - v).abs().max().item() for k, v in batch.state_dict().items())
    assert gap < 3e-4 < 1e-3 < steps  # four separate steps move the weights much further


def test_distillation_resumes_from_its_checkpoint(tmp_path):
    regions = _regions()
    targets = _targets(_teacher(), regions.views[1])
    straight, _ = reskd.distill(regions, targets, 2, *_setup(tmp_path / "a", epochs=2))
    reskd.distill(regions, targets, 2, *_setup(tmp_path / "b", epochs=1))  # interrupted after 1
    resumed, history = reskd.distill(regions, targets, 2, *_setup(tmp_path / "b", epochs=2))
    assert [row["epoch"] for row in history.rows] == [1, 2]
    for key, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value)


def _coloured_regions(n_per_class=4, size=64, seed=0) -> Regions:
    """Regions whose class is their colour: class c is bright in channel c, dark elsewhere."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(3), n_per_class)  # (3n,)
    hr = rng.integers(0, 60, (len(labels), size, size, 3), dtype=np.uint8)
    hr[np.arange(len(labels)), :, :, labels] += 180
    return Regions(np.array(["s"] * len(labels)), np.zeros((len(labels), 2), np.int64), labels,
                   {1: hr, 2: downsample_views(hr, 2)})


def test_the_teacher_and_the_ce_student_learn_the_labels_and_keep_the_best_validation_epoch(tmp_path):
    config, schedule = _setup(tmp_path, epochs=3, teacher_epochs=3, batch_size=3)
    regions, val = _coloured_regions(), _coloured_regions(n_per_class=2, seed=1)
    for factor in (1, 2):
        untrained = reskd.build_network(schedule.seed)
        before = reskd.predict(untrained, val.views[factor]).argmax(1)
        model, history = reskd.train_ce(regions, factor, config, schedule, val=val)
        assert not np.array_equal(before, val.labels)  # not right by chance before training
        assert np.array_equal(reskd.predict(model, val.views[factor]).argmax(1), val.labels)
        scores = history.column("val_balanced_accuracy")
        assert history.best_epoch == 1 + int(np.argmax(scores)) and max(scores) == 1.0
    flipped = replace(regions, labels=(regions.labels + 1) % 3)  # the same images, other labels
    model, _ = reskd.train_ce(flipped, 2, *_setup(tmp_path / "flipped", epochs=3, batch_size=3))
    assert np.array_equal(reskd.predict(model, val.views[2]).argmax(1), (val.labels + 1) % 3)


def test_augment_makes_copies_with_shared_parameters(tmp_path):
    config, schedule = _setup(tmp_path, n_views=3)
    lr = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    hr = lr.repeat(4, axis=1).repeat(4, axis=2)
    regions = Regions(np.array(["s"] * 4), np.zeros((4, 2), np.int64), np.arange(4) % 3, {1: hr, 4: lr})
    bank = reskd.augment(regions, config, schedule)
    assert len(bank.coords) == 12 and bank.labels.tolist() == [0, 1, 2, 0] * 3
    shrunk = downsample_views(bank.views[1], 4).astype(int)
    assert np.abs(shrunk - bank.views[4].astype(int)).max() <= 2
    assert not np.array_equal(bank.views[1][:4], bank.views[1][4:8])  # copies differ


# -- fit, save, load, predict ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(cohort, tmp_path_factory):
    """ResKD fitted on the tiny phantom: the teacher at 20x, the ÷2 student at 10x."""
    from mini_kd.runtime import torch_threads

    config, schedule = _setup(tmp_path_factory.mktemp("fit"), factor=2, region_stride=32,
                              regions_per_class=8)
    with torch_threads(1):  # as every test here (module fixtures start before ``one_thread``)
        return reskd.fit(cohort, _split(cohort), config, schedule)


def test_fit_save_load_predict_gives_the_same_prediction(fitted, cohort, tmp_path):
    slide = cohort.slide_path(cohort.ids("test")[0])
    before = fitted.predictor("cpu")(slide)
    path = fitted.save(tmp_path / "reskd.pt")
    loaded = methods.load(path, "reskd")
    assert isinstance(loaded, reskd.Trained) and loaded.config == fitted.config
    after = loaded.predictor("cpu")(slide)
    assert isinstance(after, methods.Prediction) and after.probability == before.probability
    assert after.tiles_read == {10.0: len(after.details["grid"])} and after.pixels_decoded > 0
    assert set(after.seconds) == {"tissue", "grid", "read", "classify"}
    # the slide's probability is its largest region P(tumour) (top_k = 1)
    assert after.probability == pytest.approx(after.details["p_tumour"].max())


def test_fit_twice_with_the_same_seed_gives_the_same_student(fitted, cohort, tmp_path):
    config, schedule = _setup(tmp_path, factor=2, region_stride=32, regions_per_class=8)
    again = reskd.fit(cohort, _split(cohort), config, schedule)
    assert again.classes == fitted.classes == reskd.CLASSES
    for key, value in fitted.network.state_dict().items():
        assert torch.equal(again.network.state_dict()[key], value), key


def test_the_slide_probability_is_the_mean_of_the_top_k_region_probabilities(fitted, cohort):
    assert reskd.top_k_mean(np.array([0.1, 0.9, 0.5, 0.7]), 2) == pytest.approx(0.8)
    assert reskd.top_k_mean(np.array([0.2, 0.4]), 5) == pytest.approx(0.3)  # fewer than k: all
    top3 = replace(fitted, config=replace(fitted.config, top_k=3))
    prediction = top3.predictor("cpu")(cohort.slide_path(cohort.ids("test")[0]))
    assert prediction.probability == pytest.approx(np.sort(prediction.details["p_tumour"])[-3:].mean())


def test_predict_classifies_a_phantom_slide_from_the_command_line(fitted, cohort, tmp_path, capsys):
    from mini_kd import cli

    path = fitted.save(tmp_path / "reskd.pt")
    slide = cohort.slide_path(cohort.ids()[0])
    out = tmp_path / "predictions.csv"
    assert cli.main(["predict", "reskd", str(path), str(slide), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert cohort.ids()[0] in printed
    assert out.read_text().splitlines()[0].startswith("slide_id,label,probability")


# -- the experiment --------------------------------------------------------------------------------
def test_run_experiment_on_a_tiny_cohort_gives_the_json_keys_of_every_timed_model(cohort, tmp_path,
                                                                                monkeypatch):
    from mini_kd.experiments import JSON_KEYS

    monkeypatch.setenv("MINI_KD_DATA", str(tmp_path))
    config, schedule = _setup(tmp_path, factor=2, region_stride=32, regions_per_class=8,
                              unlabeled_slides=(0,), checkpoint_dir=None)
    result = experiment.run_experiment("smoke", cohort, config, schedule)
    out = result.to_json()
    for model in ("teacher", "kd_x2", "ce_x2"):
        assert set(JSON_KEYS) <= set(out[model]), model
    assert out["kd_x2"]["tiles_read"] > 0 and out["teacher"]["speedup"] == pytest.approx(1.0)
    assert out["region_scores"]["students"][0]["factor"] == 2 and set(out["targets"]) >= {
        "kd_at_or_above_ce", "x8_at_least_64x_fewer_flops"}
    assert out["unlabeled"][0]["n_slides"] == 0 and out["region_labels"] == "label maps"
    assert isinstance(methods.load(result.checkpoint, "reskd"), reskd.Trained)


# -- cost ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_the_students_flops_are_the_teachers_over_n_squared(factor):
    model = TinyResNetGN(n_classes=3)
    teacher = count_flops(model, torch.zeros(1, 3, 256, 256))
    student = count_flops(model, torch.zeros(1, 3, 256 // factor, 256 // factor))
    assert teacher / student == pytest.approx(factor ** 2, rel=0.01)


def test_the_book_presets_regions_give_the_x8_student_64x_fewer_flops():
    from mini_kd.presets import schedule

    book = schedule("reskd", "book")
    (row,) = experiment.flop_reductions(region_sizes=(book.region_size,), factors=(8,))
    assert row["student_px"] == 32 and row["flop_reduction"] >= 0.99 * 64


def test_epochs_per_network():
    schedule = reskd.Schedule(epochs=30, teacher_epochs=4, epochs_by_factor={"2": 8})
    assert [reskd.epochs_of(schedule, n) for n in (1, 2, 4, 8)] == [4, 8, 30, 30]


def test_a_one_by_one_last_map_saves_less_than_n_squared():
    model = TinyResNetGN(n_classes=3)
    ratio = experiment.measure_flops(model, 128) / experiment.measure_flops(model, 8)  # ÷16 of 128 px
    assert 16 < ratio < 16 ** 2


def test_flop_reductions_skip_views_below_the_minimum_input():
    rows = experiment.flop_reductions(region_sizes=(64, 256), factors=(2, 8, 16))
    assert [(r["region_px"], r["factor"]) for r in rows] == [(64, 2), (64, 8), (256, 2), (256, 8), (256, 16)]
    by = {(r["region_px"], r["factor"]): r["flop_reduction"] for r in rows}
    assert by[(256, 8)] == pytest.approx(64, rel=0.01) and by[(64, 8)] < 64


def test_check_targets_reads_the_x8_row_and_compares_kd_with_ce():
    scores = {"teacher": {"accuracy": 0.90},
              "students": [{"factor": 4, "kd_accuracy": 0.85, "ce_accuracy": 0.86, "flop_reduction": 16.0},
                           {"factor": 8, "kd_accuracy": 0.885, "ce_accuracy": 0.80, "flop_reduction": 63.9}]}
    met = experiment.check_targets(scores)
    assert met["x8_at_least_64x_fewer_flops"] and met["x8_within_2_points_of_teacher"]
    assert met["x8_gap_to_teacher"] == pytest.approx(0.015)
    assert met["kd_at_or_above_ce"] == {4: False, 8: True}
    scores["students"][1]["flop_reduction"] = 41.7
    assert not experiment.check_targets(scores)["x8_at_least_64x_fewer_flops"]
