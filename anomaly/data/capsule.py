"""The synthetic capsule: one procedurally drawn production-line shot, optionally with a defect.

Drawing happens in object coordinates: the image spans [-1, 1] on both axes (x right, y down) and a
pixel is ``2 / size`` wide, so the scene looks the same at every resolution. Edges are soft
signed-distance ramps one pixel wide, which anti-aliases them without supersampling.

Each defective image is rendered twice from the same scene, with and without the defect; its mask is
exactly the set of pixels whose 8-bit values differ between the two.
"""

from dataclasses import dataclass

import numpy as np

from anomaly.data.capsule_shapes import (
    DEFECT_TYPES,
    HALF_LEN,
    MARK_HALF_WIDTH,
    MARK_STROKES,
    RADIUS,
    SEAM_X,
    draw_defect,
    edge_coverage,
    stroke_coverage,
)
from anomaly.errors import ConfigError

__all__ = ["DEFECT_TYPES", "MIN_SIZE", "check_size", "render_pair", "render_sample"]

MIN_SIZE = 16
# Light from above and in front, so the top of the capsule is brighter.
_LIGHT = np.array([0.0, -0.55, 0.84]) / np.linalg.norm([0.0, -0.55, 0.84])
_HALFWAY = (_LIGHT + np.array([0.0, 0.0, 1.0])) / np.linalg.norm(_LIGHT + [0.0, 0.0, 1.0])
# A defect pixel counts as changed only above this colour difference (before noise), about 6/255.
_VISIBLE = 0.025
_MAX_DEFECT_TRIES = 50


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
    alpha = edge_coverage(dist, RADIUS, pixel)[..., None]
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
    ink = stroke_coverage(print_x, print_y, strokes, MARK_HALF_WIDTH, pixel)
    if defect == "faulty_imprint" and np.any(params["smear_offset"]):
        ox, oy = params["smear_offset"]
        ghost = stroke_coverage(print_x - ox, print_y - oy, strokes, MARK_HALF_WIDTH, pixel)
        ink = np.maximum(ink, params["smear_alpha"] * ghost)
    color = color + 0.85 * ink[..., None] * (scene.ink_color - color)

    diffuse = np.clip(nx * _LIGHT[0] + ny * _LIGHT[1] + nz * _LIGHT[2], 0.0, 1.0)
    specular = np.clip(nx * _HALFWAY[0] + ny * _HALFWAY[1] + nz * _HALFWAY[2], 0.0, 1.0) ** 40
    surface = color * (0.35 + 0.7 * diffuse)[..., None] + 0.22 * specular[..., None]

    if defect in ("crack", "scratch"):
        line = stroke_coverage(x, y, params["segments"], params["half_width"], pixel)
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
        params = draw_defect(rng, defect, 2.0 / size)
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
