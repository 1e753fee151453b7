"""Exact conversion between diffusers' ControlNet layout and the original ``control_model.*``
layout.

The original layout is the one written by the ControlNet authors' ``cldm.py`` and loaded by
AUTOMATIC1111's sd-webui-controlnet and ComfyUI. diffusers only converts original -> diffusers
(``convert_controlnet_checkpoint``, used by ``ControlNetModel.from_single_file``); this module adds
the inverse, written as the exact mirror of that function, so that

    original_to_controlnet(controlnet_to_original(sd, cfg), cfg) == sd   (bit for bit)

Attention blocks have the same sub-key names on both sides (``norm``, ``proj_in``,
``transformer_blocks.N.attn1.to_q`` ...) and keep their shapes: 1x1 conv ``proj_in``/``proj_out``
(4-D) for SD1.x, linear (2-D) for SD2.x (``use_linear_projection``). Only block paths and ResNet
sub-layer names change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from cn_lightning.errors import CheckpointFormatError

CONTROL_PREFIX = "control_model."
UNET_PREFIX = "model.diffusion_model."

# diffusers ResnetBlock2D sub-layer -> LDM ResBlock sub-layer (inverse of diffusers'
# update_unet_resnet_ldm_to_diffusers).
_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}

# Keys that are renamed one to one (inverse of DIFFUSERS_TO_LDM_MAPPING["controlnet"]["layers"]
# and of the class/addition embedding tables).
_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "class_embedding.linear_1": "label_emb.0.0",
    "class_embedding.linear_2": "label_emb.0.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "class_embedding": "label_emb",  # nn.Embedding when num_class_embeds is set
}

# The original hint encoder is a fixed nn.Sequential of 8 convs with SiLUs between them: conv_in at
# index 0, six inner convs at 2, 4, ..., 12 and the zero conv_out at 14 (diffusers reads index 14).
_HINT_INNER_BLOCKS = 6
_HINT_CONV_OUT_INDEX = 14

_Rule = tuple[re.Pattern[str], Callable[[re.Match[str]], str]]


def _resnet_suffix(suffix: str) -> str:
    """Rename the first component of a ResNet sub-key, e.g. ``norm1.weight`` ->
    ``in_layers.0.weight``."""
    head, _, tail = suffix.partition(".")
    if head not in _RESNET_RENAMES:
        raise CheckpointFormatError(f"unknown ResNet parameter {suffix!r}")
    return f"{_RESNET_RENAMES[head]}.{tail}"


def _encoder_rules(layers_per_block: int) -> list[_Rule]:
    """Rules for the parts the ControlNet shares with the UNet: time embedding, input and middle
    blocks."""
    step = (
        layers_per_block + 1
    )  # input_blocks per down block: its resnets (+attention) then a downsampler

    def slot(m: re.Match[str]) -> int:
        b, j = int(m["b"]), int(m["j"])
        if j >= layers_per_block:
            raise CheckpointFormatError(
                f"{m.group(0)!r} has layer index {j} but config layers_per_block={layers_per_block}"
            )
        return b * step + j + 1

    def down_resnet(m: re.Match[str]) -> str:
        return f"input_blocks.{slot(m)}.0.{_resnet_suffix(m['rest'])}"

    def down_attn(m: re.Match[str]) -> str:
        return f"input_blocks.{slot(m)}.1.{m['rest']}"

    def downsampler(m: re.Match[str]) -> str:
        return f"input_blocks.{(int(m['b']) + 1) * step}.0.op.{m['rest']}"

    def mid_resnet(m: re.Match[str]) -> str:
        return f"middle_block.{2 * int(m['k'])}.{_resnet_suffix(m['rest'])}"

    def mid_attn(m: re.Match[str]) -> str:
        return f"middle_block.{2 * int(m['k']) + 1}.{m['rest']}"

    def fixed(m: re.Match[str]) -> str:
        return f"{_FIXED[m['name']]}.{m['rest']}"

    names = "|".join(re.escape(n) for n in sorted(_FIXED, key=len, reverse=True))
    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (rf"(?P<name>{names})\.(?P<rest>weight|bias)", fixed),
        (r"down_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.+)", down_resnet),
        (r"down_blocks\.(?P<b>\d+)\.attentions\.(?P<j>\d+)\.(?P<rest>.+)", down_attn),
        (r"down_blocks\.(?P<b>\d+)\.downsamplers\.0\.conv\.(?P<rest>weight|bias)", downsampler),
        (r"mid_block\.resnets\.(?P<k>\d+)\.(?P<rest>.+)", mid_resnet),
        (r"mid_block\.attentions\.(?P<k>\d+)\.(?P<rest>.+)", mid_attn),
    ]
    return [(re.compile(p), f) for p, f in rules]


def _controlnet_rules(layers_per_block: int) -> list[_Rule]:
    """Encoder rules plus the ControlNet-only parts: hint encoder, zero convs, middle output."""

    def hint_block(m: re.Match[str]) -> str:
        return f"input_hint_block.{2 * (int(m['k']) + 1)}.{m['rest']}"

    extra: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (
            r"controlnet_cond_embedding\.conv_in\.(?P<rest>weight|bias)",
            lambda m: f"input_hint_block.0.{m['rest']}",
        ),
        (r"controlnet_cond_embedding\.blocks\.(?P<k>\d+)\.(?P<rest>weight|bias)", hint_block),
        (
            r"controlnet_cond_embedding\.conv_out\.(?P<rest>weight|bias)",
            lambda m: f"input_hint_block.{_HINT_CONV_OUT_INDEX}.{m['rest']}",
        ),
        (
            r"controlnet_down_blocks\.(?P<k>\d+)\.(?P<rest>weight|bias)",
            lambda m: f"zero_convs.{m['k']}.0.{m['rest']}",
        ),
        (
            r"controlnet_mid_block\.(?P<rest>weight|bias)",
            lambda m: f"middle_block_out.0.{m['rest']}",
        ),
    ]
    return [(re.compile(p), f) for p, f in extra] + _encoder_rules(layers_per_block)


def _unet_decoder_rules(config: Mapping[str, Any]) -> list[_Rule]:
    """Rules for the UNet decoder (output blocks) and output head."""
    step = int(config["layers_per_block"]) + 1  # up blocks have one resnet more than down blocks
    up_types = list(config["up_block_types"])

    def up_resnet(m: re.Match[str]) -> str:
        return f"output_blocks.{int(m['b']) * step + int(m['j'])}.0.{_resnet_suffix(m['rest'])}"

    def up_attn(m: re.Match[str]) -> str:
        return f"output_blocks.{int(m['b']) * step + int(m['j'])}.1.{m['rest']}"

    def upsampler(m: re.Match[str]) -> str:
        b = int(m["b"])
        # The upsampler follows the last resnet (and its attention, in cross-attention blocks).
        slot = 2 if "CrossAttn" in up_types[b] else 1
        return f"output_blocks.{b * step + step - 1}.{slot}.conv.{m['rest']}"

    rules: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"up_blocks\.(?P<b>\d+)\.resnets\.(?P<j>\d+)\.(?P<rest>.+)", up_resnet),
        (r"up_blocks\.(?P<b>\d+)\.attentions\.(?P<j>\d+)\.(?P<rest>.+)", up_attn),
        (r"up_blocks\.(?P<b>\d+)\.upsamplers\.0\.conv\.(?P<rest>weight|bias)", upsampler),
        (r"conv_norm_out\.(?P<rest>weight|bias)", lambda m: f"out.0.{m['rest']}"),
        (r"conv_out\.(?P<rest>weight|bias)", lambda m: f"out.2.{m['rest']}"),
    ]
    return [(re.compile(p), f) for p, f in rules]


def _apply_rules(
    state_dict: Mapping[str, Tensor], rules: list[_Rule], prefix: str, what: str
) -> dict[str, Tensor]:
    """Rename every key with the first matching rule; any key no rule covers is an error."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        for pattern, target in rules:
            m = pattern.fullmatch(key)
            if m is not None:
                new_key = prefix + target(m)
                break
        else:
            raise CheckpointFormatError(
                f"{what} state dict has a key with no original-format equivalent: {key!r}"
            )
        if new_key in out:
            raise CheckpointFormatError(f"{what} state dict maps two keys to {new_key!r}")
        out[new_key] = value
    return out


def _check_hint_encoder(config: Mapping[str, Any]) -> None:
    channels = tuple(config.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    inner = 2 * (len(channels) - 1)
    if inner != _HINT_INNER_BLOCKS:
        raise CheckpointFormatError(
            f"conditioning_embedding_out_channels={list(channels)} gives {inner} inner hint convs; "
            f"the original format has exactly {_HINT_INNER_BLOCKS} "
            "(4 channel stages, e.g. [16, 32, 96, 256])"
        )


def controlnet_to_original(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """Map a diffusers ``ControlNetModel`` state dict to the original ``control_model.*`` keys.

    ``config`` is the model's config (``model.config`` or its ``config.json``); only
    ``layers_per_block`` and ``conditioning_embedding_out_channels`` are read. Tensors are not
    copied. Raises :class:`CheckpointFormatError` for a key the original format cannot hold.
    """
    _check_hint_encoder(config)
    rules = _controlnet_rules(int(config["layers_per_block"]))
    return _apply_rules(state_dict, rules, CONTROL_PREFIX, "ControlNet")


def unet_to_original(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """Map a diffusers ``UNet2DConditionModel`` state dict to LDM ``model.diffusion_model.*`` keys.

    The inverse of diffusers' ``convert_ldm_unet_checkpoint`` (e.g. to export a UNet whose decoder
    was fine-tuned with ``sd_locked: false``). Tensors are not copied.
    """
    rules = _encoder_rules(int(config["layers_per_block"])) + _unet_decoder_rules(config)
    return _apply_rules(state_dict, rules, UNET_PREFIX, "UNet")


def original_to_controlnet(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """Map an original ``control_model.*`` state dict to diffusers keys with diffusers' own
    converter.

    Accepts keys with or without the ``control_model.`` prefix (as diffusers does). Class/label
    embeddings, which diffusers' converter skips, are carried over as well.
    """
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    converted = convert_controlnet_checkpoint(checkpoint=dict(state_dict), config=dict(config))
    missing = sorted(k for k, v in converted.items() if v is None)
    if missing:
        raise CheckpointFormatError(
            f"original ControlNet state dict lacks {len(missing)} tensors diffusers expects, "
            f"e.g. {missing[0]!r}"
        )
    converted.update(_label_embeddings_to_diffusers(state_dict, config))
    return converted


def _label_embeddings_to_diffusers(
    state_dict: Mapping[str, Tensor], config: Mapping[str, Any]
) -> dict[str, Tensor]:
    """The class/addition embedding keys, inverse of ``_FIXED`` for the ``label_emb`` entries."""
    has_prefix = any(k.startswith(CONTROL_PREFIX) for k in state_dict)
    prefix = CONTROL_PREFIX if has_prefix else ""
    if config.get("addition_embed_type") == "text_time":
        owner = "add_embedding"
    elif config.get("class_embed_type") in ("timestep", "projection"):
        owner = "class_embedding"
    else:
        owner = None
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix + "label_emb."):
            continue
        sub = key[len(prefix + "label_emb.") :]
        if sub in ("weight",):
            out["class_embedding.weight"] = value
        elif owner is not None and sub.startswith("0.0."):
            out[f"{owner}.linear_1.{sub[4:]}"] = value
        elif owner is not None and sub.startswith("0.2."):
            out[f"{owner}.linear_2.{sub[4:]}"] = value
    return out


# ------------------------------------------------------------------------------------- import
_HINT_STAGE_KEYS = (
    "input_hint_block.0",
    "input_hint_block.4",
    "input_hint_block.8",
    "input_hint_block.12",
)


def strip_control_prefix(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``control_model.`` prefix (and any other top-level keys) if the file has one."""
    if any(k.startswith(CONTROL_PREFIX) for k in state_dict):
        return {
            k[len(CONTROL_PREFIX) :]: v
            for k, v in state_dict.items()
            if k.startswith(CONTROL_PREFIX)
        }
    return dict(state_dict)


def hint_encoder_shape(state_dict: Mapping[str, Tensor]) -> tuple[tuple[int, ...], int]:
    """``(conditioning_embedding_out_channels, conditioning_channels)`` read from an original hint
    encoder."""
    state = strip_control_prefix(state_dict)
    missing = [k for k in _HINT_STAGE_KEYS if f"{k}.weight" not in state]
    if missing:
        raise CheckpointFormatError(
            f"not an original-format ControlNet: no {missing[0]!r} weight "
            "(expected control_model.input_hint_block.*)"
        )
    channels = tuple(int(state[f"{k}.weight"].shape[0]) for k in _HINT_STAGE_KEYS)
    return channels, int(state["input_hint_block.0.weight"].shape[1])
