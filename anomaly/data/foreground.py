"""Where the inspected object is in a normal image, so that synthetic anomalies can fall on it.

Real defects of an object category lie on the object (a capsule's print and edges, a bottle's
rim); synthetic anomalies drawn anywhere fall mostly on the background, where any score finds
them. The object is told from the background by its colour: the background is what the image's
border shows (MVTec AD photographs objects against a plain backdrop), and the object is every
pixel that differs from the border's median colour by clearly more than the border itself
varies. Where no such object stands out (textures, a border crossed by the object), the whole
image counts as foreground.
"""

from __future__ import annotations

import cv2
import numpy as np

# The border is this fraction of the shorter side, all around.
BORDER_FRACTION = 0.04
# A pixel is foreground when its colour differs from the border's median by more than this many
# times the border's own spread (its 95th percentile distance), and by at least MIN_CONTRAST.
SPREAD_FACTOR = 2.0
MIN_CONTRAST = 0.08
# Below this foreground fraction nothing stands out: the whole image is used.
MIN_FOREGROUND = 0.02


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """The pixels of the object in a float32 (H, W, 3) image in [0, 1], as a bool (H, W) array.

    All True when no object stands out from the border (see the module docstring).
    """
    height, width = image.shape[:2]
    everywhere = np.ones((height, width), bool)
    border = max(1, round(BORDER_FRACTION * min(height, width)))
    if 2 * border >= min(height, width):
        return everywhere
    smooth = cv2.GaussianBlur(image, (0, 0), max(1.0, min(height, width) / 64))
    frame = np.concatenate(
        [
            smooth[:border].reshape(-1, 3),
            smooth[-border:].reshape(-1, 3),
            smooth[border:-border, :border].reshape(-1, 3),
            smooth[border:-border, -border:].reshape(-1, 3),
        ]
    )
    background = np.median(frame, axis=0)
    frame_spread = np.quantile(np.abs(frame - background).max(axis=1), 0.95)
    distance = np.abs(smooth - background).max(axis=2)
    mask = distance > max(SPREAD_FACTOR * frame_spread, MIN_CONTRAST)
    return mask if mask.mean() >= MIN_FOREGROUND else everywhere
