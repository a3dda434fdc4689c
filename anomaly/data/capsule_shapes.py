"""The synthetic capsule's shape, printed marking and defects, in object units.

The image spans [-1, 1] on both axes (x right, y down); the capsule is a stadium of half-length
HALF_LEN swept by RADIUS. `draw_defect` draws the random parameters of one defect, which
`anomaly.data.capsule` renders.
"""

import numpy as np

DEFECT_TYPES = ("crack", "faulty_imprint", "poke", "scratch", "squeeze")

# Capsule geometry in object units: a stadium (segment of half-length HALF_LEN swept by RADIUS).
HALF_LEN = 0.56
RADIUS = 0.23
SEAM_X = -0.04


def _seven_segment_strokes() -> np.ndarray:
    """The printed marking "500" as line segments (x0, y0, x1, y1) in object units."""
    # Segment endpoints of a unit digit cell (x in [0, 1], y in [0, 2], y down).
    cell = {
        "a": (0, 0, 1, 0),
        "b": (1, 0, 1, 1),
        "c": (1, 1, 1, 2),
        "d": (0, 2, 1, 2),
        "e": (0, 1, 0, 2),
        "f": (0, 0, 0, 1),
        "g": (0, 1, 1, 1),
    }
    digits = {"5": "afgcd", "0": "abcdef"}
    width, height, pitch, left = 0.085, 0.17, 0.14, 0.16
    strokes = []
    for k, digit in enumerate("500"):
        for name in digits[digit]:
            x0, y0, x1, y1 = cell[name]
            ox, half = left + k * pitch, height / 2
            strokes.append((ox + x0 * width, (y0 - 1) * half, ox + x1 * width, (y1 - 1) * half))
    return np.array(strokes, dtype=np.float64)


MARK_STROKES = _seven_segment_strokes()
MARK_HALF_WIDTH = 0.013


def stroke_coverage(
    x: np.ndarray, y: np.ndarray, segments: np.ndarray, half_width: float, pixel: float
) -> np.ndarray:
    """Anti-aliased coverage of round-capped line segments of the given half-width.

    Args:
        x: Point x coordinates, shape (H, W).
        y: Point y coordinates, shape (H, W).
        segments: Segments as rows (x0, y0, x1, y1), shape (S, 4); may be empty.
        half_width: Half the stroke width, object units.
        pixel: Pixel width, object units.

    Returns:
        Coverage in [0, 1], shape (H, W).
    """
    coverage = np.zeros(x.shape)
    if len(segments) == 0:
        return coverage
    # Only points near the strokes' bounding box can be covered; skipping the rest saves most work.
    reach = half_width + pixel
    near = (
        (x > segments[:, [0, 2]].min() - reach)
        & (x < segments[:, [0, 2]].max() + reach)
        & (y > segments[:, [1, 3]].min() - reach)
        & (y < segments[:, [1, 3]].max() + reach)
    )
    px, py = x[near], y[near]
    best = np.full(px.shape, np.inf)
    for x0, y0, x1, y1 in segments:
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((px - x0) * dx + (py - y0) * dy) / max(dx * dx + dy * dy, 1e-12), 0.0, 1.0)
        best = np.minimum(best, np.hypot(px - x0 - t * dx, py - y0 - t * dy))
    coverage[near] = edge_coverage(best, half_width, pixel)
    return coverage


def edge_coverage(distance: np.ndarray, half_width: float, pixel: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a shape whose boundary is at `half_width`."""
    return np.clip(0.5 - (distance - half_width) / pixel, 0.0, 1.0)


def _polyline(points: np.ndarray) -> np.ndarray:
    """Segments (S, 4) joining consecutive points (S + 1, 2)."""
    return np.concatenate([points[:-1], points[1:]], axis=1)


def _random_body_point(rng: np.random.Generator, margin: float) -> np.ndarray:
    return np.array(
        [rng.uniform(-HALF_LEN + margin, HALF_LEN - margin), rng.uniform(-0.6, 0.6) * RADIUS]
    )


def _random_course(rng: np.random.Generator) -> float:
    # Within 30 degrees of the long axis, so a line of this length stays mostly on the body.
    return float(rng.uniform(-np.pi / 6, np.pi / 6) + rng.choice([0.0, np.pi]))


def draw_defect(rng: np.random.Generator, defect: str, pixel: float) -> dict:
    """Random parameters of one defect in object units; lines stay about a pixel wide or more."""
    if defect == "crack":
        start = _random_body_point(rng, 0.2)
        course = _random_course(rng)
        points = [start]
        for _ in range(int(rng.integers(7, 11))):
            # Sharp turns about a fixed course make the line jagged yet still run across the body.
            heading = course + rng.uniform(-0.9, 0.9)
            step = rng.uniform(0.035, 0.055)
            points.append(points[-1] + step * np.array([np.cos(heading), np.sin(heading)]))
        return {
            "segments": _polyline(np.array(points)),
            "half_width": max(rng.uniform(0.006, 0.01), 0.45 * pixel),
            "darkening": rng.uniform(0.3, 0.45),
        }
    if defect == "faulty_imprint":
        mode = rng.choice(["missing", "extra", "smear"])
        keep = np.ones(len(MARK_STROKES), dtype=bool)
        extra = np.zeros((0, 4))
        offset = np.zeros(2)
        if mode == "missing":
            keep[rng.choice(len(MARK_STROKES), size=int(rng.integers(4, 8)), replace=False)] = False
        elif mode == "extra":
            rows = []
            for _ in range(int(rng.integers(2, 4))):
                a = np.array([rng.uniform(0.1, 0.55), rng.uniform(-0.6, 0.6) * RADIUS])
                angle = rng.uniform(0.0, np.pi)
                b = a + rng.uniform(0.06, 0.1) * np.array([np.cos(angle), np.sin(angle)])
                rows.append(np.concatenate([a, b]))
            extra = np.array(rows)
        else:
            offset = rng.uniform(0.025, 0.04) * np.array([1.0, rng.uniform(-0.6, 0.6)])
        return {"keep": keep, "extra": extra, "smear_offset": offset, "smear_alpha": 0.55}
    if defect == "poke":
        return {
            "center": _random_body_point(rng, 0.1),
            "radius": max(rng.uniform(0.03, 0.05), 1.5 * pixel),
            "bright": rng.uniform(0.12, 0.2),
            "dark": rng.uniform(0.2, 0.3),
        }
    if defect == "scratch":
        start = _random_body_point(rng, 0.2)
        heading = _random_course(rng)
        length = rng.uniform(0.3, 0.45)
        end = start + length * np.array([np.cos(heading), np.sin(heading)])
        bend = rng.uniform(-0.3, 0.3) * length * np.array([-np.sin(heading), np.cos(heading)])
        control = (start + end) / 2 + bend
        t = np.linspace(0.0, 1.0, 12)[:, None]
        curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * control + t**2 * end
        return {
            "segments": _polyline(curve),
            "half_width": max(rng.uniform(0.006, 0.009), 0.45 * pixel),
            "strength": rng.uniform(0.14, 0.22),
        }
    if defect == "squeeze":
        return {
            "x": rng.uniform(-HALF_LEN + 0.12, HALF_LEN - 0.12),
            "side": rng.choice([-1.0, 1.0]),
            "width": rng.uniform(0.05, 0.08),
            "depth": max(rng.uniform(0.025, 0.04), 1.2 * pixel),
        }
    raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECT_TYPES} or None")
