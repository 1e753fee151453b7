"""Colours of the synthetic-circles toy: its palette, the colour statistic and the swatch condition.

The toy backbone draws "<colour A> circle with <colour B> background" (:data:`COLOURS`, CSS names
as in the fill50k prompts). :func:`colour_statistics` reads back the background and circle
colours of images, the statistic ``tests/test_toy.py`` checks the backbone with, and
:func:`nearest_colour_names` names them against a palette.

The **swatch** condition (the toy's second condition, for composing two ControlNets) is an image
filled with the circle's colour: the circle's colour is set by the condition instead of the
prompt. Its extractor, :func:`swatch`, reads the circle colour of an image the same way and
returns it as a swatch, so the condition-fidelity metric can extract it back from a sample
(:func:`cn_lightning.metrics.fidelity.swatch_scores`).
"""

from __future__ import annotations

import numpy as np

from cn_lightning.conditions.registry import as_uint8_rgb, register_extractor

# Named colours (CSS names, RGB) as in the fill50k prompts: the toy world's palette.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "pink": (255, 192, 203),
    "brown": (165, 42, 42),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "navy": (0, 0, 128),
    "teal": (0, 128, 128),
    "olive": (128, 128, 0),
    "maroon": (128, 0, 0),
    "lime": (0, 255, 0),
    "light coral": (240, 128, 128),
    "cornflower blue": (100, 149, 237),
    "dark slate blue": (72, 61, 139),
    "gold": (255, 215, 0),
    "salmon": (250, 128, 114),
    "turquoise": (64, 224, 208),
    "violet": (238, 130, 238),
    "beige": (245, 245, 220),
    "khaki": (240, 230, 140),
    "lavender": (230, 230, 250),
    "dark green": (0, 100, 0),
    "sky blue": (135, 206, 235),
    "chocolate": (210, 105, 30),
    "indigo": (75, 0, 130),
}
# The colour statistic's defaults: the circle's core is the pixels at least CORE x the largest
# distance from the background, and at least MIN_DISTANCE (RGB, 0-255) from it.
CORE = 0.7
MIN_DISTANCE = 60.0


def image_colours(
    image: np.ndarray, core: float = CORE, min_distance: float = MIN_DISTANCE
) -> tuple[np.ndarray, np.ndarray]:
    """``(background, circle)`` colours of one image, float RGB (H, W, 3) in [0, 255].

    The background is the median of the border pixels; the circle's colour the median of its
    core: the pixels whose distance from the background is at least ``core`` x the largest (the
    VAE blurs the rim into the background). No pixel ``min_distance`` away, or fewer than 4 in
    the core: no circle (NaN).
    """
    img = np.asarray(image, dtype=np.float32)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    bg = np.median(border, axis=0)
    dist = np.linalg.norm(img - bg, axis=-1)
    fg_pixels = img[dist >= max(min_distance, core * dist.max())]
    fg = np.median(fg_pixels, axis=0) if len(fg_pixels) >= 4 else np.full(3, np.nan)
    return bg, fg


def colour_statistics(
    images, core: float = CORE, min_distance: float = MIN_DISTANCE
) -> tuple[np.ndarray, np.ndarray]:
    """Background and foreground (circle) colour of each image, RGB in [0, 255], (B, 3) each.

    Images: (B, 3, H, W) tensor in [0, 1]. See :func:`image_colours`; NaN rows: no circle.
    """
    arr = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).astype(np.float32)
    pairs = [image_colours(img, core, min_distance) for img in arr]
    return np.stack([bg for bg, _ in pairs]), np.stack([fg for _, fg in pairs])


def nearest_colour_names(
    rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]
) -> list[str | None]:
    """Name of the nearest palette colour for each RGB row (None for NaN rows)."""
    names = list(palette)
    colours = np.array([palette[n] for n in names], dtype=np.float32)
    out: list[str | None] = []
    for row in np.asarray(rgb, dtype=np.float32).reshape(-1, 3):
        if np.isnan(row).any():
            out.append(None)
        else:
            out.append(names[int(np.argmin(np.linalg.norm(colours - row, axis=1)))])
    return out


def swatch_image(colour: tuple[int, int, int] | np.ndarray, height: int, width: int) -> np.ndarray:
    """A swatch: uint8 RGB (H, W, 3) filled with ``colour``."""
    out = np.empty((height, width, 3), np.uint8)
    out[:] = np.clip(np.round(np.asarray(colour, dtype=np.float64)), 0, 255).astype(np.uint8)
    return out


@register_extractor("swatch")
def swatch(image: np.ndarray) -> np.ndarray:
    """The circle's colour as a swatch: uint8 RGB (H, W, 3) → uint8 (H, W, 3), every pixel the
    colour of the image's circle (:func:`image_colours`), or of its background when it shows
    no circle (a flat image)."""
    rgb = as_uint8_rgb(image)
    bg, fg = image_colours(rgb)
    colour = bg if np.isnan(fg).any() else fg
    return swatch_image(colour, *rgb.shape[:2])


__all__ = [
    "COLOURS",
    "colour_statistics",
    "image_colours",
    "nearest_colour_names",
    "swatch",
    "swatch_image",
]
