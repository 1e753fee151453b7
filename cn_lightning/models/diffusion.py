"""The pieces of the latent-diffusion training step shared by every module that trains one.

``ControlNetModule`` (the control branch on a locked backbone) and the toy backbone's
``ToyDiffusionModule`` (UNet + text encoder from scratch) both keep frozen parts outside their
module tree, encode prompts, drop them for classifier-free guidance and regress the scheduler's
target with these.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers import DDIMScheduler, UniPCMultistepScheduler

from cn_lightning.errors import ConfigError

# The inference schedulers offered everywhere (sample grids, generate, evaluate), by name.
SAMPLERS = {"ddim": DDIMScheduler, "unipc": UniPCMultistepScheduler}


def make_sampler(name: str, scheduler_config: dict) -> DDIMScheduler | UniPCMultistepScheduler:
    """A fresh inference scheduler ``name`` sharing the training noise schedule
    ``scheduler_config``."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}: expected one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name].from_config(scheduler_config)


class FrozenPartsMixin:
    """Frozen parts (VAE, text encoder) held in ``self._frozen``, outside the registered modules.

    No strategy (DDP, DeepSpeed, FSDP) casts, shards, wraps or checkpoints them; device moves of
    the module (``.to(device)``, ``.cuda()``) carry them along, dtype changes do not (their
    precision is chosen when they are loaded). Mix in before ``LightningModule``.
    """

    _frozen: dict[str, torch.nn.Module]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        probe = fn(torch.empty(0))
        for module in self._frozen.values():
            module.to(device=probe.device)
        return self


def encode_prompt(
    tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str], device: torch.device
) -> torch.Tensor:
    """Prompts to text-encoder hidden states, (B, tokens, hidden), padded to the model's length."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0]


def drop_prompts(
    prompts: Sequence[str], rate: float, generator: torch.Generator | None = None
) -> list[str]:
    """Replace each prompt by "" with probability ``rate`` (the paper's trick for guidance)."""
    keep = torch.rand(len(prompts), generator=generator) >= rate
    return [p if k else "" for p, k in zip(prompts, keep.tolist(), strict=True)]


def diffusion_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict, per the scheduler's ``prediction_type``."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ConfigError(f"unsupported scheduler prediction_type {kind!r}")
