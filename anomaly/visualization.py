"""Pure drawing functions: tensors or arrays in, images out. No Lightning, no file layout."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import colormaps  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from torch import Tensor  # noqa: E402

from anomaly.files import atomic_path  # noqa: E402

PANEL_TITLES = ("input", "reconstruction", "anomaly map", "ground truth", "overlay")
# Used when a tile is too narrow for the full titles (e.g. 64 px images).
SHORT_TITLES = ("input", "output", "map", "truth", "overlay")
# Pixels above this quantile of a run's test maps all show the hottest colour.
HOT_QUANTILE = 0.999
TITLE_HEIGHT = 14


def to_uint8_rgb(image: Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    array = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return (array * 255.0 + 0.5).astype(np.uint8)


def colour_scale(maps: list, quantile: float = HOT_QUANTILE) -> float:
    """The map value shown as the hottest colour: the `quantile` of all pixels of `maps`.

    A quantile rather than the maximum, so a few extreme pixels of one image do not wash out the
    defects of every other panel. `maps` holds arrays or CPU tensors; 1.0 when there are no pixels.
    """
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps] or [[]])
    if values.size == 0:
        return 1.0
    rank = min(values.size, max(1, math.ceil(quantile * values.size)))
    return float(np.partition(values, rank - 1)[rank - 1])


def colorize(anomaly_map: Tensor, vmax: float) -> np.ndarray:
    """(H, W) map -> (H, W, 3) uint8 with the "jet" colormap over [0, vmax]."""
    values = (anomaly_map.detach().float().cpu().numpy() / max(vmax, 1e-12)).clip(0, 1)
    return (colormaps["jet"](values)[..., :3] * 255.0 + 0.5).astype(np.uint8)


# Panel tiles are enlarged (by whole pixels) to at least this many pixels on their short side.
PANEL_MIN_TILE = 256
# Rows above the tiles: the panel's title, then each tile's.
PANEL_HEADER = 2 * TITLE_HEIGHT
# The colour bar column right of the tiles: a gradient and its labels in map units.
COLOUR_BAR_WIDTH = 64


def _enlarge(tile: np.ndarray, factor: int) -> np.ndarray:
    """(H, W, 3) -> (factor * H, factor * W, 3), every pixel a block: nothing is invented."""
    return np.repeat(np.repeat(tile, factor, axis=0), factor, axis=1)


def _colour_bar(height: int, vmax: float) -> Image.Image:
    """A (height, COLOUR_BAR_WIDTH) strip: the "jet" gradient from vmax (top) to 0, labelled."""
    strip = Image.new("RGB", (COLOUR_BAR_WIDTH, height), "white")
    values = np.linspace(1.0, 0.0, height)[:, None].repeat(14, axis=1)
    gradient = (colormaps["jet"](values)[..., :3] * 255.0 + 0.5).astype(np.uint8)
    strip.paste(Image.fromarray(gradient), (4, 0))
    draw = ImageDraw.Draw(strip)
    for fraction in (0.0, 0.5, 1.0):
        y = min(height - TITLE_HEIGHT, round((1.0 - fraction) * (height - 1)))
        draw.text((21, max(0, y - 4)), f"{fraction * vmax:.3g}", fill="black")
    return strip


def heatmap_panel(
    image: Tensor,
    reconstruction: Tensor,
    anomaly_map: Tensor,
    mask: Tensor,
    vmax: float,
    title: str = "",
) -> np.ndarray:
    """Five tiles side by side: input, reconstruction, anomaly map, ground truth, overlay.

    Tiles are enlarged by a whole factor to at least `PANEL_MIN_TILE` pixels on their short side;
    a colour bar in map units stands right of them and `title` (e.g. the score and verdict)
    above them.

    Args:
        image, reconstruction: (3, H, W) in [0, 1].
        anomaly_map: (H, W); colours span [0, vmax] so panels of one run are comparable.
        mask: (H, W) or (1, H, W) ground truth in {0, 1}.
        vmax: map value shown as the hottest colour.
        title: the panel's heading.

    Returns:
        (PANEL_HEADER + k * H, 5 * k * W + COLOUR_BAR_WIDTH, 3) uint8, k the enlargement.
    """
    rgb = to_uint8_rgb(image)
    heat = colorize(anomaly_map, vmax)
    truth = (mask.detach().reshape(rgb.shape[:2]).float().cpu().numpy() > 0.5).astype(np.uint8)
    overlay = (0.55 * rgb + 0.45 * heat).astype(np.uint8)
    factor = max(1, math.ceil(PANEL_MIN_TILE / min(rgb.shape[:2])))
    tiles = [
        _enlarge(tile, factor)
        for tile in (
            rgb,
            to_uint8_rgb(reconstruction),
            heat,
            np.repeat(truth[..., None] * 255, 3, 2),
            overlay,
        )
    ]
    height, width = tiles[0].shape[:2]
    canvas = Image.new(
        "RGB", (width * len(tiles) + COLOUR_BAR_WIDTH, height + PANEL_HEADER), "white"
    )
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 1), title, fill="black")
    fits = all(draw.textlength(name) + 4 <= width for name in PANEL_TITLES)
    names = PANEL_TITLES if fits else SHORT_TITLES
    for i, (tile, name) in enumerate(zip(tiles, names, strict=True)):
        canvas.paste(Image.fromarray(tile), (i * width, PANEL_HEADER))
        draw.text((i * width + 2, TITLE_HEIGHT + 1), name, fill="black")
    canvas.paste(_colour_bar(height, vmax), (width * len(tiles), PANEL_HEADER))
    return np.asarray(canvas)


def save_roc_plot(
    fpr: np.ndarray, tpr: np.ndarray, auroc: float | None, title: str, path: str | Path
) -> None:
    """Write one ROC curve as a PNG."""
    figure, axes = plt.subplots(figsize=(4, 4), dpi=100)
    axes.plot(
        fpr, tpr, lw=1.5, label="AUROC undefined" if auroc is None else f"AUROC = {auroc:.4f}"
    )
    axes.plot([0, 1], [0, 1], "k--", lw=0.8)
    axes.set(
        xlabel="false positive rate",
        ylabel="true positive rate",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.legend(loc="lower right")
    figure.tight_layout()
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png")
    finally:
        plt.close(figure)


# The shorter side of a prediction overlay's image, in pixels, at least.
OVERLAY_MIN_SIDE = 256


def save_prediction_overlay(
    image: np.ndarray, anomaly_map: np.ndarray, vmax: float, title: str, path: str | Path
) -> None:
    """Write an image with its anomaly map laid over it, a colour bar in map units and a title.

    Args:
        image: (H, W, 3) uint8, the image at its own size.
        anomaly_map: (H, W) map at the same size.
        vmax: map value shown as the hottest colour (the same for every image of a run).
        title: e.g. the score and the verdict.
        path: the PNG to write.
    """
    height, width = image.shape[:2]
    scale = max(1.0, OVERLAY_MIN_SIDE / min(height, width))
    dpi = 100
    # The image keeps at least OVERLAY_MIN_SIDE pixels on its short side; the bar and the title
    # get fixed margins beside and above it.
    image_w, image_h = width * scale / dpi, height * scale / dpi
    bar, margin, top = 0.9, 0.1, 0.35
    figure = plt.figure(figsize=(image_w + bar + 2 * margin, image_h + top + margin), dpi=dpi)
    fig_w, fig_h = figure.get_size_inches()
    axes = figure.add_axes((margin / fig_w, margin / fig_h, image_w / fig_w, image_h / fig_h))
    colour_axes = figure.add_axes(
        ((margin + image_w + 0.1) / fig_w, margin / fig_h, 0.15 / fig_w, image_h / fig_h)
    )
    axes.imshow(image, interpolation="bilinear")
    heat = axes.imshow(
        anomaly_map,
        cmap="jet",
        vmin=0.0,
        vmax=max(vmax, 1e-12),
        alpha=0.45,
        interpolation="bilinear",
    )
    axes.set_axis_off()
    figure.colorbar(heat, cax=colour_axes).ax.tick_params(labelsize=7)
    figure.text(margin / fig_w, 1 - 0.25 / fig_h, title, fontsize=9)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=dpi)
    finally:
        plt.close(figure)
