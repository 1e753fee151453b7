"""Aspect-ratio buckets: a fixed set of (height, width) training sizes of about equal pixel area.

Each sample goes to the bucket nearest its aspect ratio, is resized to cover it and cropped to
it (image and condition alike, see :func:`bucket_transform`), and every batch holds samples of one
bucket only. SDXL was trained this way; SD1.x/2.x fine-tunes (NovelAI, kohya's sd-scripts) too.

Sizes are (height, width) in pixels, multiples of ``divisor`` (64 by default: the UNet halves
the latent grid three times, the VAE divides by 8).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np

from cn_lightning.data.transforms import crop_box, resize_to_cover
from cn_lightning.errors import DataError

Bucket = tuple[int, int]  # (height, width) in pixels


def make_buckets(resolution: int, divisor: int = 64, max_aspect: float = 2.5) -> list[Bucket]:
    """Buckets of area at most ``resolution``² (and within one ``divisor`` step of it), sides
    multiples of ``divisor``, aspect ratios from 1/``max_aspect`` to ``max_aspect``.

    At 1024 this gives SDXL's familiar sizes: 1024x1024, 896x1152, 832x1216, 768x1344, 640x1536
    and their transposes (among others in between). Sorted by aspect ratio (width / height).
    """
    if resolution % divisor:
        raise DataError(f"data.resolution {resolution} is not a multiple of {divisor}")
    area = resolution * resolution
    found: set[Bucket] = set()
    width = divisor
    while width <= resolution * max_aspect:
        height = (area // width) // divisor * divisor
        if height >= divisor and max(width / height, height / width) <= max_aspect:
            found.update({(height, width), (width, height)})
        width += divisor
    return sorted(found, key=lambda hw: hw[1] / hw[0])


def parse_buckets(
    spec: str | Sequence[Sequence[int]] | None,
    resolution: int,
    divisor: int = 64,
    max_aspect: float = 2.5,
) -> list[Bucket] | None:
    """``data.buckets`` → the bucket list, or None for square ``resolution`` crops.

    ``spec``: ``None``/``"none"`` (square crops), ``"auto"`` (:func:`make_buckets`), or a list
    of ``[height, width]`` pairs.
    """
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "null", "")):
        return None
    if isinstance(spec, str):
        if spec.lower() != "auto":
            raise DataError(
                f"data.buckets={spec!r}: expected null, 'auto' or a list of [height, width] pairs"
            )
        return make_buckets(resolution, divisor, max_aspect)
    buckets: list[Bucket] = []
    for item in spec:
        pair = list(item) if isinstance(item, Sequence) and not isinstance(item, str) else None
        if pair is None or len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
            raise DataError(f"data.buckets: {item!r} is not a [height, width] pair of pixels")
        if pair[0] % divisor or pair[1] % divisor:
            raise DataError(
                f"data.buckets: {pair[0]}x{pair[1]} is not a multiple of "
                f"data.bucket_divisor={divisor}"
            )
        buckets.append((pair[0], pair[1]))
    if not buckets:
        raise DataError("data.buckets is an empty list")
    return sorted(dict.fromkeys(buckets), key=lambda hw: hw[1] / hw[0])


def nearest_bucket(height: int, width: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest (in log ratio) to ``width / height``; ties go to
    the first in the list."""
    log_ratio = math.log(width / height)
    return min(buckets, key=lambda hw: abs(math.log(hw[1] / hw[0]) - log_ratio))


def bucket_transform(
    image: np.ndarray,
    condition: np.ndarray,
    bucket: Bucket,
    crop: str = "center",
    flip: bool = False,
    rng: random.Random | None = None,
    discrete_condition: bool = False,
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Resize both to cover ``bucket``, take the same crop (and flip) of each.

    Args:
        image: uint8 (H, W, 3).
        condition: uint8 (H, W[, C]) of the same H, W (the caller checks).
        bucket: (height, width) of the result.
        crop: ``center`` or ``random`` (uniform over the valid offsets).
        flip: flip both horizontally with probability 0.5 (needs ``rng``).
        discrete_condition: resize the condition with nearest neighbour (label maps).

    Returns:
        ``(image, condition, crop_top_left)``: both (bh, bw, ...) uint8, and the crop's (top,
        left) in the resized image. After a flip ``left`` is measured in the flipped image, as
        diffusers' SDXL training scripts do (they flip before cropping).
    """
    bh, bw = bucket
    image = resize_to_cover(image, bh, bw)
    condition = resize_to_cover(condition, bh, bw, discrete_condition)
    h, w = image.shape[:2]
    y, x = crop_box(h, w, (bh, bw), crop, rng)
    image = image[y : y + bh, x : x + bw]
    condition = condition[y : y + bh, x : x + bw]
    if flip and rng is not None and rng.random() < 0.5:
        image, condition = image[:, ::-1], condition[:, ::-1]
        x = w - x - bw
    return image, condition, (y, x)
