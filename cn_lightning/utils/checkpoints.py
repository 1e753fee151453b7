"""Trainable weights out of any checkpoint or any running strategy.

* :func:`load_trainable_state_dict` reads a Lightning ``.ckpt`` file or a DeepSpeed (ZeRO-2/3)
  checkpoint directory into the module's trainable state dict (``controlnet.*`` and, when the
  decoder was unlocked, ``unet.up_blocks.*`` / ``unet.conv_norm_out.*`` / ``unet.conv_out.*``).
* :func:`gather_trainable_state_dict` collects the same from a live Trainer under any strategy
  (single device, DDP, DeepSpeed ZeRO-1/2/3 with fp32 master weights, FSDP).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from cn_lightning.errors import CheckpointFormatError

TRAINABLE_PREFIXES = ("controlnet.", "unet.up_blocks.", "unet.conv_norm_out.", "unet.conv_out.")
_WRAPPER_PREFIXES = ("_forward_module.", "module.")


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by DeepSpeed's ``save_checkpoint`` (Lightning's ``*.ckpt/``)."""
    path = Path(path)
    return path.is_dir() and (
        (path / "latest").is_file() or any(p.is_dir() for p in path.glob("*") if _has_zero_files(p))
    )


def _has_zero_files(tag_dir: Path) -> bool:
    return any(tag_dir.glob("*model_states.pt"))


def load_trainable_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, Tensor]:
    """The trainable fp32 weights of a checkpoint, keyed as ``ControlNetModule.state_dict()``.

    Accepts a Lightning ``.ckpt`` file (any strategy but DeepSpeed, or a DeepSpeed checkpoint
    consolidated into one file) or a DeepSpeed checkpoint directory (ZeRO-2 or ZeRO-3, any
    number of ranks; the shards are merged into full fp32 tensors on the CPU).
    """
    path = Path(checkpoint_path)
    if not path.exists():
        raise CheckpointFormatError(f"checkpoint {str(path)!r} does not exist")
    if path.is_dir():
        if not is_deepspeed_checkpoint(path):
            raise CheckpointFormatError(
                f"{str(path)!r} is a directory but not a DeepSpeed checkpoint (no 'latest' file "
                "or '<tag>/*model_states.pt')"
            )
        state = _load_zero_checkpoint(path)
    else:
        state = _load_lightning_file(path)
    return _trainable_only(state, path)


def _load_zero_checkpoint(path: Path) -> dict[str, Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = None if (path / "latest").is_file() else _single_tag(path)
    return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag, exclude_frozen_parameters=True)


def _single_tag(path: Path) -> str:
    tags = sorted(p.name for p in path.iterdir() if p.is_dir() and _has_zero_files(p))
    if len(tags) != 1:
        raise CheckpointFormatError(f"{str(path)!r} has no 'latest' file and tags {tags}; pass one")
    return tags[0]


def _load_lightning_file(path: Path) -> dict[str, Tensor]:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input error
        raise CheckpointFormatError(f"cannot read checkpoint {str(path)!r}: {err}") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointFormatError(f"{str(path)!r} does not hold a dict")
    return checkpoint.get("state_dict", checkpoint)


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def _trainable_only(state: dict, source: Path) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        key = _strip_wrappers(key)
        if torch.is_tensor(value) and key.startswith(TRAINABLE_PREFIXES):
            out[key] = value.float() if value.is_floating_point() else value
    if not any(k.startswith("controlnet.") for k in out):
        raise CheckpointFormatError(f"{str(source)!r} holds no controlnet.* weights")
    return out


def gather_trainable_state_dict(trainer, module) -> dict[str, Tensor]:
    """The module's trainable weights, complete on global rank 0 (other ranks may get less).

    Every rank must call this: under DeepSpeed and FSDP it is a collective. Under DeepSpeed
    the fp32 master weights are read from the optimizer (``safe_get_full_fp32_param``), so a
    bf16 run exports full precision; ZeRO-3 partitions are gathered.
    """
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(trainer.strategy, DeepSpeedStrategy):
        return _gather_deepspeed(module)
    state = trainer.strategy.lightning_module_state_dict()
    return {_strip_wrappers(k): v.detach().cpu() for k, v in state.items() if torch.is_tensor(v)}


def _gather_deepspeed(module) -> dict[str, Tensor]:
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    names = set(module._checkpointed_names())
    out: dict[str, Tensor] = {}
    for name, param in module.named_parameters():
        if name not in names:
            continue
        full = safe_get_full_fp32_param(param) if param.requires_grad else None
        if full is None:  # not owned by the optimizer (frozen, or ZeRO disabled)
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                full = param.data.float()
        out[name] = full.detach().cpu().clone()
    for name, buf in module.named_buffers():
        if name in names:
            out[name] = buf.detach().cpu().clone()
    return out
