"""Write the trained control branch as a diffusers ``ControlNetModel`` folder."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from diffusers import ControlNetModel
from torch import Tensor

from cn_lightning.errors import CheckpointFormatError
from cn_lightning.utils.atomic import atomic_directory


def save_controlnet_folder(controlnet: ControlNetModel, out: str | os.PathLike) -> Path:
    """Save ``controlnet`` (``config.json`` + ``diffusion_pytorch_model.safetensors``) atomically.

    The folder is written next to ``out`` and renamed into place, so ``out`` is either the old
    export or the complete new one, never a mix.
    """
    out = Path(out)
    with atomic_directory(out) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
    return out


def controlnet_state_from_trainable(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The ``controlnet.*`` entries of a trainable state dict, prefix removed."""
    prefix = "controlnet."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def controlnet_from_trainable_state(config: Mapping, state: dict[str, Tensor]) -> ControlNetModel:
    """A ``ControlNetModel`` of ``config`` holding the ``controlnet.*`` weights of ``state``.

    ``state`` is keyed as :meth:`ControlNetModule.state_dict` (``controlnet.*``, optionally
    ``unet.*``), e.g. from :func:`cn_lightning.utils.checkpoints.load_trainable_state_dict`.
    The model is built on the meta device and takes the tensors as they are (no random init).
    """
    weights = controlnet_state_from_trainable(state)
    if not weights:
        raise CheckpointFormatError("the state dict holds no controlnet.* weights")
    with torch.device("meta"):
        controlnet = ControlNetModel.from_config(dict(config))
    expected = set(controlnet.state_dict())
    missing, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if missing or unexpected:
        raise CheckpointFormatError(
            f"ControlNet weights do not match its config: {len(missing)} missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    weights = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    controlnet.load_state_dict(weights, assign=True)
    if any(t.is_meta for t in (*controlnet.parameters(), *controlnet.buffers())):
        raise CheckpointFormatError("ControlNet has tensors outside its state dict; cannot export")
    return controlnet.eval()
