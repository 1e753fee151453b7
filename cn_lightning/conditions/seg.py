"""ADE20K segmentation maps in the colour code ControlNet's segmentation model expects.

The palette is the standard 150-class ADE20K palette (mmsegmentation / UniFormer, RGB order),
used by the original ``control_sd15_seg`` annotator. Class index ``k`` (0-based over the 150
classes) is drawn with ``ADE20K_PALETTE[k]``; pixels with no class are black.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

import numpy as np

from cn_lightning.conditions.registry import as_uint8_rgb, register_extractor

# fmt: off
ADE20K_PALETTE: np.ndarray = np.array([
    [120, 120, 120], [180, 120, 120], [6, 230, 230], [80, 50, 50], [4, 200, 3], [120, 120, 80],
    [140, 140, 140], [204, 5, 255], [230, 230, 230], [4, 250, 7], [224, 5, 255], [235, 255, 7],
    [150, 5, 61], [120, 120, 70], [8, 255, 51], [255, 6, 82], [143, 255, 140], [204, 255, 4],
    [255, 51, 7], [204, 70, 3], [0, 102, 200], [61, 230, 250], [255, 6, 51], [11, 102, 255],
    [255, 7, 71], [255, 9, 224], [9, 7, 230], [220, 220, 220], [255, 9, 92], [112, 9, 255],
    [8, 255, 214], [7, 255, 224], [255, 184, 6], [10, 255, 71], [255, 41, 10], [7, 255, 255],
    [224, 255, 8], [102, 8, 255], [255, 61, 6], [255, 194, 7], [255, 122, 8], [0, 255, 20],
    [255, 8, 41], [255, 5, 153], [6, 51, 255], [235, 12, 255], [160, 150, 20], [0, 163, 255],
    [140, 140, 140], [250, 10, 15], [20, 255, 0], [31, 255, 0], [255, 31, 0], [255, 224, 0],
    [153, 255, 0], [0, 0, 255], [255, 71, 0], [0, 235, 255], [0, 173, 255], [31, 0, 255],
    [11, 200, 200], [255, 82, 0], [0, 255, 245], [0, 61, 255], [0, 255, 112], [0, 255, 133],
    [255, 0, 0], [255, 163, 0], [255, 102, 0], [194, 255, 0], [0, 143, 255], [51, 255, 0],
    [0, 82, 255], [0, 255, 41], [0, 255, 173], [10, 0, 255], [173, 255, 0], [0, 255, 153],
    [255, 92, 0], [255, 0, 255], [255, 0, 245], [255, 0, 102], [255, 173, 0], [255, 0, 20],
    [255, 184, 184], [0, 31, 255], [0, 255, 61], [0, 71, 255], [255, 0, 204], [0, 255, 194],
    [0, 255, 82], [0, 10, 255], [0, 112, 255], [51, 0, 255], [0, 194, 255], [0, 122, 255],
    [0, 255, 163], [255, 153, 0], [0, 255, 10], [255, 112, 0], [143, 255, 0], [82, 0, 255],
    [163, 255, 0], [255, 235, 0], [8, 184, 170], [133, 0, 255], [0, 255, 92], [184, 0, 255],
    [255, 0, 31], [0, 184, 255], [0, 214, 255], [255, 0, 112], [92, 255, 0], [0, 224, 255],
    [112, 224, 255], [70, 184, 160], [163, 0, 255], [153, 0, 255], [71, 255, 0], [255, 0, 163],
    [255, 204, 0], [255, 0, 143], [0, 255, 235], [133, 255, 0], [255, 0, 235], [245, 0, 255],
    [255, 0, 122], [255, 245, 0], [10, 190, 212], [214, 255, 0], [0, 204, 255], [20, 0, 255],
    [255, 255, 0], [0, 153, 255], [0, 41, 255], [0, 255, 204], [41, 0, 255], [41, 255, 0],
    [173, 0, 255], [0, 245, 255], [71, 0, 255], [122, 0, 255], [0, 255, 184], [0, 92, 255],
    [184, 255, 0], [0, 133, 255], [255, 214, 0], [25, 194, 194], [102, 255, 0], [92, 0, 255],
], dtype=np.uint8)

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug",
    "field", "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub",
    "railing", "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter",
    "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs",
    "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar",
    "arcade machine", "hovel", "bus", "towel", "light", "truck", "tower", "chandelier",
    "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer",
    "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave",
    "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood",
    "sconce", "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate",
    "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)
# fmt: on

assert ADE20K_PALETTE.shape == (150, 3) and len(ADE20K_CLASSES) == 150

IGNORE_INDEX = -1
_BLACK = np.zeros(3, dtype=np.uint8)


def colorize(labels: np.ndarray, palette: np.ndarray = ADE20K_PALETTE) -> np.ndarray:
    """Class indices (H,W) int, 0-based, negative = no class → uint8 RGB (H,W,3) colour map."""
    lut = np.concatenate([palette.astype(np.uint8), _BLACK[None]], axis=0)
    idx = np.where((labels >= 0) & (labels < len(palette)), labels, len(palette))
    return lut[idx]


def ade_annotation_to_labels(annotation: np.ndarray) -> np.ndarray:
    """ADE20K scene-parsing annotation PNG values (0 = other, 1..150 = class) → 0-based labels
    with ``IGNORE_INDEX`` for 0, as int16 (H,W)."""
    return annotation.astype(np.int16) - 1


def decode_colors(seg: np.ndarray, palette: np.ndarray = ADE20K_PALETTE) -> np.ndarray:
    """Inverse of :func:`colorize` by nearest palette colour: uint8 (H,W,3) → int64 (H,W)
    labels, ``IGNORE_INDEX`` where the nearest colour is black. Tolerates JPEG-like noise.

    The palette is not injective (classes 6 "road" and 48 "skyscraper" share (140,140,140)),
    so shared colours decode to the lower index; ``colorize(decode_colors(m)) == m`` holds."""
    lut = np.concatenate([palette.astype(np.int32), _BLACK[None].astype(np.int32)], axis=0)
    flat = seg.reshape(-1, 3).astype(np.int32)
    # Exact colours first (the common case), nearest-colour search only for the rest.
    codes = (lut[:, 0] << 16) | (lut[:, 1] << 8) | lut[:, 2]
    flat_codes = (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    order = np.argsort(codes)
    pos = np.clip(np.searchsorted(codes[order], flat_codes), 0, len(codes) - 1)
    hit = codes[order][pos] == flat_codes
    out = np.where(hit, order[pos], 0).astype(np.int64)
    if not hit.all():
        miss = flat[~hit]
        dist = ((miss[:, None, :] - lut[None, :, :]) ** 2).sum(-1)
        out[~hit] = dist.argmin(1)
    out[out == len(palette)] = IGNORE_INDEX
    return out.reshape(seg.shape[:2])


def class_names_present(
    labels: np.ndarray, max_names: int = 6, min_fraction: float = 0.01
) -> list[str]:
    """Class names covering at least ``min_fraction`` of the pixels, largest area first."""
    valid = labels[(labels >= 0) & (labels < len(ADE20K_CLASSES))]
    if valid.size == 0:
        return []
    counts = np.bincount(valid.ravel(), minlength=len(ADE20K_CLASSES))
    order = np.argsort(-counts, kind="stable")
    total = labels.size
    return [ADE20K_CLASSES[i] for i in order[:max_names] if counts[i] / total >= min_fraction]


def _load_callable(path: str) -> Callable:
    module, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"predictor must look like 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module), attr)


@register_extractor("seg", discrete=True)
class SegmentationExtractor:
    """ADE20K colour-coded segmentation from a pluggable local model.

    ``predictor`` is ``"package.module:function"`` naming a function (or factory returning one
    when ``factory=True``) that maps uint8 RGB (H,W,3) to int (H,W) 0-based ADE20K class indices,
    e.g. a UperNet/SegFormer loaded from local weights. The output is the palette map (H,W,3).
    """

    def __init__(self, predictor: str, factory: bool = False, **predictor_options):
        fn = _load_callable(predictor)
        self.predict = fn(**predictor_options) if factory else fn

    def __call__(self, image: np.ndarray) -> np.ndarray:
        labels = np.asarray(self.predict(as_uint8_rgb(image)))
        return colorize(labels)
