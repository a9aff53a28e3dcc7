"""Figures the course draws again and again: grids and heatmaps over thumbnails, tile mosaics,
cost-versus-accuracy plots.

Every function draws on a matplotlib ``Axes`` it is given (or returns a new figure), so notebooks
compose them freely. Tile rectangles are placed by converting level-0 coordinates to thumbnail
pixels: ``thumbnail_px = level0_px · thumb_mag / slide_mag``.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import PatchCollection
from matplotlib.patches import Rectangle

from mini_kd.tiling import TileGrid


def _rectangles(grid: TileGrid, thumb_mag: float, indices=None) -> list[Rectangle]:
    scale = thumb_mag / grid.slide_mag
    side = grid.footprint * scale
    coords = grid.coords if indices is None else grid.coords[indices]
    return [Rectangle((x * scale, y * scale), side, side) for x, y in coords]


def show_grid(ax, thumbnail: np.ndarray, grid: TileGrid, thumb_mag: float, color="tab:blue",
              linewidth=0.6, title: str | None = None, indices=None):
    """The thumbnail with the outline of every tile of ``grid`` (or of the tiles ``indices``)."""
    ax.imshow(thumbnail)
    patches = PatchCollection(_rectangles(grid, thumb_mag, indices), facecolor="none",
                              edgecolor=color, linewidth=linewidth)
    ax.add_collection(patches)
    ax.set_title(title if title is not None else f"{len(grid)} tiles at {grid.mag:g}x")
    ax.set_axis_off()
    return ax


def show_heatmap(ax, thumbnail: np.ndarray, grid: TileGrid, values, thumb_mag: float,
                 cmap="inferno", alpha=0.6, title: str = "", vmin=None, vmax=None):
    """Tiles filled with ``values`` (N,) (attention, keep mask, probability) over the thumbnail."""
    ax.imshow(thumbnail)
    patches = PatchCollection(_rectangles(grid, thumb_mag), cmap=cmap, alpha=alpha,
                              edgecolor="none")
    patches.set_array(np.asarray(values, dtype=float))
    patches.set_clim(vmin, vmax)
    ax.add_collection(patches)
    ax.set_title(title)
    ax.set_axis_off()
    plt.colorbar(patches, ax=ax, fraction=0.046, pad=0.02)
    return ax


def show_mask(ax, label_map: np.ndarray, names: dict[int, str], title: str = ""):
    """A label map (H, W) of small integer codes with a legend of their names."""
    colors = plt.get_cmap("tab10")
    rgb = np.ones(label_map.shape + (3,))
    for code in names:
        if code:  # code 0 stays white
            rgb[label_map == code] = colors(code)[:3]
    ax.imshow(rgb)
    handles = [Rectangle((0, 0), 1, 1, color=colors(c)[:3]) for c in names if c]
    ax.legend(handles, [names[c] for c in names if c], loc="lower right", fontsize=7)
    ax.set_title(title)
    ax.set_axis_off()
    return ax


def tile_mosaic(rows: dict[str, np.ndarray], columns: list[str] | None = None, size: float = 1.6):
    """A figure with one row per entry of ``rows`` (name -> uint8 tiles (M, S, S, 3))."""
    n_cols = max(len(tiles) for tiles in rows.values())
    figure, axes = plt.subplots(len(rows), n_cols, figsize=(size * n_cols, size * len(rows)),
                                squeeze=False)
    for r, (name, tiles) in enumerate(rows.items()):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c < len(tiles):
                ax.imshow(tiles[c], interpolation="nearest")
            else:
                ax.set_axis_off()
            if c == 0:
                ax.set_ylabel(name, fontsize=9)
            if r == 0 and columns:
                ax.set_title(columns[c], fontsize=9)
    figure.tight_layout()
    return figure


def cost_accuracy_plot(ax, rows: list[dict], cost="gflops", score="accuracy", label="name",
                       logx=True):
    """Scatter of ``score`` against ``cost`` with each point labelled; rows are dicts."""
    for row in rows:
        ax.scatter(row[cost], row[score])
        ax.annotate(str(row[label]), (row[cost], row[score]), textcoords="offset points",
                    xytext=(4, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(cost)
    ax.set_ylabel(score)
    ax.grid(alpha=0.3)
    return ax


def pareto_plot(ax, rows: list[dict], front: list[str], cost="seconds_per_slide", score="auc",
                label="method"):
    """``score`` with its 95 % CI bars (``<score>_ci``) against ``cost`` on a log axis, each point
    labelled, and the Pareto front (the ``front`` rows: none cheaper and better) as a staircase."""
    rows = [row for row in rows if row.get(cost) is not None]
    for row in rows:
        low, high = row[f"{score}_ci"]
        on_front = row[label] in front
        ax.errorbar(row[cost], row[score], yerr=[[row[score] - low], [high - row[score]]],
                    fmt="o" if on_front else "s", color="tab:red" if on_front else "tab:gray",
                    capsize=3, markersize=5)
        ax.annotate(str(row[label]), (row[cost], row[score]), textcoords="offset points",
                    xytext=(5, 3), fontsize=8)
    best = sorted((row for row in rows if row[label] in front), key=lambda row: row[cost])
    ax.step([row[cost] for row in best], [row[score] for row in best], where="post",
            color="tab:red", alpha=0.5, label="Pareto front")
    ax.set_xscale("log")
    ax.set_xlabel(f"{cost.replace('_', ' ')} (log scale)")
    ax.set_ylabel(f"{score.upper()} (95 % CI over slides)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")
    return ax


def show_where_it_looks(looks: dict, names: dict[int, str], size: float = 4.0):
    """One panel per model of :func:`mini_kd.experiments.where_it_looks`'s ``looks``: its
    per-tile values over the slide's thumbnail, after the ground-truth label map when there is
    one."""
    truth = looks["label_map"] is not None  # a cohort without tumour masks: no ground-truth panel
    n = len(looks["maps"]) + truth
    figure, axes = plt.subplots(1, n, figsize=(size * n, size), squeeze=False)
    if truth:
        show_mask(axes[0, 0], looks["label_map"], names, title=f"{looks['slide_id']}: ground truth")
    for ax, (name, out) in zip(axes[0, truth:], looks["maps"].items()):
        show_heatmap(ax, looks["thumbnail"], out["grid"], out["values"], looks["thumb_mag"],
                     title=f"{name}: P(tumour) = {out['probability']:.2f}")
    figure.tight_layout()
    return figure


def show_source(obj):
    """The package's own source of ``obj``, highlighted, for notebooks that walk the real code."""
    import inspect

    from IPython.display import Code

    return Code(inspect.getsource(obj), language="python")
