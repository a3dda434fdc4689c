"""Heatmap panels: layout and colour scale."""

from __future__ import annotations

import pytest
import torch

from anomaly.visualization import TITLE_HEIGHT, colour_scale, heatmap_panel


def test_panel_layout_and_hottest_colour_where_the_map_peaks():
    image = torch.rand(3, 20, 30)
    anomaly_map = torch.zeros(20, 30)
    anomaly_map[5, 7] = 2.0
    mask = torch.zeros(1, 20, 30)
    mask[0, 5, 7] = 1
    panel = heatmap_panel(image, image, anomaly_map, mask, vmax=2.0)
    assert panel.shape == (TITLE_HEIGHT + 20, 5 * 30, 3)
    heat = panel[TITLE_HEIGHT:, 60:90].astype(int)
    red, blue = heat[5, 7], heat[0, 0]
    assert (
        red[0] > 100 and red[2] < 50 and blue[2] > 100 and blue[0] < 50
    )  # jet: hot red, cold blue
    truth = panel[TITLE_HEIGHT:, 90:120]
    assert (truth[5, 7] == 255).all() and truth.sum() == 3 * 255


@pytest.mark.parametrize("size", [64, 128])
def test_titles_stay_within_their_tiles(size):
    image = torch.rand(3, size, size)
    panel = heatmap_panel(image, image, torch.rand(size, size), torch.zeros(1, size, size), 1.0)
    strip = panel[:TITLE_HEIGHT]
    for tile in range(5):
        # The rightmost columns of each title cell stay white: no title runs into the next.
        assert (strip[:, (tile + 1) * size - 2 : (tile + 1) * size] == 255).all()
        assert (strip[:, tile * size : (tile + 1) * size] < 128).any()  # a title is drawn


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
