"""Write what training made: the control branch as a diffusers ``ControlNetModel`` folder and,
when the decoder was unlocked (``sd_locked: false``), the full fine-tuned UNet.

A fine-tuned UNet is the base model's UNet (its frozen encoder and middle block, in fp32) with the
trained decoder tensors (``up_blocks.*``, ``conv_norm_out.*``, ``conv_out.*``) in place: what the
module computed with during training.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import Tensor

from cn_lightning.errors import CheckpointFormatError
from cn_lightning.utils.atomic import atomic_directory

# The UNet parts ``sd_locked: false`` trains (the original's output blocks and output head).
DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")
UNET_FOLDER = "unet"


def save_controlnet_folder(
    controlnet: ControlNetModel, out: str | os.PathLike, unet: UNet2DConditionModel | None = None
) -> Path:
    """Save ``controlnet`` (``config.json`` + ``diffusion_pytorch_model.safetensors``) atomically.

    With ``unet`` (a fine-tuned UNet that goes with this ControlNet) it is saved in ``out/unet/``,
    in the same atomic step. The folder is written next to ``out`` and renamed into place, so
    ``out`` is either the old export or the complete new one, never a mix.
    """
    out = Path(out)
    with atomic_directory(out) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        if unet is not None:
            unet.save_pretrained(tmp / UNET_FOLDER, safe_serialization=True)
    return out


def save_unet_folder(unet: UNet2DConditionModel, out: str | os.PathLike) -> Path:
    """Save a UNet as a diffusers folder atomically (what ``UNet2DConditionModel.from_pretrained`` reads)."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    return out


def decoder_state_from_trainable(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The trained decoder tensors (``unet.*`` entries, prefix removed) of a trainable state dict;
    empty when the decoder was locked."""
    prefix = "unet."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def overlay_decoder(unet: UNet2DConditionModel, decoder: Mapping[str, Tensor]) -> UNet2DConditionModel:
    """Put the trained ``decoder`` tensors into ``unet`` (in place, in ``unet``'s dtype); returns it.

    Every decoder tensor of ``unet`` must be given, with the right shape, and nothing else:
    a decoder trained on another architecture is a :class:`CheckpointFormatError`.
    """
    own = unet.state_dict()
    expected = {k for k in own if k.startswith(DECODER_PREFIXES)}
    missing, unexpected = sorted(expected - set(decoder)), sorted(set(decoder) - expected)
    wrong = sorted(k for k in set(decoder) & expected if tuple(decoder[k].shape) != tuple(own[k].shape))
    if missing or unexpected or wrong:
        raise CheckpointFormatError(
            f"the fine-tuned UNet decoder does not fit the base UNet: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:2]}); was it trained on another base model?"
        )
    with torch.no_grad():
        for key, value in decoder.items():
            own[key].copy_(value.detach().to(own[key].device, own[key].dtype))
    return unet


def load_base_unet(base: str | os.PathLike, variant: str | None = None) -> UNet2DConditionModel:
    """The base model's UNet in fp32 (a diffusers SD directory's ``unet/``, or from a single file)."""
    from cn_lightning.errors import BackboneLoadError

    path = Path(os.path.expanduser(str(base)))
    if path.is_dir() and (path / UNET_FOLDER / "config.json").is_file():
        try:
            return UNet2DConditionModel.from_pretrained(
                path / UNET_FOLDER, local_files_only=True, torch_dtype=torch.float32
            )
        except (OSError, ValueError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise BackboneLoadError(f"cannot load the UNet of {str(path)!r}: {first}") from err
    from cn_lightning.models.backbone import load_backbone

    return load_backbone(path, "fp32", variant=variant).unet


def trained_unet(
    base: str | os.PathLike, decoder: Mapping[str, Tensor], variant: str | None = None
) -> UNet2DConditionModel:
    """The full fine-tuned UNet in fp32: the base model's UNet with the trained ``decoder`` in place."""
    unet = load_base_unet(base, variant)
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet.to(dtype=torch.float32)
    return overlay_decoder(unet, decoder).eval()


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


# ------------------------------------------------------------------------------ fine-tuned UNets
UNET_ARCHITECTURE_KEYS = ("in_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                          "down_block_types", "up_block_types")


def original_unet_path(path: str | os.PathLike) -> Path:
    """Where an original-format export keeps its fine-tuned UNet: ``control_x.safetensors`` ->
    ``control_x_unet.safetensors`` (``model.diffusion_model.*`` keys, the SD checkpoint layout)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_unet{path.suffix}")


def _is_run_directory(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / ".hydra").is_dir()


@dataclass
class CompanionUNet:
    """A fine-tuned UNet (``sd_locked: false``) that goes with a ControlNet, and where it comes from.

    Exactly one of ``decoder`` (trained decoder tensors from a checkpoint, to put into the base
    model's UNet), ``folder`` (a diffusers UNet folder) or ``original`` (a UNet file in the SD
    checkpoint layout) is set.
    """

    source: str
    decoder: dict[str, Tensor] | None = None
    folder: Path | None = None
    original: Path | None = None

    def build(self, base_unet: UNet2DConditionModel, dtype: torch.dtype | None = None) -> UNet2DConditionModel:
        """The fine-tuned UNet, in ``dtype`` (default ``base_unet``'s).

        ``base_unet`` is the base model's UNet: with ``decoder`` it receives the trained tensors
        in place and is returned; otherwise it gives the architecture the UNet must have.
        """
        dtype = dtype or base_unet.dtype
        if self.decoder is not None:
            if base_unet.dtype != dtype:
                base_unet.to(dtype=dtype)
            return overlay_decoder(base_unet, self.decoder)
        if self.folder is not None:
            unet = UNet2DConditionModel.from_pretrained(self.folder, local_files_only=True, torch_dtype=dtype)
        else:
            unet = unet_from_original_file(self.original, dict(base_unet.config)).to(dtype=dtype)
        check_same_architecture(unet, base_unet, self.source)
        return unet.eval()


def check_same_architecture(unet: UNet2DConditionModel, base_unet: UNet2DConditionModel, name: str) -> None:
    """Refuse, in one line, a fine-tuned UNet that cannot stand in for the base model's."""
    from cn_lightning.errors import ConfigError

    for key in UNET_ARCHITECTURE_KEYS:
        mine, theirs = unet.config.get(key), base_unet.config.get(key)
        if (list(mine) if isinstance(mine, (list, tuple)) else mine) != (
            list(theirs) if isinstance(theirs, (list, tuple)) else theirs
        ):
            raise ConfigError(
                f"the fine-tuned UNet of {name!r} does not fit the base model: its {key} is {mine}, the base UNet's is {theirs}"
            )


def unet_from_original_file(path: str | os.PathLike, config: Mapping) -> UNet2DConditionModel:
    """A fp32 ``UNet2DConditionModel`` of ``config`` from a ``model.diffusion_model.*`` file
    (read safely; keys mapped with diffusers' own ``convert_ldm_unet_checkpoint``, loaded strictly)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from cn_lightning.errors import BackboneLoadError
    from cn_lightning.models.single_file import load_checkpoint

    try:
        state = load_checkpoint(path)
    except BackboneLoadError as err:
        raise CheckpointFormatError(str(err).replace("Stable Diffusion", "UNet")) from err
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise CheckpointFormatError(f"{path}: no model.diffusion_model.* tensors; expected a UNet in the SD checkpoint layout")
    converted = convert_ldm_unet_checkpoint(state, dict(config))
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    try:
        unet.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True, assign=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise CheckpointFormatError(f"{path}: does not fit the base model's UNet: {lines[1] if len(lines) > 1 else lines[0]}") from err
    return unet.eval()


def find_companion_unet(src: str | os.PathLike, decoder: Mapping[str, Tensor] | None = None) -> CompanionUNet | None:
    """The fine-tuned UNet that goes with the ControlNet ``src``, or ``None`` (a locked decoder).

    * a training checkpoint / run directory / DeepSpeed directory (``decoder`` given, the
      checkpoint's ``unet.*`` tensors, possibly none): its trained decoder;
    * a diffusers ControlNet folder with a ``unet/`` inside (what ``cn_lightning.export`` writes),
      or a run directory's ``controlnet/`` with the ``unet/`` the end of training wrote next to it;
    * an original-format file ``X.safetensors`` with ``X_unet.safetensors`` next to it.
    """
    path = Path(os.path.expanduser(str(src)))
    if decoder is not None:  # a training checkpoint: its decoder, or nothing when it was locked
        return CompanionUNet(source=str(path), decoder=dict(decoder)) if decoder else None
    if path.is_dir():
        if not (path / "config.json").is_file():  # not a ControlNet folder
            return None
        for folder in (path / UNET_FOLDER, path.parent / UNET_FOLDER):
            if folder == path.parent / UNET_FOLDER and not _is_run_directory(path.parent):
                continue
            if (folder / "config.json").is_file():
                return CompanionUNet(source=str(path), folder=folder)
        return None
    unet_file = original_unet_path(path)
    if path.is_file() and unet_file.is_file():
        return CompanionUNet(source=str(path), original=unet_file)
    return None
