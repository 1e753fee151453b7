"""The synthetic circles world: fill50k-style toy data, white circle outline on black → filled
circle.

Each sample: condition = a white circle outline on black; target = the circle filled with
colour A on background colour B; prompt = "<colour A> circle with <colour B> background".
Centres and radii are random and circles may cross the border. Sample ``i`` depends only on
``(seed, i)``, so the data are identical for any number of workers or parts.

The command line is ``python -m data_prep.synthetic_circles``; the quickstart's ``prepare:``
config entry calls :func:`ensure_shards`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import cv2
import numpy as np
from tqdm import tqdm

from cn_lightning.atomic import write_json_atomic, write_text_atomic
from cn_lightning.data.format import encode_image, read_manifest
from cn_lightning.data.shard_writer import PrepConfig, RunSummary, SampleMaker, run_shards
from cn_lightning.data.transforms import apply_resize_policy

# Named colours (CSS names, RGB) as in the fill50k prompts.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 128, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "orange": (255, 165, 0),
    "purple": (128, 0, 128),
    "pink": (255, 192, 203),
    "brown": (165, 42, 42),
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "grey": (128, 128, 128),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
    "navy": (0, 0, 128),
    "teal": (0, 128, 128),
    "olive": (128, 128, 0),
    "maroon": (128, 0, 0),
    "lime": (0, 255, 0),
    "light coral": (240, 128, 128),
    "cornflower blue": (100, 149, 237),
    "dark slate blue": (72, 61, 139),
    "gold": (255, 215, 0),
    "salmon": (250, 128, 114),
    "turquoise": (64, 224, 208),
    "violet": (238, 130, 238),
    "beige": (245, 245, 220),
    "khaki": (240, 230, 140),
    "lavender": (230, 230, 250),
    "dark green": (0, 100, 0),
    "sky blue": (135, 206, 235),
    "chocolate": (210, 105, 30),
    "indigo": (75, 0, 130),
}
_NAMES = sorted(COLOURS)
CONDITION = "outline"


def circle_sample(index: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Sample ``index``: (outline uint8 (size,size), target uint8 RGB (size,size,3), prompt)."""
    rng = np.random.default_rng([seed, index])
    fg, bg = rng.choice(len(_NAMES), size=2, replace=False)
    centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
    radius = int(rng.integers(max(2, size // 20), max(3, int(size * 0.45))))
    thickness = max(1, size // 128)
    outline = np.zeros((size, size), np.uint8)
    cv2.circle(outline, centre, radius, 255, thickness, lineType=cv2.LINE_AA)
    target = np.empty((size, size, 3), np.uint8)
    target[:] = COLOURS[_NAMES[bg]]
    cv2.circle(target, centre, radius, COLOURS[_NAMES[fg]], -1, lineType=cv2.LINE_AA)
    return outline, target, circle_prompt(_NAMES[fg], _NAMES[bg])


def circle_prompt(circle: str, background: str) -> str:
    """The prompt of a sample: ``"<circle colour> circle with <background colour> background"``."""
    return f"{circle} circle with {background} background"


@dataclass
class CircleMaker(SampleMaker):
    """Item = sample index → sample with ``png`` target, ``outline.png`` condition."""

    size: int
    seed: int
    resolution: int | None
    resize: str
    image_format: str
    quality: int

    def make(self, item: int) -> dict[str, bytes | str]:
        outline, target, prompt = circle_sample(item, self.size, self.seed)
        outline = apply_resize_policy(outline, self.resolution, self.resize)
        target = apply_resize_policy(target, self.resolution, self.resize)
        # Binarise again after resizing: the condition is a clean 0/255 drawing.
        outline = np.where(outline > 127, 255, 0).astype(np.uint8)
        meta = {
            "source": "synthetic_circles",
            "seed": self.seed,
            "index": item,
            "original_size": [self.size, self.size],
            "condition": CONDITION,
        }
        return {
            "__key__": f"{item:09d}",
            self.image_format: encode_image(target, self.image_format, self.quality),
            f"{CONDITION}.png": encode_image(outline, "png"),
            "txt": prompt,
            "json": json.dumps(meta),
        }


def build_shards(
    out: str,
    num_samples: int,
    size: int,
    seed: int = 0,
    samples_per_shard: int = 1000,
    workers: int = 0,
    resolution: int | None = None,
    resize: str = "center_crop",
    image_format: str = "png",
    num_parts: int = 1,
    part_index: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> tuple[RunSummary, PrepConfig]:
    """Build circle shards in ``out`` (resumable); returns the run summary and config.

    Raises :class:`cn_lightning.data.shard_writer.ShardSettingsError` if ``out`` holds shards
    built with other settings (and ``overwrite`` is off)."""
    cfg = PrepConfig(
        out=out,
        prefix="circles",
        tool="synthetic_circles",
        resolution=resolution,
        resize=resize,
        image_format=image_format,
        quality=95,
        samples_per_shard=samples_per_shard,
        workers=workers,
        num_parts=num_parts,
        part_index=part_index,
        condition_types=[CONDITION],
        settings={"seed": seed, "size": size},
        overwrite=overwrite,
        progress=progress,
    )
    maker = CircleMaker(size, seed, resolution, resize, image_format, 95)
    return run_shards(range(num_samples), maker, cfg), cfg


def ensure_shards(
    out: str, num_samples: int, size: int, seed: int = 0, samples_per_shard: int = 500
) -> str:
    """Build the circle shards in ``out`` unless a complete matching set is there already;
    return their brace pattern. Used by the quickstart's ``prepare:`` config entry."""
    manifest = read_manifest(out)
    wanted = {"seed": seed, "size": size}
    if not (
        manifest
        and manifest.get("complete")
        and manifest.get("settings") == wanted
        and manifest.get("num_inputs") == num_samples
        and manifest.get("samples_per_shard") == samples_per_shard
    ):
        summary, _ = build_shards(
            out,
            num_samples,
            size,
            seed,
            samples_per_shard,
            workers=0,
            overwrite=manifest is not None,
            progress=False,
        )
        manifest = summary.manifest
    return os.path.join(out, manifest["pattern"])


def write_fill50k_layout(out: str, num_samples: int, size: int, seed: int) -> None:
    """The original ControlNet tutorial layout: prompt.json (JSON lines with source/target/
    prompt), source/<i>.png (outline, 3-channel) and target/<i>.png."""
    for sub in ("source", "target"):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    lines = []
    for i in tqdm(range(num_samples), desc="fill50k layout", unit="sample"):
        outline, target, prompt = circle_sample(i, size, seed)
        src, tgt = f"source/{i}.png", f"target/{i}.png"
        cv2.imwrite(os.path.join(out, src), cv2.cvtColor(outline, cv2.COLOR_GRAY2BGR))
        cv2.imwrite(os.path.join(out, tgt), cv2.cvtColor(target, cv2.COLOR_RGB2BGR))
        lines.append(json.dumps({"source": src, "target": tgt, "prompt": prompt}))
    write_text_atomic(os.path.join(out, "prompt.json"), "\n".join(lines) + "\n")
    write_json_atomic(
        os.path.join(out, "layout.json"),
        {"layout": "fill50k", "num_samples": num_samples, "size": size, "seed": seed},
    )


def scene_image(seed: int, height: int = 512, width: int = 512) -> np.ndarray:
    """A photo-like test scene, uint8 RGB (H, W, 3), that depends only on ``seed``: a sky
    gradient over a textured ground, a few shaded boxes, discs and polygons with outlines,
    straight lines and sensor noise. It has edges, lines, smooth depth cues and regions, so
    every condition extractor finds something in it (no photo needs to be downloaded)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = int(height * rng.uniform(0.35, 0.6))
    sky_top, sky_bottom = rng.uniform(40, 255, 3), rng.uniform(120, 255, 3)
    t = (yy / max(1, horizon))[..., None]
    image = sky_top * (1 - t) + sky_bottom * t
    ground = rng.uniform(30, 200, 3)
    stripes = 20 * np.sin(xx / rng.uniform(6, 20) + yy / rng.uniform(3, 9))[..., None]
    shade = (0.6 + 0.4 * (yy - horizon) / max(1, height - horizon))[..., None]
    image = np.where((yy >= horizon)[..., None], ground * shade + stripes, image)
    scale = min(height, width)
    for _ in range(int(rng.integers(3, 7))):
        colour = tuple(float(c) for c in rng.uniform(0, 255, 3))
        edge = tuple(float(c) * 0.4 for c in colour)
        cx, cy = int(rng.uniform(0.1, 0.9) * width), int(rng.uniform(0.2, 0.95) * height)
        size = int(rng.uniform(0.06, 0.2) * scale)
        kind = rng.integers(0, 3)
        if kind == 0:
            cv2.rectangle(image, (cx - size, cy - size), (cx + size, cy + size), colour, -1)
            cv2.rectangle(image, (cx - size, cy - size), (cx + size, cy + size), edge, 2)
        elif kind == 1:
            cv2.circle(image, (cx, cy), size, colour, -1)
            cv2.circle(image, (cx - size // 3, cy - size // 3), size // 3, (255, 255, 255), -1)
        else:
            points = rng.normal(0, size, (5, 2)) + (cx, cy)
            cv2.fillPoly(image, [points.astype(np.int32)], colour)
            cv2.polylines(image, [points.astype(np.int32)], True, edge, 2)
    for _ in range(int(rng.integers(2, 5))):
        p1 = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        p2 = (int(rng.uniform(0, width)), int(rng.uniform(0, height)))
        cv2.line(image, p1, p2, tuple(float(c) for c in rng.uniform(0, 255, 3)), 3)
    image = cv2.GaussianBlur(image, (0, 0), 0.8) + rng.normal(0, 4, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)
