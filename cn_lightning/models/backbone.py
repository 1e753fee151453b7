"""Load the frozen Stable Diffusion backbone (UNet, VAE, text encoder, tokenizer, scheduler).

Two sources are accepted, both fully offline:

* a diffusers pipeline directory, the layout ``StableDiffusionPipeline.save_pretrained`` writes
  (``unet/ vae/ text_encoder/ tokenizer/ scheduler/``), or the SDXL one
  ``StableDiffusionXLPipeline.save_pretrained`` writes, which adds ``text_encoder_2/`` (a
  ``CLIPTextModelWithProjection``) and ``tokenizer_2/``;
* a single original-format checkpoint file (``.safetensors`` / ``.ckpt``, SD1.x, SD2.x or the SDXL
  base model), read with configs shipped inside this package (see
  ``cn_lightning.models.single_file``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from cn_lightning.errors import BackboneLoadError, first_line
from cn_lightning.serialization import SINGLE_FILE_SUFFIXES

DIFFUSERS_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# What an SDXL directory has on top of the SD components.
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Backbone:
    """The frozen parts of a Stable Diffusion model (SDXL: with the second text encoder)."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None

    @property
    def is_sdxl(self) -> bool:
        """Two text encoders and a UNet conditioned on the pooled text embedding and the
        size/crop ``time_ids`` (``addition_embed_type="text_time"``)."""
        return is_sdxl_unet(self.unet)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD, 2 for the tiny test model)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)


def is_sdxl_unet(unet: UNet2DConditionModel) -> bool:
    """Whether ``unet`` takes SDXL's ``added_cond_kwargs`` (``text_embeds`` + ``time_ids``)."""
    return unet.config.get("addition_embed_type") == "text_time"


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """``"fp32"|"fp16"|"bf16"`` (or a torch dtype) to a torch dtype; ``None`` means fp32."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise BackboneLoadError(f"unknown dtype {name!r}: expected one of {sorted(DTYPES)}")
    return DTYPES[name]


def load_backbone(
    path: str | os.PathLike,
    frozen_dtype: str | torch.dtype | None = "fp32",
    variant: str | None = None,
    vae_path: str | os.PathLike | None = None,
) -> Backbone:
    """Load and freeze a Stable Diffusion backbone from a local directory or checkpoint file.

    Args:
        path: a diffusers pipeline directory (SD1.x, SD2.x or SDXL) or an original-format
            ``.safetensors``/``.ckpt`` (SD1.x / SD2.x / SDXL base).
        frozen_dtype: dtype of the frozen weights (``fp32``, ``bf16`` or ``fp16``).
        variant: for single files, forces the architecture (``sd15``, ``sd21``, ``sd21-base``,
            ``sdxl``).
        vae_path: a separate VAE to use instead of the model's own (e.g. the fp16-fix SDXL VAE):
            a diffusers ``AutoencoderKL`` folder (``config.json`` + weights), or a pipeline
            directory with a ``vae/`` folder.

    Raises:
        BackboneLoadError: the path is missing or is not a Stable Diffusion model.
    """
    dtype = parse_dtype(frozen_dtype)
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise BackboneLoadError(
            f"model path {str(path)!r} does not exist: expected a diffusers Stable Diffusion "
            "directory (unet/ vae/ text_encoder/ tokenizer/ scheduler/) "
            "or a .safetensors/.ckpt file"
        )
    if path.is_dir():
        parts = _load_diffusers_dir(path, dtype)
    elif path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        from cn_lightning.models.single_file import load_single_file_components

        parts = load_single_file_components(path, variant=variant)
    else:
        raise BackboneLoadError(
            f"model path {str(path)!r} is neither a directory nor a checkpoint file "
            f"({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    if vae_path not in (None, ""):
        parts["vae"] = load_vae(vae_path, dtype)
    backbone = Backbone(**parts)
    freeze_backbone(backbone, dtype)
    return backbone


def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """An ``AutoencoderKL`` from a VAE folder, or from the ``vae/`` of a pipeline directory."""
    path = Path(os.path.expanduser(str(path)))
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    if not (folder / "config.json").is_file():
        raise BackboneLoadError(
            f"model.vae_path {str(path)!r} is not a diffusers VAE folder (config.json + "
            "diffusion_pytorch_model.safetensors) nor a pipeline directory with a vae/ folder"
        )
    try:
        return AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=dtype)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BackboneLoadError(
            f"could not load the VAE in {str(folder)!r}: {first_line(err)}"
        ) from err


def _load_diffusers_dir(path: Path, dtype: torch.dtype) -> dict:
    missing = [c for c in DIFFUSERS_COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise BackboneLoadError(
            f"{str(path)!r} is not a diffusers Stable Diffusion directory: missing "
            f"{', '.join(m + '/' for m in missing)} (expected unet/ vae/ text_encoder/ tokenizer/ "
            "scheduler/ as written by StableDiffusionPipeline.save_pretrained)"
        )
    sdxl = [c for c in SDXL_COMPONENTS if (path / c).is_dir()]
    if len(sdxl) == 1:
        raise BackboneLoadError(
            f"{str(path)!r} looks like an SDXL directory but has only {sdxl[0]}/: SDXL needs "
            "both text_encoder_2/ and tokenizer_2/"
        )
    try:
        parts = {
            "unet": UNet2DConditionModel.from_pretrained(
                path / "unet", local_files_only=True, torch_dtype=dtype
            ),
            "vae": AutoencoderKL.from_pretrained(
                path / "vae", local_files_only=True, torch_dtype=dtype
            ),
            "text_encoder": CLIPTextModel.from_pretrained(
                path / "text_encoder", local_files_only=True, dtype=dtype
            ),
            "tokenizer": CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True),
            "noise_scheduler": DDPMScheduler.from_pretrained(
                path / "scheduler", local_files_only=True
            ),
        }
        if sdxl:
            parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                path / "text_encoder_2", local_files_only=True, dtype=dtype
            )
            parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(
                path / "tokenizer_2", local_files_only=True
            )
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BackboneLoadError(
            f"could not load the Stable Diffusion model in {str(path)!r}: {first_line(err)}"
        ) from err
    if is_sdxl_unet(parts["unet"]) != bool(sdxl):
        problem = (
            "has text_encoder_2/ and tokenizer_2/ but its UNet is not an SDXL one"
            if sdxl
            else "has an SDXL UNet but no text_encoder_2/ and tokenizer_2/"
        )
        raise BackboneLoadError(f"{str(path)!r} {problem}")
    return parts


def freeze_backbone(backbone: Backbone, dtype: torch.dtype) -> None:
    """Freeze every backbone module: no gradients, eval mode, weights cast to ``dtype``."""
    for module in (backbone.unet, backbone.vae, backbone.text_encoder, backbone.text_encoder_2):
        if module is None:
            continue
        module.requires_grad_(False)
        module.eval()
        if any(p.dtype != dtype for p in module.parameters()):
            module.to(dtype=dtype)


def load_text_encoders(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[list[CLIPTokenizer], list[torch.nn.Module]]:
    """Only the prompt encoding of a diffusers directory: ``([tokenizer], [text_encoder])``, or
    for SDXL both tokenizers and both encoders (``tokenizer_2/``, ``text_encoder_2/``), frozen in
    ``dtype``. What ``data_prep.cache_latents --text`` needs, without loading the UNet."""
    path = Path(os.path.expanduser(str(path)))
    names = [("tokenizer", "text_encoder", CLIPTextModel)]
    if all((path / c).is_dir() for c in SDXL_COMPONENTS):
        names.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
    missing = [d + "/" for t, e, _ in names for d in (t, e) if not (path / d).is_dir()]
    if missing:
        raise BackboneLoadError(
            f"{str(path)!r} has no {' '.join(missing)}: text embeddings need a diffusers model "
            "directory with its text encoder(s) and tokenizer(s)"
        )
    tokenizers, encoders = [], []
    try:
        for tokenizer, encoder, cls in names:
            tokenizers.append(
                CLIPTokenizer.from_pretrained(path / tokenizer, local_files_only=True)
            )
            model = cls.from_pretrained(path / encoder, local_files_only=True, dtype=dtype)
            encoders.append(model.requires_grad_(False).eval())
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BackboneLoadError(
            f"could not load the text encoders in {str(path)!r}: {first_line(err)}"
        ) from err
    return tokenizers, encoders
