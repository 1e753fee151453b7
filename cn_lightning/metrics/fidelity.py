"""Condition fidelity: does a generated image follow the condition it was generated from?

As in the literature (ControlNet, Zhang et al. 2023, §4; ControlNet++, Li et al. 2024, Table 1),
the condition is **extracted back** from the generated image with the *same* registered extractor
that made the training conditions (:func:`cn_lightning.conditions.get_extractor`), and the
extracted map is compared with the input condition by the metric reported for that condition
(:func:`fidelity_metric_for`). A raw sample is never compared with a condition map.

=====================  ===============  ======================================================
condition              metric           keys (per sample; ``fidelity`` is the [0, 1] score)
=====================  ===============  ======================================================
outline (toy circles)  ``circle_iou``   ``circle_iou`` (= fidelity)
swatch (toy circles)   ``swatch_match`` ``swatch_match`` (= fidelity), ``swatch_distance``
xline, yline (toy)     ``line_match``   ``line_match`` (= fidelity), ``line_distance``
canny, mlsd, scribble  ``edge_f1``      ``edge_f1`` (= fidelity), ``edge_precision``,
                                        ``edge_recall`` (chance-corrected), ``edge_f1_px``
hed, softedge,         ``ssim``         ``ssim`` (raw); fidelity = gain over a blank map
lineart (+ plug-ins)
depth                  ``depth_rmse``   ``depth_rmse`` (0–255); fidelity = 1 − RMSE/RMSE_blank
normal                 ``normal_angle`` ``normal_angle`` (mean, degrees); fidelity = share
                                        within 30°, gain over a blank map
openpose               ``pose_oks``     ``pose_oks`` (= fidelity; NaN without a person)
seg                    ``seg_miou``     ``seg_miou`` (= fidelity)
=====================  ===============  ======================================================

A *blank map* is the constant map at the condition's median value: what a sample that shows
nothing yields. Where a blank map already scores high on the literature's number (SSIM of sparse
edge maps, the share of normals within 30°) or the number has no [0, 1] range (RMSE), ``fidelity``
is the gain over it, :func:`above_blank`: 0 = no better than blank, 1 = perfect, NaN for a
condition with no structure (a flat map). The raw number stays under its own key.

- ``circle_iou`` (the synthetic-circles toy; its outline is not extracted back): a disc is
  fitted to the outline (least-squares circle through the outline pixels) and compared by IoU
  with the region of the generated image that differs from its background colour (two colour
  clusters; the background is the cluster holding most border pixels).
- ``swatch_match`` (the toy's second condition, an image filled with the circle's colour): the
  ``swatch`` extractor reads the circle's colour back from the generated image (the colour
  statistic of :mod:`cn_lightning.conditions.colour`: the median of the circle's core, or of the
  whole image when it shows no circle); ``swatch_match`` is 1 when it and the condition's colour
  have the same nearest toy-palette colour (of 32), else 0; ``swatch_distance`` is their RGB
  distance over the largest possible one (0 = the same colour, 1 = black against white).
- ``line_match`` (the toy's position conditions, a line through the circle's centre along one
  axis, :mod:`cn_lightning.conditions.lines`): the extractor finds the generated circle's centroid
  and draws its line; ``line_match`` is 1 when the two lines lie within :data:`LINE_TOLERANCE`
  of the image's size (3.2 px at 32 px: a third of a typical radius), else 0 (also when the
  sample shows no circle); ``line_distance`` is their distance over the image's size (NaN
  without a circle).
- ``edge_f1`` (binary line maps): both maps are thresholded at half intensity; a pixel matches
  within ``tolerance`` px (Chebyshev distance; default 1 px per 512 px of the longer side, at
  least 1). Precision and recall are **chance-corrected**: a random map of the same density
  would get, as precision, the share of the image within ``tolerance`` of a condition edge (the
  dilated-area fraction ``a``), so precision is reported as ``(P − a) / (1 − a)`` clipped to
  [0, 1] (recall likewise, with the generated edges' dilated area). Uniform noise and a flat
  image therefore score ~0, a 1 px shifted copy 1. ``edge_f1_px`` is the plain pixel-wise F1
  (no tolerance, no correction), the number ControlNet++ reports.
- ``ssim`` (soft edges): SSIM (torchmetrics, Gaussian 11 px window) of the greyscale extracted
  map and condition, clipped to [0, 1] (ControlNet++'s number). Also the metric of registered
  plug-in extractors with no metric of their own.
- ``depth_rmse``: RMSE of the greyscale depth maps in 0–255 units (as ControlNet++ reports).
- ``normal_angle``: both maps decoded to vectors ``v = x / 127.5 − 1`` and normalised; the angle
  between them per pixel (pixels where either vector is shorter than 0.5, i.e. mid-grey "no
  normal", are left out); the raw value is the mean angle in degrees, the score uses the share of
  pixels within 30° (the usual surface-normal accuracy threshold).
- ``pose_oks``: the 18 OpenPose body keypoints of every person are decoded from both pose maps
  (:func:`cn_lightning.conditions.pose.decode_pose_map`) and compared by COCO's object keypoint
  similarity (:func:`keypoint_oks`): people are matched one to one, best OKS first, and the
  score is the matched OKS summed over ``max(#people in condition, #people extracted)``. A
  condition with no person gives NaN (undefined, skipped by the means), never 1.
- ``seg_miou``: both palette maps decoded to ADE20K classes; mean IoU over the classes present,
  pixels unlabelled (black) in the condition ignored; NaN when none is labelled.

When the extractor cannot be built (no local weights, unknown condition) :func:`resolve_fidelity`
logs one warning naming the option to set and returns ``None``: no fidelity, rather than a
meaningless one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchmetrics
from torch import Tensor
from torchmetrics.functional.classification import binary_jaccard_index, multiclass_jaccard_index
from torchmetrics.functional.image import structural_similarity_index_measure

from cn_lightning import log
from cn_lightning.errors import UnknownNameError, first_line

CIRCLE_KEYS = ("outline",)
SWATCH_KEYS = ("swatch",)
LINE_KEYS = ("xline", "yline")
EDGE_KEYS = ("canny", "mlsd", "scribble")
SOFT_EDGE_KEYS = ("hed", "softedge", "lineart", "pidi")
DEPTH_KEYS = ("depth",)
NORMAL_KEYS = ("normal",)
POSE_KEYS = ("openpose", "pose")
SEG_KEYS = ("seg",)

# The keys each metric returns, the primary score ``fidelity`` first.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "circle_iou": ("fidelity", "circle_iou"),
    "swatch_match": ("fidelity", "swatch_match", "swatch_distance"),
    "line_match": ("fidelity", "line_match", "line_distance"),
    "edge_f1": ("fidelity", "edge_f1", "edge_precision", "edge_recall", "edge_f1_px"),
    "ssim": ("fidelity", "ssim"),
    "depth_rmse": ("fidelity", "depth_rmse"),
    "normal_angle": ("fidelity", "normal_angle"),
    "pose_oks": ("fidelity", "pose_oks"),
    "seg_miou": ("fidelity", "seg_miou"),
}
METRICS = tuple(METRIC_KEYS)
# How each key reads in a report (``python -m cn_lightning.evaluate``).
KEY_LABELS: dict[str, str] = {
    "circle_iou": "circle IoU",
    "swatch_match": "circle colour = swatch colour (nearest of the 32 toy colours)",
    "swatch_distance": "RGB distance of circle and swatch colours, 0-1",
    "line_match": "circle centre within 10% of the image of the line",
    "line_distance": "distance of circle centre and line / image size",
    "edge_f1": "F1, chance-corrected, 1 px tolerance per 512 px",
    "edge_precision": "precision, chance-corrected",
    "edge_recall": "recall, chance-corrected",
    "edge_f1_px": "pixel-wise F1, as ControlNet++",
    "ssim": "SSIM",
    "depth_rmse": "RMSE, 0-255",
    "normal_angle": "mean angular error, degrees",
    "pose_oks": "OKS",
    "seg_miou": "mIoU",
}
# The primary score where it is not one of the metric's own keys.
FIDELITY_LABELS: dict[str, str] = {
    "ssim": "score: SSIM gain over a blank map",
    "depth_rmse": "score: 1 - RMSE / blank map's RMSE",
    "normal_angle": "score: share within 30 degrees, gain over a blank map",
}
NORMAL_THRESHOLD_DEG = 30.0
# line_match: the largest distance of the two lines, as a share of the image's size.
LINE_TOLERANCE = 0.1
# Two colour clusters closer than this (RGB distance, images in [0, 1]) mean "one flat colour":
# the generated image then shows no shape at all.
MIN_CLUSTER_CONTRAST = 0.1
CLUSTER_SIZE = 128

Extractor = Callable[[np.ndarray], np.ndarray]


class ResolvedFidelity(NamedTuple):
    """What :func:`resolve_fidelity` found: the metric and the extractor it runs (``None`` for
    ``circle_iou``, which needs none)."""

    metric: str
    extractor: Extractor | None


def fidelity_metric_for(condition_key: str) -> str:
    """The metric name for a condition type (see the module docstring)."""
    key = condition_key.lower()
    if key in CIRCLE_KEYS:
        return "circle_iou"
    if key in SWATCH_KEYS:
        return "swatch_match"
    if key in LINE_KEYS:
        return "line_match"
    if key in SEG_KEYS:
        return "seg_miou"
    if key in EDGE_KEYS:
        return "edge_f1"
    if key in DEPTH_KEYS:
        return "depth_rmse"
    if key in NORMAL_KEYS:
        return "normal_angle"
    if key in POSE_KEYS:
        return "pose_oks"
    return "ssim"


def fidelity_rows(metric: str) -> list[tuple[str, str]]:
    """``(key, label)`` per reported number of ``metric``, one row each in a report: the metric's
    own keys, plus ``fidelity`` where it is a score derived from them (ssim, depth, normal)."""
    rows = [(k, KEY_LABELS[k]) for k in METRIC_KEYS[metric] if k != "fidelity"]
    if metric in FIDELITY_LABELS:
        rows.append(("fidelity", FIDELITY_LABELS[metric]))
    return rows


# ----------------------------------------------------------------------------- resolution
def try_resolve_fidelity(
    condition_key: str, extractor_options: dict[str, Any] | None = None
) -> tuple[ResolvedFidelity | None, str | None]:
    """:func:`resolve_fidelity` without the warning: ``(resolved, None)`` or ``(None, why)``."""
    from cn_lightning.conditions import MissingWeightsError, get_extractor, list_extractors

    metric = fidelity_metric_for(condition_key)
    if metric == "circle_iou":
        return ResolvedFidelity(metric, None), None
    if condition_key not in list_extractors():
        return None, (
            f"no condition extractor {condition_key!r} is registered "
            f"(registered: {', '.join(list_extractors())}); register one with "
            "@cn_lightning.conditions.register_extractor"
        )
    try:
        extractor = get_extractor(condition_key, **(extractor_options or {}))
    except (MissingWeightsError, UnknownNameError) as err:
        return None, first_line(err)
    return ResolvedFidelity(metric, extractor), None


def resolve_fidelity(
    condition_key: str, extractor_options: dict[str, Any] | None = None
) -> ResolvedFidelity | None:
    """The metric for ``condition_key`` and its extractor, built once with ``extractor_options``
    (model-based ones: ``weights``, ``device``, ``batch_size``).

    ``None``, after one warning that names the option to set, when the extractor cannot be built
    (missing local weights, unknown condition): there is then no fidelity to measure, and
    callers turn it off. Other construction errors (a wrong option) are raised.
    """
    resolved, why = try_resolve_fidelity(condition_key, extractor_options)
    if resolved is None:
        log.warning(f"condition fidelity for {condition_key!r} is off: {why}")
    return resolved


_UNSET: Any = object()


def condition_fidelity(
    generated: Tensor,
    condition: Tensor,
    condition_key: str,
    *,
    extractor_options: dict[str, Any] | None = None,
    tolerance: int | None = None,
    _resolved: ResolvedFidelity | tuple | None = _UNSET,
) -> dict[str, Tensor]:
    """Per-sample fidelity of ``generated`` to ``condition``.

    Args:
        generated: (B, 3, H, W) images in [0, 1].
        condition: (B, 3, H, W) condition images in [0, 1].
        condition_key: the condition type (``outline``, ``canny``, ``depth``, ``seg``, ...).
        extractor_options: options of the extractor (e.g. ``weights``, ``device``).
        tolerance: edge matching tolerance in pixels (default: 1 px per 512 px, at least 1).

    Returns:
        ``{"fidelity": (B,), <metric keys>: (B,)}`` (:data:`METRIC_KEYS`), float32 on the CPU;
        ``fidelity`` in [0, 1], NaN where undefined. Without an extractor (see
        :func:`resolve_fidelity`) only ``fidelity``, all NaN.
    """
    if generated.shape != condition.shape or generated.ndim != 4:
        raise ValueError(
            f"generated and condition must both be (B, 3, H, W); got {tuple(generated.shape)} "
            f"and {tuple(condition.shape)}"
        )
    generated = generated.detach().float().cpu().clamp(0, 1)
    condition = condition.detach().float().cpu().clamp(0, 1)
    resolved = (
        resolve_fidelity(condition_key, extractor_options) if _resolved is _UNSET else _resolved
    )
    if resolved is None:
        return {"fidelity": torch.full((len(generated),), math.nan)}
    metric, extractor = resolved
    if metric == "circle_iou":
        scores = circle_iou(generated, condition).float()
        return {"fidelity": scores.clamp(0, 1), "circle_iou": scores}
    from cn_lightning.conditions import extract_batch

    extracted = extract_batch(extractor, [_to_uint8(image) for image in generated])
    return score_condition_maps(
        metric, extracted, [_to_uint8(c) for c in condition], tolerance=tolerance
    )


def score_condition_maps(
    metric: str,
    extracted: Sequence[np.ndarray],
    condition: Sequence[np.ndarray],
    *,
    tolerance: int | None = None,
) -> dict[str, Tensor]:
    """Compare condition maps extracted from generated images with the input conditions.

    Args:
        metric: one of :data:`METRICS` except ``circle_iou``.
        extracted, condition: uint8 maps (H, W) or (H, W, 3), one per sample; an extracted map
            of another size is resized to its condition's.

    Returns:
        ``{key: (B,) float32}`` for the keys of :data:`METRIC_KEYS` ``[metric]``.
    """
    if len(extracted) != len(condition):
        raise ValueError(f"{len(extracted)} extracted maps for {len(condition)} conditions")
    extracted = [
        _resize_like(np.asarray(e), np.asarray(c), metric)
        for e, c in zip(extracted, condition, strict=True)
    ]
    condition = [np.asarray(c) for c in condition]
    if metric == "edge_f1":
        pred = torch.from_numpy(np.stack([_grey(m) > 127.5 for m in extracted]))
        target = torch.from_numpy(np.stack([_grey(m) > 127.5 for m in condition]))
        out = edge_scores(pred, target, tolerance)
        out["edge_f1_px"] = edge_scores(pred, target, 0, chance_corrected=False)["edge_f1"]
        out["fidelity"] = out["edge_f1"].clamp(0, 1)
    elif metric == "ssim":
        pred, target = _stack_grey(extracted), _stack_grey(condition)
        ssim = ssim_score(pred, target)
        blank = ssim_score(_blank_like(target), target)
        out = {"fidelity": above_blank(ssim, blank, 1.0), "ssim": ssim}
    elif metric == "depth_rmse":
        pred, target = _stack_grey(extracted) * 255, _stack_grey(condition) * 255
        rmse = depth_rmse(pred, target)
        blank = depth_rmse(_blank_like(target), target)
        out = {"fidelity": above_blank(-rmse, -blank, 0.0), "depth_rmse": rmse}
    elif metric == "normal_angle":
        out = normal_angle_scores(
            np.stack([_rgb(m) for m in extracted]), np.stack([_rgb(m) for m in condition])
        )
    elif metric == "pose_oks":
        oks = pose_oks(extracted, condition)
        out = {"fidelity": oks.clamp(0, 1), "pose_oks": oks}
    elif metric == "seg_miou":
        miou = seg_miou(_stack_rgb(extracted), _stack_rgb(condition))
        out = {"fidelity": miou.clamp(0, 1), "seg_miou": miou}
    elif metric == "swatch_match":
        out = swatch_scores(extracted, condition)
    elif metric == "line_match":
        out = line_scores(extracted, condition)
    else:
        raise ValueError(f"unknown fidelity metric {metric!r}; known: {', '.join(METRICS)}")
    return {k: out[k].float() for k in METRIC_KEYS[metric]}


# --------------------------------------------------------------------------- swatch match
def swatch_scores(extracted: Sequence[np.ndarray], condition: Sequence[np.ndarray]) -> dict:
    """Colour agreement of swatches (uint8 maps, one colour each; the median pixel is taken):
    ``swatch_match`` (same nearest toy-palette colour: 1, else 0; = ``fidelity``) and
    ``swatch_distance`` (RGB distance / (255 x sqrt 3)), (B,) each."""
    from cn_lightning.conditions.colour import COLOURS, nearest_colour_names

    def colour(m: np.ndarray) -> np.ndarray:
        return np.median(_rgb(np.asarray(m)).reshape(-1, 3).astype(np.float64), axis=0)

    made = np.stack([colour(m) for m in extracted])
    wanted = np.stack([colour(m) for m in condition])
    match = [
        float(a == b)
        for a, b in zip(
            nearest_colour_names(made, COLOURS), nearest_colour_names(wanted, COLOURS), strict=True
        )
    ]
    distance = np.linalg.norm(made - wanted, axis=1) / (255 * math.sqrt(3))
    match_t = torch.tensor(match, dtype=torch.float32)
    return {
        "fidelity": match_t,
        "swatch_match": match_t,
        "swatch_distance": torch.from_numpy(distance).float(),
    }


# ---------------------------------------------------------------------------- line match
def line_scores(extracted: Sequence[np.ndarray], condition: Sequence[np.ndarray]) -> dict:
    """Agreement of line maps (uint8, one white line each, vertical or horizontal as the
    condition's): ``line_match`` (1 when within :data:`LINE_TOLERANCE` of the size, else 0;
    = ``fidelity``) and ``line_distance`` (over the size; NaN for a map with no line), (B,)."""
    from cn_lightning.conditions.lines import line_position

    match, distance = [], []
    for made, wanted in zip(extracted, condition, strict=True):
        grey = _grey(np.asarray(wanted)).astype(np.float32)
        # The condition's line runs along the axis on which its profile is flat.
        axis = "xline" if grey.mean(0).max() >= grey.mean(1).max() else "yline"
        size = grey.shape[1] if axis == "xline" else grey.shape[0]
        a, b = line_position(made, axis), line_position(wanted, axis)
        d = math.nan if a is None or b is None else abs(a - b) / size
        distance.append(d)
        match.append(float(not math.isnan(d) and d <= LINE_TOLERANCE))
    match_t = torch.tensor(match, dtype=torch.float32)
    return {
        "fidelity": match_t,
        "line_match": match_t,
        "line_distance": torch.tensor(distance, dtype=torch.float32),
    }


# ---------------------------------------------------------------------------- circle IoU
def circle_iou(generated: Tensor, condition: Tensor) -> Tensor:
    """IoU of the disc fitted to each outline with the generated image's foreground, (B,)."""
    scores = []
    for image, outline in zip(generated, condition, strict=True):
        disc = disc_from_outline(outline.float().mean(0) > 0.5)
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
def default_tolerance(height: int, width: int) -> int:
    """Edge matching tolerance: 1 px per 512 px of the longer side, at least 1."""
    return max(1, round(max(height, width) / 512))


def edge_scores(
    pred: Tensor, target: Tensor, tolerance: int | None = None, *, chance_corrected: bool = True
) -> dict[str, Tensor]:
    """Precision, recall and F1 of edge maps (B, H, W) bool with a matching tolerance, (B,) each.

    Precision = share of ``pred`` edge pixels within ``tolerance`` px (Chebyshev) of a ``target``
    edge; recall = share of ``target`` edge pixels within ``tolerance`` of a ``pred`` edge.
    ``chance_corrected``: what random pixels would score is subtracted, ``(P − a) / (1 − a)``
    clipped to [0, 1], where ``a`` is the share of the image within ``tolerance`` of a target
    edge (for precision) or of a pred edge (for recall). Two empty maps score 1; an empty map
    against a non-empty one 0.
    """
    if tolerance is None:
        tolerance = default_tolerance(*pred.shape[-2:])
    pred, target = pred.bool(), target.bool()
    near_target, near_pred = _dilate(target, tolerance), _dilate(pred, tolerance)
    n_pred, n_target = pred.flatten(1).sum(1).double(), target.flatten(1).sum(1).double()
    precision = (pred & near_target).flatten(1).sum(1) / n_pred.clamp(min=1)
    recall = (target & near_pred).flatten(1).sum(1) / n_target.clamp(min=1)
    if chance_corrected:
        precision = _above_chance(precision, near_target.flatten(1).double().mean(1))
        recall = _above_chance(recall, near_pred.flatten(1).double().mean(1))
    f1 = torch.where(
        precision + recall > 0,
        2 * precision * recall / (precision + recall).clamp(min=1e-12),
        torch.zeros(()),
    )
    both_empty = (n_pred == 0) & (n_target == 0)
    one = torch.ones((), dtype=torch.float64)
    return {
        "edge_f1": torch.where(both_empty, one, f1).float(),
        "edge_precision": torch.where(both_empty, one, precision).float(),
        "edge_recall": torch.where(both_empty, one, recall).float(),
    }


def edge_f1(
    pred: Tensor, target: Tensor, tolerance: int | None = None, *, chance_corrected: bool = True
) -> Tensor:
    """F1 of :func:`edge_scores`, (B,)."""
    return edge_scores(pred, target, tolerance, chance_corrected=chance_corrected)["edge_f1"]


def _above_chance(rate: Tensor, chance: Tensor) -> Tensor:
    """``(rate − chance) / (1 − chance)`` in [0, 1]; 0 where chance is 1 (nothing to tell)."""
    room = 1 - chance
    return torch.where(room > 0, (rate - chance) / room.clamp(min=1e-12), 0).clamp(0, 1)


def _dilate(mask: Tensor, radius: int) -> Tensor:
    """Binary dilation of (B, H, W) bool by a square of side 2 * radius + 1."""
    if radius <= 0:
        return mask
    out = F.max_pool2d(mask.float()[:, None], 2 * radius + 1, stride=1, padding=radius)
    return out[:, 0] > 0.5


# ---------------------------------------------------------------------------- SSIM, depth
def ssim_score(images: Tensor, condition: Tensor) -> Tensor:
    """SSIM of greyscale versions of (B, C, H, W) images in [0, 1], clipped to [0, 1], (B,)."""
    kernel = min(11, _odd_at_most(min(images.shape[-2:])))
    ssim = structural_similarity_index_measure(
        images.float().mean(1, keepdim=True),
        condition.float().mean(1, keepdim=True),
        data_range=1.0,
        reduction="none",
        kernel_size=kernel,
    )
    return ssim.clamp(0, 1)


def depth_rmse(pred: Tensor, target: Tensor) -> Tensor:
    """Root mean squared difference of depth maps (B, ..., H, W), in their own units, (B,)."""
    return ((pred.double() - target.double()) ** 2).flatten(1).mean(1).sqrt().float()


def above_blank(score: Tensor, blank: Tensor, perfect: float) -> Tensor:
    """``(score − blank) / (perfect − blank)`` clipped to [0, 1]: 0 = no better than a blank
    map, 1 = perfect; NaN where a blank map is already perfect (a condition with no structure)."""
    room = perfect - blank.double()
    value = ((score.double() - blank.double()) / room.clamp(min=1e-9)).clamp(0, 1)
    return torch.where(room > 1e-6, value, torch.nan).float()


def _blank_like(maps: Tensor) -> Tensor:
    """Constant maps (B, ...) at each map's median value: the blank prediction."""
    median = maps.flatten(1).median(1).values
    return median.view(-1, *([1] * (maps.ndim - 1))).expand_as(maps)


def _odd_at_most(n: int) -> int:
    return n if n % 2 else n - 1


# ------------------------------------------------------------------------------- normals
def decode_normals(normal_map: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) normal map → float (..., 3) vectors ``x / 127.5 − 1`` (not normalised)."""
    return normal_map[..., :3].astype(np.float64) / 127.5 - 1


def normal_angle_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, Tensor]:
    """Angular error of normal maps uint8 (B, H, W, 3), (B,) each:

    - ``normal_angle``: the mean angle between the decoded normals, in degrees;
    - ``fidelity``: the share of pixels within 30°, above what a blank map (every pixel the
      condition's median normal) gets (:func:`above_blank`).

    Pixels where either vector is shorter than 0.5 (mid-grey: no normal) are left out; NaN
    where none is left.
    """
    if pred.ndim != 4 or target.ndim != 4:
        raise ValueError("normal maps must be (B, H, W, 3)")
    a, b = decode_normals(pred), decode_normals(target)
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    valid = (na > 0.5) & (nb > 0.5)
    ua, ub = a / np.maximum(na, 1e-12)[..., None], b / np.maximum(nb, 1e-12)[..., None]
    angle = np.degrees(np.arccos(np.clip((ua * ub).sum(-1), -1, 1)))
    mean, within, blank = [], [], []
    for i in range(len(pred)):
        if not valid[i].any():
            mean.append(math.nan)
            within.append(math.nan)
            blank.append(math.nan)
            continue
        mean.append(float(angle[i][valid[i]].mean()))
        within.append(float((angle[i][valid[i]] < NORMAL_THRESHOLD_DEG).mean()))
        median = np.median(ub[i][valid[i]], axis=0)
        median /= max(float(np.linalg.norm(median)), 1e-12)
        blank_angle = np.degrees(np.arccos(np.clip(ub[i][valid[i]] @ median, -1, 1)))
        blank.append(float((blank_angle < NORMAL_THRESHOLD_DEG).mean()))
    fidelity = above_blank(torch.tensor(within), torch.tensor(blank), 1.0)
    return {"fidelity": fidelity, "normal_angle": torch.tensor(mean, dtype=torch.float64)}


# ---------------------------------------------------------------------------------- pose
# COCO's per-keypoint OKS constants (sigmas; cocoapi, Ronchi & Perona 2017) in the order of the
# 18 OpenPose body keypoints: nose, neck, r/l shoulder, elbow, wrist, r hip, knee, ankle, l hip,
# knee, ankle, r/l eye, r/l ear. COCO has no neck; it takes the shoulders' constant.
OPENPOSE_SIGMAS = np.array(
    # fmt: off
    [
        0.026,
        0.079,
        0.079,
        0.072,
        0.062,
        0.079,
        0.072,
        0.062,
        0.107,
        0.087,
        0.089,
        0.107,
        0.087,
        0.089,
        0.025,
        0.025,
        0.035,
        0.035,
    ]
    # fmt: on
)
# A person's scale (s² in OKS) is its keypoints' box area, at least (longer side / 16)²: 32² px
# at 512 px, COCO's smallest evaluated keypoint area.
MIN_SCALE_FRACTION = 1 / 16


def keypoint_oks(
    pred: np.ndarray, target: np.ndarray, area: float, sigmas: np.ndarray = OPENPOSE_SIGMAS
) -> float:
    """COCO object keypoint similarity of one person's keypoints (K, 2) with the target's.

    ``OKS = mean over target keypoints present of exp(−d² / (2 s² k²))``, ``k = 2σ``, ``s² =
    area``; a keypoint present in the target but missing (NaN) in ``pred`` counts 0, one missing
    in the target is left out. NaN when the target has no keypoint.
    """
    pred, target = np.asarray(pred, np.float64), np.asarray(target, np.float64)
    present = ~np.isnan(target).any(-1)
    if not present.any():
        return math.nan
    d2 = ((pred - target) ** 2).sum(-1)
    k2 = (2 * sigmas) ** 2
    sim = np.exp(-d2 / (2 * max(area, 1e-12) * k2))
    sim = np.where(np.isnan(sim), 0.0, sim)
    return float(sim[present].mean())


def person_area(keypoints: np.ndarray, height: int, width: int) -> float:
    """s² of a person for OKS: its present keypoints' box area, floored (see
    ``MIN_SCALE_FRACTION``)."""
    pts = keypoints[~np.isnan(keypoints).any(-1)]
    floor = (max(height, width) * MIN_SCALE_FRACTION) ** 2
    if len(pts) == 0:
        return floor
    extent = pts.max(0) - pts.min(0)
    return max(float(extent[0] * extent[1]), floor)


def people_oks(
    pred: Sequence[np.ndarray], target: Sequence[np.ndarray], height: int, width: int
) -> float:
    """OKS of the people in an image: one-to-one matching, best pair first; the matched OKS
    summed over ``max(len(target), len(pred))`` (missing and extra people count 0). NaN when the
    target has no person."""
    target = [t for t in target if not np.isnan(t).all()]
    pred = [p for p in pred if not np.isnan(p).all()]
    if not target:
        return math.nan
    if not pred:
        return 0.0
    oks = np.array(
        [[keypoint_oks(p, t, person_area(t, height, width)) for p in pred] for t in target]
    )
    total, used_t, used_p = 0.0, set(), set()
    for flat in np.argsort(-oks, axis=None, kind="stable"):
        i, j = np.unravel_index(flat, oks.shape)
        if i in used_t or j in used_p:
            continue
        used_t.add(i)
        used_p.add(j)
        total += oks[i, j]
    return total / max(len(target), len(pred))


def pose_oks(extracted: Sequence[np.ndarray], condition: Sequence[np.ndarray]) -> Tensor:
    """OKS between the people decoded from pose maps uint8 (H, W, 3), one per sample, (B,)."""
    from cn_lightning.conditions.pose import decode_pose_map

    scores = []
    for pred_map, cond_map in zip(extracted, condition, strict=True):
        h, w = cond_map.shape[:2]
        scores.append(
            people_oks(decode_pose_map(_rgb(pred_map)), decode_pose_map(_rgb(cond_map)), h, w)
        )
    return torch.tensor(scores, dtype=torch.float64)


# ------------------------------------------------------------------------------ seg mIoU
def seg_miou(predicted_map: Tensor, condition: Tensor) -> Tensor:
    """Mean IoU over present classes of two palette maps (B, 3, H, W) in [0, 1], (B,).

    Both maps are decoded to ADE20K class indices by nearest palette colour; pixels that are
    unlabelled (black) in the condition are ignored; a condition with no labelled pixel → NaN.
    """
    from cn_lightning.conditions import ADE20K_PALETTE, decode_colors

    num_classes = len(ADE20K_PALETTE)
    scores = []
    for pred_img, cond_img in zip(predicted_map, condition, strict=True):
        pred = torch.from_numpy(decode_colors(_to_uint8(pred_img)))
        target = torch.from_numpy(decode_colors(_to_uint8(cond_img)))
        if (target < 0).all():
            scores.append(torch.tensor(math.nan))
            continue
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


# ------------------------------------------------------------------------------- helpers
def _to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] → uint8 (H, W, 3)."""
    return (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _rgb(m: np.ndarray) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) → (H, W, 3)."""
    if m.ndim == 2:
        return np.repeat(m[:, :, None], 3, axis=2)
    return np.ascontiguousarray(m[:, :, :3])


def _grey(m: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, C) map → float (H, W), the channel mean (0–255)."""
    m = np.asarray(m, dtype=np.float64)
    return m[:, :, :3].mean(-1) if m.ndim == 3 else m


def _stack_grey(maps: Sequence[np.ndarray]) -> Tensor:
    """Maps → (B, 1, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack([_grey(m) for m in maps]))[:, None].float() / 255


def _stack_rgb(maps: Sequence[np.ndarray]) -> Tensor:
    """Maps → (B, 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.stack([_rgb(m) for m in maps])).permute(0, 3, 1, 2).float() / 255


def _resize_like(m: np.ndarray, like: np.ndarray, metric: str) -> np.ndarray:
    """``m`` at ``like``'s height and width: nearest neighbour for label-like maps (seg, pose),
    area/linear otherwise."""
    h, w = like.shape[:2]
    if m.shape[:2] == (h, w):
        return m
    import cv2

    if metric in ("seg_miou", "pose_oks"):
        interp = cv2.INTER_NEAREST
    else:
        interp = cv2.INTER_AREA if m.shape[0] > h else cv2.INTER_LINEAR
    return cv2.resize(m, (w, h), interpolation=interp)


# -------------------------------------------------------------------------------- Metric
class ConditionFidelity(torchmetrics.Metric):
    """Mean condition fidelity over many batches, reduced across processes by torchmetrics.

    ``update(generated, condition)`` takes (B, 3, H, W) tensors in [0, 1] and keeps the batch's
    per-sample scores in :attr:`batch_scores`; ``compute()`` returns the mean of every key of the
    metric (:data:`METRIC_KEYS`), NaN samples left out (each key counts its own samples, in
    :meth:`counts`). When no extractor can be built (:attr:`resolved` is ``None``, with the reason
    in :attr:`unavailable`) the metric scores nothing and computes ``{"fidelity": nan}``.
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
        self.resolved, self.unavailable = try_resolve_fidelity(condition_key, extractor_options)
        if self.resolved is None:
            log.warning(f"condition fidelity for {condition_key!r} is off: {self.unavailable}")
        self.metric_name = self.resolved.metric if self.resolved else None
        self.keys = METRIC_KEYS[self.metric_name] if self.resolved else ("fidelity",)
        self.batch_scores: dict[str, Tensor] = {}
        for key in self.keys:
            self.add_state(
                f"{key}_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
            self.add_state(f"{key}_count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, generated: Tensor, condition: Tensor) -> None:
        if self.resolved is None:
            self.batch_scores = {"fidelity": torch.full((len(generated),), math.nan)}
            return
        scores = condition_fidelity(
            generated,
            condition,
            self.condition_key,
            tolerance=self.tolerance,
            _resolved=self.resolved,
        )
        self.batch_scores = scores
        for key in self.keys:
            values = scores[key].double()
            finite = ~values.isnan()
            total = getattr(self, f"{key}_sum")
            total += values[finite].sum().to(total)
            count = getattr(self, f"{key}_count")
            count += finite.sum().to(count)

    def counts(self) -> dict[str, int]:
        """Samples behind each key's mean (after the cross-process reduction of ``compute``)."""
        return {key: int(getattr(self, f"{key}_count")) for key in self.keys}

    def compute(self) -> dict[str, Tensor]:
        out = {}
        for key in self.keys:
            count = getattr(self, f"{key}_count")
            mean = getattr(self, f"{key}_sum") / count.clamp(min=1).double()
            out[key] = torch.where(count > 0, mean, torch.nan).float()
        return out


__all__ = [
    "ConditionFidelity",
    "above_blank",
    "METRIC_KEYS",
    "ResolvedFidelity",
    "circle_iou",
    "condition_fidelity",
    "decode_normals",
    "depth_rmse",
    "disc_from_outline",
    "edge_f1",
    "edge_scores",
    "fidelity_metric_for",
    "fidelity_rows",
    "foreground_mask",
    "keypoint_oks",
    "normal_angle_scores",
    "people_oks",
    "pose_oks",
    "resolve_fidelity",
    "score_condition_maps",
    "seg_miou",
    "ssim_score",
    "swatch_scores",
    "line_scores",
    "try_resolve_fidelity",
]
