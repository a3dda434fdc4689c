"""Anomaly detection metrics: exact AUROC, F1-max and AUPRO, and their torchmetrics objects."""

from anomaly.metrics.functional import aupro, auroc, f1_max, pixel_metrics, roc_curve
from anomaly.metrics.stateful import AUROC, F1Max, PerGroupAUROC, PixelMetrics

__all__ = [
    "AUROC",
    "METRIC_KEYS",
    "F1Max",
    "PerGroupAUROC",
    "PixelMetrics",
    "aupro",
    "auroc",
    "f1_max",
    "pixel_metrics",
    "roc_curve",
]

# The test metrics of a run, in the order metrics.json, the console table and reports show them.
METRIC_KEYS = ("image_auroc", "pixel_auroc", "pixel_aupro", "image_f1_max", "pixel_f1_max")
