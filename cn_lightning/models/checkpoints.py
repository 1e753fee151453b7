"""Reading and writing ControlNets and training checkpoints, in every format users have.

The one module that knows the formats (what the tensors mean; the bytes are read by
:mod:`cn_lightning.serialization`, written through :mod:`cn_lightning.atomic`):

==================================  ============================================================
source                              read as
==================================  ============================================================
diffusers ControlNet folder         ``config.json`` + safetensors (``ControlNetModel``)
original ``control_model.*`` file   the ControlNet authors' layout (A1111, ComfyUI),
                                    ``.safetensors`` or a pickle, converted exactly
                                    (:mod:`.convert_original`)
Lightning ``.ckpt`` file            the module's trainable tensors and hyperparameters
DeepSpeed checkpoint directory      the ZeRO-2/3 shards merged into fp32
run directory                       its newest checkpoint (the rule resuming uses)
==================================  ============================================================

After ``sd_locked: false`` training a ControlNet comes with a fine-tuned UNet (its decoder was
trained): ``<folder>/unet/`` (or the run's ``unet/``), ``<stem>_unet<suffix>`` next to an original
file, or the ``unet.*`` decoder tensors of a checkpoint (see :class:`CompanionUNet`).

Writing: :func:`save_controlnet_folder`, :func:`save_original`, :func:`export_controlnet` (any
source to either format), :func:`export_from_trainer` (the end of training, under any strategy)
and :class:`AtomicCheckpointIO` (Lightning's checkpoint files).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import Tensor

from cn_lightning import log
from cn_lightning.atomic import atomic_directory, atomic_file
from cn_lightning.errors import (
    BackboneLoadError,
    CheckpointFormatError,
    ConfigError,
    NumericsError,
    UnsafeCheckpointError,
    first_line,
)
from cn_lightning.models.backbone import load_backbone, parse_dtype
from cn_lightning.models.controlnet import (
    CONTROLNET_PREFIX,
    DECODER_PREFIXES,
    TRAINABLE_PREFIXES,
    UNET_PREFIX,
)
from cn_lightning.models.convert_original import (
    controlnet_to_original,
    hint_encoder_shape,
    original_to_controlnet,
    strip_control_prefix,
    unet_to_original,
)
from cn_lightning.models.single_file import config_dir, variant_for_cross_attention
from cn_lightning.serialization import (
    WRITABLE_SUFFIXES,
    install_safe_loading,
    read_state_dict,
    safe_torch_load,
    safe_torch_loads_in,
)

FORMATS = ("diffusers", "original")
UNET_FOLDER = "unet"
# Keys that tell the architecture: a UNet standing in for the base model's must match these.
UNET_ARCHITECTURE_KEYS = (
    "in_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "down_block_types",
    "up_block_types",
)
_WRAPPER_PREFIXES = ("_forward_module.", "module.")
# A cross-attention key projection: its input width is the text encoder's (768 SD1.x, 1024 SD2.x).
_CROSS_ATTN_KEY = re.compile(
    r"(down_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.0\.attn2\.to_k\.weight"
)
_ORIGINAL_CROSS_ATTN_KEY = re.compile(
    r"(input_blocks\.\d+\.\d+|middle_block\.\d+)\.transformer_blocks\.0\.attn2\.to_k\.weight"
)


# ------------------------------------------------------------------------------ shared steps
def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``state`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def load_strict(
    model_class: type, config: Mapping[str, Any], state: Mapping[str, Tensor], what: str
) -> Any:
    """A ``model_class`` of ``config`` holding exactly ``state`` (fp32 CPU tensors taken as they
    are).

    The model is built on the meta device (no random init, no double memory) and loaded strictly:
    a missing, left-over or misshapen tensor is a one-line :class:`CheckpointFormatError` that
    starts with ``what`` (e.g. ``"control_x.safetensors: does not fit ..."``).
    """
    with torch.device("meta"):
        model = model_class.from_config(dict(config))
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else first_line(err)
        raise CheckpointFormatError(f"{what}: does not fit its architecture: {detail}") from err
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointFormatError(f"{what}: no weights for {still_meta[0]!r}")
    return model.eval()


def config_mismatch(
    mine: Mapping[str, Any], theirs: Mapping[str, Any], keys: tuple[str, ...]
) -> str | None:
    """The first of ``keys`` on which two model configs disagree, as ``"its K is A, ... is B"``."""

    def norm(value: Any) -> list:  # an int and a one-element list say the same
        return list(value) if isinstance(value, (list, tuple)) else [value]

    for key in keys:
        a, b = mine.get(key), theirs.get(key)
        if norm(a) != norm(b):
            return f"its {key} is {a}, the base UNet's is {b}"
    return None


def plain_hparams(hparams: Mapping[str, Any], resolve: bool = False) -> dict[str, Any]:
    """Hyperparameters as plain Python: OmegaConf containers (Hydra's list and dict arguments)
    converted, resolving interpolations only with ``resolve`` (one that no longer resolves is
    kept as text)."""
    from omegaconf import Container, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    def plain(value: Any) -> Any:
        if not isinstance(value, Container):
            return value
        try:
            return OmegaConf.to_container(value, resolve=resolve)
        except OmegaConfBaseException:
            return OmegaConf.to_container(value, resolve=False)

    if isinstance(hparams, Container):
        return dict(plain(hparams))
    return {k: plain(v) for k, v in hparams.items()}


# ----------------------------------------------------------------------------- training checkpoints
def newest_run_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint a run directory resumes from and exports: the most recently written of
    ``checkpoints/last.ckpt`` and the ``hpc_ckpt_N.ckpt`` Lightning writes when SLURM signals a
    requeue (files or DeepSpeed directories); None when there is none."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.exists():  # killed between the two renames of an atomic DeepSpeed save
        last = last.with_name("last.ckpt.old")
    candidates = [last, *run_dir.glob("hpc_ckpt_*.ckpt")]
    existing = [c for c in candidates if c.exists()]
    return max(existing, key=lambda c: c.stat().st_mtime) if existing else None


def is_deepspeed_checkpoint(path: str | os.PathLike) -> bool:
    """True for a directory written by DeepSpeed's ``save_checkpoint`` (Lightning's ``*.ckpt/``)."""
    path = Path(path)
    return path.is_dir() and (
        (path / "latest").is_file() or any(_has_zero_files(p) for p in path.glob("*"))
    )


def _has_zero_files(tag_dir: Path) -> bool:
    return tag_dir.is_dir() and any(tag_dir.glob("*model_states.pt"))


def find_checkpoint(src: str | os.PathLike) -> Path:
    """The checkpoint ``src`` names: a file, a DeepSpeed directory, or a run directory's newest
    (:func:`newest_run_checkpoint`, else the newest ``*.ckpt`` in it or its ``checkpoints/``)."""
    path = Path(os.path.expanduser(str(src)))
    if not path.exists():
        raise ConfigError(
            f"{str(path)!r} does not exist: expected a .ckpt file, a DeepSpeed checkpoint "
            "or a run directory"
        )
    if path.is_file() or is_deepspeed_checkpoint(path):
        return path
    newest = newest_run_checkpoint(path)
    if newest is not None:
        return newest
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise ConfigError(
            f"{str(path)!r} is a directory with no checkpoint: "
            "expected <run>/checkpoints/last.ckpt, a .ckpt file or a DeepSpeed checkpoint directory"
        )
    return candidates[-1]


def _lightning_state_file(checkpoint: Path) -> Path | None:
    """The file holding Lightning's own state: the checkpoint file, or rank 0's model states of
    a DeepSpeed directory (its client state)."""
    if checkpoint.is_file():
        return checkpoint
    files = sorted(checkpoint.glob("*/mp_rank_00_model_states.pt")) or sorted(
        checkpoint.glob("*/*model_states.pt")
    )
    return files[0] if files else None


def checkpoint_step(path: str | os.PathLike) -> int:
    """The optimizer step a Lightning checkpoint (file or DeepSpeed directory) was saved at."""
    path = Path(path)
    state_file = _lightning_state_file(path)
    if state_file is None:
        raise ConfigError(f"{str(path)!r} holds no DeepSpeed model states to resume from")
    state = _read_checkpoint_file(state_file, path, mmap=True, deepspeed=path.is_dir())
    return int(state.get("global_step", 0)) if isinstance(state, dict) else 0


def read_hparams(checkpoint: Path) -> dict[str, Any]:
    """The module's saved hyperparameters (``{}`` when the checkpoint has none).

    A DeepSpeed directory keeps them in its ``*model_states.pt`` client state. Files are
    memory-mapped so the weights are not read a second time.
    """
    state_file = _lightning_state_file(checkpoint)
    if state_file is None:
        return {}
    try:
        data = safe_torch_load(state_file, mmap=True, deepspeed=checkpoint.is_dir())
    except UnsafeCheckpointError:
        raise
    except Exception:  # noqa: BLE001 - no readable hparams just means "ask for --base"
        return {}
    if isinstance(data, dict) and isinstance(data.get("hyper_parameters"), Mapping):
        return plain_hparams(data["hyper_parameters"])
    return {}


def load_trainable_state_dict(checkpoint_path: str | os.PathLike) -> dict[str, Tensor]:
    """The trainable fp32 weights of a checkpoint, keyed as ``ControlNetModule.state_dict()``
    (``controlnet.*`` and, after ``sd_locked: false``, ``unet.up_blocks.*`` ...).

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
    out = {}
    for key, value in state.items():
        key = _strip_wrappers(key)
        if torch.is_tensor(value) and key.startswith(TRAINABLE_PREFIXES):
            out[key] = value.float() if value.is_floating_point() else value
    if not any(k.startswith(CONTROLNET_PREFIX) for k in out):
        raise CheckpointFormatError(f"{str(path)!r} holds no controlnet.* weights")
    return out


def _load_zero_checkpoint(path: Path) -> dict[str, Tensor]:
    """DeepSpeed's own merge of the ZeRO shards, with its ``torch.load`` calls made safe."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = None if (path / "latest").is_file() else _single_tag(path)
    with safe_torch_loads_in("deepspeed.utils.zero_to_fp32"):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(
                str(path), tag=tag, exclude_frozen_parameters=True
            )
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as err:  # noqa: BLE001 - a damaged directory is the user's input error
            raise CheckpointFormatError(
                f"cannot read DeepSpeed checkpoint {str(path)!r}: {first_line(err)}"
            ) from err


def _single_tag(path: Path) -> str:
    tags = sorted(p.name for p in path.iterdir() if _has_zero_files(p))
    if len(tags) != 1:
        raise CheckpointFormatError(f"{str(path)!r} has no 'latest' file and tags {tags}; pass one")
    return tags[0]


def _read_checkpoint_file(file: Path, source: Path, **load_args: Any) -> Any:
    """:func:`safe_torch_load` of ``file`` (part of the checkpoint ``source``); a file that cannot
    be read is the user's input error: one line naming ``source``."""
    try:
        return safe_torch_load(file, **load_args)
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is the user's input error
        raise CheckpointFormatError(
            f"cannot read checkpoint {str(source)!r}: {first_line(err)}"
        ) from err


def _load_lightning_file(path: Path) -> dict[str, Tensor]:
    checkpoint = _read_checkpoint_file(path, path, map_location="cpu")
    if not isinstance(checkpoint, dict):
        raise CheckpointFormatError(f"{str(path)!r} does not hold a dict")
    return checkpoint.get("state_dict", checkpoint)


def _strip_wrappers(key: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


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

    names = set(module.checkpointed_names())
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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint files, written atomically and read without running code.

    A run killed mid-save (SLURM preemption, out-of-disk) keeps the previous ``last.ckpt`` intact
    instead of leaving a truncated file that resuming would choke on (the data is flushed to disk
    before the rename). Reading (``trainer.fit(ckpt_path=...)``) goes through
    :func:`~cn_lightning.serialization.safe_torch_load`: a pickle that would call anything outside
    the allow-list is refused with :class:`~cn_lightning.errors.UnsafeCheckpointError`. OmegaConf
    values in the hyperparameters are saved as plain lists/dicts. Remote URLs fall back to
    Lightning's own writer and reader.

    Creating one installs the safe reading of DeepSpeed checkpoint directories as well
    (:func:`~cn_lightning.serialization.install_safe_loading`).
    """

    def __init__(self) -> None:
        super().__init__()
        install_safe_loading()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = {**checkpoint, key: plain_hparams(checkpoint[key], resolve=True)}
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with atomic_file(path, fsync=True) as tmp:
            torch.save(checkpoint, tmp)

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_torch_load(path, map_location=map_location)


@dataclass
class TrainedWeights:
    """The trainable tensors of a checkpoint and the hyperparameters it was trained with."""

    state_dict: dict[str, Tensor]
    hparams: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    @property
    def controlnet_state_dict(self) -> dict[str, Tensor]:
        return strip_prefix(self.state_dict, CONTROLNET_PREFIX)

    @property
    def decoder_state_dict(self) -> dict[str, Tensor]:
        """The trained UNet decoder (``sd_locked: false``), keyed as in ``UNet2DConditionModel``."""
        return strip_prefix(self.state_dict, UNET_PREFIX)


def load_trained_weights(src: str | os.PathLike) -> TrainedWeights:
    """Trainable weights + hyperparameters of a Lightning checkpoint, DeepSpeed dir or run dir."""
    checkpoint = find_checkpoint(src)
    return TrainedWeights(
        load_trainable_state_dict(checkpoint), read_hparams(checkpoint), checkpoint
    )


# ------------------------------------------------------------------------------ ControlNet configs
def hint_encoder_of(state_dict: Mapping[str, Tensor]) -> tuple[list[int], int]:
    """``(conditioning_embedding_out_channels, conditioning_channels)`` from diffusers-keyed
    tensors."""
    conv_in = state_dict.get("controlnet_cond_embedding.conv_in.weight")
    if conv_in is None:
        raise CheckpointFormatError(
            "no controlnet_cond_embedding.conv_in.weight: not a ControlNet state dict"
        )
    channels = [int(conv_in.shape[0])]
    k = 1
    while f"controlnet_cond_embedding.blocks.{k}.weight" in state_dict:
        channels.append(int(state_dict[f"controlnet_cond_embedding.blocks.{k}.weight"].shape[0]))
        k += 2
    return channels, int(conv_in.shape[1])


def controlnet_config_from_unet(
    unet_config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor] | None = None,
    hint: tuple[list[int] | tuple[int, ...], int] | None = None,
) -> dict[str, Any]:
    """``ControlNetModel.from_unet``'s config for ``unet_config``, with the condition encoder of
    ``hint`` (``(widths, input channels)``) or read from the diffusers-keyed ``state_dict``."""
    channels, cond_channels = hint if hint is not None else hint_encoder_of(state_dict or {})
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        model = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=tuple(channels),
            conditioning_channels=cond_channels,
            load_weights_from_unet=False,
        )
    config = dict(model.config)
    config["conditioning_embedding_out_channels"] = list(channels)
    return config


def shipped_controlnet_config(
    state_dict: Mapping[str, Tensor],
    hint: tuple[list[int] | tuple[int, ...], int],
    variant: str | None = None,
    original: bool = False,
) -> dict[str, Any]:
    """The shipped ControlNet config of ``variant``, or of the SD1.5/SD2.1 that the tensors'
    cross-attention width names (``original``: the tensors have original keys), with ``hint``."""
    if variant is None:
        probe_key = _ORIGINAL_CROSS_ATTN_KEY if original else _CROSS_ATTN_KEY
        probe = next((v for k, v in state_dict.items() if probe_key.fullmatch(k)), None)
        variant = variant_for_cross_attention(None if probe is None else int(probe.shape[1]))
    config = json.loads((config_dir(variant) / "controlnet" / "config.json").read_text())
    config.update(conditioning_embedding_out_channels=list(hint[0]), conditioning_channels=hint[1])
    return {k: v for k, v in config.items() if not k.startswith("_")}


def resolve_controlnet_config(
    state_dict: Mapping[str, Tensor],
    hparams: Mapping[str, Any],
    base: str | None = None,
    unet_config: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The config of a checkpoint's ControlNet (diffusers keys), from the first source that exists.

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
    if str(base_path) not in ("", ".") and (base_path / UNET_FOLDER / "config.json").is_file():
        unet_config = UNet2DConditionModel.load_config(str(base_path / UNET_FOLDER))
    if unet_config is not None:
        return controlnet_config_from_unet(unet_config, state_dict)
    return shipped_controlnet_config(
        state_dict, hint_encoder_of(state_dict), hparams.get("variant")
    )


def original_controlnet_config(
    state_dict: Mapping[str, Tensor], unet: Any | None = None
) -> dict[str, Any]:
    """The diffusers ``ControlNetModel`` config of an original-format ControlNet: ``from_unet`` of
    ``unet`` (the base model it will drive), else the shipped SD1.5 / SD2.1 config its
    cross-attention width names. The condition encoder always comes from the tensors."""
    hint = hint_encoder_shape(state_dict)
    if unet is not None:
        return controlnet_config_from_unet(unet.config, hint=hint)
    return shipped_controlnet_config(strip_control_prefix(state_dict), hint, original=True)


# ------------------------------------------------------------------------------ reading ControlNets
def load_controlnet(
    path: str | os.PathLike, unet: UNet2DConditionModel | None = None
) -> ControlNetModel:
    """A released or exported ControlNet in fp32: a diffusers folder or an original-format file
    (whose architecture comes from ``unet`` when given)."""
    path = Path(os.path.expanduser(str(path)))
    if not path.exists():
        raise BackboneLoadError(
            f"ControlNet path {str(path)!r} does not exist: expected a diffusers ControlNet "
            "folder (config.json + weights) or an original-format .safetensors/.pth file"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneLoadError(
                f"{str(path)!r} is not a diffusers ControlNet folder: no config.json in it"
            )
        return ControlNetModel.from_pretrained(
            path, local_files_only=True, torch_dtype=torch.float32
        ).eval()
    return load_original_controlnet(path, unet=unet)


def load_original_controlnet(
    path: str | os.PathLike, unet: Any | None = None, torch_dtype: torch.dtype = torch.float32
) -> ControlNetModel:
    """An original-format ControlNet file (``control_*.safetensors`` / ``.pth``) as a
    ``ControlNetModel``.

    The config comes from ``unet`` (the base model the ControlNet will drive) or, without it, from
    the shipped SD1.5/SD2.1 configs; the keys are mapped with diffusers' own converter and loaded
    strictly (:func:`load_strict`). Pickles are read with the allow-list (one that would run code
    is refused).
    """
    state, _ = read_state_dict(path, what="ControlNet")
    config = original_controlnet_config(state, unet)
    model = load_strict(ControlNetModel, config, original_to_controlnet(state, config), f"{path}")
    return model.to(dtype=torch_dtype) if torch_dtype != torch.float32 else model


def load_any_controlnet(
    src: str | os.PathLike, base: str | None = None, unet: UNet2DConditionModel | None = None
) -> tuple[ControlNetModel, TrainedWeights | None]:
    """A ControlNet from a training checkpoint / run directory, or from an export (either format).

    ``base`` (a diffusers SD directory) or ``unet`` gives the architecture where the source does
    not say it (original-format files, checkpoints whose base model is not at hand). The
    :class:`TrainedWeights` are returned for a training checkpoint (``None`` for an export).
    """
    path = Path(os.path.expanduser(str(src)))
    if path.is_dir() and (path / "config.json").is_file():
        return load_controlnet(path), None
    if path.is_file() and is_original_format(path):
        return load_original_controlnet(
            path, unet=unet if unet is not None else _meta_unet(base)
        ), None
    weights = load_trained_weights(path)
    config = resolve_controlnet_config(
        weights.controlnet_state_dict, weights.hparams, base, None if unet is None else unet.config
    )
    what = f"the ControlNet of {weights.source}"
    return load_strict(ControlNetModel, config, weights.controlnet_state_dict, what), weights


def is_original_format(path: Path) -> bool:
    """True for a file of ``control_model.*`` (or prefix-less ``input_hint_block.*``) tensors."""
    return any(k.startswith(("control_model.", "input_hint_block.")) for k in _top_level_keys(path))


def _top_level_keys(path: Path) -> list[str]:
    """The tensor names of a safetensors file, or the top-level keys of a pickled dict
    (memory-mapped)."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as err:  # noqa: BLE001 - an unreadable file is the user's input error
            raise CheckpointFormatError(
                f"cannot read {str(path)!r} as safetensors: {first_line(err)}"
            ) from err
    try:
        data = safe_torch_load(path, mmap=True)
    except UnsafeCheckpointError:
        raise
    except Exception:  # noqa: BLE001 - let the checkpoint reader report it
        return []
    return [str(k) for k in data] if isinstance(data, dict) else []


def _meta_unet(base: str | None) -> UNet2DConditionModel | None:
    """A weightless UNet of the diffusers SD directory ``base`` (its config is all that is
    needed)."""
    if base is None:
        return None
    unet_dir = Path(os.path.expanduser(base)) / UNET_FOLDER
    if not unet_dir.is_dir():
        raise ConfigError(
            f"--base {base!r} is not a diffusers Stable Diffusion directory (no unet/)"
        )
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(unet_dir)))


# ------------------------------------------------------------------------------ fine-tuned UNets
def original_unet_path(path: str | os.PathLike) -> Path:
    """Where an original-format export keeps its fine-tuned UNet: ``control_x.safetensors`` ->
    ``control_x_unet.safetensors`` (``model.diffusion_model.*`` keys, the SD checkpoint layout)."""
    path = Path(path)
    return path.with_name(f"{path.stem}_unet{path.suffix}")


def overlay_decoder(
    unet: UNet2DConditionModel, decoder: Mapping[str, Tensor]
) -> UNet2DConditionModel:
    """Put the trained ``decoder`` tensors into ``unet`` (in place, in ``unet``'s dtype); returns
    it.

    Every decoder tensor of ``unet`` must be given, with the right shape, and nothing else:
    a decoder trained on another architecture is a :class:`CheckpointFormatError`.
    """
    own = unet.state_dict()
    expected = {k for k in own if k.startswith(DECODER_PREFIXES)}
    missing, unexpected = sorted(expected - set(decoder)), sorted(set(decoder) - expected)
    wrong = sorted(
        k for k in set(decoder) & expected if tuple(decoder[k].shape) != tuple(own[k].shape)
    )
    if missing or unexpected or wrong:
        raise CheckpointFormatError(
            f"the fine-tuned UNet decoder does not fit the base UNet: {len(missing)} missing "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
            f"{len(wrong)} of another shape (e.g. {wrong[:2]}); "
            "was it trained on another base model?"
        )
    with torch.no_grad():
        for key, value in decoder.items():
            own[key].copy_(value.detach().to(own[key].device, own[key].dtype))
    return unet


def load_base_unet(base: str | os.PathLike, variant: str | None = None) -> UNet2DConditionModel:
    """The base model's UNet in fp32 (a diffusers SD directory's ``unet/``, or from a single
    file)."""
    path = Path(os.path.expanduser(str(base)))
    if path.is_dir() and (path / UNET_FOLDER / "config.json").is_file():
        try:
            return UNet2DConditionModel.from_pretrained(
                path / UNET_FOLDER, local_files_only=True, torch_dtype=torch.float32
            )
        except (OSError, ValueError) as err:
            raise BackboneLoadError(
                f"cannot load the UNet of {str(path)!r}: {first_line(err)}"
            ) from err
    return load_backbone(path, "fp32", variant=variant).unet


def trained_unet(
    base: str | os.PathLike, decoder: Mapping[str, Tensor], variant: str | None = None
) -> UNet2DConditionModel:
    """The full fine-tuned UNet in fp32: the base model's UNet with the trained ``decoder`` in
    place."""
    unet = load_base_unet(base, variant)
    if any(p.dtype != torch.float32 for p in unet.parameters()):
        unet.to(dtype=torch.float32)
    return overlay_decoder(unet, decoder).eval()


def unet_from_original_file(path: str | os.PathLike, config: Mapping) -> UNet2DConditionModel:
    """A fp32 ``UNet2DConditionModel`` of ``config`` from a ``model.diffusion_model.*`` file
    (read safely; keys mapped with diffusers' own ``convert_ldm_unet_checkpoint``, loaded
    strictly)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state, _ = read_state_dict(path, what="UNet")
    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise CheckpointFormatError(
            f"{path}: no model.diffusion_model.* tensors; "
            "expected a UNet in the SD checkpoint layout"
        )
    converted = convert_ldm_unet_checkpoint(state, dict(config))
    return load_strict(UNet2DConditionModel, config, converted, f"{path}")


def check_same_architecture(
    unet: UNet2DConditionModel, base_unet: UNet2DConditionModel, name: str
) -> None:
    """Refuse, in one line, a fine-tuned UNet that cannot stand in for the base model's."""
    problem = config_mismatch(unet.config, base_unet.config, UNET_ARCHITECTURE_KEYS)
    if problem:
        raise ConfigError(f"the fine-tuned UNet of {name!r} does not fit the base model: {problem}")


def _is_run_directory(path: Path) -> bool:
    return (path / "checkpoints").is_dir() or (path / ".hydra").is_dir()


@dataclass
class CompanionUNet:
    """A fine-tuned UNet (``sd_locked: false``) that goes with a ControlNet, and where it comes
    from.

    Exactly one of ``decoder`` (trained decoder tensors from a checkpoint, to put into the base
    model's UNet), ``folder`` (a diffusers UNet folder) or ``original`` (a UNet file in the SD
    checkpoint layout) is set.
    """

    source: str
    decoder: dict[str, Tensor] | None = None
    folder: Path | None = None
    original: Path | None = None

    def build(
        self, base_unet: UNet2DConditionModel, dtype: torch.dtype | None = None
    ) -> UNet2DConditionModel:
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
            unet = UNet2DConditionModel.from_pretrained(
                self.folder, local_files_only=True, torch_dtype=dtype
            )
        else:
            unet = unet_from_original_file(self.original, dict(base_unet.config)).to(dtype=dtype)
        check_same_architecture(unet, base_unet, self.source)
        return unet.eval()


def find_companion_unet(
    src: str | os.PathLike, decoder: Mapping[str, Tensor] | None = None
) -> CompanionUNet | None:
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
        if (path / UNET_FOLDER / "config.json").is_file():
            return CompanionUNet(source=str(path), folder=path / UNET_FOLDER)
        beside = path.parent / UNET_FOLDER
        if _is_run_directory(path.parent) and (beside / "config.json").is_file():
            return CompanionUNet(source=str(path), folder=beside)
        return None
    unet_file = original_unet_path(path)
    if path.is_file() and unet_file.is_file():
        return CompanionUNet(source=str(path), original=unet_file)
    return None


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
    companion = find_companion_unet(
        src, weights.decoder_state_dict if weights is not None else None
    )
    if companion is None:
        return None
    if companion.decoder is not None:
        assert weights is not None
        log.warning(
            f"note: {weights.source} also holds {len(companion.decoder)} fine-tuned UNet decoder "
            "tensors (sd_locked=false); writing the full UNet they belong to as well"
        )
        base_path = base or weights.hparams.get("pretrained_model_path")
        if not base_path or not Path(os.path.expanduser(str(base_path))).exists():
            raise ConfigError(
                f"{weights.source} was trained with sd_locked=false "
                f"but its base model {base_path!r} is not at hand: "
                "pass --base (the Stable Diffusion model it was trained on) "
                "to write the full UNet, or --controlnet-only"
            )
        return trained_unet(base_path, companion.decoder, weights.hparams.get("variant"))
    if companion.folder is not None:
        return UNet2DConditionModel.from_pretrained(
            companion.folder, local_files_only=True, torch_dtype=torch.float32
        )
    return unet_from_original_file(companion.original, _unet_config(controlnet, base))


def _unet_config(controlnet: ControlNetModel, base: str | None) -> dict[str, Any]:
    """The UNet config for an original-layout UNet file: the base model's, else the shipped SD1.5 /
    SD2.1 one matching the ControlNet's cross-attention width."""
    if base is not None:
        return dict(_meta_unet(base).config)
    variant = variant_for_cross_attention(int(controlnet.config.cross_attention_dim or 0))
    return dict(UNet2DConditionModel.load_config(str(config_dir(variant) / UNET_FOLDER)))


# ------------------------------------------------------------------------------ writing
def save_controlnet_folder(
    controlnet: ControlNetModel, out: str | os.PathLike, unet: UNet2DConditionModel | None = None
) -> Path:
    """Save ``controlnet`` (``config.json`` + ``diffusion_pytorch_model.safetensors``) atomically.

    With ``unet`` (a fine-tuned UNet that goes with this ControlNet) it is saved in ``out/unet/``,
    in the same atomic step: ``out`` is either the old export or the complete new one, never a mix.
    """
    out = Path(out)
    with atomic_directory(out) as tmp:
        controlnet.save_pretrained(tmp, safe_serialization=True)
        if unet is not None:
            unet.save_pretrained(tmp / UNET_FOLDER, safe_serialization=True)
    return out


def save_unet_folder(unet: UNet2DConditionModel, out: str | os.PathLike) -> Path:
    """Save a UNet as a diffusers folder atomically (what
    ``UNet2DConditionModel.from_pretrained`` reads)."""
    out = Path(out)
    with atomic_directory(out) as tmp:
        unet.save_pretrained(tmp, safe_serialization=True)
    return out


def save_original(
    state_dict: Mapping[str, Tensor], path: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """Write ``state_dict`` atomically: ``.safetensors``, or a pickled dict for ``.pth/.pt/.ckpt``.

    ``dtype`` casts floating-point tensors (e.g. ``torch.float16`` for a 723 MB SD1.5 ControlNet).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WRITABLE_SUFFIXES:
        names = f"{', '.join(WRITABLE_SUFFIXES[:-1])} or {WRITABLE_SUFFIXES[-1]}"
        raise CheckpointFormatError(f"{path}: expected a {names} file name")

    def prepare(tensor: Tensor) -> Tensor:
        tensor = tensor.detach().cpu()
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        return tensor.contiguous()  # safetensors needs contiguous tensors

    tensors = {k: prepare(v) for k, v in state_dict.items()}
    with atomic_file(path) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={"format": "pt"})
        else:
            torch.save(tensors, tmp)
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


def export_controlnet(
    src: str | os.PathLike,
    out: str | os.PathLike,
    fmt: str = "diffusers",
    dtype: str = "fp32",
    base: str | None = None,
    controlnet_only: bool = False,
) -> Path:
    """Export the ControlNet of ``src`` (any source in the module docstring) to ``out`` in ``fmt``.

    When the decoder was trained too (``sd_locked: false``), the full fine-tuned UNet is written
    as well (unless ``controlnet_only``): ``out/unet/`` (diffusers) or the SD-layout file
    ``<out stem>_unet<suffix>`` (original; see :func:`original_unet_path`). Returns the path.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown format {fmt!r}: expected one of {', '.join(FORMATS)}")
    torch_dtype = parse_dtype(dtype)
    controlnet, weights = load_any_controlnet(src, base)
    if fmt == "original":
        check_original_exportable(controlnet)
    unet = None if controlnet_only else load_companion_unet(src, weights, controlnet, base)
    out = Path(out)
    if fmt == "diffusers":
        if out.suffix.lower() in WRITABLE_SUFFIXES:
            raise ConfigError(
                f"--out {str(out)!r} looks like a file; --format diffusers writes a folder"
            )
        controlnet = controlnet.to(dtype=torch_dtype)
        path = save_controlnet_folder(
            controlnet, out, None if unet is None else unet.to(dtype=torch_dtype)
        )
        where = path / UNET_FOLDER
    else:
        path = out.with_suffix(".safetensors") if out.suffix == "" else out
        original = controlnet_to_original(controlnet.state_dict(), controlnet.config)
        if unet is not None:
            original_unet = unet_to_original(unet.state_dict(), unet.config)
            save_original(original_unet, original_unet_path(path), dtype=torch_dtype)
        save_original(original, path, dtype=torch_dtype)
        where = original_unet_path(path)
    if unet is not None:
        log.info(f"wrote the fine-tuned UNet (sd_locked=false, {dtype}) to {where}")
    return path


def export_from_trainer(trainer, module, out: str | os.PathLike) -> None:
    """Write the trained branch as a diffusers ControlNet folder at the end of training (rank 0).

    Works under every strategy: the trainable weights are gathered first (fp32 master weights
    under DeepSpeed, sharded parameters under ZeRO-3 / FSDP), a collective step every rank runs.
    With ``sd_locked: false`` the decoder trained too: the full UNet it ran with (the base
    model's fp32 UNet with the trained decoder) is written next to it, ``<run>/unet/``.
    Non-finite weights are never written (:class:`NumericsError`).
    """
    out = Path(out)
    state = gather_trainable_state_dict(trainer, module)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        raise NumericsError(
            f"not exporting {out}: {len(bad)} trained tensors are not finite (e.g. {bad[0]})"
        )
    if trainer.is_global_zero:
        weights = strip_prefix(state, CONTROLNET_PREFIX)
        controlnet = load_strict(
            ControlNetModel, module.controlnet.config, weights, "the trained ControlNet"
        )
        save_controlnet_folder(controlnet, out)
        log.info(f"exported ControlNet to {out}")
        decoder = strip_prefix(state, UNET_PREFIX)
        if decoder:
            hparams = module.hparams
            unet = trained_unet(hparams.pretrained_model_path, decoder, hparams.get("variant"))
            save_unet_folder(unet, out.parent / UNET_FOLDER)
            log.info(
                f"exported the fine-tuned UNet (sd_locked=false) to {out.parent / UNET_FOLDER}"
            )
    trainer.strategy.barrier("export_controlnet")
