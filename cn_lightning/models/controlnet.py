"""The trainable control branch and how its residuals join the locked UNet.

The branch is diffusers' ``ControlNetModel``: a copy of the UNet encoder and middle block, a
small condition encoder (``controlnet_cond_embedding``) and one zero-initialised 1x1 convolution
per skip connection (``controlnet_down_blocks``) plus one for the middle block
(``controlnet_mid_block``) — exactly the paper's architecture.

The paper's zero-convolution ablation (``model.zero_conv_init``, :data:`ZERO_CONV_INITS`) changes
how the branch's junctions with the locked model start, :func:`init_junctions`:

- ``zero`` (the paper): the input junction ``Z(c; Θz1)`` (the condition encoder's last 3x3
  convolution, ``controlnet_cond_embedding.conv_out``) and the output junctions ``Z(·; Θz2)``
  (one 1x1 convolution per skip connection and one for the middle block) start with zero weights
  and biases; at step 0 the model equals the locked backbone exactly.
- ``gaussian`` (the paper's ablation, "standard convolution layers initialised with Gaussian
  weights"): the same convolutions, trainable, with weights drawn from N(0, σ²), σ =
  ``zero_conv_std`` or, by default, 1/sqrt(fan-in) (fan-in = input channels x kernel area), and
  zero biases. Drawn from a generator seeded by ``seed``.
- ``none`` (no zero convolution at all): the branch's block outputs are added to the skip
  connections and the middle block as they are — each output junction is the identity (a 1x1
  convolution with identity weights and zero bias, **frozen**, so the branch keeps the diffusers
  and original layouts: checkpoints, exports and every loader read it unchanged) — and the
  condition enters through the condition encoder's last convolution with PyTorch's default
  initialisation (Kaiming-uniform), like the encoder's other layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from cn_lightning.errors import ConfigError

# model.zero_conv_init: how the junctions between the branch and the locked model start.
ZERO_CONV_INITS = ("zero", "gaussian", "none")

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
    zero_conv_init: str = "zero",
    zero_conv_std: float | None = None,
    seed: int = 0,
) -> ControlNetModel:
    """The control branch in fp32, trainable: a copy of ``unet``'s encoder, or ``pretrained``.

    Args:
        unet: the locked UNet; its encoder and middle block weights are copied.
        vae_scale_factor: pixels per latent cell; sets the condition encoder's depth.
        pretrained: an existing ControlNet to fine-tune instead (read with
            :func:`cn_lightning.models.checkpoints.load_controlnet`).
        conditioning_channels: channels of the condition image (3 for RGB maps).
        zero_conv_init: ``zero``, ``gaussian`` or ``none`` (see the module docstring and
            :func:`init_junctions`). With ``pretrained`` the weights come from it: ``zero`` keeps
            them, ``none`` checks that its output junctions are identities and keeps them
            frozen, ``gaussian`` is refused.
        zero_conv_std: σ of the ``gaussian`` junctions (default 1/sqrt(fan-in)).
        seed: seeds the ``gaussian`` and ``none`` initial weights.
    """
    _check_zero_conv_init(zero_conv_init)
    if pretrained is not None:
        controlnet = pretrained
        if zero_conv_init == "gaussian":
            raise ConfigError(
                "model.zero_conv_init=gaussian initialises a new branch, but model.controlnet_path "
                "gives its weights: leave zero_conv_init at zero (or none for a branch whose "
                "output junctions are identities)"
            )
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
    if pretrained is None:
        init_junctions(controlnet, zero_conv_init, std=zero_conv_std, seed=seed)
    elif zero_conv_init == "none":
        if not has_identity_junctions(controlnet):
            raise ConfigError(
                "model.zero_conv_init=none: the ControlNet of model.controlnet_path has output "
                "junctions that are not identities (it was not trained with zero_conv_init=none)"
            )
    if zero_conv_init == "none":
        for conv in output_junctions(controlnet):
            conv.requires_grad_(False)
    return controlnet


def _check_zero_conv_init(value: str) -> None:
    if value not in ZERO_CONV_INITS:
        raise ConfigError(
            f"model.zero_conv_init must be one of {', '.join(ZERO_CONV_INITS)}; got {value!r}"
        )


def input_junction(controlnet: ControlNetModel) -> torch.nn.Conv2d:
    """``Z(c; Θz1)``: the condition encoder's last convolution, whose output is added to the
    branch's input latents (zero-initialised in the paper and in diffusers)."""
    return controlnet.controlnet_cond_embedding.conv_out


def output_junctions(controlnet: ControlNetModel) -> list[torch.nn.Conv2d]:
    """``Z(·; Θz2)``: the 1x1 convolutions from the branch's block outputs to the locked
    decoder's skip connections, then the one to its middle block (the residuals' order)."""
    return [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]


@torch.no_grad()
def init_junctions(
    controlnet: ControlNetModel, mode: str = "zero", std: float | None = None, seed: int = 0
) -> None:
    """Set the branch's junction convolutions for ``mode`` (``zero``, ``gaussian``, ``none``;
    the module docstring says what each is). Deterministic by ``seed``; the global RNG is not
    touched."""
    _check_zero_conv_init(mode)
    generator = torch.Generator().manual_seed(int(seed))
    convs = [input_junction(controlnet), *output_junctions(controlnet)]
    if mode == "zero":
        for conv in convs:
            conv.weight.zero_()
            if conv.bias is not None:
                conv.bias.zero_()
    elif mode == "gaussian":
        for conv in convs:
            fan_in = conv.weight[0].numel()
            sigma = float(std) if std is not None else 1.0 / math.sqrt(fan_in)
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * sigma)
            if conv.bias is not None:
                conv.bias.zero_()
    else:  # none: identity output junctions, an ordinary input convolution
        for conv in output_junctions(controlnet):
            out_ch, in_ch, kh, kw = conv.weight.shape
            if out_ch != in_ch or (kh, kw) != (1, 1):
                raise ConfigError(
                    "zero_conv_init=none needs square 1x1 output junctions; "
                    f"got {tuple(conv.weight.shape)}"
                )
            conv.weight.copy_(torch.eye(out_ch).view(out_ch, in_ch, 1, 1))
            if conv.bias is not None:
                conv.bias.zero_()
        conv = input_junction(controlnet)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            conv.reset_parameters()


def has_identity_junctions(controlnet: ControlNetModel) -> bool:
    """Whether every output junction is the identity (a ``zero_conv_init=none`` branch)."""
    for conv in output_junctions(controlnet):
        weight = conv.weight.detach().float()
        out_ch, in_ch, kh, kw = weight.shape
        if out_ch != in_ch or (kh, kw) != (1, 1):
            return False
        eye = torch.eye(out_ch, device=weight.device).view(out_ch, in_ch, 1, 1)
        if not torch.equal(weight, eye):
            return False
        if conv.bias is not None and bool(conv.bias.detach().ne(0).any()):
            return False
    return True


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
