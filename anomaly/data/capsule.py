"""The synthetic capsule: one procedurally drawn production-line shot, optionally with a defect.

Drawing happens in object coordinates: the image spans [-1, 1] on both axes (x right, y down) and a
pixel is ``2 / size`` wide, so the scene looks the same at every resolution. Edges are soft
signed-distance ramps one pixel wide, which anti-aliases them without supersampling.

Each defective image is rendered twice from the same scene, with and without the defect; its mask is
exactly the set of pixels whose 8-bit values differ between the two.
"""

from dataclasses import dataclass

import numpy as np

from anomaly.errors import ConfigError

DEFECT_TYPES = ("crack", "faulty_imprint", "poke", "scratch", "squeeze")
MIN_SIZE = 16


# Capsule geometry in object units: a stadium (segment of half-length HALF_LEN swept by RADIUS).
HALF_LEN = 0.56
RADIUS = 0.23
SEAM_X = -0.04
# Light from above and in front, so the top of the capsule is brighter.
_LIGHT = np.array([0.0, -0.55, 0.84]) / np.linalg.norm([0.0, -0.55, 0.84])
_HALFWAY = (_LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(_LIGHT + [0.0, 0.0, 1.0])
# A defect pixel counts as changed only above this colour difference (before noise), about 6/255.
_VISIBLE = 0.025
_MAX_DEFECT_TRIES = 50


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
_MARK_HALF_WIDTH = 0.013


@dataclass(frozen=True)
class _Scene:
    """Nuisance parameters of one production-line shot."""

    shift: tuple[float, float]
    print_offset: tuple[float, float]
    angle: float
    gradient: tuple[float, float]
    gain: float
    cream_color: np.ndarray
    brown_color: np.ndarray
    ink_color: np.ndarray
    background: np.ndarray
    noise_sigma: float


def _draw_scene(rng: np.random.Generator) -> _Scene:
    return _Scene(
        shift=(float(rng.uniform(-0.04, 0.04)), float(rng.uniform(-0.04, 0.04))),
        # Print registration and the capsule's roll about its axis move the marking on the body.
        print_offset=(float(rng.uniform(-0.02, 0.02)), float(rng.uniform(-0.03, 0.03))),
        angle=float(np.deg2rad(rng.uniform(-3.0, 3.0))),
        gradient=(float(rng.uniform(-0.06, 0.06)), float(rng.uniform(-0.06, 0.06))),
        gain=float(rng.uniform(0.96, 1.04)),
        cream_color=np.array([0.93, 0.89, 0.80]) + rng.uniform(-0.025, 0.025, 3),
        brown_color=np.array([0.62, 0.25, 0.15]) + rng.uniform(-0.03, 0.03, 3),
        ink_color=np.array([0.95, 0.90, 0.84]) + rng.uniform(-0.02, 0.02, 3),
        background=np.array([0.84, 0.85, 0.85]) + rng.uniform(-0.02, 0.02, 3),
        noise_sigma=float(rng.uniform(0.006, 0.012)),
    )


def _stroke_coverage(
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
    coverage[near] = _coverage(best, half_width, pixel)
    return coverage


def _coverage(distance: np.ndarray, half_width: float, pixel: float) -> np.ndarray:
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


def _draw_defect(rng: np.random.Generator, defect: str, pixel: float) -> dict:
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


def _render(scene: _Scene, size: int, defect: str | None, params: dict | None) -> np.ndarray:
    """Noise-free float render of the scene, optionally with a defect, shape (size, size, 3)."""
    pixel = 2.0 / size
    centers = (np.arange(size) + 0.5) * pixel - 1.0
    image_x, image_y = np.meshgrid(centers, centers)  # (H, W) each
    # Object coordinates: undo the capsule's shift and rotation.
    cos, sin = np.cos(scene.angle), np.sin(scene.angle)
    sx, sy = image_x - scene.shift[0], image_y - scene.shift[1]
    x, y = cos * sx + sin * sy, -sin * sx + cos * sy
    # The contact shadow lies on the table, so a squeeze of the capsule does not bend it.
    shadow_dist = np.hypot(x - np.clip(x, -HALF_LEN, HALF_LEN), y - 0.05)
    shadow = 0.07 * np.clip(1.0 - (shadow_dist - RADIUS) / 0.1, 0.0, 1.0)

    if defect == "squeeze":
        # Scaling |y| up near one spot of one side pulls that side's outline inward by `depth`.
        bump = params["depth"] * np.exp(-0.5 * ((x - params["x"]) / params["width"]) ** 2)
        y = np.where(y * params["side"] > 0, y * RADIUS / (RADIUS - bump), y)

    # Stadium signed distance and the surface normal of a cylinder with hemispherical caps.
    dx = x - np.clip(x, -HALF_LEN, HALF_LEN)
    dist = np.hypot(dx, y)
    alpha = _coverage(dist, RADIUS, pixel)[..., None]
    tilt = np.minimum(dist / RADIUS, 0.999)
    nx, ny = dx / RADIUS, y / RADIUS
    nz = np.sqrt(1.0 - tilt**2)

    brown = np.clip(0.5 + (x - SEAM_X) / pixel, 0.0, 1.0)[..., None]  # the right half
    color = (1 - brown) * scene.cream_color + brown * scene.brown_color
    # The cap overlaps the body at the seam; its edge reads as a faint dark line.
    color = color * (1 - 0.18 * np.exp(-0.5 * ((x - SEAM_X) / (0.8 * pixel)) ** 2))[..., None]

    strokes = MARK_STROKES
    if defect == "faulty_imprint":
        strokes = np.concatenate([MARK_STROKES[params["keep"]], params["extra"]])
    print_x, print_y = x - scene.print_offset[0], y - scene.print_offset[1]
    ink = _stroke_coverage(print_x, print_y, strokes, _MARK_HALF_WIDTH, pixel)
    if defect == "faulty_imprint" and np.any(params["smear_offset"]):
        ox, oy = params["smear_offset"]
        ghost = _stroke_coverage(print_x - ox, print_y - oy, strokes, _MARK_HALF_WIDTH, pixel)
        ink = np.maximum(ink, params["smear_alpha"] * ghost)
    color = color + 0.85 * ink[..., None] * (scene.ink_color - color)

    diffuse = np.clip(nx * _LIGHT[0] + ny * _LIGHT[1] + nz * _LIGHT[2], 0.0, 1.0)
    specular = np.clip(nx * _HALFWAY[0] + ny * _HALFWAY[1] + nz * _HALFWAY[2], 0.0, 1.0) ** 40
    surface = color * (0.35 + 0.7 * diffuse)[..., None] + 0.22 * specular[..., None]

    if defect in ("crack", "scratch"):
        line = _stroke_coverage(x, y, params["segments"], params["half_width"], pixel)
        line = line * (dist < RADIUS - 2 * pixel)  # keep the line on the body, off its rim
        if defect == "crack":
            surface = surface * (1 - params["darkening"] * line)[..., None]
        else:
            # A scratch scatters light: it looks pale on the brown half and grey on the cream one.
            polarity = np.where(surface.mean(axis=-1) > 0.6, -1.0, 1.0)
            surface = surface + (params["strength"] * polarity * line)[..., None]
    elif defect == "poke":
        cx, cy = params["center"]
        rho = np.hypot(x - cx, y - cy) / params["radius"]
        # A dent: a lit centre inside a shadowed rim.
        profile = params["bright"] * np.exp(-0.5 * (rho / 0.5) ** 2) - params["dark"] * np.exp(
            -0.5 * ((rho - 1.0) / 0.3) ** 2
        )
        surface = surface * (1 + profile * (dist < RADIUS - pixel))[..., None]

    background = scene.background * (1 - shadow)[..., None]

    image = alpha * surface + (1 - alpha) * background
    lighting = scene.gain * (1 + scene.gradient[0] * image_x + scene.gradient[1] * image_y)
    return image * lighting[..., None]


def check_size(size: int) -> None:
    """ConfigError unless `size` is an integer number of pixels >= MIN_SIZE."""
    if not isinstance(size, (int, np.integer)) or size < MIN_SIZE:
        raise ConfigError(f"size must be an integer >= {MIN_SIZE}, got {size!r}")


def render_pair(
    rng: np.random.Generator, size: int, defect: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one capsule with a defect and its defect-free twin.

    Both share the scene (pose, colours, lighting) and the sensor noise, so they differ exactly
    where the defect visibly changed the image.

    Args:
        rng: Source of all randomness; its state decides the image.
        size: Height and width in pixels (>= 16).
        defect: One of DEFECT_TYPES, or None for a normal image (then both images are equal).

    Returns:
        The defective image (size, size, 3) uint8, its defect-free twin (size, size, 3) uint8, and
        the mask (size, size) bool, True exactly where the two images differ; non-empty for a
        defect.
    """
    check_size(size)
    if defect is not None and defect not in DEFECT_TYPES:
        raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECT_TYPES} or None")
    scene = _draw_scene(rng)
    normal = _render(scene, size, None, None)
    noise = rng.normal(0.0, scene.noise_sigma, normal.shape)
    twin = np.clip(np.rint((normal + noise) * 255), 0, 255).astype(np.uint8)
    if defect is None:
        return twin, twin.copy(), np.zeros((size, size), dtype=bool)
    for _ in range(_MAX_DEFECT_TRIES):
        params = _draw_defect(rng, defect, 2.0 / size)
        changed = _render(scene, size, defect, params)
        # Changes below the visible level are dropped so the mask holds only what one can see.
        visible = np.abs(changed - normal).max(axis=-1) > _VISIBLE
        mixed = np.where(visible[..., None], changed, normal)
        image = np.clip(np.rint((mixed + noise) * 255), 0, 255).astype(np.uint8)
        mask = np.any(image != twin, axis=-1)
        if mask.any():
            return image, twin, mask
    raise ValueError(f"could not draw a visible {defect!r} defect at size {size}")


def render_sample(
    rng: np.random.Generator, size: int, defect: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render one capsule, optionally with a defect.

    Args:
        rng: Source of all randomness; its state decides the image.
        size: Height and width in pixels (>= 16).
        defect: One of DEFECT_TYPES, or None for a normal image.

    Returns:
        The image (size, size, 3) uint8 and the defect mask (size, size) bool (all False when
        `defect` is None).
    """
    image, _, mask = render_pair(rng, size, defect)
    return image, mask
