"""The toy's position conditions: lines through the circle's centre, one per axis.

``xline`` is a vertical line at the circle centre's x, ``yline`` a horizontal one at its y: each
fixes one coordinate of the circle and says nothing about the other (nor about colours or size).
A ControlNet on each, summed, places the circle at both: the toy's test of the paper's
composition by addition (``benchmarks/paper_claims.py --claim compose``). The synthetic circles
of the composition world carry both (``<key>.xline.png``, ``<key>.yline.png``,
:mod:`cn_lightning.data.synthetic`).

The extractors read the centre back from an image as the centroid of its circle: the pixels
whose colour lies far from the background's (the colour statistic of
:mod:`cn_lightning.conditions.colour`). An image that shows no circle gives a black map, so the
fidelity metric (``line_match``, :func:`cn_lightning.metrics.fidelity.line_scores`) scores it 0.
"""

from __future__ import annotations

import numpy as np

from cn_lightning.conditions.colour import MIN_DISTANCE, image_colours
from cn_lightning.conditions.registry import as_uint8_rgb, register_extractor

# The line's width in pixels at 32 px (it scales with the image, at least 2).
LINE_WIDTH_32 = 2
# A pixel belongs to the circle when its colour is at least this share of the largest distance
# from the background (and MIN_DISTANCE): half-way, so the VAE-blurred rim splits evenly.
CIRCLE_SHARE = 0.5
AXES = ("xline", "yline")


def line_width(size: int) -> int:
    return max(LINE_WIDTH_32, round(LINE_WIDTH_32 * size / 32))


def centre_line(position: float | None, height: int, width: int, axis: str) -> np.ndarray:
    """A line map, uint8 RGB (H, W, 3): white on black, :func:`line_width` px wide, centred on
    ``position`` (pixels, along x for ``xline``, y for ``yline``); all black for ``None``."""
    if axis not in AXES:
        raise ValueError(f"axis must be one of {', '.join(AXES)}, got {axis!r}")
    out = np.zeros((height, width, 3), np.uint8)
    if position is None or not np.isfinite(position):
        return out
    length = width if axis == "xline" else height
    w = line_width(length)
    # The pixels whose centres lie within w / 2 of ``position`` (pixel i's centre is at i).
    start = int(np.clip(np.floor(position - w / 2 + 0.5), 0, length - w))
    if axis == "xline":
        out[:, start : start + w] = 255
    else:
        out[start : start + w, :] = 255
    return out


def circle_centre(image: np.ndarray) -> tuple[float, float] | None:
    """``(x, y)`` of the circle in a uint8 RGB image (H, W, 3): the centroid of the pixels far
    from the background colour (see :data:`CIRCLE_SHARE`); ``None`` when it shows no circle."""
    img = np.asarray(image, dtype=np.float32)
    bg, fg = image_colours(img)
    if np.isnan(fg).any():
        return None
    dist = np.linalg.norm(img - bg, axis=-1)
    ys, xs = np.nonzero(dist >= max(MIN_DISTANCE, CIRCLE_SHARE * dist.max()))
    if len(xs) < 4:
        return None
    return float(xs.mean()), float(ys.mean())


def line_position(line_map: np.ndarray, axis: str) -> float | None:
    """Where a line map's line lies (pixels along its axis), or ``None`` when it has none."""
    grey = np.asarray(line_map, dtype=np.float32)
    if grey.ndim == 3:
        grey = grey.mean(-1)
    profile = grey.mean(axis=0 if axis == "xline" else 1)
    on = profile >= 127.5
    if not on.any():
        return None
    # The inverse of centre_line: exact for a line drawn at a whole pixel.
    return float(np.nonzero(on)[0].mean() + 0.5)


def _extract(image: np.ndarray, axis: str) -> np.ndarray:
    rgb = as_uint8_rgb(image)
    centre = circle_centre(rgb)
    position = None if centre is None else centre[0] if axis == "xline" else centre[1]
    return centre_line(position, *rgb.shape[:2], axis)


@register_extractor("xline")
def xline(image: np.ndarray) -> np.ndarray:
    """The vertical line through the image's circle centre, uint8 RGB (H, W, 3)."""
    return _extract(image, "xline")


@register_extractor("yline")
def yline(image: np.ndarray) -> np.ndarray:
    """The horizontal line through the image's circle centre, uint8 RGB (H, W, 3)."""
    return _extract(image, "yline")


__all__ = ["centre_line", "circle_centre", "line_position", "line_width", "xline", "yline"]
