"""The plain PyTorch ControlNet training step the benchmarks compare cn_lightning against.

It does what diffusers' ``examples/controlnet/train_controlnet.py`` does per step: VAE encode,
text encode with 50% empty prompts, noise, ControlNet, UNet with the residuals, MSE against the
scheduler's target, backward, AdamW step. Used by ``step_time.py`` and ``end_to_end.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import ControlNetModel

from cn_lightning.models.backbone import load_backbone
from cn_lightning.models.controlnet import hint_channels_for


@dataclass
class PlainParts:
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    unet: torch.nn.Module
    tokenizer: object
    scheduler: object
    controlnet: ControlNetModel
    optimizer: torch.optim.Optimizer


def build_plain(model_dir: str, lr: float) -> PlainParts:
    """The frozen backbone of ``model_dir``, a ControlNet copied from its UNet, AdamW at ``lr``."""
    bb = load_backbone(model_dir)
    for frozen in (bb.vae, bb.text_encoder, bb.unet):
        frozen.requires_grad_(False)
    controlnet = ControlNetModel.from_unet(
        bb.unet, conditioning_embedding_out_channels=hint_channels_for(bb.vae_scale_factor)
    )
    controlnet.train()
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=lr, weight_decay=1e-2)
    return PlainParts(
        bb.vae, bb.text_encoder, bb.unet, bb.tokenizer, bb.noise_scheduler, controlnet, optimizer
    )


def plain_step(
    parts: PlainParts, images: torch.Tensor, conditions: torch.Tensor, prompts: list[str]
) -> float:
    """One training step on ``images`` (B, 3, H, W) in [-1, 1] and ``conditions`` (B, 3, H, W) in
    [0, 1]; returns the loss."""
    p = parts
    with torch.no_grad():
        latents = p.vae.encode(images).latent_dist.sample() * p.vae.config.scaling_factor
        prompts = ["" if torch.rand(()) < 0.5 else text for text in prompts]
        ids = p.tokenizer(
            prompts,
            padding="max_length",
            max_length=p.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        emb = p.text_encoder(ids)[0]
    noise = torch.randn_like(latents)
    t = torch.randint(0, p.scheduler.config.num_train_timesteps, (latents.shape[0],))
    noisy = p.scheduler.add_noise(latents, noise, t)
    down, mid = p.controlnet(
        noisy, t, encoder_hidden_states=emb, controlnet_cond=conditions, return_dict=False
    )
    pred = p.unet(
        noisy,
        t,
        encoder_hidden_states=emb,
        down_block_additional_residuals=down,
        mid_block_additional_residual=mid,
        return_dict=False,
    )[0]
    if p.scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = p.scheduler.get_velocity(latents, noise, t)
    loss = F.mse_loss(pred.float(), target.float())
    loss.backward()
    p.optimizer.step()
    p.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())
