"""Write a complete tiny Stable Diffusion model in diffusers format, with no download.

Tests and the quickstart load it through the same path as a real SD1.5 directory
(``cn_lightning.models.backbone.load_backbone``).

    python -m cn_lightning.models.tiny --out DIR [--preset test|small|sdxl-test] [--seed 0]

``sdxl-test`` writes a tiny SDXL pipeline directory (two text encoders, ``text_time`` UNet) that
``StableDiffusionXLPipeline.from_pretrained`` loads, sized like diffusers' own SDXL unit tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from cn_lightning import log
from cn_lightning.atomic import atomic_directory
from cn_lightning.errors import ConfigError

# Sizes per preset. "test" mirrors diffusers' own unit-test models; "small" is still tiny
# (about 2 M parameters) but wide enough for the quickstart to learn something.
PRESETS: dict[str, dict] = {
    "test": {
        "unet_channels": (4, 8),
        "unet_groups": 1,
        "vae_channels": (4, 8),
        "vae_groups": 2,
        "text_hidden": 32,
        "text_layers": 5,
        "text_heads": 4,
        "attention_head_dim": (2, 4),
    },
    # The toy backbone that `python -m cn_lightning.pretrain_toy` trains: a VAE that downsamples
    # 4x (32 px images -> 8x8 latents) so the UNet is cheap on a CPU.
    "toy": {
        "unet_channels": (32, 64),
        "unet_groups": 8,
        "vae_channels": (16, 32, 32),
        "vae_groups": 8,
        "text_hidden": 64,
        "text_layers": 2,
        "text_heads": 4,
        "attention_head_dim": 8,
    },
    "small": {
        "unet_channels": (32, 64),
        "unet_groups": 8,
        "vae_channels": (32, 64),
        "vae_groups": 8,
        "text_hidden": 32,
        "text_layers": 2,
        "text_heads": 4,
        "attention_head_dim": 8,
    },
}
# Tiny SDXL models, after diffusers' tests/pipelines/stable_diffusion_xl get_dummy_components:
# a UNet with addition_embed_type="text_time" (8-wide time embeddings for the six time_ids plus
# the pooled text embedding: 6 * 8 + 32 = 80 inputs), linear projections, two transformer layers
# in the second block, cross-attention on both encoders' hidden states concatenated (32 + 32),
# two 32-wide CLIP text encoders (the second with a 32-wide projection) and SDXL's Euler
# scheduler. The VAE is the SD "test" one (downsamples 2x) with SDXL's scaling factor.
SDXL_PRESETS: dict[str, dict] = {
    "sdxl-test": {
        "unet_channels": (4, 8),
        "unet_groups": 1,
        "attention_head_dim": (2, 4),
        "transformer_layers_per_block": (1, 2),
        "addition_time_embed_dim": 8,
        "vae_channels": (4, 8),
        "vae_groups": 2,
        "text_hidden": 32,
        "text_layers": 2,
        "text_heads": 4,
        "projection_dim": 32,
    },
}
SDXL_VAE_SCALING_FACTOR = 0.13025
MAX_TOKENS = 16
# The pixel size these models train and sample at (the quickstart's 32 px). Their configs'
# sample_size (UNet: latent cells, VAE: pixels) say so, so diffusers' pipelines and
# `python -m cn_lightning.generate` draw at this size by default.
NATIVE_RESOLUTION = 32


def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """A byte-level CLIP BPE vocabulary covering every single character plus a few merges.

    Every printable ASCII letter with and without the end-of-word marker is a token, so any
    English prompt tokenises without unknown tokens.
    """
    chars = [chr(c) for c in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + chars + [c + "</w>" for c in chars]
    merges = ["#version: 0.2"]
    # Whole-word merges for the synthetic-circles vocabulary: every prompt word is one token, so
    # "<colour A> circle with <colour B> background" fits the 16-token context.
    from cn_lightning.data.synthetic import COLOURS

    words = {"circle", "background", "the", "with"}
    words.update(w for name in COLOURS for w in name.split())
    for word in sorted(words):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            if f"{a} {b}" not in merges:
                merges.append(f"{a} {b}")
            merged = a + b
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer(out: Path) -> CLIPTokenizer:
    """Write ``vocab.json`` + ``merges.txt`` and load them as a ``CLIPTokenizer``."""
    out.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (out / "vocab.json").write_text(json.dumps(vocab))
    (out / "merges.txt").write_text("\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(m.split(" ")) for m in merges[1:]],
        model_max_length=MAX_TOKENS,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(out)
    # Load back from disk so callers get exactly what load_backbone will see.
    return CLIPTokenizer.from_pretrained(out, local_files_only=True)


def build_tiny_components(preset: str = "test", seed: int = 0, vocab_size: int | None = None):
    """Build (unet, vae, text_encoder, scheduler) with random weights for ``preset``."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown tiny preset {preset!r}: expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    torch.manual_seed(seed)
    vae_scale_factor = 2 ** (len(p["vae_channels"]) - 1)
    unet = UNet2DConditionModel(
        sample_size=NATIVE_RESOLUTION // vae_scale_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=p["unet_channels"],
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=p["text_hidden"],
        attention_head_dim=p["attention_head_dim"],
        norm_num_groups=p["unet_groups"],
    )
    vae = AutoencoderKL(
        block_out_channels=list(p["vae_channels"]),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(p["vae_channels"]),
        up_block_types=["UpDecoderBlock2D"] * len(p["vae_channels"]),
        latent_channels=4,
        norm_num_groups=p["vae_groups"],
        sample_size=NATIVE_RESOLUTION,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=p["text_hidden"],
            intermediate_size=p["text_hidden"] * 2,
            num_attention_heads=p["text_heads"],
            num_hidden_layers=p["text_layers"],
            layer_norm_eps=1e-5,
            vocab_size=vocab_size or 1000,
            max_position_embeddings=MAX_TOKENS,
        )
    )
    scheduler = DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        prediction_type="epsilon",
    )
    return unet, vae, text_encoder, scheduler


def write_tiny_backbone(out: str | os.PathLike, preset: str = "test", seed: int = 0) -> Path:
    """Write a tiny SD model in diffusers layout to ``out`` and return the path.

    The directory is assembled in a temporary sibling and moved into place, so an interrupted
    run never leaves a half-written model that later runs would try to load.
    """
    out = Path(out)
    if preset in SDXL_PRESETS:
        return write_tiny_sdxl_backbone(out, preset=preset, seed=seed)
    with atomic_directory(out) as tmp:
        tokenizer = write_tokenizer(tmp / "tokenizer")
        unet, vae, text_encoder, scheduler = build_tiny_components(
            preset, seed, vocab_size=len(tokenizer)
        )
        save_model_parts(tmp, unet, vae, text_encoder, scheduler)
    return out


def build_tiny_sdxl_components(
    preset: str = "sdxl-test", seed: int = 0, vocab_size: int | None = None
) -> dict:
    """The components of a tiny ``StableDiffusionXLPipeline`` (tokenizers excepted), random
    weights: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``scheduler``."""
    if preset not in SDXL_PRESETS:
        raise ConfigError(f"unknown SDXL preset {preset!r}: expected one of {sorted(SDXL_PRESETS)}")
    p = SDXL_PRESETS[preset]
    torch.manual_seed(seed)
    vae_scale_factor = 2 ** (len(p["vae_channels"]) - 1)
    text_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=p["text_hidden"],
        intermediate_size=p["text_hidden"] * 2,
        num_attention_heads=p["text_heads"],
        num_hidden_layers=p["text_layers"],
        layer_norm_eps=1e-5,
        vocab_size=vocab_size or 1000,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="gelu",
        projection_dim=p["projection_dim"],
    )
    unet = UNet2DConditionModel(
        sample_size=NATIVE_RESOLUTION // vae_scale_factor,
        in_channels=4,
        out_channels=4,
        block_out_channels=p["unet_channels"],
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=p["attention_head_dim"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=p["addition_time_embed_dim"],
        transformer_layers_per_block=p["transformer_layers_per_block"],
        projection_class_embeddings_input_dim=6 * p["addition_time_embed_dim"]
        + p["projection_dim"],
        cross_attention_dim=2 * p["text_hidden"],
        norm_num_groups=p["unet_groups"],
    )
    vae = AutoencoderKL(
        block_out_channels=list(p["vae_channels"]),
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * len(p["vae_channels"]),
        up_block_types=["UpDecoderBlock2D"] * len(p["vae_channels"]),
        latent_channels=4,
        norm_num_groups=p["vae_groups"],
        sample_size=NATIVE_RESOLUTION,
        scaling_factor=SDXL_VAE_SCALING_FACTOR,
    )
    text_encoder = CLIPTextModel(text_config)
    text_encoder_2 = CLIPTextModelWithProjection(text_config)
    # SDXL's scheduler_config.json (the base model's, minus its sample-time options).
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "scheduler": scheduler,
    }


def write_tiny_sdxl_backbone(
    out: str | os.PathLike, preset: str = "sdxl-test", seed: int = 0
) -> Path:
    """Write a tiny SDXL model with ``StableDiffusionXLPipeline.save_pretrained`` (atomically)."""
    from diffusers import StableDiffusionXLPipeline

    out = Path(out)
    with atomic_directory(out) as tmp:
        tokenizer = write_tokenizer(tmp / "tokenizer")
        tokenizer_2 = write_tokenizer(tmp / "tokenizer_2")
        parts = build_tiny_sdxl_components(preset, seed, vocab_size=len(tokenizer))
        pipe = StableDiffusionXLPipeline(
            tokenizer=tokenizer, tokenizer_2=tokenizer_2, force_zeros_for_empty_prompt=True, **parts
        )
        pipe.save_pretrained(tmp, safe_serialization=True)
    return out


def save_model_parts(out: Path, unet, vae, text_encoder, scheduler) -> None:
    """Write the UNet, VAE, text encoder, scheduler and ``model_index.json`` in diffusers layout
    (the tokenizer is written separately)."""
    unet.save_pretrained(out / "unet")
    vae.save_pretrained(out / "vae")
    text_encoder.save_pretrained(out / "text_encoder")
    scheduler.save_pretrained(out / "scheduler")
    (out / "model_index.json").write_text(json.dumps(_model_index(), indent=2))


def ensure_tiny_backbone(out: str | os.PathLike, preset: str = "small", seed: int = 0) -> str:
    """Write the tiny model to ``out`` unless a complete one is already there; return its path."""
    out = Path(os.path.expanduser(str(out)))
    if not (out / "model_index.json").is_file():
        log.info(f"writing tiny {preset!r} Stable Diffusion backbone to {out}")
        write_tiny_backbone(out, preset=preset, seed=seed)
    return str(out)


def _model_index() -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.30.0",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cn_lightning.models.tiny",
        description="Write a tiny Stable Diffusion model (diffusers layout) built from configs.",
    )
    parser.add_argument("--out", required=True, help="directory to write the model to")
    parser.add_argument("--preset", default="test", choices=sorted({*PRESETS, *SDXL_PRESETS}))
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = write_tiny_backbone(args.out, preset=args.preset, seed=args.seed)
    log.info(f"wrote tiny Stable Diffusion model ({args.preset}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
