"""Monocular depth and normal maps, as the original ControlNet depth and normal conditions.

Both run a transformers depth model from a local folder (``AutoModelForDepthEstimation``):
Depth Anything V2 (``depth-anything/Depth-Anything-V2-Small-hf``, ...) or DPT/MiDaS
(``Intel/dpt-hybrid-midas``, the network of the original ``annotator/midas``). Both predict
relative inverse depth (disparity): large = near.

* ``depth``: the prediction min-max normalised per image to uint8 (H, W), near = bright, as the
  original ControlNet depth maps.
* ``normal``: the original ControlNet "normal from depth" (``annotator/midas``): Sobel gradients of
  the raw prediction as x/y, a constant ``a`` as z, background (normalised depth < ``bg_th``)
  flat, unit vectors mapped to uint8 RGB (H, W, 3) by ``n * 127.5 + 127.5``.

Batches of same-sized images share one forward pass; the preprocessing (resize to the model's
input size, normalise) runs on the device (:class:`~cn_lightning.conditions.hf_vision.
TorchPreprocessor`), matching the model's image processor.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from cn_lightning.conditions.base import ModelExtractor, seeded
from cn_lightning.conditions.hf_vision import TorchPreprocessor, load_pretrained, resize_maps
from cn_lightning.conditions.registry import register_extractor

DEPTH_WEIGHTS = (
    "a local folder of depth-anything/Depth-Anything-V2-Small-hf (or Intel/dpt-hybrid-midas) "
    "from huggingface.co: config.json, model.safetensors, preprocessor_config.json"
)

# Depth Anything V2's published preprocessing (its preprocessor_config.json): 518 px, keep the
# aspect ratio, sides a multiple of the 14 px ViT patch, bicubic, ImageNet mean/std.
_DEPTH_ANYTHING_PROCESSOR = dict(
    do_resize=True,
    size={"height": 518, "width": 518},
    keep_aspect_ratio=True,
    ensure_multiple_of=14,
    resample=3,
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.485, 0.456, 0.406],
    image_std=[0.229, 0.224, 0.225],
    do_pad=False,
)


def normal_from_depth(depth: np.ndarray, a: float = 2 * math.pi, bg_th: float = 0.1) -> np.ndarray:
    """The original ControlNet normal map of a depth prediction (``annotator/midas``).

    Args:
        depth: float (H, W) raw relative inverse depth (disparity, large = near), in the model's
            own units: the gradients are not rescaled, so ``a`` sets how steep a slope looks.
        a: the constant z component before normalisation (2π in the original).
        bg_th: pixels whose min-max normalised depth is below this are background: x = y = 0
            (they face the camera).

    Returns:
        uint8 (H, W, 3): channels (x, y, z) of the unit normal, each ``n * 127.5 + 127.5``
        truncated to uint8; a flat plane is (127, 127, 255). x is the Sobel derivative along
        the columns, y along the rows (3x3 kernels, OpenCV's reflected border).
    """
    depth = np.asarray(depth, dtype=np.float32)
    lo, hi = float(depth.min()), float(depth.max())
    # A constant map has no foreground (the original would divide by zero here).
    norm = (depth - lo) / (hi - lo) if hi > lo else np.zeros_like(depth)
    x = cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3)
    y = cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3)
    z = np.full_like(x, a)
    x[norm < bg_th] = 0
    y[norm < bg_th] = 0
    normal = np.stack([x, y, z], axis=2)
    normal /= np.sum(normal**2.0, axis=2, keepdims=True) ** 0.5
    return (normal * 127.5 + 127.5).clip(0, 255).astype(np.uint8)


def depth_to_uint8(depth: torch.Tensor) -> torch.Tensor:
    """float (B, H, W) → uint8 (B, H, W): min-max per image, truncated like the original
    annotator's ``(d * 255).astype(uint8)``; a constant map is black."""
    flat = depth.flatten(1)
    lo = flat.min(1).values[:, None, None]
    span = (flat.max(1).values[:, None, None] - lo).clamp_min(torch.finfo(depth.dtype).tiny)
    return ((depth - lo) / span * 255.0).clamp(0, 255).to(torch.uint8)


class DepthModelExtractor(ModelExtractor):
    """Shared loading and forward pass of ``depth`` and ``normal`` (a transformers depth model)."""

    expected_weights = DEPTH_WEIGHTS

    def load(self, weights: Path) -> Any:
        model, processor = load_pretrained(
            self.name, weights, "AutoModelForDepthEstimation", self.expected_weights
        )
        self.preprocess = TorchPreprocessor(processor, self.name)
        return model

    def predict_depth(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (B, H, W, 3) RGB → float32 (B, H, W) raw relative inverse depth on the device,
        resized back to the input size (bicubic, as transformers' post-processing)."""
        batch = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        pixels = self.preprocess(batch.permute(0, 3, 1, 2))
        dtype = next(self.model.parameters()).dtype
        depth = self.model(pixel_values=pixels.to(dtype)).predicted_depth.float()
        return resize_maps(depth[:, None], images.shape[1:3], "bicubic")[:, 0]

    @classmethod
    def write_random_weights(cls, out_dir: str | os.PathLike, seed: int = 0) -> str:
        """A tiny Depth Anything (2-layer Dinov2 of width 32, small neck and head) with random
        weights and Depth Anything V2's image processor, saved as a hub folder would be."""
        from transformers import (
            DepthAnythingConfig,
            DepthAnythingForDepthEstimation,
            Dinov2Config,
            DPTImageProcessor,
        )

        backbone = Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            patch_size=14,
            image_size=518,
            out_indices=[1, 2],
            reshape_hidden_states=False,
        )
        config = DepthAnythingConfig(
            backbone_config=backbone,
            patch_size=14,
            reassemble_hidden_size=32,
            reassemble_factors=[2, 0.5],
            neck_hidden_sizes=[16, 32],
            fusion_hidden_size=16,
            head_hidden_size=8,
            # Larger than the default 0.02 so the random network's output is not ~0 everywhere
            # (the head ends with a ReLU): the maps then vary and the tests compare something.
            initializer_range=0.15,
            depth_estimation_type="relative",
        )
        with seeded(seed):
            model = DepthAnythingForDepthEstimation(config).eval()
        model.save_pretrained(out_dir)
        DPTImageProcessor(**_DEPTH_ANYTHING_PROCESSOR).save_pretrained(out_dir)
        return os.fspath(out_dir)


@register_extractor("depth")
class DepthExtractor(DepthModelExtractor):
    """Relative depth (Depth Anything V2 or DPT/MiDaS): uint8 (H, W), near = bright.

    Args:
        weights: local transformers folder (see :data:`DEPTH_WEIGHTS`).
        device, batch_size: as :class:`~cn_lightning.conditions.base.ModelExtractor`.

    Output per image: uint8 (H, W) at the input size, the prediction min-max normalised to
    [0, 255] per image (so 0 and 255 both occur unless the prediction is constant).
    """

    def predict(self, images: np.ndarray) -> np.ndarray:
        return depth_to_uint8(self.predict_depth(images)).cpu().numpy()


@register_extractor("normal")
class NormalExtractor(DepthModelExtractor):
    """Normal map from predicted depth, as the original ControlNet: uint8 (H, W, 3).

    Args:
        weights: local transformers depth folder (the same as ``depth``'s).
        a: z component before normalisation (default 2π, the original's); larger = flatter.
        bg_th: normalised-depth threshold under which pixels are background (x = y = 0).
        device, batch_size: as :class:`~cn_lightning.conditions.base.ModelExtractor`.

    The gradients are those of the raw prediction at the input size, so their scale depends on
    the model: the original used MiDaS (DPT hybrid) outputs; Depth Anything's are smaller, which
    makes surfaces look flatter at the same ``a``.
    """

    def __init__(
        self,
        weights: str | os.PathLike | None = None,
        device: str | torch.device | None = "auto",
        batch_size: int = 8,
        a: float = 2 * math.pi,
        bg_th: float = 0.1,
    ) -> None:
        self.a = float(a)
        self.bg_th = float(bg_th)
        super().__init__(weights=weights, device=device, batch_size=batch_size)

    def predict(self, images: np.ndarray) -> np.ndarray:
        depth = self.predict_depth(images).cpu().numpy()
        return np.stack([normal_from_depth(d, self.a, self.bg_th) for d in depth])


__all__ = [
    "DEPTH_WEIGHTS",
    "DepthExtractor",
    "DepthModelExtractor",
    "NormalExtractor",
    "depth_to_uint8",
    "normal_from_depth",
]
