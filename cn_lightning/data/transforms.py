"""Image geometry (resize, crop boxes) and tensor conversion; the paired image/condition
transform built on them is :func:`cn_lightning.data.buckets.bucket_transform`.

All functions work on uint8 numpy arrays (H,W,C) or (H,W); tensors are made at the end:
images in [-1, 1], conditions in [0, 1], both float32 (3,H,W).
"""

from __future__ import annotations

import random

import cv2
import numpy as np
import torch

RESIZE_MODES = ("center_crop", "shorter_side", "none")


def resize_shorter_side(image: np.ndarray, size: int, discrete: bool = False) -> np.ndarray:
    """Resize so the shorter side is ``size`` (aspect kept): :func:`resize_to_cover` of a
    ``size`` x ``size`` square."""
    return resize_to_cover(image, size, size, discrete)


def resize_to_cover(
    image: np.ndarray, height: int, width: int, discrete: bool = False
) -> np.ndarray:
    """Resize (aspect kept) to the smallest size that covers ``height`` x ``width``. Area filter
    when shrinking, bilinear when enlarging, nearest for label-like (``discrete``) maps."""
    h, w = image.shape[:2]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) == (h, w):
        return image
    if discrete:
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_w, new_h), interpolation=interp)


def crop_box(
    h: int, w: int, size: int | tuple[int, int], mode: str, rng: random.Random | None
) -> tuple[int, int]:
    """Top-left (y, x) of a crop of ``size`` (a side, or (height, width)): centred, or uniform
    at random (``mode="random"``)."""
    ch, cw = (size, size) if isinstance(size, int) else size
    if mode == "center":
        return (h - ch) // 2, (w - cw) // 2
    if mode == "random":
        if rng is None:
            raise ValueError("random crop needs an rng")
        return rng.randint(0, h - ch), rng.randint(0, w - cw)
    raise ValueError(f"crop must be 'center' or 'random', got {mode!r}")


def center_crop_resize(image: np.ndarray, size: int, discrete: bool = False) -> np.ndarray:
    """Shorter side to ``size`` then centre crop to size x size."""
    image = resize_shorter_side(image, size, discrete)
    y, x = crop_box(image.shape[0], image.shape[1], size, "center", None)
    return image[y : y + size, x : x + size]


def apply_resize_policy(
    image: np.ndarray, resolution: int | None, mode: str, discrete: bool = False
) -> np.ndarray:
    """The data_prep resize policy: ``center_crop`` (default), ``shorter_side`` or ``none``."""
    if resolution is None or mode == "none":
        return image
    if mode == "center_crop":
        return center_crop_resize(image, resolution, discrete)
    if mode == "shorter_side":
        return resize_shorter_side(image, resolution, discrete)
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 RGB (H,W,3) → float32 (3,H,W) in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float()
    return t / 127.5 - 1.0


def condition_to_tensor(condition: np.ndarray) -> torch.Tensor:
    """uint8 (H,W) or (H,W,C) → float32 (3,H,W) in [0, 1]; one channel is repeated to three."""
    if condition.ndim == 2:
        condition = condition[:, :, None]
    if condition.shape[2] == 1:
        condition = np.repeat(condition, 3, axis=2)
    t = torch.from_numpy(np.ascontiguousarray(condition[:, :, :3])).permute(2, 0, 1).float()
    return t / 255.0
