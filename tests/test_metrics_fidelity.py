"""Condition fidelity metrics on real synthetic-circle samples and hand-made condition maps:
edges, segmentation, depth, normals, pose keypoints; the torchmetrics reduction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cn_lightning.conditions import ADE20K_PALETTE, canny
from cn_lightning.data.synthetic import circle_sample
from cn_lightning.metrics.fidelity import (
    METRIC_KEYS,
    ConditionFidelity,
    condition_fidelity,
    disc_from_outline,
    edge_f1,
    edge_scores,
    fidelity_metric_for,
    foreground_mask,
    keypoint_oks,
    people_oks,
    resolve_fidelity,
    score_condition_maps,
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
    for key in ("canny", "mlsd", "scribble"):
        assert fidelity_metric_for(key) == "edge_f1"
    for key in ("hed", "softedge", "lineart", "my_plugin"):
        assert fidelity_metric_for(key) == "ssim"
    assert fidelity_metric_for("seg") == "seg_miou"
    assert fidelity_metric_for("depth") == "depth_rmse"
    assert fidelity_metric_for("normal") == "normal_angle"
    assert fidelity_metric_for("openpose") == "pose_oks"


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
    ours = edge_f1(pred, target, tolerance=0, chance_corrected=False)
    ref = binary_f1_score(pred.long(), target.long(), multidim_average="samplewise")
    assert torch.allclose(ours, ref)
    # Two independent random maps: chance-corrected, they agree on nothing.
    assert edge_f1(pred, target, tolerance=0).max() < 0.05
    line = torch.zeros(1, 32, 32, dtype=torch.bool)
    line[0, 10, :] = True
    shifted = line.roll(1, dims=1)
    assert edge_f1(shifted, line, tolerance=0) == 0
    assert edge_f1(shifted, line, tolerance=1) == 1
    empty = torch.zeros(1, 32, 32, dtype=torch.bool)
    assert edge_f1(empty, empty) == 1 and edge_f1(empty, line) == 0 and edge_f1(line, empty) == 0


def _two_shapes(size: int) -> np.ndarray:
    import cv2

    image = np.full((size, size, 3), 200, np.uint8)
    cv2.circle(image, (size // 3, size // 3), size // 5, (30, 60, 200), -1)
    cv2.rectangle(image, (size // 2, size // 2), (size * 7 // 8, size * 7 // 8), (20, 150, 40), -1)
    return image


@pytest.mark.parametrize("size", [64, 512])
def test_edge_f1_does_not_reward_noise(size):
    """The issue's case: uniform pixel noise against the Canny map of two filled shapes scored
    0.11 at 512 px. Chance-corrected, noise and a flat image score ~0; the image itself and a
    copy shifted by 1 px score 1 (the default tolerance is 1 px per 512 px)."""
    image = _two_shapes(size)
    condition = canny(image)
    rng = np.random.default_rng(0)
    samples = {
        "noise": rng.integers(0, 256, image.shape, dtype=np.uint8),
        "flat": np.full_like(image, 128),
        "shifted": np.roll(image, (1, -1), axis=(0, 1)),
        "same": image,
    }
    scores = score_condition_maps(
        "edge_f1", [canny(x) for x in samples.values()], [condition] * len(samples)
    )
    assert set(scores) == set(METRIC_KEYS["edge_f1"])
    got = dict(zip(samples, scores["fidelity"].tolist(), strict=True))
    assert got["noise"] < 0.02 and got["flat"] == 0
    assert got["shifted"] > 0.95 and got["same"] == pytest.approx(1.0)
    assert scores["edge_precision"][0] < 0.02  # noise: its edges are where chance puts them
    # The old setting (tolerance 0.75% of the diagonal, no correction) rewarded noise; the
    # correction alone removes that, even at that tolerance.
    pred = torch.from_numpy(canny(samples["noise"]) > 127)[None]
    target = torch.from_numpy(condition > 127)[None]
    old_tolerance = max(1, round(0.0075 * math.hypot(size, size)))
    raw = edge_scores(pred, target, old_tolerance, chance_corrected=False)
    assert raw["edge_f1"] > 0.08
    assert edge_scores(pred, target, old_tolerance)["edge_f1"] < 0.02


def test_canny_fidelity_of_the_image_its_edges_came_from():
    _, targets = _circles(range(4), 128)
    edges = torch.stack([_chw(canny(_uint8(t))) for t in targets])
    same = condition_fidelity(targets, edges, "canny")
    assert set(same) == set(METRIC_KEYS["edge_f1"])
    assert same["fidelity"].min() > 0.95
    assert torch.equal(same["fidelity"], same["edge_f1"])
    shuffled = condition_fidelity(targets.roll(1, dims=0), edges, "canny")
    assert shuffled["fidelity"].max() < 0.3
    assert (shuffled["edge_precision"] <= 1).all() and (shuffled["edge_recall"] >= 0).all()


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
    # A condition with no labelled pixel: undefined.
    blank = condition_fidelity(image, torch.zeros_like(condition), "seg", extractor_options=opts)
    assert blank["fidelity"].isnan().all()


def test_no_extractor_means_no_fidelity_with_one_warning(caplog):
    """Without weights (or for an unknown condition) fidelity is off, never a raw-image SSIM."""
    for key, option in (("seg", "--weights"), ("depth", "--weights"), ("nonesuch", "register")):
        caplog.clear()
        with caplog.at_level("WARNING", logger="cn_lightning"):
            assert resolve_fidelity(key) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and key in warnings[0] and option in warnings[0], warnings
    image = torch.rand(2, 3, 32, 32)
    scores = condition_fidelity(image, image, "depth")
    assert set(scores) == {"fidelity"} and scores["fidelity"].isnan().all()
    metric = ConditionFidelity("depth")
    assert metric.resolved is None and "--weights" in metric.unavailable
    metric.update(image, image)
    assert metric.compute()["fidelity"].isnan()


def _flat_depth(size: int = 32) -> np.ndarray:
    """A ramp (far at the top, near at the bottom) with a near box: uint8 (H, W)."""
    depth = np.repeat(np.linspace(20, 200, size)[:, None], size, axis=1)
    depth[8:20, 8:20] = 240
    return depth.round().astype(np.uint8)


def test_depth_rmse_in_0_255_units_and_score_against_a_blank_map():
    cond = _flat_depth()
    rng = np.random.default_rng(0)
    maps = {
        "same": cond,
        "off by 10": np.clip(cond.astype(int) + 10, 0, 255).astype(np.uint8),
        "black": np.zeros_like(cond),
        "blank": np.full_like(cond, int(np.median(cond))),
        "unrelated": rng.permutation(cond.ravel()).reshape(cond.shape),
    }
    scores = score_condition_maps("depth_rmse", list(maps.values()), [cond] * len(maps))
    rmse = dict(zip(maps, scores["depth_rmse"].tolist(), strict=True))
    score = dict(zip(maps, scores["fidelity"].tolist(), strict=True))
    assert rmse["same"] == 0 and score["same"] == 1
    assert rmse["off by 10"] == pytest.approx(10, abs=0.2)
    blank_rmse = rmse["blank"]
    assert score["off by 10"] == pytest.approx(1 - rmse["off by 10"] / blank_rmse, abs=1e-5)
    assert score["black"] == 0 and score["blank"] == 0 and score["unrelated"] == 0
    flat = score_condition_maps("depth_rmse", [cond], [np.full_like(cond, 7)])
    assert flat["fidelity"].isnan().all()  # a flat condition has nothing to follow


def _normals(vectors: np.ndarray) -> np.ndarray:
    v = vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.clip(np.round(v * 127.5 + 127.5), 0, 255).astype(np.uint8)


def test_normal_angle_decodes_uint8_vectors():
    up = np.zeros((16, 16, 3))
    up[..., 2] = 1
    tilted = up.copy()
    tilted[:, 12:] = [np.sin(np.radians(60)), 0, np.cos(np.radians(60))]
    cond = _normals(tilted)  # a quarter of the pixels tilted by 60°, the rest facing the camera
    scores = score_condition_maps(
        "normal_angle", [cond, _normals(up), _normals(tilted[:, ::-1])], [cond] * 3
    )
    angle = scores["normal_angle"].tolist()
    assert angle[0] == pytest.approx(0, abs=1.0)
    assert angle[1] == pytest.approx(15, abs=1.0)  # a quarter of the pixels off by 60°
    assert angle[2] == pytest.approx(30, abs=1.0)  # half of them
    # Score: the share within 30° above a blank map's (every pixel the median normal, here
    # facing the camera: 3/4 right). The blank map itself and a worse one score 0.
    assert scores["fidelity"].tolist() == pytest.approx([1.0, 0.0, 0.0], abs=1e-6)
    grey = np.full_like(cond, 128)  # no normal anywhere: undefined
    assert score_condition_maps("normal_angle", [cond], [grey])["fidelity"].isnan().all()


def _person(dx: float = 0.0) -> np.ndarray:
    pts = np.array(
        [
            [64, 22], [64, 34], [52, 35], [46, 52], [42, 68], [76, 35], [82, 52], [86, 68],
            [56, 68], [55, 90], [54, 112], [72, 68], [73, 90], [74, 112], [61, 19], [67, 19],
            [57, 21], [71, 21],
        ],
        dtype=np.float64,
    )  # fmt: skip
    pts[:, 0] += dx
    return pts


def test_keypoint_oks_follows_coco():
    person = _person()
    area = 44 * 93  # the keypoints' box
    assert keypoint_oks(person, person, area) == 1
    # COCO: exp(-d² / (2 s² (2σ)²)) averaged over the target's keypoints.
    moved = person + [3, 4]
    sigmas = np.array([0.026, 0.079, 0.079, 0.072, 0.062, 0.079, 0.072, 0.062, 0.107, 0.087,
                       0.089, 0.107, 0.087, 0.089, 0.025, 0.025, 0.035, 0.035])  # fmt: skip
    expected = np.exp(-25 / (2 * area * (2 * sigmas) ** 2)).mean()
    assert keypoint_oks(moved, person, area) == pytest.approx(expected)
    # Missing in the target: left out; missing in the prediction: 0.
    partial = person.copy()
    partial[10:] = np.nan
    assert keypoint_oks(person, partial, area) == 1
    assert keypoint_oks(partial, person, area) == pytest.approx(10 / 18)
    assert np.isnan(keypoint_oks(person, np.full_like(person, np.nan), area))


def test_people_oks_matches_one_to_one_and_is_undefined_without_people():
    a, b = _person(), _person(dx=-40)
    small_move = a + np.random.default_rng(0).uniform(-2, 2, a.shape)
    assert people_oks([small_move], [a], 128, 128) > 0.8
    assert people_oks([b], [a], 128, 128) < 0.05
    assert people_oks([], [a], 128, 128) == 0
    assert np.isnan(people_oks([a], [], 128, 128))  # no person in the condition: undefined
    assert people_oks([b, a], [a, b], 128, 128) == pytest.approx(1.0)
    # An extra person counts against the score; a missing one too.
    assert people_oks([a, b], [a], 128, 128) == pytest.approx(0.5, abs=0.05)
    assert people_oks([a], [a, b], 128, 128) == pytest.approx(0.5)


def test_condition_fidelity_metric_accumulates_means():
    outlines, targets = _circles(range(8), 64)
    metric = ConditionFidelity("outline")
    metric.update(targets[:5], outlines[:5])
    metric.update(targets[5:], outlines[5:])
    out = metric.compute()
    direct = condition_fidelity(targets, outlines, "outline")
    assert set(out) == {"circle_iou", "fidelity"}
    assert out["fidelity"].item() == pytest.approx(direct["fidelity"].mean().item(), abs=1e-6)
    assert metric.counts() == {"fidelity": 8, "circle_iou": 8}


def identity_map(image: np.ndarray) -> np.ndarray:
    """A plug-in "extractor" whose condition map is the image itself."""
    return image


def test_condition_fidelity_metric_skips_undefined_samples_per_key(monkeypatch):
    """A NaN sample (a flat condition: nothing to follow) is left out of ``fidelity``'s mean and
    count, but not out of the keys where it is defined (its SSIM is 1)."""
    from cn_lightning.conditions import registry

    spec = registry.ExtractorSpec("identity_map", identity_map)
    monkeypatch.setitem(registry._REGISTRY, "identity_map", spec)
    metric = ConditionFidelity("identity_map")
    assert metric.metric_name == "ssim"  # a plug-in without a metric of its own
    flat = torch.full((1, 3, 16, 16), 0.5)
    cond = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    metric.update(flat, flat)
    assert metric.batch_scores["fidelity"].isnan().all()
    metric.update(cond, cond)
    out = metric.compute()
    assert metric.counts() == {"fidelity": 2, "ssim": 3}
    assert out["fidelity"].item() == pytest.approx(1.0) and out["ssim"].item() == pytest.approx(1)


def _uint8(image: torch.Tensor) -> np.ndarray:
    return (image * 255).round().byte().permute(1, 2, 0).numpy()
