"""``ControlNetModule``: the locked Stable Diffusion backbone plus a trainable control branch.

Training step (the paper's recipe): encode the target image with the frozen VAE, encode the
prompt with the frozen text encoder (replaced by "" with probability ``ucg_rate``), add noise at a
random timestep, predict the scheduler's target (epsilon or v) with UNet + ControlNet residuals,
MSE loss. Only the control branch (and, with ``sd_locked=False``, the UNet decoder) trains.

SDXL backbones (a diffusers SDXL directory) work the same way, as diffusers'
``train_controlnet_sdxl.py`` and ``StableDiffusionXLControlNetPipeline`` run them: both text
encoders encode the prompt (the empty one too), and the ControlNet and the UNet both get
``added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids}``. ``add_time_ids`` is
``(original_size, crop_top_left, target_size)``: the batch's ``original_size`` /
``crop_top_left`` (B, 2) when it has those keys (the ShardDataModule always passes each
sample's source size and its crop in the image resized to cover the training size; with
aspect-ratio buckets, see docs/data.md), else the training image's own size and (0, 0); the
target size is always the training image's size (latent size x the VAE factor: the bucket's).

Checkpoints hold only the trainable weights (see :meth:`ControlNetModule.state_dict`): the frozen
backbone is reloaded from ``pretrained_model_path`` and never copied into a checkpoint.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from cn_lightning import log
from cn_lightning.data.stream import derive_seed
from cn_lightning.errors import ConfigError, NumericsError
from cn_lightning.models.backbone import (
    freeze_backbone,
    is_sdxl_unet,
    load_backbone,
    parse_dtype,
)
from cn_lightning.models.checkpoints import load_controlnet
from cn_lightning.models.controlnet import (
    CONTROLNET_PREFIX,
    DECODER_PREFIXES,
    UNET_PREFIX,
    build_controlnet,
    expand_control_scales,
    scale_residuals,
)
from cn_lightning.models.diffusion import (
    SAMPLERS,
    FrozenPartsMixin,
    diffusion_target,
    drop_mask,
    drop_prompts,
    make_sampler,
    sdxl_time_ids,
)
from cn_lightning.models.diffusion import encode_text as run_text_encoders
from cn_lightning.models.fingerprint import text_fingerprint, vae_fingerprint


def adamw(params: Iterable, lr: float, **kwargs: Any) -> torch.optim.Optimizer:
    """``torch.optim.AdamW``, fused where the parameters' device has the fused kernel.

    The fused step updates every tensor in one kernel instead of a Python loop over the
    parameters: on the quickstart's CPU it takes 2.2 ms instead of 11.3 ms (the toy ControlNet's
    174 tensors), a tenth of a training step. ``kwargs`` go to ``AdamW`` (``fused`` included, to
    force either way); where fusing is not possible it is torch's default implementation.
    """
    params = list(params)
    if "fused" not in kwargs:
        try:
            return torch.optim.AdamW(params, lr=lr, fused=True, **kwargs)
        except RuntimeError:  # a device or dtype without the fused kernel
            pass
    return torch.optim.AdamW(params, lr=lr, **kwargs)


def default_optimizer(params: Iterable, lr: float) -> torch.optim.Optimizer:
    return adamw(params, lr=lr, weight_decay=1e-2)


# Most prompts ControlNetModule.encode_prompt keeps (77 x 768 fp32 is 236 kB each for SD1.5).
PROMPT_CACHE_SIZE = 64
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class ControlNetModule(FrozenPartsMixin, L.LightningModule):
    """Train a ControlNet on a frozen Stable Diffusion backbone.

    Args:
        pretrained_model_path: diffusers SD / SDXL directory or single ``.safetensors``/``.ckpt``
            file (SD1.x / SD2.x).
        controlnet_path: optional existing ControlNet (diffusers folder or original-format file)
            to start from instead of copying the UNet encoder.
        variant: forces the architecture of a single-file checkpoint (``sd15``, ``sd21``, ...).
        vae_path: a separate VAE folder to use instead of the model's (e.g. SDXL's fp16-fix VAE).
        frozen_dtype: dtype of the frozen weights (``fp32``, ``bf16``, ``fp16``); the trainable
            weights always stay fp32 (master weights).
        sd_locked: ``False`` also trains the UNet decoder and output head at
            ``decoder_learning_rate``.
        only_mid_control: add the control only to the middle block.
        control_scales: one float or one per ControlNet output (13 for SD).
        gradient_checkpointing: recompute activations of ControlNet and UNet in backward.
        memory_format: layout of the 4-D weights of the UNet, ControlNet and VAE for training:
            ``channels_last`` (NHWC), ``contiguous`` (NCHW) or ``auto`` (NHWC except under
            DeepSpeed and FSDP, which need contiguous parameters). Convolutions pick their
            kernels by the weight's layout; NHWC ones are faster on GPUs (tensor cores) and
            with oneDNN on CPUs (0.91x the quickstart's step time). Set when fit starts
            (:meth:`configure_model`); the weights are the same in either layout.
        ucg_rate: probability of replacing a prompt by "" (the paper uses 0.5).
        learning_rate: learning rate of the control branch (paper: 1e-5).
        decoder_learning_rate: learning rate of the decoder when ``sd_locked=False``.
        optimizer: a callable ``(param_groups, lr=...) -> Optimizer`` (Hydra ``_partial_``).
        lr_warmup_steps: linear warmup of every group's learning rate over these steps.
        latent_sampling: ``sample`` draws from the VAE posterior, ``mode`` takes its mean.
        noise_offset: optional offset noise (0 disables it).
        sampler / sample_steps / guidance_scale / eta: defaults of :meth:`sample`.
        conditioning_channels: channels of the condition image.
        zero_conv_init: how the junctions between the branch and the locked UNet start: ``zero``
            (the paper: the model equals the locked backbone at step 0), ``gaussian`` (the
            paper's ablation: Gaussian weights, σ = ``zero_conv_std`` or 1/sqrt(fan-in)) or
            ``none`` (no zero convolution: the branch's outputs join the skip connections
            directly, through frozen identity junctions); see
            :mod:`cn_lightning.models.controlnet`.
        zero_conv_std: σ of the ``gaussian`` junctions (null: 1/sqrt(fan-in)).
        seed: with the global rank and the optimizer step, seeds every random draw of a
            training step (noise, timesteps, prompt drops, latent sampling), so ranks draw
            differently and a rerun or resumed run draws exactly the same.
        max_consecutive_nonfinite: stop with an error after this many optimizer steps in a
            row were skipped for a non-finite loss or gradient.
    """

    def __init__(
        self,
        pretrained_model_path: str,
        controlnet_path: str | None = None,
        variant: str | None = None,
        vae_path: str | None = None,
        frozen_dtype: str = "fp32",
        sd_locked: bool = True,
        only_mid_control: bool = False,
        control_scales: float | Sequence[float] | None = None,
        gradient_checkpointing: bool = False,
        memory_format: str = "auto",
        ucg_rate: float = 0.5,
        learning_rate: float = 1e-5,
        decoder_learning_rate: float = 2e-6,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        lr_warmup_steps: int = 0,
        latent_sampling: str = "sample",
        noise_offset: float = 0.0,
        sampler: str = "ddim",
        sample_steps: int = 20,
        guidance_scale: float = 9.0,
        eta: float = 0.0,
        conditioning_channels: int = 3,
        zero_conv_init: str = "zero",
        zero_conv_std: float | None = None,
        seed: int = 0,
        max_consecutive_nonfinite: int = 10,
    ) -> None:
        super().__init__()
        if pretrained_model_path in (None, "", "???"):
            raise ConfigError(
                "model.pretrained_model_path is not set: point it at a Stable Diffusion "
                "diffusers directory or a .safetensors/.ckpt file"
            )
        _check_choice("latent_sampling", latent_sampling, ("sample", "mode"))
        _check_choice("sampler", sampler, tuple(SAMPLERS))
        _check_choice("memory_format", memory_format, ("auto", *MEMORY_FORMATS))
        if not 0.0 <= ucg_rate <= 1.0:
            raise ConfigError(f"ucg_rate must be in [0, 1], got {ucg_rate}")
        self.save_hyperparameters(ignore=["optimizer"])

        # Loaded in fp32 so the trainable copy starts from the exact weights; the frozen parts
        # are cast to frozen_dtype only after the copy is made.
        backbone = load_backbone(pretrained_model_path, "fp32", variant=variant, vae_path=vae_path)
        # What the prompt encoding and the VAE are, from their float32 weights (before the cast
        # to frozen_dtype): caches made with another backbone are refused (check_caches).
        self.text_fingerprint = text_fingerprint(
            (backbone.tokenizer, backbone.tokenizer_2),
            (backbone.text_encoder, backbone.text_encoder_2),
        )
        self.vae_fingerprint = vae_fingerprint(backbone.vae)
        self.vae_scale_factor = backbone.vae_scale_factor
        self.tokenizer = backbone.tokenizer
        self.tokenizer_2 = backbone.tokenizer_2
        self.noise_scheduler = backbone.noise_scheduler
        # The VAE and text encoder(s) run before the differentiable graph. Keeping them out of
        # the registered modules means no strategy (DDP, DeepSpeed, FSDP) casts, shards, wraps or
        # checkpoints them; FrozenPartsMixin moves them with the module (device only).
        self._frozen = {"vae": backbone.vae, "text_encoder": backbone.text_encoder}
        if backbone.is_sdxl:
            self._frozen["text_encoder_2"] = backbone.text_encoder_2
        self.unet = backbone.unet
        self.controlnet = build_controlnet(
            backbone.unet,
            vae_scale_factor=self.vae_scale_factor,
            pretrained=load_controlnet(controlnet_path, backbone.unet) if controlnet_path else None,
            conditioning_channels=conditioning_channels,
            zero_conv_init=zero_conv_init,
            zero_conv_std=zero_conv_std,
            seed=seed,
        )
        decoder_fp32 = {} if sd_locked else _decoder_parameters(backbone.unet)
        freeze_backbone(backbone, parse_dtype(frozen_dtype))
        if not sd_locked:
            self._unlock_decoder(decoder_fp32)
        if gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()
        num_outputs = len(self.controlnet.controlnet_down_blocks) + 1
        self.control_scales = expand_control_scales(control_scales, num_outputs)
        self.optimizer_factory = optimizer or default_optimizer
        self.numerics = NonFiniteGuard(max_consecutive_nonfinite)
        # (optimizer step, micro-batches seen in it): the key of each micro-batch's generator.
        self._micro = (-1, 0)
        self._rng_step = -1
        # Prompt -> (text embedding (tokens, hidden), SDXL's pooled embedding or None) on the
        # module's device: see encode_text.
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # The empty prompt's embeddings stored with a text cache (check_caches), on the CPU.
        self._cached_empty: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def configure_model(self) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

        # _uses_deepspeed() needs the engine, which the strategy builds only after this hook.
        deepspeed = isinstance(self.trainer.strategy, DeepSpeedStrategy)
        fsdp = isinstance(self.trainer.strategy, FSDPStrategy)
        layout = self.hparams.memory_format
        if layout == "auto":
            layout = "contiguous" if deepspeed or fsdp else "channels_last"
        elif layout == "channels_last" and (deepspeed or fsdp):
            why = (
                "DeepSpeed (its engine broadcasts and flattens parameters as contiguous buffers)"
                if deepspeed
                else "FSDP (the optimizer state of NHWC weights comes back permuted on resume)"
            )
            raise ConfigError(
                f"model.memory_format=channels_last does not work under {why}: use auto or "
                "contiguous"
            )
        for part in (self.unet, self.controlnet, self.vae):
            part.to(memory_format=MEMORY_FORMATS[layout])

    # ----------------------------------------------------------------------------- structure
    @property
    def vae(self) -> torch.nn.Module:
        return self._frozen["vae"]

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self._frozen["text_encoder"]

    @property
    def text_encoder_2(self) -> torch.nn.Module | None:
        """SDXL's second text encoder (``CLIPTextModelWithProjection``); ``None`` for SD."""
        return self._frozen.get("text_encoder_2")

    @property
    def is_sdxl(self) -> bool:
        """An SDXL backbone: two text encoders and ``added_cond_kwargs`` for UNet and branch."""
        return is_sdxl_unet(self.unet)

    def _unlock_decoder(self, fp32_weights: dict[str, torch.Tensor]) -> None:
        for name, param in self.unet.named_parameters():
            if name.startswith(DECODER_PREFIXES):
                param.data = fp32_weights[name]
                param.requires_grad_(True)
        self.unet.up_blocks.train()

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only trainable tensors: the ControlNet (and the decoder when unlocked).

        Lightning and DeepSpeed both take checkpoints through this method, so no checkpoint
        ever holds a second copy of the frozen backbone.
        """
        full = super().state_dict(prefix=prefix, keep_vars=keep_vars)
        keep = {prefix + n for n in self.checkpointed_names()}
        out = destination if destination is not None else type(full)()
        for key, value in full.items():
            if key in keep:
                out[key] = value
        return out

    def checkpointed_names(self) -> list[str]:
        """The keys :meth:`state_dict` keeps (what checkpoints hold): the branch's, and the
        decoder's when it is unlocked."""
        names = [CONTROLNET_PREFIX + n for n in self.controlnet.state_dict()]
        if not self.hparams.sd_locked:
            names += [
                UNET_PREFIX + n for n in self.unet.state_dict() if n.startswith(DECODER_PREFIXES)
            ]
        return names

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load a trainable-only state dict; the frozen backbone is already in place."""
        expected = set(self.checkpointed_names())
        missing = sorted(expected - set(state_dict))
        unexpected = sorted(set(state_dict) - expected - set(super().state_dict()))
        if strict and (missing or unexpected):
            raise RuntimeError(
                "checkpoint does not match this ControlNetModule: "
                f"{len(missing)} missing keys (e.g. {missing[:3]}), "
                f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})"
            )
        return super().load_state_dict(state_dict, strict=False, assign=assign)

    # ------------------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_prompt(self, prompts: Sequence[str], cache: bool = False) -> torch.Tensor:
        """Prompts to text-encoder hidden states, (B, tokens, hidden) (SDXL: both encoders'
        penultimate states concatenated; its pooled embedding comes from :meth:`encode_text`)."""
        return self.encode_text(prompts, cache=cache)[0]

    @torch.no_grad()
    def encode_text(
        self, prompts: Sequence[str], cache: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompts to ``(hidden states (B, tokens, hidden), pooled (B, proj) or None)``; the
        pooled embedding exists for SDXL only (the second encoder's projected output).

        The empty prompt (half of the training prompts) is encoded once and kept; with ``cache``
        every prompt of the call is kept too (the sample grid's fixed prompts), up to
        ``PROMPT_CACHE_SIZE``. The text encoders are frozen, so a kept embedding never goes stale.
        """
        kept = self._prompt_cache
        if kept and next(iter(kept.values()))[0].device != self.device:
            kept.clear()  # the module moved
        new = list(dict.fromkeys(p for p in prompts if p not in kept))
        fresh: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if new:
            parts = [(self.tokenizer, self.text_encoder)]
            if self.is_sdxl:
                parts.append((self.tokenizer_2, self.text_encoder_2))
            tokenizers, encoders = zip(*parts, strict=True)
            # On the encoders' device: the CPU when a text cache serves training (see
            # keep_text_encoders_on_host), else the module's.
            device = next(self.text_encoder.parameters()).device
            hidden, pooled = run_text_encoders(tokenizers, encoders, new, device)
            hidden = hidden.to(self.device)
            pooled = [None] * len(new) if pooled is None else pooled.to(self.device)
            fresh = {p: (h, q) for p, h, q in zip(new, hidden, pooled, strict=True)}
            keep = [p for p in new if cache or p == ""]
            if len(kept) + len(keep) > PROMPT_CACHE_SIZE:
                kept.clear()
            kept.update({p: fresh[p] for p in keep[:PROMPT_CACHE_SIZE]})
        rows = [fresh[p] if p in fresh else kept[p] for p in prompts]
        hidden = torch.stack([h for h, _ in rows])
        pooled = torch.stack([q for _, q in rows]) if self.is_sdxl else None
        return hidden, pooled

    def added_cond_kwargs(
        self,
        pooled: torch.Tensor | None,
        target_size: tuple[int, int],
        batch: dict[str, Any] | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """SDXL's ``added_cond_kwargs`` (``None`` for SD): ``text_embeds`` (the pooled prompt
        embedding) and ``time_ids`` (B, 6) = ``(original_size, crop_top_left, target_size)``.

        ``original_size`` and ``crop_top_left`` come from the batch's keys of those names
        ((B, 2) each, (height, width) and (top, left) in pixels) when it has them, else they are
        ``target_size`` and (0, 0): what diffusers' ``train_controlnet_sdxl.py`` uses too
        (``(resolution, resolution)`` and its ``--crops_coords_top_left`` default).
        """
        if not self.is_sdxl:
            return None
        if pooled is None:
            raise ConfigError("an SDXL backbone needs the pooled prompt embedding")
        b = pooled.shape[0]
        batch = batch or {}
        original = _pairs(batch.get("original_size"), b, tuple(target_size))
        crop = _pairs(batch.get("crop_top_left"), b, (0, 0))
        ids = [sdxl_time_ids(o, c, target_size) for o, c in zip(original, crop, strict=True)]
        time_ids = torch.tensor(ids, dtype=torch.float32, device=pooled.device)
        return {"text_embeds": pooled, "time_ids": time_ids}

    @torch.no_grad()
    def encode_image(
        self, image: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] to scaled latents (B, C, H/f, W/f), fp32.

        ``generator`` (on the image's device) draws the posterior sample.
        """
        posterior = self.vae.encode(image.to(_dtype(self.vae))).latent_dist
        if self.hparams.latent_sampling == "sample":
            latents = posterior.sample(generator=generator)
        else:
            latents = posterior.mode()
        return latents.float() * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) to images (B, 3, h*f, w*f) in [0, 1]."""
        scaled = latents.to(_dtype(self.vae)) / self.vae.config.scaling_factor
        image = self.vae.decode(scaled).sample
        return ((image.float() + 1) / 2).clamp(0, 1)

    def drop_prompts(self, prompts: Sequence[str], generator: torch.Generator | None = None):
        """Replace each prompt by "" with probability ``ucg_rate`` (the paper's trick)."""
        return drop_prompts(prompts, self.hparams.ucg_rate, generator)

    # --------------------------------------------------------------------- cached embeddings
    def cached_text(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's cached text embeddings (``text_embeds`` (B, T, D), SDXL's
        ``pooled_text_embeds`` (B, P)) with the prompt drop applied: the same draw from
        ``generator`` as :meth:`drop_prompts`, the dropped rows replaced by the empty prompt's
        embeddings (:meth:`empty_text`). Equal to :meth:`encode_text` of the dropped prompts
        up to the cache's float16 storage."""
        hidden = batch["text_embeds"].to(self.device, torch.float32)
        pooled = batch.get("pooled_text_embeds")
        if self.is_sdxl and pooled is None:
            raise ConfigError(
                "an SDXL model needs the pooled text embeddings too: cache the shards again "
                "with data_prep.cache_latents --text --model <the SDXL model>"
            )
        pooled = None if pooled is None or not self.is_sdxl else pooled.to(hidden)
        drop = drop_mask(hidden.shape[0], self.hparams.ucg_rate, generator)
        if bool(drop.any()):
            empty_hidden, empty_pooled = self.empty_text()
            rows = drop.to(self.device)
            hidden = torch.where(rows[:, None, None], empty_hidden.to(hidden), hidden)
            if pooled is not None:
                pooled = torch.where(rows[:, None], empty_pooled.to(pooled), pooled)
        return hidden, pooled

    def empty_text(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The empty prompt's ``(hidden (T, D), pooled (P,) or None)``: the ones stored with the
        text cache (given by :meth:`check_caches`), else encoded by :meth:`encode_text`."""
        if self._cached_empty is None:
            hidden, pooled = self.encode_text([""])
            return hidden[0], None if pooled is None else pooled[0]
        hidden, pooled = self._cached_empty
        return hidden.to(self.device), None if pooled is None else pooled.to(self.device)

    def check_caches(self, text_caches: Sequence = (), latent_caches: dict | None = None) -> None:
        """Refuse caches made with another backbone, in one line (:class:`ConfigError`), and keep
        the text cache's empty-prompt embeddings for the prompt drop.

        Args:
            text_caches: ``cn_lightning.data.format.TextCache`` objects (``fingerprint``,
                ``model``, ``kind``, ``path``, ``empty_hidden``, ``empty_pooled``), e.g.
                ``ShardDataModule.text_caches()``.
            latent_caches: ``{shard folder: manifest "latent" entry}`` (``vae``,
                ``vae_fingerprint``), e.g. ``ShardDataModule.latent_caches()``.
        """
        path = self.hparams.pretrained_model_path
        kind = "sdxl" if self.is_sdxl else "sd"
        for cache in text_caches:
            if cache.fingerprint != self.text_fingerprint:
                raise ConfigError(
                    f"the text cache {cache.path} was made with the text encoder(s) of "
                    f"{cache.model} ({cache.kind}, {cache.fingerprint}), not those of "
                    f"model.pretrained_model_path {path} ({kind}, {self.text_fingerprint}): "
                    f"cache the shards again with python -m data_prep.cache_latents --model "
                    f"{path}, or set data.use_cached_text=false"
                )
        for folder, info in (latent_caches or {}).items():
            made_with = info.get("vae_fingerprint")
            if made_with and made_with != self.vae_fingerprint:
                vae = self.hparams.vae_path or path
                raise ConfigError(
                    f"the cached latents in {folder} were made with the VAE of "
                    f"{info.get('vae', '?')} ({made_with}), not with {vae}'s "
                    f"({self.vae_fingerprint}): cache them again with python -m "
                    f"data_prep.cache_latents --model {vae}, or set data.use_cached_latents=false"
                )
        if text_caches:
            cache = text_caches[0]
            pooled = None if cache.empty_pooled is None else torch.from_numpy(cache.empty_pooled)
            self._cached_empty = (torch.from_numpy(cache.empty_hidden), pooled)

    def keep_text_encoders_on_host(self, host: bool = True) -> None:
        """Keep the text encoder(s) on the CPU whatever the module's device (``host``), or let
        them follow it again. With cached text embeddings training never runs them; only the
        sample grids' fixed prompts are encoded there, once (:meth:`encode_text` with
        ``cache=True``), which frees their accelerator memory (1.6 GB for SDXL's in bf16)."""
        names = frozenset(n for n in ("text_encoder", "text_encoder_2") if n in self._frozen)
        self._host_frozen = names if host else frozenset()
        for name in names:
            self._frozen[name].to(torch.device("cpu") if host else self.device)

    def setup(self, stage: str) -> None:
        # The DataModule's setup (which Lightning runs first) has found the caches it reads.
        datamodule = self.trainer.datamodule
        if hasattr(datamodule, "text_caches"):
            self.check_caches(datamodule.text_caches(), datamodule.latent_caches())
            # Before the strategy moves the module: the encoders stay on the host when no
            # split encodes prompts per step.
            splits = ["train"] if stage == "fit" else []
            if stage in ("fit", "validate") and datamodule.val_urls() is not None:
                splits.append("val")
            cached = all(datamodule.text_cache(s) is not None for s in splits)
            self.keep_text_encoders_on_host(bool(splits) and cached)

    # ------------------------------------------------------------------------------- forward
    def forward(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        text_embeddings: torch.Tensor,
        condition: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """UNet prediction with control.

        Args:
            noisy_latents: (B, C, h, w) latents at ``timesteps``.
            timesteps: (B,) integer timesteps.
            text_embeddings: (B, tokens, hidden) from :meth:`encode_prompt`.
            condition: (B, 3, h*f, w*f) condition image in [0, 1].
            added_cond_kwargs: SDXL only (required there): ``text_embeds`` and ``time_ids``
                from :meth:`added_cond_kwargs`, given to the ControlNet and the UNet alike.

        Returns:
            (B, C, h, w) prediction (epsilon or v, as the scheduler says), fp32.
        """
        # Under DeepSpeed the registered modules are cast to bf16/fp16 and no autocast runs, so
        # the inputs made outside the engine must follow the branch's dtype (a no-op in fp32 and
        # under autocast, where the branch keeps fp32 weights).
        if self.is_sdxl and added_cond_kwargs is None:
            raise ConfigError(
                "an SDXL ControlNetModule needs added_cond_kwargs (text_embeds, time_ids): "
                "see ControlNetModule.added_cond_kwargs"
            )
        branch_dtype = _dtype(self.controlnet)
        down, mid = self.controlnet(
            noisy_latents.to(branch_dtype),
            timesteps,
            encoder_hidden_states=text_embeddings.to(branch_dtype),
            controlnet_cond=condition.to(branch_dtype),
            added_cond_kwargs=_cast(added_cond_kwargs, branch_dtype),
            return_dict=False,
        )
        down, mid = scale_residuals(down, mid, self.control_scales, self.hparams.only_mid_control)
        dtype = _dtype(self.unet)
        pred = self.unet(
            noisy_latents.to(dtype),
            timesteps,
            encoder_hidden_states=text_embeddings.to(dtype),
            down_block_additional_residuals=[r.to(dtype) for r in down],
            mid_block_additional_residual=mid.to(dtype),
            added_cond_kwargs=_cast(added_cond_kwargs, dtype),
            return_dict=False,
        )[0]
        return pred.float()

    def diffusion_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """What the UNet must predict, per the scheduler's ``prediction_type``."""
        return diffusion_target(self.noise_scheduler, latents, noise, timesteps)

    def compute_loss(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The diffusion MSE loss of one batch (see the module docstring), fp32.

        ``generator`` (a CPU generator) makes every draw reproducible: it draws the prompt
        drops and timesteps itself and seeds a generator on the batch's device for the noise
        and the VAE posterior sample. Without it the global RNGs are used.
        """
        device = batch["condition"].device
        device_gen = _device_generator(generator, device)
        if "latent" in batch:
            latents = batch["latent"].float() * self.vae.config.scaling_factor
        else:
            latents = self.encode_image(batch["image"], generator=device_gen)
        if "text_embeds" in batch:  # cached (data.use_cached_text): the same drop draws
            text_embeddings, pooled = self.cached_text(batch, generator=generator)
        else:
            prompts = self.drop_prompts(batch["prompt"], generator=generator)
            text_embeddings, pooled = self.encode_text(prompts)
        f = self.vae_scale_factor
        added = self.added_cond_kwargs(
            pooled, (latents.shape[-2] * f, latents.shape[-1] * f), batch
        )
        noise = torch.randn(latents.shape, generator=device_gen, device=device)
        if self.hparams.noise_offset:
            offset = torch.randn(latents.shape[:2] + (1, 1), generator=device_gen, device=device)
            noise = noise + self.hparams.noise_offset * offset
        num_steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, num_steps, (latents.shape[0],), generator=generator)
        timesteps = timesteps.to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = self(noisy, timesteps, text_embeddings, batch["condition"].float(), added)
        target = self.diffusion_target(latents, noise, timesteps)
        return F.mse_loss(pred, target.float(), reduction="mean")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The global RNGs (python, numpy, torch, CUDA) restart from (seed, rank, step) at every
        # optimizer step, so anything drawing from them also differs by rank and resumes
        # exactly, with no state to carry in a checkpoint. The step itself uses step_generator.
        step = self.trainer.global_step
        if self._rng_step != step:
            self._rng_step = step
            _seed_global_rngs(derive_seed(self.hparams.seed, self.global_rank, step, 2**31))

    def step_generator(self) -> torch.Generator:
        """A CPU generator for the current micro-batch, seeded by (seed, global rank,
        optimizer step, micro-batch within the step): distinct on every rank, identical when
        the run is repeated or resumed, and with no state to carry in a checkpoint."""
        step = self.trainer.global_step if self._trainer is not None else 0
        index = self._micro[1] if self._micro[0] == step else 0
        self._micro = (step, index + 1)
        seed = derive_seed(self.hparams.seed, self.global_rank, step, index)
        return torch.Generator().manual_seed(seed)

    # ----------------------------------------------------------------------------- Lightning
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        loss = self.compute_loss(batch, generator=self.step_generator())
        batch_size = len(batch["prompt"])
        finite = self.trainer.strategy.reduce_boolean_decision(
            bool(torch.isfinite(loss.detach())), all=True
        )
        self.log("train/skipped_nonfinite", float(self.numerics.skipped), batch_size=batch_size)
        if "n_skipped" in batch:
            skipped = torch.as_tensor(batch["n_skipped"]).sum().float()
            self.log("data/skipped_samples", skipped, reduce_fx="sum", batch_size=batch_size)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if not finite:
            # Every rank agreed (reduce_boolean_decision), so none waits in DDP's all-reduce.
            self.numerics.flag_window()
            if not self._uses_deepspeed():
                return None  # Lightning skips backward; the guarded step skips the update
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # A fixed generator per batch so the validation loss is comparable across steps.
        generator = torch.Generator().manual_seed(batch_idx)
        loss = self.compute_loss(batch, generator=generator)
        self.log("val/loss", loss, sync_dist=True, batch_size=len(batch["prompt"]))
        return loss

    def configure_optimizers(self):
        groups = [{"params": [p for p in self.controlnet.parameters() if p.requires_grad]}]
        if not self.hparams.sd_locked:
            decoder = [p for p in self.unet.parameters() if p.requires_grad]
            groups.append({"params": decoder, "lr": self.hparams.decoder_learning_rate})
        optimizer = self.optimizer_factory(groups, lr=self.hparams.learning_rate)
        self.numerics.guard(optimizer)  # before a scheduler wraps optimizer.step
        warmup = self.hparams.lr_warmup_steps
        if warmup <= 0:
            return optimizer
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, functools.partial(_linear_warmup, warmup_steps=warmup)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # ----------------------------------------------------------------------------- numerics
    def on_before_optimizer_step(self, optimizer) -> None:
        # Gradients here are complete (accumulated, all-reduced, unscaled for fp16). Under
        # DeepSpeed they live in its own buffers; its optimizer checks them itself.
        # The optimizer's own list: walking the module's ~700 tensors cost 1% of a toy step.
        params = [p for group in optimizer.param_groups for p in group["params"]]
        finite = all_finite([p.grad for p in params if p.grad is not None])
        if not self.trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.numerics.flag_window()

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        engine = getattr(self.trainer.strategy, "deepspeed_engine", None)
        engine_steps = getattr(engine, "global_steps", None)
        optimizer.step(closure=optimizer_closure)
        if engine is not None and engine.global_steps == engine_steps:
            # DeepSpeed accumulates itself: Lightning calls this hook for every micro-batch and
            # the engine steps only at the window's last one, where the window (flagged or not)
            # is accounted for. Not a skipped step, and a flag raised here must stay set.
            return
        skipped_by_engine = engine is not None and not getattr(engine, "_step_applied", True)
        self.numerics.end_step(self.trainer.global_step, skipped_by_engine, log.info)

    def _uses_deepspeed(self) -> bool:
        return getattr(self.trainer.strategy, "deepspeed_engine", None) is not None

    def forward_entry(self) -> Callable[..., torch.Tensor]:
        """What runs :meth:`forward` outside a training step (sample grids, FLOP counts):
        ``self``, or under FSDP the FSDP root wrapping it, which gathers the parameters it holds
        itself (the stems of the branch and the UNet) before the forward; the wrapped blocks
        gather their own. Called on ``self``, those would still be shards."""
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = getattr(self._trainer.strategy, "model", None) if self._trainer else None
        return model if isinstance(model, FullyShardedDataParallel) else self

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        bad = [n for n, p in self.named_parameters() if p.requires_grad and not _finite(p)]
        if bad:
            raise NumericsError(
                f"refusing to save a checkpoint at step {self.trainer.global_step}: "
                f"{len(bad)} trainable tensors are not finite (e.g. {bad[0]})"
            )
        checkpoint["cn_numerics"] = self.numerics.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "cn_numerics" in checkpoint:
            self.numerics.load_state_dict(checkpoint["cn_numerics"])

    # ------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(
        self,
        condition: torch.Tensor,
        prompts: Sequence[str],
        num_inference_steps: int | None = None,
        guidance_scale: float | Sequence[float] | None = None,
        seed: int | Sequence[int] = 0,
        sampler: str | None = None,
        negative_prompt: str = "",
        eta: float | None = None,
    ) -> torch.Tensor:
        """Generate images for conditions and prompts with classifier-free guidance.

        The unconditional branch uses ``negative_prompt`` (default "") and the same condition,
        as the original does. Rows with guidance 1 need no unconditional branch and get none, so
        one call can mix guided rows and rows without guidance (the sample grid's with- and
        without-prompt samples) in one batch per denoising step.

        Args:
            condition: (B, 3, H, W) in [0, 1]; H and W divisible by the VAE factor.
            prompts: B prompts.
            guidance_scale: one scale for the batch, or one per sample (``None``: the model's).
            seed: one seed for the whole batch, or one per sample.

        Returns:
            (B, 3, H, W) images in [0, 1], fp32, on the module's device.
        """
        b = condition.shape[0]
        steps = num_inference_steps or self.hparams.sample_steps
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        scales = [float(scale)] * b if isinstance(scale, (int, float)) else list(map(float, scale))
        if len(scales) != b:
            raise ConfigError(f"guidance_scale: {len(scales)} scales for {b} samples")
        guided = [i for i, s in enumerate(scales) if s != 1.0]
        scheduler = self.make_sampler(sampler)
        scheduler.set_timesteps(steps, device=self.device)
        condition = condition.to(self.device, torch.float32)
        latents = self._initial_latents(condition, seed) * scheduler.init_noise_sigma
        # Rows 0..B-1 with their prompts, then the guided rows again with the negative prompt.
        text, pooled = self.encode_text([*prompts, *[negative_prompt] * len(guided)], cache=True)
        # SDXL: original and target size are the image's, no crop (the pipeline's defaults).
        added = self.added_cond_kwargs(pooled, tuple(condition.shape[-2:]))
        control = torch.cat([condition, condition[guided]])
        weight = torch.tensor([scales[i] for i in guided], device=self.device).view(-1, 1, 1, 1)
        extra = (
            {"eta": self.hparams.eta if eta is None else eta} if sampler_is_ddim(scheduler) else {}
        )
        forward = self.forward_entry()
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents[guided]])
            model_in = scheduler.scale_model_input(model_in, t)
            timesteps = t.expand(model_in.shape[0]).to(self.device)
            pred = forward(model_in, timesteps, text, control, added)
            pred, uncond = pred[:b], pred[b:]
            if guided:
                pred = pred.clone()
                pred[guided] = uncond + weight * (pred[guided] - uncond)
            latents = scheduler.step(pred, t, latents, **extra).prev_sample
        return self.decode_latents(latents)

    def make_sampler(self, name: str | None = None):
        """A fresh inference scheduler (DDIM or UniPC) sharing the training noise schedule."""
        return make_sampler(name or self.hparams.sampler, self.noise_scheduler.config)

    def _initial_latents(self, condition: torch.Tensor, seed: int | Sequence[int]) -> torch.Tensor:
        b, _, h, w = condition.shape
        f = self.vae_scale_factor
        if h % f or w % f:
            raise ConfigError(f"condition size {h}x{w} is not divisible by the VAE factor {f}")
        shape = (self.unet.config.in_channels, h // f, w // f)
        seeds = [seed + i for i in range(b)] if isinstance(seed, int) else list(seed)
        noise = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(noise).to(self.device)

    @torch.no_grad()
    def sample_with_and_without_prompt(
        self,
        condition: torch.Tensor,
        prompts: Sequence[str],
        seed: int | Sequence[int] = 0,
        guidance_scale: float | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples with the prompts (guided) and with the empty prompt, from the same noise, in
        one :meth:`sample` call. Without a prompt both guidance branches would be equal, so
        those rows run at guidance 1: the same image at half the cost.

        Returns:
            Two (B, 3, H, W) tensors in [0, 1]: with the prompts, without.
        """
        n = len(prompts)
        scale = self.hparams.guidance_scale if guidance_scale is None else guidance_scale
        seeds = [seed + i for i in range(n)] if isinstance(seed, int) else list(seed)
        both = self.sample(
            torch.cat([condition, condition]),
            [*prompts, *[""] * n],
            guidance_scale=[scale] * n + [1.0] * n,
            seed=seeds * 2,
            **kwargs,
        )
        return both[:n], both[n:]

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any], n: int = 4, seed: int = 0, **kwargs) -> dict:
        """Condition, samples with and without the prompt, and target for the first ``n``.

        Returns a dict of (n, 3, H, W) tensors in [0, 1] and the prompts.
        """
        condition = batch["condition"][:n]
        prompts = list(batch["prompt"][:n])
        samples, no_prompt = self.sample_with_and_without_prompt(
            condition, prompts, seed=seed, **kwargs
        )
        out = {
            "condition": condition.float().cpu(),
            "samples": samples.cpu(),
            "samples_no_prompt": no_prompt.cpu(),
            "prompts": prompts,
        }
        if "image" in batch:
            out["target"] = ((batch["image"][:n].float().cpu() + 1) / 2).clamp(0, 1)
        return out


def _dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's first parameter: all of them share it here (frozen_dtype, or the
    DeepSpeed engine's cast). diffusers' ``.dtype`` walks every submodule, 1% of a toy step."""
    return next(model.parameters()).dtype


def _cast(
    added: dict[str, torch.Tensor] | None, dtype: torch.dtype
) -> dict[str, torch.Tensor] | None:
    return None if added is None else {k: v.to(dtype) for k, v in added.items()}


def _pairs(value: Any, n: int, default: tuple[int, int]) -> list[tuple[int, int]]:
    """``n`` (a, b) pairs from a batch value ((n, 2) tensor / array / list of pairs), or
    ``default`` for every row when the batch has no such key."""
    if value is None:
        return [default] * n
    if torch.is_tensor(value):
        value = value.tolist()
    pairs = [tuple(int(x) for x in row) for row in value]
    if len(pairs) != n or any(len(p) != 2 for p in pairs):
        raise ConfigError(f"expected {n} (height, width)-style pairs in the batch, got {value!r}")
    return pairs


def _device_generator(
    generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """A generator on ``device`` seeded from the CPU ``generator`` (None stays None): large
    draws (noise, posterior samples) then happen on the device itself, no host copy."""
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _seed_global_rngs(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _finite(param: torch.Tensor) -> bool:
    # ZeRO-3 keeps only this rank's partition in ds_tensor; the parameter itself is empty.
    tensor = getattr(param, "ds_tensor", param)
    return bool(torch.isfinite(tensor).all())


def _decoder_parameters(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """fp32 copies of the decoder weights that ``sd_locked=False`` trains."""
    return {
        n: p.detach().float().clone()
        for n, p in unet.named_parameters()
        if n.startswith(DECODER_PREFIXES)
    }


class NonFiniteGuard:
    """Skips optimizer steps whose loss or gradients are not finite, counts them, and stops
    the run after ``max_consecutive`` skips in a row.

    The module flags the current accumulation window (:meth:`flag_window`) when a loss or a
    gradient is not finite on any rank; :meth:`guard` makes the optimizer's own ``step`` a
    no-op for a flagged window (also when DeepSpeed calls it), so weights and optimizer state
    stay exactly as they were.
    """

    def __init__(self, max_consecutive: int = 10) -> None:
        if max_consecutive < 1:
            raise ConfigError(f"max_consecutive_nonfinite must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self.flagged = False

    def flag_window(self) -> None:
        self.flagged = True

    def guard(self, optimizer: torch.optim.Optimizer) -> None:
        step = optimizer.step

        def guarded_step(closure=None, **kwargs):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if self.flagged:
                return loss
            return step(**kwargs)

        optimizer.step = guarded_step

    def end_step(self, step: int, skipped_by_engine: bool, report: Callable[[str], None]) -> None:
        """Account for the optimizer step that just ran (``step``: the trainer's step count)."""
        skipped, self.flagged = self.flagged or skipped_by_engine, False
        if not skipped:
            self.consecutive = 0
            return
        self.skipped += 1
        self.consecutive += 1
        report(
            f"[cn_lightning] step {step}: non-finite loss or gradient, optimizer step skipped "
            f"({self.consecutive} in a row, {self.skipped} in all)"
        )
        if self.consecutive >= self.max_consecutive:
            raise NumericsError(
                f"step {step}: {self.consecutive} optimizer steps in a row had a non-finite loss "
                "or gradient; stopping (usual causes: model.learning_rate too high, fp16 "
                "overflow - use trainer.precision=bf16-mixed, or bad data). The last checkpoint "
                "holds finite weights"
            )

    def state_dict(self) -> dict[str, int]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.consecutive = int(state.get("consecutive", 0))


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one host sync.

    The total norm (one multi-tensor kernel) is finite exactly when every element is, unless the
    sum of squares overflows; only then does the exact check run, so a huge but finite gradient
    is not taken for a non-finite one.
    """
    if not tensors:
        return True
    norm = torch.nn.utils.get_total_norm(tensors, norm_type=2.0, foreach=True)
    if bool(torch.isfinite(norm)):
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def sampler_is_ddim(scheduler) -> bool:
    return isinstance(scheduler, SAMPLERS["ddim"])


def _linear_warmup(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


__all__ = ["ControlNetModule"]
