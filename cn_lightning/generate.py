"""Generate images with one or more ControlNets on an SD1.x, SD2.x or SDXL model.

    python -m cn_lightning.generate --base SD_MODEL \\
        --controlnet CN_A [CN_B ...] --image COND_A [COND_B ...] [--scale 1.0 0.5] \\
        [--extractor none canny] --prompt "..." --out DIR

A thin shell over :mod:`cn_lightning.inference` (see there for what each input may be).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cn_lightning import log
from cn_lightning.cli import ArgumentParser, run_cli
from cn_lightning.errors import ConfigError
from cn_lightning.inference import Control, GenerationSettings, generate, save_outputs
from cn_lightning.models.diffusion import SAMPLERS


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m cn_lightning.generate",
        description="Generate images with one or more ControlNets on an SD1.x, SD2.x or SDXL "
        "model.",
    )
    parser.add_argument(
        "--base",
        required=True,
        help=(
            "Stable Diffusion model: diffusers directory (SD1.x, SD2.x, SDXL) or "
            ".safetensors/.ckpt file (SD1.x, SD2.x)"
        ),
    )
    parser.add_argument(
        "--variant", default=None, help="architecture of a single-file base (sd15, sd21, sd21-base)"
    )
    parser.add_argument(
        "--controlnet",
        nargs="+",
        required=True,
        help=(
            "one or more ControlNets: diffusers folder, original-format file, "
            "training checkpoint or run directory"
        ),
    )
    parser.add_argument(
        "--image",
        nargs="+",
        required=True,
        help="one condition image (or photo, see --extractor) per ControlNet",
    )
    parser.add_argument(
        "--scale",
        nargs="+",
        type=float,
        default=[1.0],
        help="conditioning scale: one for all ControlNets or one each (default 1.0)",
    )
    parser.add_argument(
        "--extractor",
        nargs="+",
        default=None,
        help=(
            "turn a photo into the condition first (e.g. canny): one for all or one each; "
            "'none' = image is the condition"
        ),
    )
    parser.add_argument(
        "--extractor-weights",
        nargs="+",
        default=None,
        metavar="PATH",
        help=(
            "local weights of a model-based --extractor (hed, depth, ...; docs/data.md): one "
            "for all or one each, 'none' where an extractor needs none"
        ),
    )
    parser.add_argument("--prompt", default="", help="text prompt (default empty)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale (default: the base model's, 7.5 SD, 5.0 SDXL)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the first image; image i uses seed + i"
    )
    parser.add_argument(
        "--width",
        type=int,
        default=None,
        help="output width (default: condition aspect, native size)",
    )
    parser.add_argument(
        "--height",
        type=int,
        default=None,
        help="output height (default: condition aspect, native size)",
    )
    parser.add_argument("--batch", type=int, default=1, help="number of images (default 1)")
    parser.add_argument(
        "--guess-mode",
        action="store_true",
        help=(
            "the ControlNet recognises the content without a prompt "
            "(the paper's guess mode; try --guidance 3-5)"
        ),
    )
    parser.add_argument(
        "--sampler", default="ddim", choices=sorted(SAMPLERS), help="scheduler (default ddim)"
    )
    parser.add_argument(
        "--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="default: fp16 on GPU, fp32 on CPU",
    )
    parser.add_argument("--out", required=True, help="output folder for the PNGs")
    return parser


def _per_control(values: list | None, n: int, name: str, default: Any) -> list:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise ConfigError(f"{name} takes one value or one per ControlNet ({n}); got {len(values)}")
    return values


def settings_from_args(args) -> GenerationSettings:
    n = len(args.controlnet)
    if len(args.image) != n:
        raise ConfigError(
            f"give one --image per --controlnet: {n} ControlNets but {len(args.image)} images"
        )
    for name, value in (("--steps", args.steps), ("--batch", args.batch)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    scales = _per_control(args.scale, n, "--scale", 1.0)
    extractors = [
        None if e in (None, "none") else e
        for e in _per_control(args.extractor, n, "--extractor", None)
    ]
    weights = [
        None if w in (None, "none") else w
        for w in _per_control(args.extractor_weights, n, "--extractor-weights", None)
    ]
    controls = [
        Control(c, i, s, e, w)
        for c, i, s, e, w in zip(
            args.controlnet, args.image, scales, extractors, weights, strict=True
        )
    ]
    return GenerationSettings(
        base=args.base,
        controls=controls,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        width=args.width,
        height=args.height,
        batch_size=args.batch,
        guess_mode=args.guess_mode,
        sampler=args.sampler,
        variant=args.variant,
        dtype=args.dtype,
        device=args.device,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    images, conditions = generate(settings)
    for path in save_outputs(images, settings, Path(os.path.expanduser(args.out)), conditions):
        log.info(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
