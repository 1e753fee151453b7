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
    precision is chosen when they are loaded). Mix in before ``LightningModule``. The parts
    named in ``_host_frozen`` stay on the CPU whatever the module's device (the text encoders
    when cached text embeddings serve training).
    """

    _frozen: dict[str, torch.nn.Module]
    _host_frozen: frozenset[str] = frozenset()

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        probe = fn(torch.empty(0))
        for name, module in self._frozen.items():
            if name not in self._host_frozen:
                module.to(device=probe.device)
        return self


def encode_prompt(
    tokenizer, text_encoder: torch.nn.Module, prompts: Sequence[str], device: torch.device
) -> torch.Tensor:
    """Prompts to text-encoder hidden states, (B, tokens, hidden), padded to the model's length."""
    return text_encoder(token_ids(tokenizer, prompts, device))[0]


def token_ids(tokenizer, prompts: Sequence[str], device: torch.device) -> torch.Tensor:
    """Token ids (B, model_max_length), padded and truncated to the tokenizer's length."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def encode_prompt_sdxl(
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    prompts: Sequence[str],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's prompt encoding, as ``StableDiffusionXLPipeline.encode_prompt`` and diffusers'
    ``train_controlnet_sdxl.py`` do it: the penultimate hidden states of both encoders
    concatenated on the last axis, (B, tokens, hidden_1 + hidden_2), and the pooled (projected)
    output of the last one, (B, projection_dim). The empty prompt is encoded like any other
    (no zeroed embedding: that is only the pipeline's default *negative* prompt)."""
    hidden, pooled = [], None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        out = text_encoder(token_ids(tokenizer, prompts, device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    if pooled is None:
        raise ConfigError("SDXL needs a CLIPTextModelWithProjection as its last text encoder")
    return torch.cat(hidden, dim=-1), pooled


def encode_text(
    tokenizers: Sequence,
    text_encoders: Sequence[torch.nn.Module],
    prompts: Sequence[str],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A backbone's prompt encoding, ``(hidden (B, tokens, hidden), pooled (B, proj) or None)``:
    :func:`encode_prompt` with one text encoder (SD: the last hidden state, no pooled
    embedding), :func:`encode_prompt_sdxl` with two. What ``ControlNetModule.encode_text``
    trains on and ``data_prep.cache_latents --text`` stores."""
    if len(text_encoders) == 2:
        return encode_prompt_sdxl(tokenizers, text_encoders, prompts, device)
    (tokenizer,), (text_encoder,) = tokenizers, text_encoders
    return encode_prompt(tokenizer, text_encoder, prompts, device), None


def sdxl_time_ids(
    original_size: Sequence[int], crop_top_left: Sequence[int], target_size: Sequence[int]
) -> list[int]:
    """SDXL's micro-conditioning ``time_ids`` of one sample, in diffusers' order:
    ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    return [*map(int, original_size), *map(int, crop_top_left), *map(int, target_size)]


def drop_mask(n: int, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n,) bool: which of ``n`` prompts to replace by "" (probability ``rate`` each). One draw
    of ``n`` uniforms from ``generator``, whether the prompts are text or cached embeddings."""
    return torch.rand(n, generator=generator) < rate


def drop_prompts(
    prompts: Sequence[str], rate: float, generator: torch.Generator | None = None
) -> list[str]:
    """Replace each prompt by "" with probability ``rate`` (the paper's trick for guidance)."""
    drop = drop_mask(len(prompts), rate, generator)
    return ["" if d else p for p, d in zip(prompts, drop.tolist(), strict=True)]


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
