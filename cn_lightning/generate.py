"""Generate images with one or more ControlNets on any SD1.x-architecture model.

    python -m cn_lightning.generate --base SD_MODEL \\
        --controlnet CN_A [CN_B ...] --image COND_A [COND_B ...] [--scale 1.0 0.5] \\
        [--extractor none canny] --prompt "..." --out DIR

The base model is a diffusers directory or a single ``.safetensors``/``.ckpt`` file (a ControlNet
trained on SD1.5 drives community fine-tunes of it unchanged). Each ControlNet is a diffusers
folder, an original-format file, a training checkpoint or a run directory; several are composed
by summing their scaled residuals (diffusers' ``MultiControlNetModel``). The sampling loop is
diffusers' ``StableDiffusionControlNetPipeline``; this module only assembles it from local
components, prepares the conditions and writes PNGs with the settings in their metadata.

A ControlNet trained with ``sd_locked: false`` comes with its fine-tuned UNet decoder (in its
checkpoint / run directory, or as the ``unet/`` of an export); the pipeline then runs that UNet
instead of the base model's (see :func:`load_controlnets`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from cn_lightning.errors import ConfigError
from cn_lightning.models.backbone import Backbone, load_backbone
from cn_lightning.models.module import SAMPLERS
from cn_lightning.utils.cli import ArgumentParser, run_cli
from cn_lightning.utils.export import CompanionUNet

# Condition images with at most this many colours (edge maps, label maps) are resized with
# nearest neighbour so no in-between value or colour outside a palette appears.
MAX_DISCRETE_COLOURS = 256
SIZE_MULTIPLE = 8


@dataclass
class Control:
    """One ControlNet with its condition: ``image`` is a condition map (``extractor`` None or
    ``"none"``), or a photo that the named extractor turns into one (e.g. ``"canny"``)."""

    controlnet: str
    image: str
    scale: float = 1.0
    extractor: str | None = None


@dataclass
class GenerationSettings:
    """Everything that determines the output; stored in each PNG's metadata."""

    base: str
    controls: list[Control]
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    guidance_scale: float = 7.5
    seed: int = 0
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    guess_mode: bool = False
    sampler: str = "ddim"
    variant: str | None = None
    dtype: str = "auto"
    device: str = "auto"


# ------------------------------------------------------------------------------ conditions
def load_image(path: str | os.PathLike) -> np.ndarray:
    """An image file as uint8 RGB ``(H, W, 3)``; a clear error when it is missing or unreadable."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise ConfigError(f"condition image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except OSError as err:
        raise ConfigError(f"cannot read {str(path)!r} as an image: {err}") from err


def _is_discrete(image: np.ndarray) -> bool:
    return len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) <= MAX_DISCRETE_COLOURS


def resize(image: np.ndarray, width: int, height: int, discrete: bool) -> np.ndarray:
    """Resize uint8 RGB to ``width`` x ``height`` (nearest for label-like maps, else Lanczos)."""
    if image.shape[1] == width and image.shape[0] == height:
        return image
    method = Image.NEAREST if discrete else Image.LANCZOS
    return np.asarray(Image.fromarray(image).resize((width, height), method))


def prepare_condition(
    image: np.ndarray, width: int, height: int, extractor: str | None = None
) -> Image.Image:
    """The condition image at ``width`` x ``height``: a condition map resized, or a photo resized then
    run through the named extractor of :mod:`cn_lightning.conditions` (e.g. ``canny``). ``None`` or
    ``"none"`` (as on the command line): the image already is the condition."""
    if extractor is None or extractor == "none":
        return Image.fromarray(resize(image, width, height, _is_discrete(image)))
    from cn_lightning.conditions import get_extractor, is_discrete, list_extractors

    if extractor not in list_extractors():
        raise ConfigError(
            f"unknown condition extractor {extractor!r}; registered: {', '.join(list_extractors())} "
            "(or none: the image already is the condition)"
        )
    condition = get_extractor(extractor)(resize(image, width, height, discrete=False))
    if condition.ndim == 2:
        condition = np.repeat(condition[:, :, None], 3, axis=2)
    return Image.fromarray(resize(condition, width, height, is_discrete(extractor)))


def default_size(image: np.ndarray, native: int) -> tuple[int, int]:
    """``(width, height)`` keeping the image's aspect with the shorter side at the model's native size."""
    h, w = image.shape[:2]
    scale = native / min(h, w)
    return _round(w * scale), _round(h * scale)


def _round(x: float) -> int:
    return max(SIZE_MULTIPLE, int(round(x / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


# ------------------------------------------------------------------------------ models
def load_controlnet(path: str, backbone: Backbone, dtype: torch.dtype) -> ControlNetModel:
    """A ControlNet from a diffusers folder, an original-format file, a checkpoint or a run directory."""
    return load_controlnet_and_unet(path, backbone, dtype)[0]


def load_controlnet_and_unet(
    path: str, backbone: Backbone, dtype: torch.dtype
) -> tuple[ControlNetModel, CompanionUNet | None]:
    """:func:`load_controlnet`, and the fine-tuned UNet that comes with it (``sd_locked: false``
    training; see :func:`cn_lightning.utils.export.find_companion_unet`), not yet built."""
    from cn_lightning.export import load_any_controlnet
    from cn_lightning.utils.export import find_companion_unet

    if not Path(os.path.expanduser(path)).exists():
        raise ConfigError(f"ControlNet {path!r} does not exist")
    controlnet, weights = load_any_controlnet(path, unet=backbone.unet)
    check_fits(controlnet, backbone.unet, path, backbone.vae_scale_factor)
    if controlnet.dtype != dtype:
        controlnet.to(dtype=dtype)
    companion = find_companion_unet(path, weights.decoder_state_dict if weights is not None else None)
    return controlnet.eval(), companion


def load_controlnets(paths: Sequence[str], backbone: Backbone, dtype: torch.dtype) -> list[ControlNetModel]:
    """The ControlNets of ``paths``; a fine-tuned UNet that comes with one of them (a run trained with
    ``sd_locked: false``, or an export with ``unet/``) replaces ``backbone.unet``: the ControlNet was
    trained with that decoder. The base model's UNet gives the rest of a checkpoint's UNet."""
    loaded = [load_controlnet_and_unet(p, backbone, dtype) for p in paths]
    companions = [c for _, c in loaded if c is not None]
    if len(companions) > 1:
        names = ", ".join(repr(c.source) for c in companions)
        raise ConfigError(
            f"ControlNets {names} each come with a fine-tuned UNet (sd_locked=false); a pipeline has one UNet, "
            "so combine at most one of them with others"
        )
    if companions:
        unet = companions[0].build(backbone.unet, dtype)
        backbone.unet = unet.requires_grad_(False).eval()
        print(f"[cn_lightning] using the fine-tuned UNet (sd_locked=false) of {companions[0].source}")
    return [controlnet for controlnet, _ in loaded]


def check_fits(controlnet: ControlNetModel, unet: UNet2DConditionModel, name: str, vae_scale_factor: int) -> None:
    """Refuse, in one line, a ControlNet whose residuals cannot be added to ``unet``'s skips or
    whose condition encoder does not downsample to the base model's latent grid."""
    hint_factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    if hint_factor != vae_scale_factor:
        raise ConfigError(
            f"ControlNet {name!r} downsamples its condition {hint_factor}x but the base model's VAE "
            f"downsamples {vae_scale_factor}x: it was made for another model"
        )
    for key in ("block_out_channels", "cross_attention_dim", "layers_per_block", "in_channels"):
        mine, theirs = controlnet.config.get(key), unet.config.get(key)
        if list(np.atleast_1d(mine)) != list(np.atleast_1d(theirs)):
            raise ConfigError(
                f"ControlNet {name!r} does not fit the base model: its {key} is {mine}, the base UNet's is {theirs}"
            )


def build_pipeline(
    backbone: Backbone, controlnets: Sequence[ControlNetModel], sampler: str = "ddim"
) -> StableDiffusionControlNetPipeline:
    """diffusers' ControlNet pipeline from local components; several ControlNets are summed."""
    if sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    controlnet = controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(list(controlnets))
    pipe = StableDiffusionControlNetPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        controlnet=controlnet,
        scheduler=SAMPLERS[sampler].from_config(backbone.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto`` picks CUDA when present; dtype ``auto`` is fp16 on CUDA and fp32 on the CPU."""
    from cn_lightning.models.backbone import parse_dtype

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {device!r}: expected auto, cpu, cuda or cuda:N") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    if dtype == "auto":
        return dev, torch.float16 if dev.type == "cuda" else torch.float32
    return dev, parse_dtype(dtype)


# ------------------------------------------------------------------------------ generation
def generate(settings: GenerationSettings) -> tuple[list[Image.Image], list[Image.Image]]:
    """Run the pipeline for ``settings``; returns the images and the conditions they used."""
    if not settings.controls:
        raise ConfigError("give at least one --controlnet with its --image")
    device, dtype = resolve_device(settings.device, settings.dtype)
    backbone = load_backbone(settings.base, dtype, variant=settings.variant)
    photos = [load_image(c.image) for c in settings.controls]
    native = backbone.unet.config.sample_size * backbone.vae_scale_factor
    width, height = default_size(photos[0], native)
    width, height = _round(settings.width or width), _round(settings.height or height)
    settings.width, settings.height = width, height
    conditions = [prepare_condition(p, width, height, c.extractor) for p, c in zip(photos, settings.controls, strict=True)]
    controlnets = load_controlnets([c.controlnet for c in settings.controls], backbone, dtype)
    pipe = build_pipeline(backbone, controlnets, settings.sampler).to(device)
    multi = len(controlnets) > 1
    generators = [torch.Generator().manual_seed(settings.seed + i) for i in range(settings.batch_size)]
    images = pipe(
        prompt=[settings.prompt] * settings.batch_size,
        negative_prompt=[settings.negative_prompt] * settings.batch_size,
        image=conditions if multi else conditions[0],
        height=height,
        width=width,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        controlnet_conditioning_scale=[c.scale for c in settings.controls] if multi else settings.controls[0].scale,
        guess_mode=settings.guess_mode,
        generator=generators,
    ).images
    return images, conditions


def png_metadata(settings: GenerationSettings, index: int) -> PngInfo:
    """A1111-style ``parameters`` text plus the exact settings as JSON (``cn_lightning``)."""
    seed = settings.seed + index
    info = PngInfo()
    controls = ", ".join(
        f"ControlNet {i}: \"{c.controlnet}, weight: {c.scale}, preprocessor: {c.extractor or 'none'}\""
        for i, c in enumerate(settings.controls)
    )
    info.add_text(
        "parameters",
        f"{settings.prompt}\nNegative prompt: {settings.negative_prompt}\n"
        f"Steps: {settings.steps}, Sampler: {settings.sampler}, CFG scale: {settings.guidance_scale}, "
        f"Seed: {seed}, Size: {settings.width}x{settings.height}, Model: {Path(settings.base).name}, "
        f"Guess mode: {settings.guess_mode}, {controls}",
    )
    info.add_text("cn_lightning", json.dumps({**asdict(settings), "seed": seed, "batch_index": index}))
    return info


def save_png(image: Image.Image, path: Path, info: PngInfo | None = None) -> Path:
    """Write a PNG atomically (temporary file in the same folder, then rename)."""
    from cn_lightning.utils.atomic import atomic_file

    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def save_outputs(
    images: Sequence[Image.Image], settings: GenerationSettings, out: Path, conditions: Sequence[Image.Image] = ()
) -> list[Path]:
    """``out/<seed>.png`` per image (settings in the metadata), and ``out/condition_<i>.png``."""
    paths = [save_png(im, out / f"{settings.seed + i:06d}.png", png_metadata(settings, i)) for i, im in enumerate(images)]
    for i, condition in enumerate(conditions):
        save_png(condition, out / f"condition_{i}.png")
    return paths


# ------------------------------------------------------------------------------ CLI
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m cn_lightning.generate",
        description="Generate images with one or more ControlNets on any SD1.x-architecture model.",
    )
    parser.add_argument("--base", required=True, help="Stable Diffusion model: diffusers directory or .safetensors/.ckpt file")
    parser.add_argument("--variant", default=None, help="architecture of a single-file base (sd15, sd21, sd21-base)")
    parser.add_argument(
        "--controlnet", nargs="+", required=True,
        help="one or more ControlNets: diffusers folder, original-format file, training checkpoint or run directory",
    )
    parser.add_argument("--image", nargs="+", required=True, help="one condition image (or photo, see --extractor) per ControlNet")
    parser.add_argument(
        "--scale", nargs="+", type=float, default=[1.0],
        help="conditioning scale: one for all ControlNets or one each (default 1.0)",
    )
    parser.add_argument(
        "--extractor", nargs="+", default=None,
        help="turn a photo into the condition first (e.g. canny): one for all or one each; 'none' = image is the condition",
    )
    parser.add_argument("--prompt", default="", help="text prompt (default empty)")
    parser.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    parser.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--width", type=int, default=None, help="output width (default: condition aspect, native size)")
    parser.add_argument("--height", type=int, default=None, help="output height (default: condition aspect, native size)")
    parser.add_argument("--batch", type=int, default=1, help="number of images (default 1)")
    parser.add_argument(
        "--guess-mode", action="store_true",
        help="the ControlNet recognises the content without a prompt (the paper's guess mode; try --guidance 3-5)",
    )
    parser.add_argument("--sampler", default="ddim", choices=sorted(SAMPLERS), help="scheduler (default ddim)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ... (default auto)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="default: fp16 on GPU, fp32 on CPU")
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
        raise ConfigError(f"give one --image per --controlnet: {n} ControlNets but {len(args.image)} images")
    for name, value in (("--steps", args.steps), ("--batch", args.batch)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    scales = _per_control(args.scale, n, "--scale", 1.0)
    extractors = [None if e in (None, "none") else e for e in _per_control(args.extractor, n, "--extractor", None)]
    controls = [Control(c, i, s, e) for c, i, s, e in zip(args.controlnet, args.image, scales, extractors, strict=True)]
    return GenerationSettings(
        base=args.base, controls=controls, prompt=args.prompt, negative_prompt=args.negative_prompt,
        steps=args.steps, guidance_scale=args.guidance, seed=args.seed, width=args.width, height=args.height,
        batch_size=args.batch, guess_mode=args.guess_mode, sampler=args.sampler, variant=args.variant,
        dtype=args.dtype, device=args.device,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = settings_from_args(args)
    images, conditions = generate(settings)
    for path in save_outputs(images, settings, Path(os.path.expanduser(args.out)), conditions):
        print(f"[cn_lightning] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
