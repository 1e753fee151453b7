"""Condition fidelity metrics on real synthetic-circle samples and hand-made edge/seg maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cn_lightning.conditions import ADE20K_PALETTE, canny
from cn_lightning.data.synthetic import circle_sample
from cn_lightning.metrics.fidelity import (
    ConditionFidelity,
    condition_fidelity,
    disc_from_outline,
    edge_f1,
    fidelity_metric_for,
    foreground_mask,
)


def _chw(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 3) → float (3, H, W) in [0, 1]."""
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(array).permute(2, 0, 1).float() / 255


def _circles(indices, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    outlines, targets = zip(*[circle_sample(i, size, seed)[:2] for i in indices], strict=True)
    return torch.stack([_chw(o) for o in outlines]), torch.stack([_chw(t) for t in targets])


def test_metric_names_per_condition():
    assert fidelity_metric_for("outline") == "circle_iou"
    for key in ("canny", "hed", "mlsd", "scribble"):
        assert fidelity_metric_for(key) == "edge_f1"
    assert fidelity_metric_for("seg") == "seg_miou"
    assert fidelity_metric_for("depth") == "ssim"
    assert fidelity_metric_for("normal") == "ssim"


@pytest.mark.parametrize("size", [64, 256])
def test_circle_iou_own_target_near_one_other_target_low(size):
    outlines, targets = _circles(range(24), size)
    own = condition_fidelity(targets, outlines, "outline")
    assert set(own) == {"circle_iou", "fidelity"}
    assert own["fidelity"].shape == (24,)
    assert torch.equal(own["fidelity"], own["circle_iou"])
    assert own["fidelity"].median() > 0.9 and own["fidelity"].min() > 0.65
    # The same targets against the outlines of other samples: the shapes do not match.
    other = condition_fidelity(targets.roll(1, dims=0), outlines, "outline")["fidelity"]
    assert other.mean() < 0.25
    assert (own["fidelity"] > other).float().mean() > 0.9


def test_disc_fit_recovers_circle_crossing_the_border():
    import cv2

    outline = np.zeros((64, 64), np.uint8)
    cv2.circle(outline, (60, 8), 20, 255, 1)  # mostly outside the image: only an arc is seen
    disc = disc_from_outline(torch.from_numpy(outline > 127))
    filled = np.zeros((64, 64), np.uint8)
    cv2.circle(filled, (60, 8), 20, 255, -1)
    truth = torch.from_numpy(filled > 127)
    iou = (disc & truth).sum() / (disc | truth).sum()
    assert iou > 0.9


def test_flat_or_noisy_images_score_low():
    outlines, _ = _circles(range(8), 64)
    flat = torch.full((8, 3, 64, 64), 0.4)
    assert not foreground_mask(flat[0]).any()
    assert condition_fidelity(flat, outlines, "outline")["fidelity"].max() == 0
    noise = torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert condition_fidelity(noise, outlines, "outline")["fidelity"].mean() < 0.35


def test_edge_f1_matches_torchmetrics_at_zero_tolerance_and_tolerates_shifts():
    from torchmetrics.functional.classification import binary_f1_score

    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 32, 32, generator=g) > 0.8
    target = torch.rand(3, 32, 32, generator=g) > 0.8
    ours = edge_f1(pred, target, tolerance=0)
    ref = binary_f1_score(pred.long(), target.long(), multidim_average="samplewise")
    assert torch.allclose(ours, ref)
    line = torch.zeros(1, 32, 32, dtype=torch.bool)
    line[0, 10, :] = True
    shifted = line.roll(1, dims=1)
    assert edge_f1(shifted, line, tolerance=0) == 0
    assert edge_f1(shifted, line, tolerance=1) == 1
    empty = torch.zeros(1, 32, 32, dtype=torch.bool)
    assert edge_f1(empty, empty) == 1 and edge_f1(empty, line) == 0


def test_canny_fidelity_of_the_image_its_edges_came_from():
    _, targets = _circles(range(4), 128)
    edges = torch.stack([_chw(canny(_uint8(t))) for t in targets])
    same = condition_fidelity(targets, edges, "canny")
    assert set(same) == {"edge_f1", "fidelity"}
    assert same["fidelity"].min() > 0.95
    shuffled = condition_fidelity(targets.roll(1, dims=0), edges, "canny")["fidelity"]
    assert shuffled.max() < 0.5


def bright_is_class_2(image: np.ndarray) -> np.ndarray:
    """A threshold segmenter (uint8 RGB → ADE20K labels): bright pixels class 2, others 0."""
    return np.where(image.mean(-1) > 127, 2, 0)


def test_seg_miou_with_a_configured_segmenter():
    image = torch.zeros(1, 3, 32, 32)
    image[:, :, :, 16:] = 1.0
    labels = np.where(np.arange(32)[None, :].repeat(32, 0) >= 16, 2, 0)
    condition = _chw(ADE20K_PALETTE[labels])[None]
    opts = {"predictor": "test_metrics_fidelity:bright_is_class_2"}
    good = condition_fidelity(image, condition, "seg", extractor_options=opts)
    assert set(good) == {"seg_miou", "fidelity"} and good["fidelity"].item() == pytest.approx(1.0)
    half = condition_fidelity(image.flip(-1), condition, "seg", extractor_options=opts)
    assert half["fidelity"].item() == pytest.approx(0.0)
    # Without a segmenter the metric falls back to SSIM instead of failing a training run.
    assert set(condition_fidelity(image, condition, "seg")) == {"ssim", "fidelity"}


def test_ssim_fallback_in_unit_range():
    g = torch.Generator().manual_seed(0)
    cond = torch.rand(2, 3, 32, 32, generator=g)
    same = condition_fidelity(cond, cond, "depth")
    assert same["fidelity"].allclose(torch.ones(2), atol=1e-4)
    other = condition_fidelity(torch.rand(2, 3, 32, 32, generator=g), cond, "depth")["fidelity"]
    assert ((other >= 0) & (other < 0.2)).all()


def test_condition_fidelity_metric_accumulates_means():
    outlines, targets = _circles(range(8), 64)
    metric = ConditionFidelity("outline")
    metric.update(targets[:5], outlines[:5])
    metric.update(targets[5:], outlines[5:])
    out = metric.compute()
    direct = condition_fidelity(targets, outlines, "outline")
    assert set(out) == {"circle_iou", "fidelity"}
    assert out["fidelity"].item() == pytest.approx(direct["fidelity"].mean().item(), abs=1e-6)


def _uint8(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().byte().permute(1, 2, 0).numpy()
