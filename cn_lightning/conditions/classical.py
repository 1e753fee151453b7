"""Classical (model-free) condition extractors: Canny edges and the circle-toy outline."""

from __future__ import annotations

import cv2
import numpy as np

from cn_lightning.conditions.registry import as_uint8_rgb, register_extractor


@register_extractor("canny")
def canny(image: np.ndarray, low_threshold: int = 100, high_threshold: int = 200) -> np.ndarray:
    """Canny edges (the paper's 100/200 thresholds): uint8 RGB (H,W,3) → uint8 (H,W) in {0,255}."""
    grey = cv2.cvtColor(as_uint8_rgb(image), cv2.COLOR_RGB2GRAY)
    return cv2.Canny(grey, low_threshold, high_threshold)


@register_extractor("outline")
def outline(image: np.ndarray, threshold: int = 127) -> np.ndarray:
    """Binarised outline for the synthetic-circles toy: grey > threshold → 255, else 0.

    Input is the outline drawing itself (white strokes on black), (H,W,3) or (H,W) uint8;
    output (H,W) uint8 in {0,255}. Binarising removes resize/JPEG grey levels.
    """
    grey = image if image.ndim == 2 else cv2.cvtColor(as_uint8_rgb(image), cv2.COLOR_RGB2GRAY)
    return np.where(grey > threshold, 255, 0).astype(np.uint8)
