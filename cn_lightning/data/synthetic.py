"""The synthetic circles world: fill50k-style toy data, white circle outline on black → filled
circle.

Each sample: condition = a white circle outline on black; target = the circle filled with
colour A on background colour B; prompt = "<colour A> circle with <colour B> background".
Centres and radii are random and circles may cross the border. Sample ``i`` depends only on
``(seed, i)``, so the data are identical for any number of workers or parts.

Two variants of the world (both off by default, so existing shards stay valid):

- ``palette="community"`` (:data:`PALETTES`): the prompts' colour names are drawn in other
  palette colours (a fixed permutation, :func:`community_palette`): the data a toy "community
  model" is fine-tuned on (``python -m cn_lightning.pretrain_toy --config-name finetune_toy``).
- ``swatch=True``: the composition world. The circle lies fully inside the image (radius 15-35%
  of the size), so its colour and centre can always be read back, and each sample has three
  more conditions next to the outline: ``<key>.swatch.png``, an image filled with the circle's
  colour (:mod:`cn_lightning.conditions.colour`), and ``<key>.xline.png`` / ``<key>.yline.png``,
  lines through the circle's centre (:mod:`cn_lightning.conditions.lines`). ControlNets on the
  two lines, summed, place the circle at both coordinates: the paper's composition by addition.

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
from cn_lightning.conditions.colour import COLOURS, MIN_DISTANCE, swatch_image
from cn_lightning.conditions.lines import centre_line
from cn_lightning.data.format import encode_image, read_manifest
from cn_lightning.data.shard_writer import PrepConfig, RunSummary, SampleMaker, run_shards
from cn_lightning.data.transforms import apply_resize_policy

_NAMES = sorted(COLOURS)
CONDITION = "outline"
SWATCH = "swatch"
# The composition world's conditions besides the outline (``swatch=True``).
COMPOSITION_CONDITIONS = (SWATCH, "xline", "yline")
# The community palette's shift in the sorted colour names (see community_palette).
COMMUNITY_SHIFT = 5


def community_palette() -> dict[str, tuple[int, int, int]]:
    """The toy "community model"'s palette: colour name ``i`` (in sorted order) is drawn in the
    colour of name ``i + 5`` (mod 32), e.g. "red" in violet, "blue" in dark green. A permutation of
    the palette, so every colour stays one the toy's VAE was trained on; of the 31 shifts, 5
    moves every colour farthest (at least 122 RGB units, 239 on average)."""
    return {
        name: COLOURS[_NAMES[(i + COMMUNITY_SHIFT) % len(_NAMES)]] for i, name in enumerate(_NAMES)
    }


# Name -> RGB each colour name is drawn in, per palette.
PALETTES: dict[str, dict[str, tuple[int, int, int]]] = {
    "toy": COLOURS,
    "community": community_palette(),
}


def _palette(name: str) -> dict[str, tuple[int, int, int]]:
    if name not in PALETTES:
        raise ValueError(f"unknown palette {name!r}; known: {', '.join(PALETTES)}")
    return PALETTES[name]


def _draw(
    size: int,
    centre: tuple[int, int],
    radius: int,
    fg: tuple[int, int, int],
    bg: tuple[int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """(outline uint8 (size, size), target uint8 RGB (size, size, 3)) of one circle."""
    thickness = max(1, size // 128)
    outline = np.zeros((size, size), np.uint8)
    cv2.circle(outline, centre, radius, 255, thickness, lineType=cv2.LINE_AA)
    target = np.empty((size, size, 3), np.uint8)
    target[:] = bg
    cv2.circle(target, centre, radius, fg, -1, lineType=cv2.LINE_AA)
    return outline, target


def circle_sample(
    index: int, size: int, seed: int, palette: str = "toy"
) -> tuple[np.ndarray, np.ndarray, str]:
    """Sample ``index``: (outline uint8 (size,size), target uint8 RGB (size,size,3), prompt).

    ``palette`` says which RGB each colour name is drawn in (:data:`PALETTES`); the outline and
    the prompt do not depend on it."""
    colours = _palette(palette)
    rng = np.random.default_rng([seed, index])
    fg, bg = rng.choice(len(_NAMES), size=2, replace=False)
    centre = (int(rng.integers(0, size)), int(rng.integers(0, size)))
    radius = int(rng.integers(max(2, size // 20), max(3, int(size * 0.45))))
    outline, target = _draw(size, centre, radius, colours[_NAMES[fg]], colours[_NAMES[bg]])
    return outline, target, circle_prompt(_NAMES[fg], _NAMES[bg])


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _composition_geometry(
    index: int, size: int, seed: int
) -> tuple[str, str, int, tuple[int, int]]:
    """(circle colour name, background colour name, radius, centre) of sample ``index`` of the
    composition world: the circle fully inside, its radius 15-35% of the size, its colour and
    the background's at least :data:`~cn_lightning.conditions.colour.MIN_DISTANCE` apart in
    the toy palette (gold on orange would read as no circle at all)."""
    rng = np.random.default_rng([seed, index, 2])
    fg, bg = rng.choice(len(_NAMES), size=2, replace=False)
    while _distance(COLOURS[_NAMES[fg]], COLOURS[_NAMES[bg]]) < MIN_DISTANCE:
        fg, bg = rng.choice(len(_NAMES), size=2, replace=False)
    radius = int(rng.integers(max(2, int(size * 0.15)), max(3, int(size * 0.35)) + 1))
    # Inside with a 2 px margin: no part of the circle (or its anti-aliased rim) on the border.
    low, high = radius + 2, max(radius + 3, size - radius - 2)
    centre = (int(rng.integers(low, high)), int(rng.integers(low, high)))
    return _NAMES[fg], _NAMES[bg], radius, centre


def swatch_sample(
    index: int, size: int, seed: int, palette: str = "toy"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Sample ``index`` of the composition world: (outline uint8 (size, size), swatch uint8 RGB
    (size, size, 3) filled with the circle's colour, target uint8 RGB, prompt). See
    :func:`_composition_geometry`; :func:`line_conditions` gives its centre lines."""
    colours = _palette(palette)
    fg, bg, radius, centre = _composition_geometry(index, size, seed)
    outline, target = _draw(size, centre, radius, colours[fg], colours[bg])
    return outline, swatch_image(colours[fg], size, size), target, circle_prompt(fg, bg)


def line_conditions(index: int, size: int, seed: int) -> dict[str, np.ndarray]:
    """The centre lines of sample ``index`` of the composition world: ``{"xline", "yline"}`` ->
    uint8 RGB (size, size, 3) (:func:`cn_lightning.conditions.lines.centre_line`)."""
    _, _, _, (x, y) = _composition_geometry(index, size, seed)
    return {
        "xline": centre_line(x, size, size, "xline"),
        "yline": centre_line(y, size, size, "yline"),
    }


def circle_prompt(circle: str, background: str) -> str:
    """The prompt of a sample: ``"<circle colour> circle with <background colour> background"``."""
    return f"{circle} circle with {background} background"


def world_settings(seed: int, size: int, palette: str = "toy", swatch: bool = False) -> dict:
    """The settings a shard set records (and :func:`ensure_shards` compares): seed and size, plus
    the palette and the swatch condition when they are not the defaults (so shards written
    before these options existed stay valid)."""
    _palette(palette)
    settings: dict = {"seed": seed, "size": size}
    if palette != "toy":
        settings["palette"] = palette
    if swatch:
        settings["swatch"] = True
        settings["conditions"] = [CONDITION, *COMPOSITION_CONDITIONS]
    return settings


def condition_types(swatch: bool = False) -> list[str]:
    return [CONDITION, *COMPOSITION_CONDITIONS] if swatch else [CONDITION]


@dataclass
class CircleMaker(SampleMaker):
    """Item = sample index → sample with ``png`` target, ``outline.png`` condition (and
    ``swatch.png`` with ``swatch``)."""

    size: int
    seed: int
    resolution: int | None
    resize: str
    image_format: str
    quality: int
    palette: str = "toy"
    swatch: bool = False

    def make(self, item: int) -> dict[str, bytes | str]:
        swatch = None
        if self.swatch:
            outline, swatch, target, prompt = swatch_sample(
                item, self.size, self.seed, self.palette
            )
        else:
            outline, target, prompt = circle_sample(item, self.size, self.seed, self.palette)
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
        if self.palette != "toy":
            meta["palette"] = self.palette
        sample: dict[str, bytes | str] = {
            "__key__": f"{item:09d}",
            self.image_format: encode_image(target, self.image_format, self.quality),
            f"{CONDITION}.png": encode_image(outline, "png"),
            "txt": prompt,
            "json": json.dumps(meta),
        }
        if swatch is not None:
            # A flat colour: resizing keeps it flat (nearest neighbour keeps it exact).
            h, w = outline.shape[:2]
            sample[f"{SWATCH}.png"] = encode_image(swatch_image(swatch[0, 0], h, w), "png")
            for key, line in line_conditions(item, self.size, self.seed).items():
                line = apply_resize_policy(line, self.resolution, self.resize)
                sample[f"{key}.png"] = encode_image(
                    np.where(line > 127, 255, 0).astype(np.uint8), "png"
                )
            meta["conditions"] = condition_types(True)
            sample["json"] = json.dumps(meta)
        return sample


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
    palette: str = "toy",
    swatch: bool = False,
) -> tuple[RunSummary, PrepConfig]:
    """Build circle shards in ``out`` (resumable); returns the run summary and config.
    ``palette`` and ``swatch``: see the module docstring.

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
        condition_types=condition_types(swatch),
        settings=world_settings(seed, size, palette, swatch),
        overwrite=overwrite,
        progress=progress,
    )
    maker = CircleMaker(size, seed, resolution, resize, image_format, 95, palette, swatch)
    return run_shards(range(num_samples), maker, cfg), cfg


def ensure_shards(
    out: str,
    num_samples: int,
    size: int,
    seed: int = 0,
    samples_per_shard: int = 500,
    palette: str = "toy",
    swatch: bool = False,
) -> str:
    """Build the circle shards in ``out`` unless a complete matching set is there already;
    return their brace pattern. Used by the quickstart's ``prepare:`` config entry."""
    manifest = read_manifest(out)
    wanted = world_settings(seed, size, palette, swatch)
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
            palette=palette,
            swatch=swatch,
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
