"""Condition fidelity: does a generated image follow the condition it was generated from?

The condition is extracted back from the generated image and compared with the input condition,
with a metric that suits the condition type (:func:`fidelity_metric_for`):

- ``circle_iou`` (``outline``, the synthetic-circles toy): a disc is fitted to the outline
  (least-squares circle through the outline pixels) and compared by IoU with the region of the
  generated image that differs from its background colour (two colour clusters; the background
  is the cluster holding most border pixels).
- ``edge_f1`` (canny, hed, mlsd, scribble, ...): edges are extracted from the generated image with
  the experiment's extractor (Canny when that extractor needs a model that is not configured) and
  compared with the condition's edges by F1 with a small matching tolerance: precision is the
  share of generated edge pixels within ``tolerance`` px of a condition edge, recall the share of
  condition edge pixels within ``tolerance`` px of a generated edge (BSDS-style, via dilation).
- ``seg_miou`` (``seg``): the configured segmenter maps the generated image to the palette, both
  maps are decoded to class indices and compared by mean IoU over the classes present.
- ``ssim``: the generic fallback: SSIM between the condition extracted from the generated image
  (or the generated image itself when no extractor is available) and the input condition,
  clipped to [0, 1].

Every score is in [0, 1], higher = follows the condition better; ``"fidelity"`` is the primary one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_jaccard_index,
    binary_precision,
    binary_recall,
    multiclass_jaccard_index,
)
from torchmetrics.functional.image import structural_similarity_index_measure

from cn_lightning import log

CIRCLE_KEYS = ("outline",)
EDGE_KEYS = ("canny", "hed", "pidi", "mlsd", "scribble", "lineart", "softedge", "edge", "sketch")
SEG_KEYS = ("seg",)
METRICS = ("circle_iou", "edge_f1", "seg_miou", "ssim")
# Two colour clusters closer than this (RGB distance, images in [0, 1]) mean "one flat colour":
# the generated image then shows no shape at all.
MIN_CLUSTER_CONTRAST = 0.1
CLUSTER_SIZE = 128

Extractor = Callable[[np.ndarray], np.ndarray]


def fidelity_metric_for(condition_key: str) -> str:
    """The metric name for a condition type: circle_iou, edge_f1, seg_miou or ssim."""
    key = condition_key.lower()
    if key in CIRCLE_KEYS:
        return "circle_iou"
    if key in SEG_KEYS:
        return "seg_miou"
    if key in EDGE_KEYS or key.endswith(("edge", "edges", "lines")):
        return "edge_f1"
    return "ssim"


# ----------------------------------------------------------------------------- resolution
def resolve_fidelity(
    condition_key: str, extractor_options: dict[str, Any] | None = None
) -> tuple[str, Extractor | None]:
    """The metric actually used and the extractor it needs (``None`` when it needs none).

    Model-based extractors (hed, seg, ...) need options such as local weights; when they cannot
    be built the metric falls back (edge metrics to Canny edges, ``seg_miou`` to SSIM) with a
    warning, so a training run never fails for lack of an annotator.
    """
    from cn_lightning.conditions import get_extractor, list_extractors

    metric = fidelity_metric_for(condition_key)
    if metric == "circle_iou":
        return metric, None
    extractor = None
    if condition_key in list_extractors():
        try:
            extractor = get_extractor(condition_key, **(extractor_options or {}))
        except Exception as err:  # noqa: BLE001 - any construction failure means "not configured"
            log.warning(f"condition extractor {condition_key!r} unavailable for fidelity ({err})")
    if metric == "edge_f1" and extractor is None:
        log.warning(f"fidelity for {condition_key!r}: comparing Canny edges of the samples")
        extractor = get_extractor("canny")
    if metric == "seg_miou" and extractor is None:
        log.warning(
            f"fidelity for {condition_key!r}: no segmenter configured, falling back to SSIM"
        )
        metric = "ssim"
    return metric, extractor


def condition_fidelity(
    generated: Tensor,
    condition: Tensor,
    condition_key: str,
    *,
    extractor_options: dict[str, Any] | None = None,
    tolerance: int | None = None,
    _resolved: tuple[str, Extractor | None] | None = None,
) -> dict[str, Tensor]:
    """Per-sample fidelity of ``generated`` to ``condition``.

    Args:
        generated: (B, 3, H, W) images in [0, 1].
        condition: (B, 3, H, W) condition images in [0, 1].
        condition_key: the condition type (``outline``, ``canny``, ``seg``, ...).
        extractor_options: options of a model-based extractor (e.g. local weights).
        tolerance: edge matching tolerance in pixels (default: 0.75% of the diagonal, >= 1).

    Returns:
        ``{metric_name: (B,), "fidelity": (B,)}``, float32 on the CPU, values in [0, 1].
    """
    if generated.shape != condition.shape or generated.ndim != 4:
        raise ValueError(
            f"generated and condition must both be (B, 3, H, W); got {tuple(generated.shape)} "
            f"and {tuple(condition.shape)}"
        )
    generated = generated.detach().float().cpu().clamp(0, 1)
    condition = condition.detach().float().cpu().clamp(0, 1)
    metric, extractor = _resolved or resolve_fidelity(condition_key, extractor_options)
    if metric == "circle_iou":
        scores = circle_iou(generated, condition)
    elif metric == "edge_f1":
        scores = edge_f1(_extract(generated, extractor), _grey(condition) > 0.5, tolerance)
    elif metric == "seg_miou":
        scores = seg_miou(_extract_rgb(generated, extractor), condition)
    else:
        extracted = _extract_rgb(generated, extractor) if extractor is not None else generated
        scores = ssim_score(extracted, condition)
    scores = scores.float()
    return {metric: scores, "fidelity": scores.clamp(0, 1)}


# ---------------------------------------------------------------------------- circle IoU
def circle_iou(generated: Tensor, condition: Tensor) -> Tensor:
    """IoU of the disc fitted to each outline with the generated image's foreground, (B,)."""
    scores = []
    for image, outline in zip(generated, condition, strict=True):
        disc = disc_from_outline(_grey(outline[None])[0] > 0.5)
        shape = foreground_mask(image)
        scores.append(_mask_iou(shape, disc))
    return torch.stack(scores)


def disc_from_outline(outline: Tensor) -> Tensor:
    """Filled disc (H, W) bool from a circle outline mask (H, W) bool.

    Least-squares (Kasa) circle fit: x² + y² + Dx + Ey + F = 0 through the outline pixels, which
    also works for arcs of circles that cross the image border. Fewer than 3 pixels → empty.
    """
    ys, xs = torch.nonzero(outline, as_tuple=True)
    h, w = outline.shape
    if len(xs) < 3:
        return torch.zeros(h, w, dtype=torch.bool)
    x, y = xs.double(), ys.double()
    a = torch.stack([x, y, torch.ones_like(x)], dim=1)
    b = -(x**2 + y**2)
    d, e, f = torch.linalg.lstsq(a, b[:, None]).solution[:, 0].tolist()
    cx, cy = -d / 2, -e / 2
    r2 = cx**2 + cy**2 - f
    if not math.isfinite(r2) or r2 <= 0:
        return torch.zeros(h, w, dtype=torch.bool)
    yy, xx = torch.meshgrid(torch.arange(h).double(), torch.arange(w).double(), indexing="ij")
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r2


def foreground_mask(image: Tensor, iterations: int = 10) -> Tensor:
    """Pixels of (3, H, W) ``image`` that differ from its background colour, (H, W) bool.

    Two-means clustering of the RGB values, started from the median border colour and the pixel
    farthest from it; the background is the cluster that holds most border pixels. A flat image
    (clusters closer than ``MIN_CLUSTER_CONTRAST``) has no foreground.
    """
    _, h, w = image.shape
    # Fit the two colours on at most 128x128 pixels (cost), then label every pixel once.
    small = image
    if max(h, w) > CLUSTER_SIZE:
        small = F.interpolate(image[None], size=CLUSTER_SIZE, mode="area")[0]
    centres = _two_means(small, iterations)
    if (centres[0] - centres[1]).norm() < MIN_CLUSTER_CONTRAST:
        return torch.zeros(h, w, dtype=torch.bool)
    labels = _nearest(image.reshape(3, -1).T, centres).reshape(h, w)
    background = int(labels[_border_mask(h, w)].float().mean().round())
    return labels != background


def _two_means(image: Tensor, iterations: int) -> Tensor:
    """Two colour centres (2, 3) of a (3, H, W) image, the first started at the border median."""
    _, h, w = image.shape
    pixels = image.reshape(3, -1).T  # (H*W, 3)
    first = pixels[_border_mask(h, w).reshape(-1)].median(0).values
    centres = torch.stack([first, pixels[((pixels - first) ** 2).sum(1).argmax()]])
    for _ in range(iterations):
        onehot = F.one_hot(_nearest(pixels, centres), 2).float()  # (N, 2)
        counts = onehot.sum(0)
        sums = onehot.T @ pixels  # (2, 3)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return centres


def _nearest(pixels: Tensor, centres: Tensor) -> Tensor:
    """Index (0 or 1) of the nearest of two centres (2, 3) for (N, 3) pixels.

    Nearer to centre 1 ⇔ p·(c1 − c0) > (|c1|² − |c0|²) / 2: one matrix-vector product, far
    cheaper than torch.cdist on the CPU.
    """
    c0, c1 = centres[0], centres[1]
    return (pixels @ (c1 - c0) > (c1.dot(c1) - c0.dot(c0)) / 2).long()


def _border_mask(h: int, w: int) -> Tensor:
    mask = torch.zeros(h, w, dtype=torch.bool)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


def _mask_iou(pred: Tensor, target: Tensor) -> Tensor:
    # Two empty masks agree perfectly; torchmetrics would call 0/0 zero.
    if not pred.any() and not target.any():
        return torch.tensor(1.0)
    return binary_jaccard_index(pred.long(), target.long(), validate_args=False)


# ------------------------------------------------------------------------------- edge F1
def edge_f1(pred: Tensor, target: Tensor, tolerance: int | None = None) -> Tensor:
    """F1 of edge maps (B, H, W) bool with a matching tolerance in pixels, (B,).

    Precision = share of ``pred`` edge pixels within ``tolerance`` of a ``target`` edge; recall =
    share of ``target`` edge pixels within ``tolerance`` of a ``pred`` edge. ``tolerance=0`` is
    the plain pixel-wise F1. Two empty maps score 1.
    """
    if tolerance is None:
        tolerance = max(1, round(0.0075 * math.hypot(*pred.shape[-2:])))
    pred, target = pred.bool(), target.bool()
    precision = binary_precision(
        pred.long(),
        _dilate(target, tolerance).long(),
        multidim_average="samplewise",
        validate_args=False,
    )
    recall = binary_recall(
        _dilate(pred, tolerance).long(),
        target.long(),
        multidim_average="samplewise",
        validate_args=False,
    )
    f1 = torch.where(
        precision + recall > 0, 2 * precision * recall / (precision + recall), torch.zeros(())
    )
    both_empty = ~pred.flatten(1).any(1) & ~target.flatten(1).any(1)
    return torch.where(both_empty, torch.ones(()), f1)


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of (B, H, W) bool by a square of side 2 * radius + 1."""
    if radius <= 0:
        return mask
    out = F.max_pool2d(mask.float()[:, None], 2 * radius + 1, stride=1, padding=radius)
    return out[:, 0] > 0.5


# ------------------------------------------------------------------------------ seg mIoU
def seg_miou(predicted_map: Tensor, condition: Tensor) -> Tensor:
    """Mean IoU over present classes of two palette maps (B, 3, H, W) in [0, 1], (B,).

    Both maps are decoded to ADE20K class indices by nearest palette colour; pixels that are
    unlabelled (black) in the condition are ignored.
    """
    from cn_lightning.conditions import ADE20K_PALETTE, decode_colors

    num_classes = len(ADE20K_PALETTE)
    scores = []
    for pred_img, cond_img in zip(predicted_map, condition, strict=True):
        pred = torch.from_numpy(decode_colors(_to_uint8(pred_img)))
        target = torch.from_numpy(decode_colors(_to_uint8(cond_img)))
        # torchmetrics wants labels in [0, C); "no class" (-1) becomes class C, then ignored.
        pred[pred < 0] = num_classes
        target[target < 0] = num_classes
        scores.append(
            multiclass_jaccard_index(
                pred[None],
                target[None],
                num_classes=num_classes + 1,
                average="macro",
                ignore_index=num_classes,
                validate_args=False,
            )
        )
    return torch.stack(scores)


# ---------------------------------------------------------------------------------- SSIM
def ssim_score(images: Tensor, condition: Tensor) -> Tensor:
    """SSIM of greyscale versions of (B, 3, H, W) images in [0, 1], clipped to [0, 1], (B,)."""
    kernel = min(11, _odd_at_most(min(images.shape[-2:])))
    ssim = structural_similarity_index_measure(
        _grey(images)[:, None],
        _grey(condition)[:, None],
        data_range=1.0,
        reduction="none",
        kernel_size=kernel,
    )
    return ssim.clamp(0, 1)


def _odd_at_most(n: int) -> int:
    return n if n % 2 else n - 1


# ------------------------------------------------------------------------------- helpers
def _grey(images: Tensor) -> Tensor:
    """(B, C, H, W) → (B, H, W), the channel mean."""
    return images.float().mean(1)


def _to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → uint8 (H, W, 3)."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _extract(images: Tensor, extractor: Extractor) -> Tensor:
    """Run an edge-like extractor on (B, 3, H, W) images → (B, H, W) bool (> half intensity)."""
    maps = [np.asarray(extractor(_to_uint8(img))) for img in images]
    maps = [m.mean(-1) if m.ndim == 3 else m for m in maps]
    return torch.from_numpy(np.stack(maps)).float() > 127.5


def _extract_rgb(images: Tensor, extractor: Extractor) -> Tensor:
    """Run an extractor on (B, 3, H, W) images → (B, 3, H, W) float in [0, 1]."""
    out = []
    for img in images:
        m = np.asarray(extractor(_to_uint8(img)))
        if m.ndim == 2:
            m = np.repeat(m[:, :, None], 3, axis=2)
        out.append(torch.from_numpy(np.ascontiguousarray(m[:, :, :3])).permute(2, 0, 1))
    return torch.stack(out).float() / 255


# -------------------------------------------------------------------------------- Metric
class ConditionFidelity(torchmetrics.Metric):
    """Mean condition fidelity over many batches, reduced across processes by torchmetrics.

    ``update(generated, condition)`` takes (B, 3, H, W) tensors in [0, 1]; ``compute()`` returns
    ``{metric_name: mean, "fidelity": mean}`` (scalar tensors).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(
        self,
        condition_key: str,
        extractor_options: dict[str, Any] | None = None,
        tolerance: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.condition_key = condition_key
        self.tolerance = tolerance
        self._resolved = resolve_fidelity(condition_key, extractor_options)
        self.metric_name = self._resolved[0]
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fidelity_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, generated: Tensor, condition: Tensor) -> None:
        scores = condition_fidelity(
            generated,
            condition,
            self.condition_key,
            tolerance=self.tolerance,
            _resolved=self._resolved,
        )
        self.score_sum += scores[self.metric_name].sum().to(self.score_sum)
        self.fidelity_sum += scores["fidelity"].sum().to(self.fidelity_sum)
        self.count += len(scores["fidelity"])

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp(min=1).double()
        return {
            self.metric_name: (self.score_sum / n).float(),
            "fidelity": (self.fidelity_sum / n).float(),
        }


__all__ = [
    "ConditionFidelity",
    "circle_iou",
    "condition_fidelity",
    "disc_from_outline",
    "edge_f1",
    "fidelity_metric_for",
    "foreground_mask",
    "resolve_fidelity",
    "seg_miou",
    "ssim_score",
]
