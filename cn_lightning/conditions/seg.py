"""ADE20K segmentation maps in the colour code ControlNet's segmentation model expects.

The palette is the standard 150-class ADE20K palette (mmsegmentation / UniFormer, RGB order),
used by the original ``control_sd15_seg`` annotator. Class index ``k`` (0-based over the 150
classes) is drawn with ``ADE20K_PALETTE[k]``; pixels with no class are black.

The ``seg`` extractor runs an ADE20K transformers segmenter (SegFormer, UperNet, ...) from a
local folder, batched on the device, or any local model through a ``predictor`` plug-in.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cn_lightning.conditions.base import ModelExtractor, seeded
from cn_lightning.conditions.hf_vision import TorchPreprocessor, load_pretrained, resize_maps
from cn_lightning.conditions.registry import register_extractor
from cn_lightning.errors import ConfigError

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
        raise ConfigError(f"predictor must look like 'package.module:function', got {path!r}")
    return getattr(importlib.import_module(module), attr)


SEG_WEIGHTS = (
    "a local folder of an ADE20K (150 classes) transformers segmenter from huggingface.co, e.g. "
    "nvidia/segformer-b5-finetuned-ade-640-640, nvidia/segformer-b0-finetuned-ade-512-512 or "
    "openmmlab/upernet-convnext-small: config.json, weights, preprocessor_config.json; or "
    "predictor='package.module:function'"
)

# Spot checks that a 150-label model counts its classes in ADE20K's order (as the hub's
# ADE20K SegFormer/UperNet models do); generic names ("LABEL_0") are accepted.
_ADE_NAME_CHECKS = {0: "wall", 2: "sky", 12: "person"}


def check_ade20k_labels(name: str, config: Any, folder: Path) -> None:
    """One-line :class:`ConfigError` unless ``config`` has ADE20K's 150 labels in its order."""
    num_labels = int(getattr(config, "num_labels", 0))
    if num_labels != len(ADE20K_CLASSES):
        raise ConfigError(
            f"condition extractor {name!r}: {str(folder)!r} predicts {num_labels} classes; the "
            f"ADE20K palette needs a model with {len(ADE20K_CLASSES)} labels (an ADE20K model)"
        )
    id2label = getattr(config, "id2label", None) or {}
    for index, expected in _ADE_NAME_CHECKS.items():
        label = str(id2label.get(index, id2label.get(str(index), ""))).strip().lower()
        if label and not label.startswith("label_") and not label.startswith(expected):
            raise ConfigError(
                f"condition extractor {name!r}: {str(folder)!r} labels class {index} "
                f"{label!r}, ADE20K's is {expected!r} (the classes must be in ADE20K's order)"
            )


@register_extractor("seg", discrete=True)
class SegmentationExtractor(ModelExtractor):
    """ADE20K colour-coded segmentation: uint8 (H, W, 3) in :data:`ADE20K_PALETTE` colours.

    Give exactly one of:

    * ``weights``: a local transformers folder of an ADE20K semantic segmentation model
      (``AutoModelForSemanticSegmentation``: SegFormer, UperNet, ...; 150 labels). Same-sized
      images share one forward pass; the logits are upsampled (bilinear) to the input size and
      the arg-max class coloured with the palette.
    * ``predictor``: ``"package.module:function"`` naming a function (or, with
      ``factory=True``, a factory called with the remaining options that returns one) mapping
      uint8 RGB (H, W, 3) to int (H, W) 0-based ADE20K class indices (negative = no class),
      for any other local model.

    Args:
        weights, device, batch_size: as :class:`~cn_lightning.conditions.base.ModelExtractor`.
        predictor, factory, **predictor_options: the plug-in alternative to ``weights``.
    """

    expected_weights = SEG_WEIGHTS

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        predictor: str | None = None,
        factory: bool = False,
        **predictor_options: Any,
    ) -> None:
        if predictor is None:
            if factory or predictor_options:
                raise ConfigError(
                    f"condition extractor {self.name!r}: factory/predictor options "
                    f"{sorted(predictor_options) or ['factory']} need predictor="
                )
            self.predictor = None
            super().__init__(weights=weights, device=device, batch_size=batch_size)
            return
        if weights is not None and str(weights) != "":
            raise ConfigError(
                f"condition extractor {self.name!r}: give weights= or predictor=, not both"
            )
        # A plug-in predictor: no network of ours, images are mapped one by one.
        fn = _load_callable(predictor)
        self.predictor = fn(**predictor_options) if factory else fn
        self.weights = None
        self.device = torch.device("cpu")
        self.batch_size = max(1, int(batch_size))
        self.model = None

    def load(self, weights: Path) -> Any:
        model, processor = load_pretrained(
            self.name, weights, "AutoModelForSemanticSegmentation", self.expected_weights
        )
        check_ade20k_labels(self.name, model.config, weights)
        self.preprocess = TorchPreprocessor(processor, self.name)
        return model

    def predict_labels(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB → int64 (B, H, W) 0-based ADE20K class indices."""
        if self.predictor is not None:
            return np.stack([np.asarray(self.predictor(image)) for image in images])
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        pixels = self.preprocess(batch.permute(0, 3, 1, 2))
        dtype = next(self.model.parameters()).dtype
        logits = self.model(pixel_values=pixels.to(dtype)).logits.float()
        # As transformers' post_process_semantic_segmentation: bilinear to the image, arg-max.
        logits = resize_maps(logits, images.shape[1:3], "bilinear")
        return logits.argmax(1).cpu().numpy()

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.stack([colorize(labels) for labels in self.predict_labels(images)])

    @classmethod
    def write_random_weights(cls, out_dir: str | os.PathLike, seed: int = 0) -> str:
        """A small SegFormer (b0 layout, narrower) with 150 ADE20K labels and random weights,
        with SegFormer's ADE20K image processor (512 px), saved as a hub folder would be."""
        from transformers import (
            SegformerConfig,
            SegformerForSemanticSegmentation,
            SegformerImageProcessor,
        )

        config = SegformerConfig(
            num_channels=3,
            num_encoder_blocks=4,
            depths=[1, 1, 1, 1],
            sr_ratios=[8, 4, 2, 1],
            hidden_sizes=[8, 16, 24, 32],
            num_attention_heads=[1, 1, 1, 1],
            decoder_hidden_size=32,
            num_labels=len(ADE20K_CLASSES),
            id2label=dict(enumerate(ADE20K_CLASSES)),
            label2id={label: i for i, label in enumerate(ADE20K_CLASSES)},
        )
        with seeded(seed):
            model = SegformerForSemanticSegmentation(config).eval()
        model.save_pretrained(out_dir)
        SegformerImageProcessor(
            size={"height": 512, "width": 512},
            resample=2,
            do_reduce_labels=True,
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ).save_pretrained(out_dir)
        return os.fspath(out_dir)
