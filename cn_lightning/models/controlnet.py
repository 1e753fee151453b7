"""The trainable control branch and how its residuals join the locked UNet.

The branch is diffusers' ``ControlNetModel``: a copy of the UNet encoder and middle block, a
small condition encoder (``controlnet_cond_embedding``) and one zero-initialised 1x1 convolution
per skip connection (``controlnet_down_blocks``) plus one for the middle block
(``controlnet_mid_block``) — exactly the paper's architecture.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from cn_lightning.errors import ConfigError

# The paper's condition encoder: 3x3 convs with a stride-2 step between these widths.
PAPER_HINT_CHANNELS = (16, 32, 96, 256)

# Key prefixes of the module's state dict: the branch, and the locked UNet.
CONTROLNET_PREFIX = "controlnet."
UNET_PREFIX = "unet."
# The UNet parts ``sd_locked: false`` trains (the original's output blocks and output head).
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")
# What training changes, hence what checkpoints and exports hold: the branch, and the decoder
# when it is unlocked.
TRAINABLE_PREFIXES = (CONTROLNET_PREFIX, *(UNET_PREFIX + p for p in DECODER_PREFIXES))


def hint_channels_for(vae_scale_factor: int) -> tuple[int, ...]:
    """Condition-encoder widths that downsample a full-resolution condition to the latent grid.

    SD's VAE downsamples 8x, which gives the paper's (16, 32, 96, 256); the tiny test VAE
    downsamples 2x, which gives (16, 32).
    """
    steps = int(round(math.log2(vae_scale_factor)))
    if 2**steps != vae_scale_factor or steps + 1 > len(PAPER_HINT_CHANNELS):
        raise ConfigError(f"unsupported VAE scale factor {vae_scale_factor}: expected 1, 2, 4 or 8")
    return PAPER_HINT_CHANNELS[: steps + 1]


def build_controlnet(
    unet: UNet2DConditionModel,
    vae_scale_factor: int = 8,
    pretrained: ControlNetModel | None = None,
    conditioning_channels: int = 3,
) -> ControlNetModel:
    """The control branch in fp32, trainable: a copy of ``unet``'s encoder, or ``pretrained``.

    Args:
        unet: the locked UNet; its encoder and middle block weights are copied.
        vae_scale_factor: pixels per latent cell; sets the condition encoder's depth.
        pretrained: an existing ControlNet to fine-tune instead (read with
            :func:`cn_lightning.models.checkpoints.load_controlnet`).
        conditioning_channels: channels of the condition image (3 for RGB maps).
    """
    if pretrained is not None:
        controlnet = pretrained
    else:
        controlnet = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=hint_channels_for(vae_scale_factor),
            conditioning_channels=conditioning_channels,
        )
    # Master weights stay fp32 whatever the frozen backbone's dtype is.
    if any(p.dtype != torch.float32 for p in controlnet.parameters()):
        controlnet.to(dtype=torch.float32)
    controlnet.train()
    controlnet.requires_grad_(True)
    return controlnet


def expand_control_scales(
    control_scales: float | Sequence[float] | None, num_residuals: int
) -> list[float] | None:
    """Per-residual multipliers: ``None`` (all 1), one float, or one value per residual.

    The order is the original's: the encoder skip connections from the input side, then the
    middle block (13 values for SD).
    """
    if control_scales is None:
        return None
    if isinstance(control_scales, (int, float)):
        return [float(control_scales)] * num_residuals
    scales = [float(s) for s in control_scales]
    if len(scales) != num_residuals:
        raise ConfigError(
            f"control_scales has {len(scales)} values but this ControlNet has {num_residuals} "
            "outputs (the encoder skips plus the middle block)"
        )
    return scales


def scale_residuals(
    down: Sequence[torch.Tensor],
    mid: torch.Tensor,
    scales: Sequence[float] | None,
    only_mid_control: bool = False,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Apply per-output scales and ``only_mid_control`` to the ControlNet's residuals."""
    down = list(down)
    if scales is not None:
        down = [r * s for r, s in zip(down, scales[:-1], strict=True)]
        mid = mid * scales[-1]
    if only_mid_control:
        # The decoder's skip connections stay untouched, as in the original. diffusers' UNet
        # applies the middle residual only when skip residuals are given too, hence zeros.
        down = [torch.zeros_like(r) for r in down]
    return down, mid
