"""Export a trained ControlNet: ``python -m cn_lightning.export SRC --format diffusers|original --out PATH``.

``SRC`` is a Lightning ``.ckpt`` file, a DeepSpeed checkpoint directory, a run directory (its
``checkpoints/last.ckpt``, else its newest checkpoint), or an already exported ControlNet (a
diffusers folder or an original-format file) to convert between the two formats.

* ``--format diffusers`` writes a ``ControlNetModel`` folder (``config.json`` + safetensors), which
  ``StableDiffusionControlNetPipeline`` and ComfyUI load.
* ``--format original`` writes the ``control_model.*`` state dict of the original ControlNet repo
  (``.safetensors``, or ``.pth`` when ``--out`` ends in ``.pth``), which AUTOMATIC1111's and
  ComfyUI's ControlNet loaders read. The conversion is exact (see ``models.convert_original``).

After ``sd_locked: false`` training the UNet decoder was trained too, and the ControlNet only
works with it: the full fine-tuned UNet (the base model's UNet with the trained decoder, fp32
unless ``--dtype``) is written as well, to ``OUT/unet/`` (diffusers folder) or to
``<OUT stem>_unet<suffix>`` (``model.diffusion_model.*`` keys, the SD checkpoint layout).
``--controlnet-only`` skips it. Pickled inputs are read with ``weights_only=True`` and an
allow-list; a pickle that would run code is refused.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from torch import Tensor

from cn_lightning.errors import CheckpointFormatError, ConfigError, UnsafeCheckpointError
from cn_lightning.models.backbone import parse_dtype
from cn_lightning.utils.cli import ArgumentParser, run_cli

FORMATS = ("diffusers", "original")
ORIGINAL_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")
CONTROLNET_PREFIX = "controlnet."
_CROSS_ATTN_KEY = re.compile(r"(down_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.0\.attn2\.to_k\.weight")


@dataclass
class TrainedWeights:
    """The trainable tensors of a checkpoint and the hyperparameters it was trained with."""

    state_dict: dict[str, Tensor]
    hparams: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def controlnet_state_dict(self) -> dict[str, Tensor]:
        n = len(CONTROLNET_PREFIX)
        return {k[n:]: v for k, v in self.state_dict.items() if k.startswith(CONTROLNET_PREFIX)}

    @property
    def decoder_keys(self) -> list[str]:
        return [k for k in self.state_dict if k.startswith("unet.")]

    @property
    def decoder_state_dict(self) -> dict[str, Tensor]:
        """The trained UNet decoder (``sd_locked: false``), keyed as in ``UNet2DConditionModel``."""
        return {k[len("unet."):]: v for k, v in self.state_dict.items() if k.startswith("unet.")}


# ------------------------------------------------------------------------------ reading
def find_checkpoint(src: str | os.PathLike) -> Path:
    """The checkpoint that ``src`` names: a file, a DeepSpeed directory, or a run directory's last one."""
    from cn_lightning.utils.checkpoints import is_deepspeed_checkpoint, newest_run_checkpoint

    path = Path(os.path.expanduser(str(src)))
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist: expected a .ckpt file, a DeepSpeed checkpoint or a run directory")
    if path.is_file() or is_deepspeed_checkpoint(path):
        return path
    newest = newest_run_checkpoint(path)  # the same rule as resuming: what training continues
    if newest is not None:
        return newest
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    if (folder / "last.ckpt").exists():
        return folder / "last.ckpt"
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(
            f"{str(path)!r} is a directory with no checkpoint: expected <run>/checkpoints/last.ckpt, "
            "a .ckpt file or a DeepSpeed checkpoint directory"
        )
    return candidates[-1]


def read_hparams(checkpoint: Path) -> dict[str, Any]:
    """The module's saved hyperparameters (``{}`` when the checkpoint has none).

    A DeepSpeed directory keeps them in its ``*model_states.pt`` client state. Files are
    memory-mapped so the weights are not read a second time.
    """
    from cn_lightning.utils.checkpoints import safe_torch_load

    files = [checkpoint] if checkpoint.is_file() else sorted(checkpoint.rglob("*model_states.pt"))[:1]
    for file in files:
        try:
            data = safe_torch_load(file, mmap=True, deepspeed=checkpoint.is_dir())
        except UnsafeCheckpointError:
            raise
        except Exception:  # noqa: BLE001 - no readable hparams just means "ask for --base"
            return {}
        if isinstance(data, dict) and isinstance(data.get("hyper_parameters"), Mapping):
            return _plain(data["hyper_parameters"])
    return {}


def _plain(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as plain Python: OmegaConf containers (Hydra's list arguments) converted
    without resolving any interpolation a file might hold."""
    try:
        from omegaconf import Container, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return dict(hparams)
    if isinstance(hparams, Container):
        return dict(OmegaConf.to_container(hparams, resolve=False))
    return {k: OmegaConf.to_container(v, resolve=False) if isinstance(v, Container) else v for k, v in hparams.items()}


def load_trained_weights(src: str | os.PathLike) -> TrainedWeights:
    """Trainable weights + hyperparameters of a Lightning checkpoint, DeepSpeed dir or run dir."""
    from cn_lightning.utils.checkpoints import load_trainable_state_dict

    checkpoint = find_checkpoint(src)
    state = load_trainable_state_dict(checkpoint)
    return TrainedWeights(state, read_hparams(checkpoint), checkpoint)


# ------------------------------------------------------------------------------ config
def hint_encoder_of(state_dict: Mapping[str, Tensor]) -> tuple[list[int], int]:
    """``(conditioning_embedding_out_channels, conditioning_channels)`` from diffusers-keyed tensors."""
    conv_in = state_dict.get("controlnet_cond_embedding.conv_in.weight")
    if conv_in is None:
        raise CheckpointFormatError("no controlnet_cond_embedding.conv_in.weight: not a ControlNet state dict")
    channels = [int(conv_in.shape[0])]
    k = 1
    while f"controlnet_cond_embedding.blocks.{k}.weight" in state_dict:
        channels.append(int(state_dict[f"controlnet_cond_embedding.blocks.{k}.weight"].shape[0]))
        k += 2
    return channels, int(conv_in.shape[1])


def controlnet_config_from_unet(unet_config: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> dict[str, Any]:
    """``ControlNetModel.from_unet``'s config for ``unet_config``, with the hint encoder of ``state_dict``."""
    channels, cond_channels = hint_encoder_of(state_dict)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        model = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(channels),
            conditioning_channels=cond_channels,
            load_weights_from_unet=False,
        )
    return dict(model.config)


def _shipped_config(state_dict: Mapping[str, Tensor], variant: str | None) -> dict[str, Any]:
    """The shipped ControlNet config of ``variant``, or of SD1.5/SD2.1 told apart by cross-attention width."""
    from cn_lightning.models.single_file import config_dir

    if variant is None:
        probe = next((v for k, v in state_dict.items() if _CROSS_ATTN_KEY.fullmatch(k)), None)
        width = None if probe is None else int(probe.shape[1])
        variant = {768: "sd15", 1024: "sd21"}.get(width or 0)
        if variant is None:
            raise ConfigError(
                f"cannot tell this ControlNet's architecture (cross-attention width {width}): "
                "pass the base model it was trained on with --base"
            )
    config = json.loads((config_dir(variant) / "controlnet" / "config.json").read_text())
    channels, cond_channels = hint_encoder_of(state_dict)
    config.update(conditioning_embedding_out_channels=channels, conditioning_channels=cond_channels)
    return {k: v for k, v in config.items() if not k.startswith("_")}


def resolve_controlnet_config(
    state_dict: Mapping[str, Tensor],
    hparams: Mapping[str, Any],
    base: str | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The ControlNet's diffusers config, from the first source that exists.

    1. the config of the ControlNet training started from (``controlnet_path``, a diffusers folder);
    2. ``from_unet`` of the base model's UNet config (``base``, else ``pretrained_model_path``);
    3. ``from_unet`` of ``unet_config`` (the UNet the ControlNet is about to drive);
    4. the shipped SD1.5 / SD2.1 config matching the tensors (single-file bases, unknown bases).
    """
    start = hparams.get("controlnet_path")
    if base is None and start and (Path(str(start)) / "config.json").is_file():
        config = ControlNetModel.load_config(str(start))
        return {k: v for k, v in config.items() if not k.startswith("_")}
    base_path = Path(os.path.expanduser(str(base or hparams.get("pretrained_model_path") or "")))
    if base and not base_path.exists():
        raise ConfigError(f"--base {str(base_path)!r} does not exist")
    if str(base_path) not in ("", ".") and (base_path / "unet" / "config.json").is_file():
        unet_config = UNet2DConditionModel.load_config(str(base_path / "unet"))
    if unet_config is not None:
        return controlnet_config_from_unet(unet_config, state_dict)
    return _shipped_config(state_dict, hparams.get("variant"))


# ------------------------------------------------------------------------------ building
def controlnet_from_state_dict(state_dict: Mapping[str, Tensor], config: Mapping[str, Any]) -> ControlNetModel:
    """A ``ControlNetModel`` of ``config`` holding exactly ``state_dict`` (strict: nothing missing or extra)."""
    with torch.device("meta"):
        model = ControlNetModel.from_config(dict(config))
    try:
        model.load_state_dict(dict(state_dict), strict=True, assign=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise CheckpointFormatError(
            f"the checkpoint's ControlNet does not fit its config: {lines[1] if len(lines) > 1 else lines[0]}"
        ) from err
    return model.eval()


def load_any_controlnet(
    src: str | os.PathLike, base: str | None = None, unet: UNet2DConditionModel | None = None
) -> tuple[ControlNetModel, TrainedWeights | None]:
    """A ControlNet from a training checkpoint/run dir, or from an exported ControlNet (either format).

    ``base`` (a diffusers SD directory) or ``unet`` gives the architecture where the source does
    not say it (original-format files, checkpoints whose base model is not at hand).
    """
    path = Path(os.path.expanduser(str(src)))
    if path.is_dir() and (path / "config.json").is_file():
        from cn_lightning.models.controlnet import load_pretrained_controlnet

        return load_pretrained_controlnet(path), None
    if path.is_file() and _is_original_format(path):
        from cn_lightning.models.convert_original import load_original_controlnet

        return load_original_controlnet(path, unet=unet if unet is not None else _meta_unet(base)), None
    weights = load_trained_weights(path)
    unet_config = None if unet is None else unet.config
    config = resolve_controlnet_config(weights.controlnet_state_dict, weights.hparams, base, unet_config)
    return controlnet_from_state_dict(weights.controlnet_state_dict, config), weights


def _is_original_format(path: Path) -> bool:
    """True for a file of ``control_model.*`` (or prefix-less ``input_hint_block.*``) tensors."""
    return any(k.startswith(("control_model.", "input_hint_block.")) for k in _top_level_keys(path))


def _top_level_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, or the top-level keys of a pickled dict (memory-mapped)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as err:  # noqa: BLE001 - an unreadable file is the user's input error
            raise CheckpointFormatError(f"cannot read {str(path)!r} as safetensors: {err}") from err
    from cn_lightning.utils.checkpoints import safe_torch_load

    try:
        data = safe_torch_load(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception:  # noqa: BLE001 - let the checkpoint reader report it
        return []
    return [str(k) for k in data] if isinstance(data, dict) else []


def _meta_unet(base: str | None) -> UNet2DConditionModel | None:
    """A weightless UNet of the diffusers SD directory ``base`` (its config is all that is needed)."""
    if base is None:
        return None
    unet_dir = Path(os.path.expanduser(base)) / "unet"
    if not unet_dir.is_dir():
        raise ConfigError(f"--base {base!r} is not a diffusers Stable Diffusion directory (no unet/)")
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(unet_dir)))


# ------------------------------------------------------------------------------ writing
def export_controlnet(
    src: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "diffusers",
    dtype: str = "fp32",
    base: str | None = None,
    controlnet_only: bool = False,
) -> Path:
    """Export the ControlNet of ``src`` to ``out`` in ``fmt``; returns the written path.

    When the decoder was trained too (``sd_locked: false``), the full fine-tuned UNet is written
    as well (unless ``controlnet_only``): ``out/unet/`` (diffusers) or the SD-layout file
    ``<out stem>_unet<suffix>`` (original; see :func:`original_unet_path`).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    torch_dtype = parse_dtype(dtype)
    controlnet, weights = load_any_controlnet(src, base)
    if fmt == "original":
        check_original_exportable(controlnet)
    unet = None if controlnet_only else load_companion_unet(src, weights, controlnet, base)
    if fmt == "diffusers":
        path = _write_diffusers(controlnet, Path(out), torch_dtype, unet)
        where = path / "unet"
    else:
        path = _write_original(controlnet, Path(out), torch_dtype, unet)
        where = original_unet_path(path)
    if unet is not None:
        print(f"[cn_lightning] wrote the fine-tuned UNet (sd_locked=false, {dtype}) to {where}")
    return path


def check_original_exportable(controlnet: ControlNetModel) -> None:
    """The original format's hint encoder has exactly four stages, for SD's 8x VAE; a ControlNet
    made for a VAE with another factor (the toy and tiny backbones) has no original equivalent."""
    channels = list(controlnet.config.get("conditioning_embedding_out_channels", (16, 32, 96, 256)))
    if len(channels) != 4:
        factor = 2 ** (len(channels) - 1)
        raise ConfigError(
            f"this ControlNet has no original-format equivalent: its condition encoder has "
            f"{len(channels)} stages ({channels}), made for a base model whose VAE downsamples "
            f"{factor}x, while the original format's has exactly 4 (for SD's 8x VAE); "
            "export it with --format diffusers"
        )


def load_companion_unet(
    src: str | os.PathLike,
    weights: TrainedWeights | None,
    controlnet: ControlNetModel,
    base: str | None = None,
) -> UNet2DConditionModel | None:
    """The full fp32 fine-tuned UNet that goes with ``src`` (``sd_locked: false``), or ``None``.

    A checkpoint holds only the trained decoder: the rest of the UNet comes from its base model
    (``base``, else the checkpoint's ``pretrained_model_path``), which must then be at hand.
    """
    from cn_lightning.utils.export import find_companion_unet, trained_unet, unet_from_original_file

    companion = find_companion_unet(src, weights.decoder_state_dict if weights is not None else None)
    if companion is None:
        return None
    if companion.decoder is not None:
        assert weights is not None
        print(
            f"[cn_lightning] note: {weights.source} also holds {len(companion.decoder)} fine-tuned UNet decoder "
            "tensors (sd_locked=false); writing the full UNet they belong to as well",
            file=sys.stderr,
        )
        base_path = base or weights.hparams.get("pretrained_model_path")
        if not base_path or not Path(os.path.expanduser(str(base_path))).exists():
            raise ConfigError(
                f"{weights.source} was trained with sd_locked=false but its base model {base_path!r} is not at "
                "hand: pass --base (the Stable Diffusion model it was trained on) to write the full UNet, "
                "or --controlnet-only"
            )
        return trained_unet(base_path, companion.decoder, weights.hparams.get("variant"))
    if companion.folder is not None:
        return UNet2DConditionModel.from_pretrained(companion.folder, local_files_only=True, torch_dtype=torch.float32)
    return unet_from_original_file(companion.original, _unet_config(controlnet, base))


def _unet_config(controlnet: ControlNetModel, base: str | None) -> dict[str, Any]:
    """The UNet config for an original-layout UNet file: the base model's, else the shipped SD1.5 /
    SD2.1 one matching the ControlNet's cross-attention width."""
    from cn_lightning.models.single_file import config_dir

    if base is not None:
        return dict(_meta_unet(base).config)
    variant = {768: "sd15", 1024: "sd21"}.get(int(controlnet.config.cross_attention_dim or 0))
    if variant is None:
        raise ConfigError(
            f"cannot tell the UNet architecture (cross-attention width {controlnet.config.cross_attention_dim}): "
            "pass the base model it was trained on with --base"
        )
    return dict(UNet2DConditionModel.load_config(str(config_dir(variant) / "unet")))


def original_unet_path(path: str | os.PathLike) -> Path:
    """``control_x.safetensors`` -> ``control_x_unet.safetensors``: where the original-format export
    writes a fine-tuned UNet (``model.diffusion_model.*`` keys, the layout of SD checkpoints)."""
    from cn_lightning.utils.export import original_unet_path as path_of

    return path_of(path)


def _write_diffusers(
    controlnet: ControlNetModel, out: Path, dtype: torch.dtype, unet: UNet2DConditionModel | None = None
) -> Path:
    from cn_lightning.utils.export import save_controlnet_folder

    if out.suffix.lower() in ORIGINAL_SUFFIXES:
        raise ConfigError(f"--out {str(out)!r} looks like a file; --format diffusers writes a folder")
    if any(p.dtype != dtype for p in controlnet.parameters()):
        controlnet = controlnet.to(dtype=dtype)
    if unet is not None and any(p.dtype != dtype for p in unet.parameters()):
        unet = unet.to(dtype=dtype)
    return save_controlnet_folder(controlnet, out, unet=unet)


def _write_original(
    controlnet: ControlNetModel, out: Path, dtype: torch.dtype, unet: UNet2DConditionModel | None = None
) -> Path:
    from cn_lightning.models.convert_original import (
        controlnet_to_original,
        save_original,
        unet_to_original,
    )

    if out.suffix == "":
        out = out.with_suffix(".safetensors")
    original = controlnet_to_original(controlnet.state_dict(), controlnet.config)
    if unet is not None:
        save_original(unet_to_original(unet.state_dict(), unet.config), original_unet_path(out), dtype=dtype)
    return save_original(original, out, dtype=dtype)


# ------------------------------------------------------------------------------ CLI
def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m cn_lightning.export",
        description=(
            "Export a trained ControlNet to a diffusers folder or to the original control_model.* "
            "format (A1111 / ComfyUI)."
        ),
    )
    parser.add_argument(
        "src",
        help=(
            "Lightning .ckpt file, DeepSpeed checkpoint directory, run directory (uses "
            "checkpoints/last.ckpt), or an exported ControlNet (diffusers folder / original .safetensors)"
        ),
    )
    parser.add_argument("--format", dest="fmt", required=True, choices=FORMATS, help="output format")
    parser.add_argument(
        "--out",
        required=True,
        help="output folder (diffusers) or file (original: .safetensors, or .pth/.pt/.ckpt for a pickle)",
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=("fp32", "fp16", "bf16"), help="dtype of the written weights (default fp32)"
    )
    parser.add_argument(
        "--base",
        default=None,
        help=(
            "the Stable Diffusion model the ControlNet was trained on, for its architecture and, after "
            "sd_locked=false training, the frozen part of the UNet (default: the checkpoint's pretrained_model_path)"
        ),
    )
    parser.add_argument(
        "--controlnet-only",
        action="store_true",
        help=(
            "after sd_locked=false training, write only the ControlNet (by default the fine-tuned UNet is "
            "written too: OUT/unet/ for diffusers, <OUT stem>_unet<suffix> for original)"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = export_controlnet(
        args.src, args.out, fmt=args.fmt, dtype=args.dtype, base=args.base, controlnet_only=args.controlnet_only
    )
    print(f"[cn_lightning] wrote {args.fmt} ControlNet ({args.dtype}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
