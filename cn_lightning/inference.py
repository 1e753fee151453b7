"""Build diffusers ControlNet pipelines from local parts and run them: the inference layer.

``python -m cn_lightning.generate`` and ``python -m cn_lightning.evaluate`` are thin shells over
this module; the Python API is :func:`generate` with :class:`GenerationSettings`.

The base model is a diffusers directory (SD1.x, SD2.x or SDXL) or a single
``.safetensors``/``.ckpt`` file (SD1.x / SD2.x; a ControlNet trained on SD1.5 drives community
fine-tunes of it unchanged). Each ControlNet is a diffusers folder, an original-format file, a
training checkpoint or a run directory
(:func:`cn_lightning.models.checkpoints.load_any_controlnet`); several are composed by summing
their scaled residuals (diffusers' ``MultiControlNetModel``). The sampling loop is diffusers'
``StableDiffusionControlNetPipeline``, or for an SDXL base ``StableDiffusionXLControlNetPipeline``;
this module assembles it, prepares the conditions, and writes PNGs with the settings in their
metadata. What the backbone decides by default (the guidance scale, the native size) follows it:
:func:`default_guidance`, :func:`native_size`.

A ControlNet trained with ``sd_locked: false`` comes with its fine-tuned UNet decoder (in its
checkpoint / run directory, or as the ``unet/`` of an export); the pipeline then runs that UNet
instead of the base model's (see :func:`load_controlnets`).
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from cn_lightning import log
from cn_lightning.atomic import atomic_file
from cn_lightning.errors import ConfigError
from cn_lightning.models.backbone import Backbone, load_backbone, parse_dtype
from cn_lightning.models.checkpoints import (
    CompanionUNet,
    config_mismatch,
    find_companion_unet,
    load_any_controlnet,
)
from cn_lightning.models.diffusion import make_sampler

# Condition images with at most this many colours (edge maps, label maps) are resized with
# nearest neighbour so no in-between value or colour outside a palette appears.
MAX_DISCRETE_COLOURS = 256
SIZE_MULTIPLE = 8
# What a ControlNet shares with the UNet it drives: its residuals must fit that UNet's skips,
# and an SDXL one reads the same pooled-text + time-ids embedding as the SDXL UNet.
CONTROLNET_FIT_KEYS = (
    "block_out_channels",
    "cross_attention_dim",
    "layers_per_block",
    "in_channels",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
)
# The pipelines' own default guidance scales (their ``__call__`` defaults): SD's 7.5, SDXL's 5.
SD_GUIDANCE = 7.5
SDXL_GUIDANCE = 5.0


@dataclass
class Control:
    """One ControlNet with its condition: ``image`` is a condition map (``extractor`` None or
    ``"none"``), or a photo that the named extractor turns into one (e.g. ``"canny"``)."""

    controlnet: str
    image: str
    scale: float = 1.0
    extractor: str | None = None
    # Local weights of a model-based extractor (hed, depth, ...).
    extractor_weights: str | None = None


@dataclass
class GenerationSettings:
    """Everything that determines the output; stored in each PNG's metadata."""

    base: str
    controls: list[Control]
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    # None: the base model's pipeline default (:func:`default_guidance`: 7.5 SD, 5.0 SDXL).
    guidance_scale: float | None = None
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
    image: np.ndarray,
    width: int,
    height: int,
    extractor: str | None = None,
    weights: str | None = None,
    device: str = "auto",
) -> Image.Image:
    """The condition image at ``width`` x ``height``: a condition map resized, or a photo resized
    then run through the named extractor of :mod:`cn_lightning.conditions` (e.g. ``canny``, or
    ``depth`` with its local ``weights``, run on ``device``).
    ``None`` or ``"none"`` (as on the command line): the image already is the condition."""
    if extractor is None or extractor == "none":
        return Image.fromarray(resize(image, width, height, _is_discrete(image)))
    from cn_lightning.conditions import get_extractor, is_discrete, list_extractors, needs_weights

    if extractor not in list_extractors():
        raise ConfigError(
            f"unknown condition extractor {extractor!r}; "
            f"registered: {', '.join(list_extractors())} "
            "(or none: the image already is the condition)"
        )
    options = {}
    if needs_weights(extractor):
        options = {"weights": weights, "device": device}
    elif weights:
        raise ConfigError(f"--extractor-weights: {extractor!r} has no model (it needs no weights)")
    condition = get_extractor(extractor, **options)(resize(image, width, height, discrete=False))
    if condition.ndim == 2:
        condition = np.repeat(condition[:, :, None], 3, axis=2)
    return Image.fromarray(resize(condition, width, height, is_discrete(extractor)))


def default_size(image: np.ndarray, native: int) -> tuple[int, int]:
    """``(width, height)`` keeping the image's aspect with the shorter side at the model's native
    size."""
    h, w = image.shape[:2]
    scale = native / min(h, w)
    return _round(w * scale), _round(h * scale)


def _round(x: float) -> int:
    return max(SIZE_MULTIPLE, int(round(x / SIZE_MULTIPLE)) * SIZE_MULTIPLE)


# ------------------------------------------------------------------------------ models
def load_controlnet(path: str, backbone: Backbone, dtype: torch.dtype) -> ControlNetModel:
    """A ControlNet from a diffusers folder, an original-format file, a checkpoint or a run
    directory."""
    return load_controlnet_and_unet(path, backbone, dtype)[0]


def load_controlnet_and_unet(
    path: str, backbone: Backbone, dtype: torch.dtype
) -> tuple[ControlNetModel, CompanionUNet | None]:
    """:func:`load_controlnet`, and the fine-tuned UNet that comes with it (``sd_locked: false``
    training; see :func:`cn_lightning.models.checkpoints.find_companion_unet`), not yet built."""
    if not Path(os.path.expanduser(path)).exists():
        raise ConfigError(f"ControlNet {path!r} does not exist")
    controlnet, weights = load_any_controlnet(path, unet=backbone.unet)
    check_fits(controlnet, backbone.unet, path, backbone.vae_scale_factor)
    if controlnet.dtype != dtype:
        controlnet.to(dtype=dtype)
    companion = find_companion_unet(
        path, weights.decoder_state_dict if weights is not None else None
    )
    return controlnet.eval(), companion


def load_controlnets(
    paths: Sequence[str], backbone: Backbone, dtype: torch.dtype
) -> list[ControlNetModel]:
    """The ControlNets of ``paths``; a fine-tuned UNet that comes with one of them (a run trained
    with ``sd_locked: false``, or an export with ``unet/``) replaces ``backbone.unet``: the
    ControlNet was trained with that decoder. The base model's UNet gives the rest of a
    checkpoint's UNet."""
    loaded = [load_controlnet_and_unet(p, backbone, dtype) for p in paths]
    companions = [c for _, c in loaded if c is not None]
    if len(companions) > 1:
        names = ", ".join(repr(c.source) for c in companions)
        raise ConfigError(
            f"ControlNets {names} each come with a fine-tuned UNet (sd_locked=false); "
            "a pipeline has one UNet, so combine at most one of them with others"
        )
    if companions:
        unet = companions[0].build(backbone.unet, dtype)
        backbone.unet = unet.requires_grad_(False).eval()
        log.info(f"using the fine-tuned UNet (sd_locked=false) of {companions[0].source}")
    return [controlnet for controlnet, _ in loaded]


def check_fits(
    controlnet: ControlNetModel, unet: UNet2DConditionModel, name: str, vae_scale_factor: int
) -> None:
    """Refuse, in one line, a ControlNet whose residuals cannot be added to ``unet``'s skips or
    whose condition encoder does not downsample to the base model's latent grid."""
    hint_factor = 2 ** (len(controlnet.config.conditioning_embedding_out_channels) - 1)
    if hint_factor != vae_scale_factor:
        raise ConfigError(
            f"ControlNet {name!r} downsamples its condition {hint_factor}x but the base model's "
            f"VAE downsamples {vae_scale_factor}x: it was made for another model"
        )
    problem = config_mismatch(controlnet.config, unet.config, CONTROLNET_FIT_KEYS)
    if problem:
        raise ConfigError(f"ControlNet {name!r} does not fit the base model: {problem}")


def default_guidance(backbone: Backbone) -> float:
    """The classifier-free guidance scale diffusers' pipeline for ``backbone`` uses by default:
    7.5 for SD1.x / SD2.x, 5.0 for SDXL."""
    return SDXL_GUIDANCE if backbone.is_sdxl else SD_GUIDANCE


def native_size(backbone: Backbone) -> int:
    """The base model's own image size in pixels, as diffusers' pipelines take it: the UNet's
    ``sample_size`` (latent cells) x the VAE factor (512 SD1.5, 768 SD2.1-v, 1024 SDXL, 32 for
    the toy and tiny models)."""
    return backbone.unet.config.sample_size * backbone.vae_scale_factor


def force_zeros_for_empty_prompt(base: str | os.PathLike) -> bool:
    """An SDXL model's ``force_zeros_for_empty_prompt`` (its ``model_index.json``; diffusers'
    default, True, when the file does not say): with it, an empty negative prompt is a zero
    embedding rather than the encoded "", as ``StableDiffusionXLPipeline.from_pretrained`` does."""
    index = Path(os.path.expanduser(str(base))) / "model_index.json"
    try:
        value = json.loads(index.read_text()).get("force_zeros_for_empty_prompt", True)
    except (OSError, ValueError, AttributeError):
        return True
    return bool(value)


def build_pipeline(
    backbone: Backbone,
    controlnets: Sequence[ControlNetModel],
    sampler: str = "ddim",
    force_zeros_for_empty_prompt: bool = True,
) -> StableDiffusionControlNetPipeline | StableDiffusionXLControlNetPipeline:
    """diffusers' ControlNet pipeline from local components; several ControlNets are summed.

    SDXL backbones get ``StableDiffusionXLControlNetPipeline`` with both text encoders,
    ``force_zeros_for_empty_prompt`` (see :func:`force_zeros_for_empty_prompt`) and no invisible
    watermark (it would change the pixels that evaluate scores)."""
    scheduler = make_sampler(sampler, backbone.noise_scheduler.config)
    controlnet = (
        controlnets[0] if len(controlnets) == 1 else MultiControlNetModel(list(controlnets))
    )
    if backbone.is_sdxl:
        return StableDiffusionXLControlNetPipeline(
            vae=backbone.vae,
            text_encoder=backbone.text_encoder,
            text_encoder_2=backbone.text_encoder_2,
            tokenizer=backbone.tokenizer,
            tokenizer_2=backbone.tokenizer_2,
            unet=backbone.unet,
            controlnet=controlnet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
            add_watermarker=False,
        )
    pipe = StableDiffusionControlNetPipeline(
        vae=backbone.vae,
        text_encoder=backbone.text_encoder,
        tokenizer=backbone.tokenizer,
        unet=backbone.unet,
        controlnet=controlnet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return pipe


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """``auto`` picks CUDA when present; dtype ``auto`` is fp16 on CUDA and fp32 on the CPU."""
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
    width, height = default_size(photos[0], native_size(backbone))
    width, height = _round(settings.width or width), _round(settings.height or height)
    settings.width, settings.height = width, height
    if settings.guidance_scale is None:
        settings.guidance_scale = default_guidance(backbone)
    conditions = [
        prepare_condition(p, width, height, c.extractor, c.extractor_weights, str(device))
        for p, c in zip(photos, settings.controls, strict=True)
    ]
    controlnets = load_controlnets([c.controlnet for c in settings.controls], backbone, dtype)
    pipe = build_pipeline(
        backbone, controlnets, settings.sampler, force_zeros_for_empty_prompt(settings.base)
    ).to(device)
    multi = len(controlnets) > 1
    generators = [
        torch.Generator().manual_seed(settings.seed + i) for i in range(settings.batch_size)
    ]
    images = pipe(
        prompt=[settings.prompt] * settings.batch_size,
        negative_prompt=negative_prompts(settings.negative_prompt, settings.batch_size),
        image=conditions if multi else conditions[0],
        height=height,
        width=width,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance_scale,
        controlnet_conditioning_scale=[c.scale for c in settings.controls]
        if multi
        else settings.controls[0].scale,
        guess_mode=settings.guess_mode,
        generator=generators,
    ).images
    return images, conditions


def negative_prompts(negative_prompt: str, n: int) -> list[str] | None:
    """The pipeline's ``negative_prompt`` for ``n`` images: ``None`` for an empty one, so each
    pipeline does what it does without one (SD encodes "", SDXL a zero embedding where the model
    says ``force_zeros_for_empty_prompt``, as diffusers' pipelines do by default)."""
    return [negative_prompt] * n if negative_prompt else None


def png_metadata(settings: GenerationSettings, index: int) -> PngInfo:
    """A1111-style ``parameters`` text plus the exact settings as JSON (``cn_lightning``)."""
    seed = settings.seed + index
    info = PngInfo()
    controls = ", ".join(
        f'ControlNet {i}: "{c.controlnet}, weight: {c.scale}, '
        f'preprocessor: {c.extractor or "none"}"'
        for i, c in enumerate(settings.controls)
    )
    info.add_text(
        "parameters",
        f"{settings.prompt}\nNegative prompt: {settings.negative_prompt}\n"
        f"Steps: {settings.steps}, Sampler: {settings.sampler}, "
        f"CFG scale: {settings.guidance_scale}, Seed: {seed}, "
        f"Size: {settings.width}x{settings.height}, Model: {Path(settings.base).name}, "
        f"Guess mode: {settings.guess_mode}, {controls}",
    )
    info.add_text(
        "cn_lightning", json.dumps({**asdict(settings), "seed": seed, "batch_index": index})
    )
    return info


def save_png(image: Image.Image, path: Path, info: PngInfo | None = None) -> Path:
    """Write a PNG atomically (temporary file in the same folder, then rename)."""
    with atomic_file(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    return path


def save_outputs(
    images: Sequence[Image.Image],
    settings: GenerationSettings,
    out: Path,
    conditions: Sequence[Image.Image] = (),
) -> list[Path]:
    """``out/<seed>.png`` per image (settings in the metadata), and ``out/condition_<i>.png``."""
    paths = [
        save_png(im, out / f"{settings.seed + i:06d}.png", png_metadata(settings, i))
        for i, im in enumerate(images)
    ]
    for i, condition in enumerate(conditions):
        save_png(condition, out / f"condition_{i}.png")
    return paths


# ------------------------------------------------------------------------------ validation batches
def sample_seed(seed: int, key: str) -> int:
    """A per-sample seed from the sample key: the same image whatever the device split."""
    return (seed + zlib.crc32(key.encode("utf-8"))) % (2**63)


# Where a validation batch holds the condition of a ControlNet that reads another shard member
# than the scored one (evaluate --control-key): batch["condition.<key>"].
EXTRA_CONDITION = "condition.{}"


def control_plan(cfg: Any) -> list[tuple[str, float, str]]:
    """``(ControlNet, scale, condition key)`` for each ControlNet of an evaluation config
    (:class:`cn_lightning.evaluation.EvalConfig`): ``controlnet`` is one path or several (their
    residuals are summed, as ``generate`` composes them), ``control_scale`` one value or one
    each, ``control_key`` the shard condition each reads (default: ``condition_key``, the scored
    one)."""
    paths = [cfg.controlnet] if isinstance(cfg.controlnet, str) else list(cfg.controlnet or [])
    n = len(paths)
    scales = cfg.control_scale
    scales = [float(scales)] * n if isinstance(scales, int | float) else [float(x) for x in scales]
    if len(scales) == 1:
        scales = scales * n
    keys = getattr(cfg, "control_key", None) or cfg.condition_key
    keys = [keys] if isinstance(keys, str) else list(keys)
    if len(keys) == 1:
        keys = keys * n
    if len(scales) != n or len(keys) != n:
        raise ConfigError(
            f"--control-scale and --control-key take one value or one per --controlnet ({n}); "
            f"got {len(scales)} and {len(keys)}"
        )
    return list(zip(paths, scales, keys, strict=True))


def batch_condition(batch: dict[str, Any], key: str, scored_key: str) -> Tensor:
    """The (B, 3, H, W) condition ``key`` of a validation batch: ``batch["condition"]`` for the
    scored condition, ``batch["condition.<key>"]`` for another one."""
    if key == scored_key:
        return batch["condition"]
    name = EXTRA_CONDITION.format(key)
    if name not in batch:
        raise ConfigError(f"the validation batch has no {key!r} condition (--control-key)")
    return batch[name]


class PipelineSource:
    """Generates each validation batch's images with the ControlNet pipeline.

    ``cfg`` is an :class:`cn_lightning.evaluation.EvalConfig` (base, controlnet, sampler, steps,
    guidance, scales, seed). A batch holds ``condition`` (B, 3, H, W) in [0, 1], ``prompt`` and
    ``key`` lists; the result is (B, 3, H, W) float in [0, 1], seeded per sample by its key.
    ``guidance_scale`` (the config's, else the base model's default) and ``native_size`` (the
    base model's image size) say what the backbone decided.
    """

    def __init__(self, cfg: Any, device: torch.device, dtype: torch.dtype) -> None:
        if not cfg.base or not cfg.controlnet:
            raise ConfigError(
                "give --base and --controlnet to generate images, "
                "or --images DIR to score existing ones"
            )
        backbone = load_backbone(cfg.base, dtype, variant=cfg.variant)
        # A ControlNet trained with sd_locked=false brings its fine-tuned UNet
        # (it replaces backbone.unet). Several ControlNets are summed (composition).
        self.plan = control_plan(cfg)
        controlnets = load_controlnets([c for c, _, _ in self.plan], backbone, dtype)
        self.pipe = build_pipeline(
            backbone, controlnets, cfg.sampler, force_zeros_for_empty_prompt(cfg.base)
        ).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.cfg, self.device = cfg, device
        self.native_size = native_size(backbone)
        self.guidance_scale = (
            default_guidance(backbone) if cfg.guidance_scale is None else cfg.guidance_scale
        )

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        cfg = self.cfg
        prompts = ["" if cfg.no_prompt else p for p in batch["prompt"]]
        conditions = [
            batch_condition(batch, key, cfg.condition_key).to(self.device, self.pipe.unet.dtype)
            for _, _, key in self.plan
        ]
        scales = [s for _, s, _ in self.plan]
        multi = len(conditions) > 1
        h, w = conditions[0].shape[-2:]
        generators = [torch.Generator().manual_seed(sample_seed(cfg.seed, k)) for k in batch["key"]]
        return self.pipe(
            prompt=prompts,
            negative_prompt=negative_prompts(cfg.negative_prompt, len(prompts)),
            image=conditions if multi else conditions[0],
            height=h,
            width=w,
            num_inference_steps=cfg.steps,
            guidance_scale=self.guidance_scale,
            controlnet_conditioning_scale=scales if multi else scales[0],
            guess_mode=cfg.no_prompt,
            generator=generators,
            output_type="pt",
        ).images.float()
