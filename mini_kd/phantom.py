"""The phantom cohort: synthetic H&E-like whole-slide images in which the papers' premise holds.

This is a teaching phantom, not a clinical benchmark: it is built so that the claim all three
papers rest on -- *the tumour cue is plain at high magnification and faint at low magnification*
-- is true by construction and can be measured, in seconds, on a laptop. Numbers obtained on it say
whether a method exploits that premise, not how it would fare on patients.

What each slide holds (label codes of the label map in brackets):

- glass (0): near-white with a little scanner noise;
- tissue (1): irregular pieces covering 35-60 % of the slide, pink fibrous stroma with sparse,
  medium, round-ish, moderately stained nuclei;
- mimics (2), in normal *and* tumour slides: lymphocyte-like clusters of small, round, very dark,
  densely packed nuclei;
- tumour foci (3), in tumour slides only, small like CAMELYON16 micro-metastases (a few % of the
  tissue): large, pleomorphic (eccentric, irregular outline), vesicular nuclei (pale centre, dark
  rim, a nucleolus), crowded, in purple-pink cytoplasm.

What each magnification shows (level 0 is 20x at 0.5 µm/px; levels at 4x and 16x down):

- **20x**: a tumour nucleus spans 20-30 px, a lymphocyte 10-13 px; shape, size, chromatin and
  crowding separate tumour from mimic at a glance;
- **5x**: nuclei are 3-7 px; size differences survive, outline and chromatin mostly do not;
- **1.25x**: a pixel averages a 16 x 16 patch of 20x pixels, i.e. about two lymphocytes or half
  a tumour nucleus. Tumour and mimic regions are both purple smudges: the phantom *calibrates*
  each slide so that their mean colour at low resolution is the same, up to a gap that shrinks as
  ``difficulty`` goes from 0 to 1 (which also shrinks the tumour foci), and the packing of the
  nuclei (lymphocytes on a tight, regular lattice, tumour cells on a looser one) is chosen so that
  their texture at 1.25x matches too.

Slides are written as Aperio-like pyramids (:mod:`mini_kd.pyramid`), level 0 rendered band by
band so that a 16k x 16k slide never sits in memory. Rendering is a sum of optical densities
(Beer-Lambert): each pixel's haematoxylin and eosin amounts ``h, e`` give

    I = I_glass · exp(-(h · v_H + e · v_E + t))                 (per RGB channel)

with per-slide stain vectors ``v_H, v_E`` (some stain variation between slides) and a per-class
calibration tint ``t``. Nuclei are stamped from a per-slide bank of random nucleus images. Every
random choice derives from ``(seed, slide index)``: the same seed gives the same label maps, byte
for byte, and the same pixels.

On disk::

    root/slides/{slide_id}.svs    root/masks/{slide_id}.png  (uint8 codes, 4x down from level 0)
    root/labels.csv               slide_id,label,split  (label 1 = the slide contains tumour)
    root/cohort.json              the configuration that made the cohort
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from mini_kd.download import stratified_split, write_labels
from mini_kd.errors import MiniKDError
from mini_kd.progress import progress
from mini_kd.pyramid import write_pyramid

LABELS = {0: "background", 1: "normal", 2: "mimic", 3: "tumour"}
BACKGROUND, NORMAL, MIMIC, TUMOUR = 0, 1, 2, 3
MPP = 0.5  # µm per level-0 pixel
MAGNIFICATION = 20.0  # objective power of level 0
DOWNSAMPLES = (1, 4, 16)  # 20x, 5x, 1.25x
MASK_DOWNSAMPLE = 4  # the label map is stored at 5x
GENERATOR_VERSION = 1  # bump when the pictures change, so cached cohorts are rebuilt


# ---------------------------------------------------------------------------------------------
# Geometry: where the tissue, the mimics and the tumour are (the label map, 4x down).
# ---------------------------------------------------------------------------------------------

def _smooth_noise(rng, grid: int, sigma: float) -> np.ndarray:
    """float (grid, grid) zero-mean unit-variance noise smoothed over ``sigma`` cells (tileable)."""
    field = ndimage.gaussian_filter(rng.standard_normal((grid, grid)), sigma, mode="wrap")
    return (field - field.mean()) / field.std()


def _tissue(rng, side: int, fraction: float, grid: int = 256) -> np.ndarray:
    """bool (side, side): irregular tissue pieces covering ``fraction`` of the slide, off the edges.

    Two octaves of smooth noise, minus a bowl that keeps tissue away from the glass edges, drawn
    on a ``grid``-cell square (so the cost does not grow with the slide), enlarged bilinearly and
    thresholded at the quantile that leaves ``fraction`` above it.
    """
    yy, xx = (np.mgrid[0:grid, 0:grid] + 0.5) / grid - 0.5  # (grid, grid) in (-0.5, 0.5)
    field = _smooth_noise(rng, grid, 16.0) + 0.3 * _smooth_noise(rng, grid, 5.0) - 6.0 * (xx**2 + yy**2)
    field = ndimage.zoom(field.astype(np.float32), side / grid, order=1, grid_mode=True,
                         mode="nearest")[:side, :side]  # (side, side)
    return field > np.quantile(field, 1.0 - fraction)


def _harmonic_outline(rng, count: int, amplitude: float, orders=(2, 3, 4, 5)) -> tuple:
    """Random star-shaped outlines R(α) = 1 + Σ_k a_k cos(kα + φ_k): amplitudes and phases (count, K)."""
    orders = np.asarray(orders, dtype=np.float32)
    amplitudes = amplitude * rng.uniform(0.3, 1.0, (count, len(orders))) / orders  # smoother at high k
    phases = rng.uniform(0, 2 * np.pi, (count, len(orders)))
    return orders, amplitudes.astype(np.float32), phases.astype(np.float32)


def _outline_radius(angle, orders, amplitudes, phases) -> np.ndarray:
    """R(α) of :func:`_harmonic_outline` for ``angle`` (count, ...): one outline per leading index."""
    per_outline = (len(amplitudes),) + (1,) * (angle.ndim - 1) + (-1,)
    terms = amplitudes.reshape(per_outline) * np.cos(orders * angle[..., None]
                                                      + phases.reshape(per_outline))
    return 1.0 + terms.sum(-1)


def _add_regions(rng, label_map, tissue, code: int, area: float, count: int) -> None:
    """Paint ``count`` irregular blobs of total ``area`` (label-map px) of ``code`` inside the tissue."""
    side = label_map.shape[0]
    depth = ndimage.distance_transform_edt(tissue[::4, ::4]) * 4  # coarse distance to glass
    areas = area * rng.dirichlet(np.full(count, 2.0))
    for blob_area in areas:
        radius = max(2.0, np.sqrt(blob_area / np.pi))
        inside = np.argwhere(depth >= min(radius, depth.max()) * 0.8) * 4  # (M, 2) row, col
        centre = inside[rng.integers(len(inside))] + rng.integers(0, 4, 2)
        reach = int(np.ceil(radius * 1.8))  # the outline's harmonics add at most ~77 % (amplitude 0.6)
        y0, y1 = max(0, centre[0] - reach), min(side, centre[0] + reach + 1)
        x0, x1 = max(0, centre[1] - reach), min(side, centre[1] + reach + 1)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        dy, dx = yy - centre[0], xx - centre[1]
        outline = _outline_radius(np.arctan2(dy, dx)[None], *_harmonic_outline(rng, 1, 0.6))[0]
        blob = np.hypot(dy, dx) <= radius * outline
        label_map[y0:y1, x0:x1][blob & tissue[y0:y1, x0:x1]] = code


def _dense_fraction(rng, difficulty: float) -> float:
    """Fraction of the tissue one kind of dense region covers: 3-15 % at difficulty 0, 1-5 % at 1."""
    return rng.uniform(0.03 - 0.02 * difficulty, 0.15 - 0.10 * difficulty)


def _tumour_fraction(rng, difficulty: float, tumour_fraction: tuple | None) -> float:
    """Fraction of the tissue the tumour covers: :func:`_dense_fraction`'s, or, with
    ``tumour_fraction`` (lo, hi), drawn log-uniformly from [lo, hi] -- from a few tumour cells to
    a micro-metastasis when lo is a fraction of a per cent."""
    if tumour_fraction is None:
        return _dense_fraction(rng, difficulty)
    return float(np.exp(rng.uniform(*np.log(tumour_fraction))))


def make_label_map(rng, side: int, is_tumour: bool, difficulty: float,
                   tumour_fraction: tuple | None = None) -> np.ndarray:
    """uint8 (side, side) codes of :data:`LABELS` for one slide (``side`` = slide side / 4).

    Tumour slides get tumour foci and mimic clusters; normal slides get mimic clusters covering
    as much as both together would, so the amount of dense tissue does not give the label away.
    """
    tissue = _tissue(rng, side, rng.uniform(0.35, 0.60))
    label_map = tissue.astype(np.uint8) * NORMAL
    tissue_area = tissue.sum()
    tumour_area = _tumour_fraction(rng, difficulty, tumour_fraction) * tissue_area
    mimic_area = _dense_fraction(rng, difficulty) * tissue_area
    if is_tumour:
        _add_regions(rng, label_map, tissue, MIMIC, mimic_area, int(rng.integers(1, 4)))
        _add_regions(rng, label_map, tissue, TUMOUR, tumour_area, int(rng.integers(1, 4)))
    else:
        _add_regions(rng, label_map, tissue, MIMIC, mimic_area + tumour_area, int(rng.integers(2, 7)))
    return label_map


# ---------------------------------------------------------------------------------------------
# Appearance: nuclei, stains, and the per-slide calibration.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NucleusKind:
    """How the nuclei of one region look (lengths in level-0 pixels at 0.5 µm/px, densities in OD)."""

    radius: tuple[float, float]  # range of the major semi-axis
    axis_ratio: tuple[float, float]  # range of minor / major axis
    irregularity: float  # amplitude of the outline's harmonics (0 = smooth ellipse)
    rim: float  # haematoxylin at the nuclear membrane
    centre: float  # haematoxylin inside (vesicular nuclei: centre << rim)
    nucleolus: float  # haematoxylin of the nucleolus (0 = none)
    chromatin: float  # relative amplitude of the chromatin speckle
    spacing: float  # distance between neighbours on the jittered lattice they sit on
    jitter: float  # largest shift off the lattice point, as a fraction of the spacing
    keep: float  # fraction of lattice points that hold a nucleus


KINDS = {
    NORMAL: NucleusKind(radius=(6.0, 8.0), axis_ratio=(0.6, 0.9), irregularity=0.05, rim=0.75,
                        centre=0.65, nucleolus=0.0, chromatin=0.15, spacing=34.0, jitter=0.3, keep=0.35),
    MIMIC: NucleusKind(radius=(5.0, 6.5), axis_ratio=(0.85, 1.0), irregularity=0.03, rim=1.9,
                       centre=1.9, nucleolus=0.0, chromatin=0.10, spacing=14.0, jitter=0.12, keep=1.0),
    TUMOUR: NucleusKind(radius=(10.0, 15.0), axis_ratio=(0.55, 0.9), irregularity=0.25, rim=1.1,
                        centre=0.35, nucleolus=1.2, chromatin=0.35, spacing=27.0, jitter=0.3, keep=0.95),
}
# (haematoxylin, eosin) between the nuclei: stroma, interstitium of a lymphoid cluster, cytoplasm
GROUND = {BACKGROUND: (0.0, 0.0), NORMAL: (0.03, 0.42), MIMIC: (0.06, 0.22), TUMOUR: (0.14, 0.40)}
STAMPS_PER_KIND = 48


def nucleus_stamps(rng, kind: NucleusKind, count: int = STAMPS_PER_KIND) -> np.ndarray:
    """float32 (count, S, S): haematoxylin of ``count`` random nuclei of ``kind``, centred.

    Each nucleus is an ellipse (random size, axis ratio, angle) whose radius is modulated by the
    harmonics of :func:`_harmonic_outline`; inside it, haematoxylin rises from ``centre`` to
    ``rim`` near the membrane, with a speckle of chromatin and, if any, an off-centre nucleolus.
    """
    half = int(np.ceil(kind.radius[1] * (1 + 1.3 * kind.irregularity) + 2))  # Σ 1/k over k=2..5 < 1.3
    yy, xx = np.mgrid[-half: half + 1, -half: half + 1].astype(np.float32)  # (S, S)
    radius = rng.uniform(*kind.radius, (count, 1, 1)).astype(np.float32)
    ratio = rng.uniform(*kind.axis_ratio, (count, 1, 1)).astype(np.float32)
    theta = rng.uniform(0, np.pi, (count, 1, 1)).astype(np.float32)
    u = xx * np.cos(theta) + yy * np.sin(theta)  # (count, S, S) along the major axis
    v = (-xx * np.sin(theta) + yy * np.cos(theta)) / ratio
    outline = _outline_radius(np.arctan2(v, u), *_harmonic_outline(rng, count, kind.irregularity))
    distance = np.hypot(u, v) / (radius * outline)  # 1 on the membrane
    inside = np.clip((1.0 - distance) * radius + 0.5, 0.0, 1.0)  # anti-aliased edge, ~1 px
    profile = kind.centre + (kind.rim - kind.centre) * np.clip((distance - 0.55) / 0.35, 0, 1)
    speckle = ndimage.gaussian_filter(rng.standard_normal(inside.shape), (0, 0.8, 0.8))
    density = profile * (1.0 + kind.chromatin * speckle / speckle.std())
    if kind.nucleolus:
        offset = rng.uniform(-0.3, 0.3, (2, count, 1, 1)) * radius
        spot = np.exp(-((xx - offset[0]) ** 2 + (yy - offset[1]) ** 2) / (2 * 1.3**2))
        density = np.maximum(density, kind.nucleolus * spot)
    return (inside * np.clip(density, 0, None)).astype(np.float32)


def _hexagonal_lattice(rng, side: int, spacing: float) -> np.ndarray:
    """float (G, 2) points of a randomly rotated and shifted hexagonal lattice covering the square."""
    reach = int(np.ceil(side * 0.75 / spacing)) + 1  # the rotated lattice must still cover the corners
    i, j = np.meshgrid(np.arange(-reach, reach + 1), np.arange(-reach, reach + 1), indexing="ij")
    points = np.stack([i + 0.5 * j, j * np.sqrt(3) / 2], axis=-1).reshape(-1, 2) * spacing
    angle = rng.uniform(0, np.pi / 3)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    points = points @ rotation.T + side / 2 + rng.uniform(0, spacing, 2)
    return points[((points >= 0) & (points < side)).all(axis=1)]


def nucleus_centres(rng, label_map: np.ndarray, side: int, code: int, kind: NucleusKind) -> np.ndarray:
    """int64 (N, 3) rows (x, y, stamp index) of the nuclei of ``code``, sorted by y.

    Nuclei sit on a jittered hexagonal lattice (the closest packing) of ``kind.spacing``: crowded
    but rarely piled up, as in tissue; a lattice point holds a nucleus with probability
    ``kind.keep`` if it falls in ``code``. The regular packing keeps the number of nuclei per
    1.25x pixel steady, so a cluster's texture averages out at low resolution.
    """
    points = _hexagonal_lattice(rng, side, kind.spacing)  # (G, 2)
    points += rng.uniform(-kind.jitter, kind.jitter, points.shape) * kind.spacing
    xy = np.clip(points, 0, side - 1).astype(np.int64)  # (G, 2)
    kept = rng.random(len(xy)) < kind.keep
    inside = label_map[xy[:, 1] // MASK_DOWNSAMPLE, xy[:, 0] // MASK_DOWNSAMPLE] == code
    stamp = rng.integers(0, STAMPS_PER_KIND, len(xy))
    nuclei = np.column_stack([xy, stamp])[kept & inside]  # (N, 3)
    return nuclei[np.argsort(nuclei[:, 1], kind="stable")]


@dataclass
class Appearance:
    """How one slide looks: its stains, its bank of nuclei, its stroma fibres and scanner noise."""

    haematoxylin: np.ndarray  # (3,) optical density in R, G, B per unit of haematoxylin
    eosin: np.ndarray  # (3,)
    glass: np.ndarray  # (3,) RGB of empty glass
    stamps: dict  # code -> float32 (K, S, S) haematoxylin of K nuclei (nucleus_stamps)
    fibres: np.ndarray  # float32 (T, T) tileable stroma texture
    noise: np.ndarray  # float32 (3, T, T) tileable scanner noise per channel, in grey levels
    tint: np.ndarray  # float32 (4, 3) extra optical density per label code (see calibrate)


TEXTURE_SIDE = 512  # period of the stroma fibres and of the scanner noise, in level-0 pixels
FIBRE_CONTRAST = 0.25  # relative eosin variation along the stroma fibres


def _periodic_noise(rng, side: int, sigma: tuple[float, float], angle: float) -> np.ndarray:
    """float32 (side, side) tileable unit-variance noise, smoothed by ``sigma`` (along, across ``angle``)."""
    fy = np.fft.fftfreq(side)[:, None]
    fx = np.fft.rfftfreq(side)[None, :]
    along = fx * np.cos(angle) + fy * np.sin(angle)
    across = -fx * np.sin(angle) + fy * np.cos(angle)
    spectrum = np.exp(-2 * np.pi**2 * ((sigma[0] * along) ** 2 + (sigma[1] * across) ** 2))
    noise = np.fft.rfft2(rng.standard_normal((side, side)))  # Gaussian blur = product in Fourier space
    texture = np.fft.irfft2(noise * spectrum, s=(side, side))
    return ((texture - texture.mean()) / texture.std()).astype(np.float32)


def stroma_fibres(rng, side: int = 512) -> np.ndarray:
    """float32 (side, side) tileable texture of wavy collagen fibres (zero mean, unit variance).

    Two families of streaks (noise smoothed along two nearby directions) are bent by a smooth
    random displacement field, so the fibres wave instead of running straight.
    """
    angle = rng.uniform(0, np.pi)
    streaks = (_periodic_noise(rng, side, (10.0, 1.2), angle)
               + 0.6 * _periodic_noise(rng, side, (8.0, 1.0), angle + rng.uniform(0.4, 0.8)))
    shift = 12.0 * np.stack([_periodic_noise(rng, side, (30.0, 30.0), 0.0) for _ in range(2)])
    yy, xx = np.mgrid[0:side, 0:side]
    bent = ndimage.map_coordinates(streaks, [yy + shift[0], xx + shift[1]], order=1, mode="grid-wrap")
    return ((bent - bent.mean()) / bent.std()).astype(np.float32)


def random_appearance(rng) -> Appearance:
    """H&E with per-slide variation: ±10 % per OD component, ±12 % per stain, glass 238-248."""
    haematoxylin = np.array([0.65, 0.70, 0.29]) * rng.uniform(0.9, 1.1, 3) * rng.uniform(0.88, 1.12)
    eosin = np.array([0.10, 0.85, 0.45]) * rng.uniform(0.9, 1.1, 3) * rng.uniform(0.88, 1.12)
    glass = rng.uniform(238, 248) + rng.uniform(-2, 2, 3)
    return Appearance(
        haematoxylin=haematoxylin.astype(np.float32), eosin=eosin.astype(np.float32),
        glass=glass.astype(np.float32),
        stamps={code: nucleus_stamps(rng, kind) for code, kind in KINDS.items()},
        fibres=stroma_fibres(rng, TEXTURE_SIDE),
        noise=rng.normal(0, 2.0, (3, TEXTURE_SIDE, TEXTURE_SIDE)).astype(np.float32),
        tint=np.zeros((len(LABELS), 3), np.float32),
    )


class PhantomImage:
    """A phantom slide's level 0 as a lazy uint8 (H, W, 3) image: ``image[y0:y1]`` renders those rows.

    Pixels depend only on their coordinates and the slide's random draws, never on how the image
    is sliced, so :func:`~mini_kd.pyramid.write_pyramid` can ask for one band at a time.
    """

    def __init__(self, rng, label_map: np.ndarray, side: int, look: Appearance):
        self.label_map = label_map  # (ceil(side / 4), ceil(side / 4)) codes
        self.shape = (side, side, 3)
        self.look = look
        self.nuclei = {code: nucleus_centres(rng, label_map, side, code, kind)
                       for code, kind in KINDS.items()}

    def _ground(self, y0: int, y1: int) -> np.ndarray:
        """float32 (4, y1 - y0, W): optical density between the nuclei (R, G, B) and stroma eosin.

        Each code's values are looked up on the label map and interpolated bilinearly to level 0,
        so region borders become 4-px ramps instead of 4-px stairs.
        """
        look = self.look
        table = np.zeros((len(LABELS), 4), np.float32)  # per code: OD in R, G, B, stroma eosin
        for code, (haematoxylin, eosin) in GROUND.items():
            table[code, :3] = haematoxylin * look.haematoxylin + eosin * look.eosin + look.tint[code]
        table[NORMAL, 3] = GROUND[NORMAL][1]
        first = max(0, y0 // MASK_DOWNSAMPLE - 1)  # the map rows the band needs, and one more
        last = min(self.label_map.shape[0], -(-y1 // MASK_DOWNSAMPLE) + 1)
        values = table[self.label_map[first:last]]  # (m, w4, 4)
        box = (0, y0 / MASK_DOWNSAMPLE - first, self.shape[1] / MASK_DOWNSAMPLE,
               y1 / MASK_DOWNSAMPLE - first)  # the band, in map pixels
        size = (self.shape[1], y1 - y0)
        return np.stack([
            np.asarray(Image.fromarray(np.ascontiguousarray(values[..., channel]), "F")
                       .resize(size, Image.Resampling.BILINEAR, box=box))
            for channel in range(4)
        ])

    def _nuclear_haematoxylin(self, y0: int, y1: int) -> np.ndarray:
        """float32 (y1 - y0, W): haematoxylin of every nucleus overlapping rows y0:y1."""
        height, width = y1 - y0, self.shape[1]
        total = np.zeros(height * width)
        for code, stamps in self.look.stamps.items():
            half = stamps.shape[1] // 2
            nuclei = self.nuclei[code]
            lo, hi = np.searchsorted(nuclei[:, 1], [y0 - half, y1 + half])
            x, y, index = nuclei[lo:hi].T  # (n,) each
            offsets = np.arange(-half, half + 1)
            rows = (y - y0)[:, None, None] + offsets[None, :, None]  # (n, S, 1)
            cols = x[:, None, None] + offsets[None, None, :]  # (n, 1, S)
            valid = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)  # (n, S, S)
            pixel = (rows * width + cols)[valid]
            total += np.bincount(pixel, weights=stamps[index][valid], minlength=total.size)
        return total.reshape(height, width).astype(np.float32)

    def __getitem__(self, rows: slice) -> np.ndarray:
        y0, y1, _ = rows.indices(self.shape[0])
        look, width = self.look, self.shape[1]
        ground = self._ground(y0, y1)  # (4, h, W)
        fibres = FIBRE_CONTRAST * ground[3] * _periodic_rows(look.fibres, y0, y1, width)  # (h, W)
        nuclear = self._nuclear_haematoxylin(y0, y1)  # (h, W)
        image = np.empty((y1 - y0, width, 3), np.uint8)
        for channel in range(3):  # Beer-Lambert, one colour channel at a time
            density = ground[channel] + fibres * look.eosin[channel] + nuclear * look.haematoxylin[channel]
            value = look.glass[channel] * np.exp(-density)
            value += _periodic_rows(look.noise[channel], y0, y1, width) + 0.5
            image[..., channel] = np.clip(value, 0, 255)  # rounded to the nearest grey level
        return image


def _periodic_rows(texture: np.ndarray, y0: int, y1: int, width: int) -> np.ndarray:
    """(y1 - y0, width): rows y0:y1 of ``texture`` (T, T) repeated periodically over the plane."""
    side = texture.shape[1]
    rows = texture[np.arange(y0, y1) % side]  # (h, T)
    return np.tile(rows, (1, -(-width // side)))[:, :width]


MIMIC_GAP = 0.12  # haematoxylin the mimics keep over tumour at low resolution when difficulty = 0


def calibrate(rng, look: Appearance, difficulty: float, side: int = 512) -> np.ndarray:
    """float32 (4, 3): the tint that gives mimic and tumour regions the same low-resolution colour.

    A region's colour at 1.25x is the mean of its 20x pixels. Both classes are rendered on a
    ``side``-px patch; the brighter one (per channel) gets the optical density ln(mean / target)
    that brings its mean down to the darker one's, exactly, since exp(-density) factors out. Then
    the mimics are darkened by (1 - difficulty) · MIMIC_GAP units of haematoxylin, the cue that
    ``difficulty`` leaves at low resolution.
    """
    side4 = side // MASK_DOWNSAMPLE
    means = {}
    for code in (MIMIC, TUMOUR):
        patch = PhantomImage(rng, np.full((side4, side4), code, np.uint8), side, look)[:]
        margin = side // 8  # nuclei cut by the patch edge would bias the mean
        means[code] = patch[margin:-margin, margin:-margin].reshape(-1, 3).mean(axis=0)
    target = np.minimum(means[MIMIC], means[TUMOUR])
    tint = np.zeros((len(LABELS), 3), np.float32)
    for code in (MIMIC, TUMOUR):
        tint[code] = np.log(means[code] / target)
    tint[MIMIC] += (1.0 - difficulty) * MIMIC_GAP * look.haematoxylin
    return tint



def render_slide(slide_path, mask_path, seed: int, index: int, is_tumour: bool,
                 difficulty: float, slide_size: int, tumour_fraction: tuple | None = None) -> None:
    """Draw slide ``index`` of the cohort ``seed``: its label map (PNG) and its pyramid (SVS)."""
    rng = np.random.default_rng([seed, index])
    side4 = -(-slide_size // MASK_DOWNSAMPLE)  # ceil
    label_map = make_label_map(rng, side4, is_tumour, difficulty, tumour_fraction)  # (side4, side4)
    look = random_appearance(rng)
    look.tint = calibrate(rng, look, difficulty)
    write_pyramid(slide_path, PhantomImage(rng, label_map, slide_size, look), MPP, MAGNIFICATION,
                  DOWNSAMPLES)
    Image.fromarray(label_map).save(mask_path)


# ---------------------------------------------------------------------------------------------
# The cohort on disk.
# ---------------------------------------------------------------------------------------------

@dataclass
class Cohort:
    """A folder of slides (``slides/``), ``labels.csv`` and, for a phantom, label maps (``masks/``).

    Public cohorts downloaded by ``data_scripts/`` use the same layout without ``masks/``.
    """

    root: Path
    slides: list[dict]  # rows of labels.csv: slide_id, label (0 normal / 1 tumour), split

    def slide_path(self, slide_id: str) -> Path:
        """``slides/{slide_id}.svs``, or the one ``slides/{slide_id}.*`` of a public cohort
        (CAMELYON16 ships ``.tif``); a download still in progress (``.part``) does not count."""
        path = self.root / "slides" / f"{slide_id}.svs"
        if path.is_file():
            return path
        found = [p for p in sorted((self.root / "slides").glob(f"{slide_id}.*"))
                 if p.suffix != ".part"]
        return found[0] if found else path

    @property
    def has_label_maps(self) -> bool:
        """True for a phantom cohort; a public cohort has slide labels but no tile-level truth."""
        return (self.root / "masks").is_dir()

    def label_map(self, slide_id: str) -> tuple[np.ndarray, int]:
        """uint8 (H, W) codes of :data:`LABELS` and the map's downsample versus level 0."""
        path = self.root / "masks" / f"{slide_id}.png"
        if not path.is_file():
            raise MiniKDError(f"no label map at {path}: only phantom cohorts have one "
                              "(regenerate it with make_cohort)")
        return np.asarray(Image.open(path)), MASK_DOWNSAMPLE

    def tile_fractions(self, slide_id: str, coords, footprint: int) -> np.ndarray:
        """float (N, 4): fraction of each label code under each tile (level-0 corners ``coords``).

        A tile covers label-map pixels floor(x / 4) to ceil((x + footprint) / 4); the part of a
        tile beyond the slide counts as background.
        """
        label_map, downsample = self.label_map(slide_id)
        fractions = np.zeros((len(coords), len(LABELS)))
        for i, (x, y) in enumerate(np.asarray(coords, dtype=np.int64)):
            x0, y0 = x // downsample, y // downsample
            x1, y1 = -(-(x + footprint) // downsample), -(-(y + footprint) // downsample)
            window = label_map[max(y0, 0): max(y1, 0), max(x0, 0): max(x1, 0)]
            counts = np.bincount(window.ravel(), minlength=len(LABELS)).astype(float)
            counts[BACKGROUND] += (x1 - x0) * (y1 - y0) - window.size  # off the slide
            fractions[i] = counts / counts.sum()
        return fractions

    def ids(self, split: str | None = None) -> list[str]:
        """Slide ids in labels.csv order, optionally only those of ``split`` (train/val/test)."""
        return [row["slide_id"] for row in self.slides if split is None or row["split"] == split]

    def labels(self, ids) -> np.ndarray:
        """int64 (N,) slide labels of ``ids``."""
        label_of = {row["slide_id"]: row["label"] for row in self.slides}
        return np.array([label_of[slide_id] for slide_id in ids], dtype=np.int64)


def _config(n_slides, seed, difficulty, slide_size, tumour_fraction=None) -> dict:
    """The cohort.json content: everything the pictures depend on."""
    config = dict(n_slides=int(n_slides), seed=int(seed), difficulty=float(difficulty),
                  slide_size=int(slide_size), generator_version=GENERATOR_VERSION)
    if tumour_fraction is not None:
        config["tumour_fraction"] = [float(f) for f in tumour_fraction]
    return config


def _check_config(n_slides, difficulty, slide_size, tumour_fraction=None) -> None:
    if n_slides < 6:
        raise MiniKDError(f"n_slides={n_slides} is too few: the stratified train/val/test split "
                          "needs at least 3 slides per class; use n_slides >= 6")
    if not 0.0 <= difficulty <= 1.0:
        raise MiniKDError(f"difficulty={difficulty} must lie in [0, 1] (0 easy, 1 hardest)")
    if slide_size < 512:
        raise MiniKDError(f"slide_size={slide_size} px is too small for 1.25x tiles; use >= 512")
    if tumour_fraction is not None and not (len(tumour_fraction) == 2
                                            and 0 < tumour_fraction[0] <= tumour_fraction[1] < 1):
        raise MiniKDError(f"tumour_fraction={tumour_fraction} must be (lo, hi) with "
                          "0 < lo <= hi < 1, e.g. (0.002, 0.03)")


def make_cohort(root, n_slides: int = 24, seed: int = 0, difficulty: float = 0.5,
                slide_size: int = 3072, tumour_fraction: tuple | None = None) -> Cohort:
    """Generate a phantom cohort of ``n_slides`` square slides of ``slide_size`` px in ``root``.

    Half the slides (rounded down) contain tumour; which ones, and the stratified 60/20/20
    train/val/test split, are drawn from ``seed``. ``difficulty`` in [0, 1] shrinks the tumour
    foci and brings tumour and mimic closer together at low resolution; ``tumour_fraction`` (lo,
    hi) instead draws each tumour slide's share of tumour log-uniformly from [lo, hi] (None: the
    difficulty's share, 1-15 %).
    """
    _check_config(n_slides, difficulty, slide_size, tumour_fraction)
    root = Path(root)
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    (root / "cohort.json").unlink(missing_ok=True)  # written last: marks a complete cohort
    is_tumour = np.random.default_rng(seed).permutation(n_slides) < n_slides // 2
    ids = [f"phantom_{index:03d}" for index in range(n_slides)]
    for index, slide_id in enumerate(progress(ids, desc="phantom slides")):
        render_slide(root / "slides" / f"{slide_id}.svs", root / "masks" / f"{slide_id}.png",
                     seed, index, bool(is_tumour[index]), difficulty, slide_size, tumour_fraction)
    labels = {slide_id: int(tumour) for slide_id, tumour in zip(ids, is_tumour)}
    write_labels(root / "labels.csv", labels, stratified_split(labels, seed=seed))
    config = _config(n_slides, seed, difficulty, slide_size, tumour_fraction)
    (root / "cohort.json").write_text(json.dumps(config, indent=2) + "\n")
    return load_cohort(root)


def load_cohort(root) -> Cohort:
    """The cohort in ``root``: written by :func:`make_cohort`, or a public cohort downloaded by
    ``data_scripts/`` (same layout). Every slide of ``labels.csv`` must be in ``slides/``."""
    root = Path(root)
    path = root / "labels.csv"
    make_one = ("generate a cohort with make_cohort (or `mini-kd phantom`) or download one with "
                "data_scripts/")
    if not root.is_dir():
        raise MiniKDError(f"no cohort folder at {root} (a folder with slides/ and labels.csv); {make_one}")
    if not path.is_file():
        raise MiniKDError(f"no labels.csv in {root}; {make_one}")
    cohort = Cohort(root, _read_labels(root))
    if not (root / "slides").is_dir():
        raise MiniKDError(f"{root} has no slides/ folder; put the slides listed in {path} in "
                          f"{root / 'slides'} as <slide_id>.svs (or .tif, ...)")
    missing = _missing_slides(cohort)
    if missing:
        raise MiniKDError(f"{len(missing)} slides of {path} are missing from {root / 'slides'} "
                          f"(e.g. {missing[0]}); run the download script again (it resumes) or "
                          "regenerate the phantom cohort")
    return cohort


def _missing_slides(cohort: Cohort) -> list[str]:
    return [slide_id for slide_id in cohort.ids() if not cohort.slide_path(slide_id).is_file()]


LABEL_COLUMNS = ("slide_id", "label", "split")
SPLITS = ("train", "val", "test")


def _read_labels(root: Path) -> list[dict]:
    """The rows of ``root/labels.csv`` (slide_id, label 0 or 1, split), checked: every column is
    there, ids are unique, labels are 0 or 1 and both occur, splits are train, val or test."""
    path = root / "labels.csv"
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet's BOM
            reader = csv.DictReader(file)
            absent = [column for column in LABEL_COLUMNS if column not in (reader.fieldnames or [])]
            if absent:
                raise MiniKDError(f"{path} has no column {', '.join(absent)} (its header is "
                                  f"{','.join(reader.fieldnames or []) or 'empty'}); the first line "
                                  f"must be {','.join(LABEL_COLUMNS)}")
            rows = [_label_row(path, line, row) for line, row in enumerate(reader, start=2)
                    if any(row.values())]  # blank lines are skipped
    except UnicodeDecodeError:
        raise MiniKDError(f"{path} is not a text CSV file; write it as UTF-8 text with the header "
                          f"{','.join(LABEL_COLUMNS)}") from None
    if not rows:
        raise MiniKDError(f"{path} lists no slides; add one row per slide: slide_id,label,split")
    ids = [row["slide_id"] for row in rows]
    repeated = sorted({slide_id for slide_id in ids if ids.count(slide_id) > 1})
    if repeated:
        raise MiniKDError(f"{path} lists {repeated[0]!r} more than once ({len(repeated)} repeated "
                          "id(s)); keep one row per slide")
    classes = {row["label"] for row in rows}
    if len(classes) < 2:
        raise MiniKDError(f"every slide of {path} has label {classes.pop()}; training and evaluation "
                          "need slides of both classes (0 normal, 1 tumour)")
    return rows


def _label_row(path: Path, line: int, row: dict) -> dict:
    """One checked row of labels.csv (``line`` counts the header as line 1)."""
    missing = [column for column in LABEL_COLUMNS if row.get(column) in (None, "")]
    if missing:
        raise MiniKDError(f"line {line} of {path} has no {', '.join(missing)}; the file needs the "
                          f"header {','.join(LABEL_COLUMNS)} and a value in every column")
    label, split = row["label"].strip(), row["split"].strip()
    if label not in ("0", "1"):
        raise MiniKDError(f"line {line} of {path} has label {label!r}; a label is 0 (normal) or "
                          "1 (tumour)")
    if split not in SPLITS:
        raise MiniKDError(f"line {line} of {path} has split {split!r}; a split is one of "
                          f"{', '.join(SPLITS)}")
    return dict(slide_id=row["slide_id"].strip(), label=int(label), split=split)


def ensure_cohort(root, **config) -> Cohort:
    """Load the cohort in ``root`` if it was made with ``config`` (make_cohort's arguments), else make it."""
    root = Path(root)
    defaults = dict(n_slides=24, seed=0, difficulty=0.5, slide_size=3072)
    wanted = _config(**{**defaults, **config})
    marker = root / "cohort.json"
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        if not _missing_slides(Cohort(root, _read_labels(root))):
            return load_cohort(root)
    return make_cohort(root, **{**defaults, **config})


# ---------------------------------------------------------------------------------------------
# The premise, measured: tumour vs mimic tiles from simple statistics, at 20x and at 1.25x.
# ---------------------------------------------------------------------------------------------

DARK = 100  # grey level below which a pixel counts as dark (condensed chromatin)


def tile_statistics(tiles: np.ndarray) -> np.ndarray:
    """float (N, 8) per tile (N, S, S, 3) uint8: RGB means, RGB stds, gradient energy, dark fraction.

    Gradient energy is the mean of |∇g|² over the grey image g in [0, 1] (texture at the pixel
    scale); the dark fraction is the share of pixels with g < DARK / 255.
    """
    pixels = tiles.astype(np.float32) / 255.0  # (N, S, S, 3)
    grey = pixels.mean(axis=-1)  # (N, S, S)
    gy, gx = np.gradient(grey, axis=(1, 2))
    return np.column_stack([
        pixels.mean(axis=(1, 2)),  # (N, 3)
        pixels.std(axis=(1, 2)),  # (N, 3)
        (gx**2 + gy**2).mean(axis=(1, 2)),  # (N,)
        (grey < DARK / 255.0).mean(axis=(1, 2)),  # (N,)
    ])


def _tile_candidates(label_map: np.ndarray, code: int, window: int, min_fraction: float) -> np.ndarray:
    """int64 (M, 2) label-map (x, y) corners, on a 4-px lattice, of windows mostly of ``code``."""
    inside = (label_map == code).astype(np.float32)
    share = ndimage.uniform_filter(inside, window, mode="constant", origin=-(window // 2))
    share = share[: label_map.shape[0] - window + 1: 4, : label_map.shape[1] - window + 1: 4]
    rows, cols = np.nonzero(share >= min_fraction)
    return np.column_stack([cols, rows]).astype(np.int64) * 4


def class_tiles(cohort: Cohort, code: int, count: int, tile_size: int, rng,
                min_fraction: float = 0.7) -> np.ndarray:
    """int64 (count, 3) rows (slide index, x, y): random 20x tiles of ``tile_size`` px, each at least
    ``min_fraction`` of class ``code`` in its slide's label map, drawn from the whole cohort.

    Corners lie on a 16-px level-0 lattice; ``rng`` is a numpy Generator. Raises if the cohort
    holds fewer than ``count`` such tiles.
    """
    pool = []
    for index, slide_id in enumerate(cohort.ids()):
        label_map, downsample = cohort.label_map(slide_id)
        corners = _tile_candidates(label_map, code, tile_size // downsample, min_fraction)
        pool.append(np.column_stack([np.full(len(corners), index), corners * downsample]))
    pool = np.concatenate(pool).astype(np.int64)  # (M, 3)
    if len(pool) < count:
        raise MiniKDError(f"the cohort holds {len(pool)} {LABELS[code]} tiles of {tile_size} px, "
                          f"fewer than the {count} asked for; ask for fewer or smaller tiles")
    return pool[rng.permutation(len(pool))[:count]]


def read_cohort_tiles(cohort: Cohort, picks: np.ndarray, size: int, mag: float) -> np.ndarray:
    """uint8 (N, size, size, 3): the tiles ``picks`` (N, 3) rows (slide index, x, y) read at ``mag``,
    each with the footprint of ``size`` px at ``mag`` (one slide opened once)."""
    from mini_kd.slides import open_slide

    ids = cohort.ids()
    tiles = np.zeros((len(picks), size, size, 3), np.uint8)
    for index in np.unique(picks[:, 0]):
        rows = np.flatnonzero(picks[:, 0] == index)
        with open_slide(cohort.slide_path(ids[index])) as slide:
            tiles[rows] = slide.read_tiles(picks[rows, 1:3], size, mag)
    return tiles


def premise_check(cohort: Cohort, n_tiles: int = 400, tile_size: int = 128, seed: int = 0,
                  lr_mag: float = 1.25, min_fraction: float = 0.7) -> dict:
    """How well tumour and mimic tiles separate at 20x and at ``lr_mag``, from :func:`tile_statistics`.

    ``n_tiles`` tiles (half tumour, half mimic, each at least ``min_fraction`` of its class in the
    label map) of ``tile_size`` px at 20x are read again, same footprint, at ``lr_mag``. A
    logistic regression on the statistics of each view is scored by cross-validation with slides
    as groups (no slide is in the training and the test fold at once); chance is 0.5.
    Returns {"hr_accuracy", "lr_accuracy", "n_tiles"}.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedGroupKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(seed)
    picks = np.concatenate([
        np.column_stack([class_tiles(cohort, code, n_tiles // 2, tile_size, rng, min_fraction),
                         np.full(n_tiles // 2, code == TUMOUR)])
        for code in (MIMIC, TUMOUR)
    ])  # (N, 4) rows (slide index, x, y, is_tumour)
    groups, is_tumour = picks[:, 0], picks[:, 3]
    if min(np.unique(groups[is_tumour == k]).size for k in (0, 1)) < 2:
        raise MiniKDError("too few slides with tumour or mimic tiles for a held-out estimate; "
                          "use a cohort with more slides or a smaller tile_size")

    lr_size = max(1, round(tile_size * lr_mag / MAGNIFICATION))
    hr_features = tile_statistics(read_cohort_tiles(cohort, picks[:, :3], tile_size, MAGNIFICATION))
    lr_features = tile_statistics(read_cohort_tiles(cohort, picks[:, :3], lr_size, lr_mag))

    n_splits = min(5, *(np.unique(groups[is_tumour == k]).size for k in (0, 1)))
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)

    def accuracy(features):
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        predicted = cross_val_predict(model, features, is_tumour, groups=groups, cv=folds)
        return float((predicted == is_tumour).mean())

    return dict(hr_accuracy=accuracy(hr_features), lr_accuracy=accuracy(lr_features),
                n_tiles=len(picks))
