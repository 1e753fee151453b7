"""Does condition fidelity mean something? Degenerate samples vs one that follows the condition.

For every condition, a condition map is extracted from a photo-like synthetic scene with the
condition's registered extractor, and :func:`cn_lightning.metrics.condition_fidelity` scores

- the *matching* sample: the scene the condition was extracted from (it follows the condition
  exactly; re-extraction is deterministic, so it should score ~1), and
- *degenerate* samples: a black image, uniform pixel noise, and an unrelated photo-like scene.

Model-based extractors run with random weights in their real on-disk format
(:mod:`cn_lightning.conditions.random_weights`): no download, and the same code path as with the
published weights, but the maps mean little, so this checks the metric, not the annotator.
``outline`` (the circles toy) scores a target image against its own outline, ``swatch``,
``xline`` and ``yline`` (its composition world) against its own colour swatch and centre lines
(a circle away from the middle, and another whose centre is at least a quarter of the image
away: uniform noise reads as a circle in the middle). ``openpose``: a
random-weight body network detects no one in a synthetic scene, so the pose metric is checked on
pose maps drawn from hand-made keypoints (``draw_body_pose``): matching = the same keypoints moved
by at most 2 px, degenerate = black and another pose.

    python benchmarks/fidelity_sanity.py [--size 256]

prints a Markdown table: condition | metric | degenerate scores | matching score.
``tests/test_fidelity_conditions.py`` runs the same cases at a small size.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

CONDITIONS = (
    "canny",
    "hed",
    "softedge",
    "scribble",
    "lineart",
    "mlsd",
    "depth",
    "normal",
    "openpose",
    "seg",
    "outline",
    "swatch",
    "xline",
    "yline",
)


@dataclass
class Case:
    """The scores of one condition: ``fidelity`` of each sample, and the metric's raw value."""

    condition: str
    metric: str
    degenerate: dict[str, float]
    matching: float
    raw: dict[str, float] = field(default_factory=dict)
    note: str = ""


# ------------------------------------------------------------------------------- images
def scene(seed: int, size: int) -> np.ndarray:
    """A photo-like synthetic image, uint8 (size, size, 3): a shaded sky and ground, a few
    shaded, textured objects (discs, boxes, triangles) with soft shadows, sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    horizon = rng.uniform(0.35, 0.6)
    sky_top, sky_low = rng.uniform(80, 255, 3), rng.uniform(150, 255, 3)
    ground_near, ground_far = rng.uniform(20, 140, 3), rng.uniform(60, 200, 3)
    t_sky = (yy / horizon)[..., None]
    t_ground = ((yy - horizon) / (1 - horizon))[..., None]
    sky = sky_top * (1 - t_sky) + sky_low * t_sky
    ground = ground_far * (1 - t_ground) + ground_near * t_ground
    image = np.where((yy < horizon)[..., None], sky, ground).astype(np.float32)
    # Ground texture: fine stripes in perspective.
    image += (4 * np.sin(60 * xx * (0.5 + yy)) * (yy > horizon))[..., None]
    for _ in range(int(rng.integers(3, 6))):
        mask = np.zeros((size, size), np.uint8)
        cx, cy = rng.uniform(0.15, 0.85) * size, rng.uniform(horizon, 0.9) * size
        r = rng.uniform(0.07, 0.2) * size
        kind = rng.integers(3)
        if kind == 0:
            cv2.circle(mask, (int(cx), int(cy - r)), int(r), 1, -1)
        elif kind == 1:
            cv2.rectangle(mask, (int(cx - r), int(cy - 2 * r)), (int(cx + r), int(cy)), 1, -1)
        else:
            pts = np.array([[cx - r, cy], [cx + r, cy], [cx, cy - 2.2 * r]], np.int32)
            cv2.fillPoly(mask, [pts], 1)
        shadow = cv2.GaussianBlur(np.roll(mask, (size // 40, size // 25), (0, 1)), (0, 0), 2)
        image *= 1 - 0.35 * shadow[..., None].astype(np.float32)
        colour = rng.uniform(0, 255, 3)
        shade = 0.6 + 0.5 * (1 - (xx - cx / size + 0.3))  # lit from the left
        texture = 1 + 0.12 * np.sin(rng.uniform(20, 50) * (xx + rng.uniform(-1, 1) * yy))
        obj = colour * (shade * texture)[..., None]
        image = np.where(mask[..., None] > 0, obj, image)
    image = cv2.GaussianBlur(image, (0, 0), 0.6)
    image += rng.normal(0, 3, image.shape)
    return np.clip(image, 0, 255).round().astype(np.uint8)


def uniform_noise(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W) or (H, W, 3) arrays → (B, 3, H, W) in [0, 1]."""
    rgb = [np.repeat(a[:, :, None], 3, 2) if a.ndim == 2 else a[:, :, :3] for a in images]
    return torch.from_numpy(np.stack(rgb)).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------------------ extractors
def colour_segmenter(image: np.ndarray) -> np.ndarray:
    """A deterministic stand-in segmenter (uint8 RGB → ADE20K class indices): the brightest
    channel and brightness band of each pixel pick one of 12 classes."""
    img = image.astype(np.int32)
    band = np.clip(img.sum(-1) // 192, 0, 3)
    return img.argmax(-1) * 4 + band


def extractor_options(name: str, weights_dir: Path) -> dict:
    """Options that build ``name``: random weights for a model-based one, a stand-in predictor
    for a predictor-based ``seg``, none for a classical one."""
    from cn_lightning.conditions import get_spec
    from cn_lightning.conditions.random_weights import needs_weights, write_random_weights

    if needs_weights(name):
        options = {"weights": write_random_weights(name, weights_dir), "device": "cpu"}
        if name == "normal":
            # The random depth network's slopes are gentle: at the default z of 2π every normal
            # would be within ~10° of the view axis. A smaller z makes the normals vary.
            options["a"] = 1.0
        return options
    if name == "seg" and "predictor" in get_spec(name).factory.__init__.__code__.co_varnames:
        return {"predictor": f"{Path(__file__).stem}:colour_segmenter"}
    return {}


# ------------------------------------------------------------------------------- cases
def run_case(name: str, size: int, weights_dir: Path) -> Case:
    """Scores of the degenerate and matching samples for condition ``name`` at ``size`` px."""
    from cn_lightning.metrics.fidelity import condition_fidelity, fidelity_metric_for

    metric = fidelity_metric_for(name)
    if name == "outline":
        return _outline_case(size)
    if name == "swatch":
        return _swatch_case(size)
    if name in ("xline", "yline"):
        return _line_case(name, size)
    from cn_lightning.conditions import extract_batch
    from cn_lightning.metrics.fidelity import resolve_fidelity

    resolved = resolve_fidelity(name, extractor_options(name, weights_dir))
    if resolved is None:
        raise RuntimeError(f"no extractor for {name!r}")
    source = scene(0, size)
    condition = extract_batch(resolved.extractor, [source])[0]
    if name == "openpose" and not _has_person(condition):
        return _drawn_pose_case(size)
    samples = {
        "black": np.zeros_like(source),
        "noise": uniform_noise(1, size),
        "unrelated": scene(7, size),
        "matching": source,
    }
    scores = condition_fidelity(
        _tensor(list(samples.values())),
        _tensor([condition] * len(samples)),
        name,
        _resolved=resolved,
    )
    return _case(name, metric, list(samples), scores)


def _case(name: str, metric: str, names: list[str], scores: dict) -> Case:
    fidelity = [float(v) for v in scores["fidelity"]]
    raw = {}
    if metric in ("ssim", "depth_rmse", "normal_angle"):
        raw = {n: float(v) for n, v in zip(names, scores[metric], strict=True)}
    by_name = dict(zip(names, fidelity, strict=True))
    matching = by_name.pop("matching")
    return Case(name, metric, by_name, matching, raw)


def _outline_case(size: int) -> Case:
    """The circles toy: a target image against its own outline (and others')."""
    from cn_lightning.data.synthetic import circle_sample
    from cn_lightning.metrics.fidelity import condition_fidelity

    outline, target, _ = circle_sample(3, size, 0)
    _, other, _ = circle_sample(4, size, 0)
    names = ["black", "noise", "unrelated", "matching"]
    images = [np.zeros_like(target), uniform_noise(1, size), other, target]
    scores = condition_fidelity(_tensor(images), _tensor([outline] * 4), "outline")
    return _case("outline", "circle_iou", names, scores)


def _swatch_case(size: int) -> Case:
    """The circles toy's second condition: a target image against its own colour swatch (and
    another sample whose circle has another colour)."""
    from cn_lightning.data.synthetic import swatch_sample
    from cn_lightning.metrics.fidelity import condition_fidelity

    _, swatch, target, _ = swatch_sample(3, size, 0)
    other = next(
        t
        for i in range(4, 64)
        for _, s, t, _ in [swatch_sample(i, size, 0)]
        if not np.array_equal(s[0, 0], swatch[0, 0])
    )
    names = ["black", "noise", "unrelated", "matching"]
    images = [np.zeros_like(target), uniform_noise(1, size), other, target]
    scores = condition_fidelity(_tensor(images), _tensor([swatch] * 4), "swatch")
    return _case("swatch", "swatch_match", names, scores)


def _line_case(name: str, size: int) -> Case:
    """The composition world's centre lines: a target image against its own line (its circle at
    least a quarter of the image from the middle along the line's axis), and another sample's
    circle at least a quarter of the image from it."""
    from cn_lightning.conditions.lines import line_position
    from cn_lightning.data.synthetic import line_conditions, swatch_sample
    from cn_lightning.metrics.fidelity import condition_fidelity

    def where(i: int) -> float:
        return line_position(line_conditions(i, size, 0)[name], name)

    index = next(i for i in range(64) if abs(where(i) - size / 2) >= size / 4)
    other = next(i for i in range(64) if abs(where(i) - where(index)) >= size / 4)
    condition = line_conditions(index, size, 0)[name]
    target, unrelated = swatch_sample(index, size, 0)[2], swatch_sample(other, size, 0)[2]
    names = ["black", "noise", "unrelated", "matching"]
    images = [np.zeros_like(target), uniform_noise(1, size), unrelated, target]
    scores = condition_fidelity(_tensor(images), _tensor([condition] * 4), name)
    return _case(name, "line_match", names, scores)


def _has_person(pose_map: np.ndarray) -> bool:
    from cn_lightning.conditions.pose import decode_pose_map

    return any(not np.isnan(p).all() for p in decode_pose_map(np.asarray(pose_map)))


def standing_person(size: int, dx: float = 0.0, arms_up: bool = False) -> np.ndarray:
    """18 OpenPose body keypoints (x, y) of a standing person filling most of the height."""
    s = size / 128
    # nose, neck, r sho, r elb, r wri, l sho, l elb, l wri, r hip, r knee, r ank, l hip, l knee,
    # l ank, r eye, l eye, r ear, l ear (the person faces the viewer: right is image left).
    pts = np.array(
        [
            [64, 22], [64, 34], [52, 35], [46, 52], [42, 68], [76, 35], [82, 52], [86, 68],
            [56, 68], [55, 90], [54, 112], [72, 68], [73, 90], [74, 112], [61, 19], [67, 19],
            [57, 21], [71, 21],
        ],
        dtype=np.float64,
    )  # fmt: skip
    if arms_up:
        pts[[3, 4, 6, 7]] = [[44, 24], [40, 8], [84, 24], [88, 8]]
    pts[:, 0] += dx
    return pts * s


def _drawn_pose_case(size: int) -> Case:
    """OKS on pose maps drawn from hand-made keypoints (the extraction step left out)."""
    from cn_lightning.conditions.pose import draw_body_pose
    from cn_lightning.metrics.fidelity import score_condition_maps

    person = standing_person(size)
    moved = person + np.random.default_rng(0).uniform(-2, 2, person.shape)
    condition = draw_body_pose([person], size, size)
    maps = {
        "black": np.zeros_like(condition),
        "other pose": draw_body_pose(
            [standing_person(size, dx=-size * 0.15, arms_up=True)], size, size
        ),
        "matching": draw_body_pose([moved], size, size),
    }
    scores = score_condition_maps("pose_oks", list(maps.values()), [condition] * len(maps))
    case = _case("openpose", "pose_oks", list(maps), scores)
    case.note = "drawn pose maps: a random-weight OpenPose finds no one in the scene"
    return case


def run_all(size: int, weights_dir: Path, conditions: tuple[str, ...] = CONDITIONS) -> list[Case]:
    return [run_case(name, size, weights_dir) for name in conditions]


# ------------------------------------------------------------------------------- table
LABELS = {
    "circle_iou": "circle IoU",
    "swatch_match": "circle colour = swatch colour",
    "line_match": "circle centre within 10% of the line",
    "edge_f1": "edge F1 (chance-corrected)",
    "ssim": "SSIM above a blank map's",
    "depth_rmse": "1 - RMSE / blank map's RMSE",
    "normal_angle": "share within 30 deg above a blank map's",
    "pose_oks": "OKS",
    "seg_miou": "mIoU",
}


def table(cases: list[Case]) -> str:
    lines = [
        "| condition | metric | degenerate scores | matching score |",
        "|---|---|---|---|",
    ]
    for c in cases:
        degenerate = ", ".join(
            f"{name} {_fmt(v)}" + _raw(c, name) for name, v in c.degenerate.items()
        )
        metric = LABELS[c.metric] + (f" ({c.note})" if c.note else "")
        lines.append(
            f"| {c.condition} | {metric} | {degenerate} | {_fmt(c.matching)}{_raw(c, 'matching')} |"
        )
    return "\n".join(lines)


def _fmt(v: float) -> str:
    return "NaN" if math.isnan(v) else f"{v:.3f}"


def _raw(case: Case, name: str) -> str:
    if name not in case.raw:
        return ""
    value = case.raw[name]
    if case.metric == "ssim":
        return f" (SSIM {value:.3f})"
    if case.metric == "depth_rmse":
        return f" (RMSE {value:.1f})"
    return f" (mean {value:.1f} deg)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image size in px (default 256)")
    parser.add_argument("conditions", nargs="*", default=list(CONDITIONS))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # for the stand-in segmenter
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        cases = run_all(args.size, Path(tmp), tuple(args.conditions))
    print(f"Condition fidelity at {args.size} px (model-based extractors with random weights)\n")
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
