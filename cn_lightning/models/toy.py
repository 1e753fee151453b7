"""Pretrain the toy text-to-image latent diffusion model that the quickstart controls.

ControlNet's premise is a *pretrained* backbone. The toy world is the synthetic-circles task:
the backbone learns to draw "<colour A> circle with <colour B> background" with the right colours
at a random place; the ControlNet then learns to put the circle where the outline is.

Two Lightning stages on the same shards the ControlNet trains on:

1. :class:`ToyVAEModule` trains the VAE (reconstruction + a small KL term);
2. :class:`ToyDiffusionModule` freezes it and trains the UNet and the text encoder with the
   diffusion loss of :class:`~cn_lightning.models.module.ControlNetModule` (the same functions of
   :mod:`cn_lightning.models.diffusion`: prompt encoding, prompt dropping, the scheduler's target).

The result is written in diffusers layout, so it loads through ``load_backbone`` like SD1.5.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from cn_lightning.atomic import atomic_directory
from cn_lightning.conditions.colour import colour_statistics, nearest_colour_names
from cn_lightning.models.diffusion import (
    FrozenPartsMixin,
    diffusion_target,
    drop_prompts,
    encode_prompt,
)
from cn_lightning.models.tiny import build_tiny_components, save_model_parts

TOY_PRESET = "toy"


class ToyVAEModule(L.LightningModule):
    """Stage 1: an ``AutoencoderKL`` trained on the target images.

    Args:
        learning_rate: AdamW learning rate.
        kl_weight: weight of the KL term (small: the latents only need to be well behaved).
        seed: seed of the initial weights.
    """

    def __init__(self, learning_rate: float = 1e-3, kl_weight: float = 1e-6, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        _, self.vae, _, _ = build_tiny_components(TOY_PRESET, seed=seed)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        image = batch["image"]
        posterior = self.vae.encode(image).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        mse = F.mse_loss(recon, image)
        kl = posterior.kl().mean()
        loss = mse + self.hparams.kl_weight * kl
        self.log_dict(
            {"vae/mse": mse, "vae/kl": kl, "train/loss": loss},
            prog_bar=True,
            batch_size=image.shape[0],
        )
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(
            self.vae.parameters(), lr=self.hparams.learning_rate, weight_decay=0.0
        )


class ToyDiffusionModule(FrozenPartsMixin, L.LightningModule):
    """Stage 2: UNet + text encoder trained with the diffusion loss on a frozen VAE.

    Args:
        vae_dir: the stage-1 VAE (a diffusers ``AutoencoderKL`` folder).
        tokenizer_dir: the toy tokenizer folder.
        learning_rate: AdamW learning rate of the UNet and text encoder.
        ucg_rate: share of empty prompts, so classifier-free guidance works.
        seed: seed of the initial weights.
        init_from: a toy backbone (diffusers layout) to fine-tune instead of training from
            scratch: its UNet, text encoder and scheduler are the starting point (how the toy
            "community model" is made).
        train_text_encoder: also train the text encoder (off: it stays the backbone's, as in
            most community fine-tunes of SD, which a ControlNet reads too).
    """

    def __init__(
        self,
        vae_dir: str,
        tokenizer_dir: str,
        learning_rate: float = 1e-3,
        ucg_rate: float = 0.1,
        seed: int = 0,
        init_from: str | None = None,
        train_text_encoder: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        if init_from:
            root = Path(init_from)
            self.unet = UNet2DConditionModel.from_pretrained(root / "unet", local_files_only=True)
            self.text_encoder = CLIPTextModel.from_pretrained(
                root / "text_encoder", local_files_only=True
            )
            self.noise_scheduler = DDPMScheduler.from_pretrained(
                root / "scheduler", local_files_only=True
            )
        else:
            self.unet, _, self.text_encoder, self.noise_scheduler = build_tiny_components(
                TOY_PRESET, seed=seed, vocab_size=len(self.tokenizer)
            )
        # from_pretrained returns models in eval mode: the trained parts train, a frozen text
        # encoder stays in eval mode.
        self.unet.train()
        self.text_encoder.train(train_text_encoder).requires_grad_(train_text_encoder)
        vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True)
        vae.requires_grad_(False).eval()
        self._frozen = {"vae": vae}

    @property
    def vae(self) -> AutoencoderKL:
        return self._frozen["vae"]

    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Prompts to text-encoder hidden states, (B, tokens, hidden)."""
        return encode_prompt(self.tokenizer, self.text_encoder, prompts, self.device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        with torch.no_grad():
            latents = self.vae.encode(batch["image"]).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
        prompts = drop_prompts(batch["prompt"], self.hparams.ucg_rate)
        noise = torch.randn_like(latents)
        t = torch.randint(
            0,
            self.noise_scheduler.config.num_train_timesteps,
            (latents.shape[0],),
            device=latents.device,
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        pred = self.unet(noisy, t, encoder_hidden_states=self.encode_prompt(prompts)).sample
        loss = F.mse_loss(pred, diffusion_target(self.noise_scheduler, latents, noise, t))
        self.log("train/loss", loss, prog_bar=True, batch_size=latents.shape[0])
        return loss

    def configure_optimizers(self):
        params = list(self.unet.parameters())
        if self.hparams.train_text_encoder:
            params += list(self.text_encoder.parameters())
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=1e-2)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        size: int = 64,
        steps: int = 20,
        guidance_scale: float = 3.0,
        seed: int = 0,
    ) -> torch.Tensor:
        """Images (B, 3, size, size) in [0, 1] for ``prompts`` (DDIM, classifier-free guidance)."""
        return text_to_image(
            self.unet,
            self.vae,
            self.encode_prompt,
            self.noise_scheduler,
            prompts,
            size,
            steps,
            guidance_scale,
            seed,
        )


@torch.no_grad()
def text_to_image(
    unet,
    vae,
    encode_prompt,
    noise_scheduler,
    prompts: list[str],
    size: int = 64,
    steps: int = 20,
    guidance_scale: float = 3.0,
    seed: int = 0,
) -> torch.Tensor:
    """Sample a backbone without control: (B, 3, size, size) in [0, 1]."""
    device = next(unet.parameters()).device
    scheduler = DDIMScheduler.from_config(noise_scheduler.config)
    scheduler.set_timesteps(steps, device=device)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(
        len(prompts), unet.config.in_channels, size // factor, size // factor, generator=g
    ).to(device)
    text = torch.cat([encode_prompt([""] * len(prompts)), encode_prompt(list(prompts))])
    for t in scheduler.timesteps:
        pred = unet(torch.cat([latents, latents]), t, encoder_hidden_states=text).sample
        uncond, cond = pred.chunk(2)
        latents = scheduler.step(uncond + guidance_scale * (cond - uncond), t, latents).prev_sample
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return ((image + 1) / 2).clamp(0, 1)


def latent_scaling_factor(vae: AutoencoderKL, images: torch.Tensor) -> float:
    """1 / std of the VAE latents of ``images``, as SD chose its 0.18215."""
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample()
    return float(1.0 / latents.std())


def save_toy_backbone(
    out: str | os.PathLike,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer_dir: str | os.PathLike,
    scheduler: DDPMScheduler,
    provenance: dict,
) -> Path:
    """Write the trained parts in diffusers layout (atomically) with how they were made."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        save_model_parts(tmp, unet, vae, text_encoder, scheduler)
        shutil.copytree(tokenizer_dir, tmp / "tokenizer")
        (tmp / "PROVENANCE.json").write_text(json.dumps(provenance, indent=2))
    return out


# ------------------------------------------------------------------------- colour statistics
# The statistic lives with the toy's palette in the conditions layer (the swatch condition and
# its fidelity metric use it too); imported here, where the toy's users have always found it.
__all__ = [
    "ToyDiffusionModule",
    "ToyVAEModule",
    "colour_statistics",
    "latent_scaling_factor",
    "nearest_colour_names",
    "save_toy_backbone",
    "text_to_image",
]
