"""Unsupervised anomaly detection and localization in industrial images."""
