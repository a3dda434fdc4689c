"""Heatmap panels: layout and colour scale."""

from __future__ import annotations

import pytest
import torch

from anomaly.visualization import (
    COLOUR_BAR_WIDTH,
    PANEL_HEADER,
    PANEL_MIN_TILE,
    TITLE_HEIGHT,
    colour_scale,
    heatmap_panel,
)


def test_panel_layout_and_hottest_colour_where_the_map_peaks():
    image = torch.rand(3, 20, 30)
    anomaly_map = torch.zeros(20, 30)
    anomaly_map[5, 7] = 2.0
    mask = torch.zeros(1, 20, 30)
    mask[0, 5, 7] = 1
    panel = heatmap_panel(image, image, anomaly_map, mask, vmax=2.0, title="crack/000.png")
    k = 13  # the smallest whole factor that makes 20 px at least PANEL_MIN_TILE
    assert 20 * k >= PANEL_MIN_TILE > 20 * (k - 1)
    assert panel.shape == (PANEL_HEADER + 20 * k, 5 * 30 * k + COLOUR_BAR_WIDTH, 3)
    tiles = panel[PANEL_HEADER:]
    heat = tiles[:, 60 * k : 90 * k].astype(int)
    red, blue = heat[5 * k + k // 2, 7 * k + k // 2], heat[0, 0]
    assert (
        red[0] > 100 and red[2] < 50 and blue[2] > 100 and blue[0] < 50
    )  # jet: hot red, cold blue
    truth = tiles[:, 90 * k : 120 * k]
    assert (truth[5 * k : 6 * k, 7 * k : 8 * k] == 255).all() and truth.sum() == 3 * 255 * k * k
    # The colour bar: hot at the top, cold at the bottom, labelled in map units.
    bar = tiles[:, 5 * 30 * k + 4 : 5 * 30 * k + 18].astype(int)
    assert bar[0, 0, 0] > 100 and bar[-1, 0, 2] > 100 and bar[-1, 0, 0] < 50
    assert (panel[:TITLE_HEIGHT] < 128).any()  # the title is drawn


@pytest.mark.parametrize("size", [64, 128, 300])
def test_tiles_are_at_least_256_px_and_titles_stay_within_them(size):
    image = torch.rand(3, size, size)
    panel = heatmap_panel(image, image, torch.rand(size, size), torch.zeros(1, size, size), 1.0)
    tile = (panel.shape[1] - COLOUR_BAR_WIDTH) // 5
    assert tile >= PANEL_MIN_TILE and tile % size == 0
    strip = panel[TITLE_HEIGHT:PANEL_HEADER]
    for index in range(5):
        # The rightmost columns of each title cell stay white: no title runs into the next.
        assert (strip[:, (index + 1) * tile - 2 : (index + 1) * tile] == 255).all()
        assert (strip[:, index * tile : (index + 1) * tile] < 128).any()  # a title is drawn


def test_colour_scale_is_a_quantile_of_all_pixels_so_one_outlier_cannot_set_it():
    maps = [torch.arange(1000.0).reshape(10, 100), torch.arange(1000.0, 2000.0).reshape(10, 100)]
    # 2000 values 0..1999: the 0.999 quantile is the 1998th smallest, 1997.
    assert colour_scale(maps) == 1997.0
    assert colour_scale(maps, quantile=0.5) == 999.0
    spiked = [torch.zeros(50, 40), torch.ones(50, 40)]
    spiked[0][3, 4] = 1e6
    assert colour_scale(spiked) == 1.0
    assert colour_scale([]) == 1.0 and colour_scale([torch.empty(0)]) == 1.0


def test_undefined_metrics_are_written_as_null():
    from types import SimpleNamespace

    from anomaly.callbacks import TestResultsWriter

    module = SimpleNamespace(
        name="m",
        test_results={
            "image_auroc": float("nan"),
            "pixel_auroc": 0.5,
            "per_defect": {"crack": float("nan"), "poke": 0.75},
        },
    )
    trainer = SimpleNamespace(datamodule=SimpleNamespace(category="c", image_size=32))
    record = TestResultsWriter.metrics_record(trainer, module, 3)
    assert record["image_auroc"] is None and record["pixel_auroc"] == 0.5
    assert record["per_defect"] == {"crack": None, "poke": 0.75}
    assert record["num_test_images"] == 3 and record["model"] == "m"
