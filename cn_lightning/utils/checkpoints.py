"""Trainable weights out of any checkpoint or any running strategy, read without running code.

* :func:`safe_torch_load` is the one way this package unpickles a file: ``torch.load(...,
  weights_only=True)`` with the allow-list of :func:`checkpoint_safe_globals` (the few types our
  own Lightning and DeepSpeed checkpoints hold besides tensors and plain containers). A pickle
  that references anything else (``os.system``, ``getattr``, ...) is refused with
  :class:`~cn_lightning.errors.UnsafeCheckpointError` before anything is called.
* :func:`load_trainable_state_dict` reads a Lightning ``.ckpt`` file or a DeepSpeed (ZeRO-2/3)
  checkpoint directory into the module's trainable state dict (``controlnet.*`` and, when the
  decoder was unlocked, ``unet.up_blocks.*`` / ``unet.conv_norm_out.*`` / ``unet.conv_out.*``).
* :func:`gather_trainable_state_dict` collects the same from a live Trainer under any strategy
  (single device, DDP, DeepSpeed ZeRO-1/2/3 with fp32 master weights, FSDP).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from cn_lightning.errors import CheckpointFormatError, UnsafeCheckpointError

TRAINABLE_PREFIXES = ("controlnet.", "unet.up_blocks.", "unet.conv_norm_out.", "unet.conv_out.")
_WRAPPER_PREFIXES = ("_forward_module.", "module.")


# ------------------------------------------------------------------------------ safe unpickling
def checkpoint_safe_globals(deepspeed: bool = False) -> list[Any]:
    """The allow-list: every type a cn_lightning checkpoint holds besides tensors and plain containers.

    torch's ``weights_only`` unpickler already accepts tensors, dtypes, ``torch.Size``, dicts,
    lists, tuples, strings and numbers. Our checkpoints add:

    * OmegaConf containers in ``hyper_parameters`` (Hydra passes list/dict arguments such as
      ``model.control_scales=[...]`` as ``ListConfig``/``DictConfig``), with the metadata types
      they pickle (``typing.Any``, ``defaultdict``, element types ``int``/``float``/...);
    * NumPy arrays and scalars (RNG states such as ``np.random.get_state()``, counters);
    * ``pathlib`` paths (a path-valued hyperparameter);
    * with ``deepspeed``: the loss scaler, ZeRO stage enum and fragment address that DeepSpeed
      writes into ``*optim_states.pt``.

    Constructing any of these runs no user-chosen code. Extend the list here, and only here.
    """
    import collections
    import pathlib
    import typing

    import numpy as np

    allowed: list[Any] = [
        typing.Any, collections.defaultdict, dict, list, tuple, set, int, float, str, bool, bytes,
        pathlib.PosixPath, pathlib.PurePosixPath, pathlib.WindowsPath, pathlib.PureWindowsPath,
        np.ndarray, np.dtype,
    ]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed += [multiarray._reconstruct, multiarray.scalar]  # arrays and NumPy scalars (np.int64(3))
    allowed += [type(np.dtype(t)) for t in ("bool", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8")]
    try:
        from omegaconf import DictConfig, ListConfig, nodes
        from omegaconf.base import ContainerMetadata, Metadata

        allowed += [DictConfig, ListConfig, ContainerMetadata, Metadata]
        allowed += [
            getattr(nodes, name)
            for name in ("AnyNode", "StringNode", "IntegerNode", "FloatNode", "BooleanNode", "BytesNode", "PathNode")
            if hasattr(nodes, name)
        ]
    except ImportError:  # pragma: no cover - omegaconf comes with hydra, a dependency
        pass
    if deepspeed:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed += [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]
    return allowed


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_UNPICKLER_ERROR = re.compile(r"WeightsUnpickler error: ([^\n]+)")


_SAFE_ONLY = (
    "pickles can run code, so only tensors, plain containers and the types of cn_lightning's own "
    "checkpoints are loaded; convert a file you trust to .safetensors"
)


def _refusal(path: str | os.PathLike, err: BaseException) -> UnsafeCheckpointError:
    """One line: the global the file wanted, or (an opcode or object the safe unpickler does not
    build, which is also what a file that is no pickle at all gives) what was refused."""
    text = str(err)
    found = _REFUSED_GLOBAL.search(text)
    if found:
        return UnsafeCheckpointError(f"{path}: refusing to unpickle {found.group(1)} (not a safe checkpoint: {_SAFE_ONLY})")
    detail = _UNPICKLER_ERROR.search(text) or re.search(r"\n\n([^\n]+)\n\nCheck the documentation", text)
    reason = "" if detail is None else f" ({detail.group(1).strip().split('. ')[0].rstrip('.')})"
    return UnsafeCheckpointError(
        f"{path}: not a safe checkpoint, or not a checkpoint at all: refusing to unpickle it{reason} ({_SAFE_ONLY})"
    )


def _is_weights_only_refusal(err: BaseException) -> bool:
    return isinstance(err, pickle.UnpicklingError) and (
        "Weights only load failed" in str(err) or "WeightsUnpickler" in str(err)
    )


def _allowing(allowed: list[Any]) -> contextlib.AbstractContextManager:
    """``torch.serialization.safe_globals(allowed)`` (torch >= 2.5); on older torch the globals are
    registered for the process with ``add_safe_globals`` (torch 2.4)."""
    context = getattr(torch.serialization, "safe_globals", None)
    if context is not None:
        return context(allowed)
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:  # pragma: no cover - torch 2.4
        add(allowed)
    return contextlib.nullcontext()


def safe_torch_load(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    mmap: bool | None = None,
    deepspeed: bool = False,
) -> Any:
    """``torch.load(path, weights_only=True)`` with :func:`checkpoint_safe_globals` allowed.

    ``mmap=True`` maps the tensors instead of reading them (falls back to a plain read for files
    in torch's legacy format). Raises :class:`UnsafeCheckpointError` (one line, naming the
    refused global) when the pickle references anything outside the allow-list; nothing in the
    file is called in that case. Other read errors (not a checkpoint, truncated) propagate.
    """
    with _allowing(checkpoint_safe_globals(deepspeed=deepspeed)):
        try:
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap can only be used" not in str(err):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            if _is_weights_only_refusal(err):
                raise _refusal(path, err) from None
            raise


def verify_safe_checkpoint(path: str | os.PathLike) -> None:
    """Refuse (:class:`UnsafeCheckpointError`) a checkpoint file, or any ``*.pt`` file of a
    DeepSpeed checkpoint directory, that could not be loaded with :func:`safe_torch_load`.

    For readers we do not control (DeepSpeed's engine and Lightning's DeepSpeed resume use
    ``weights_only=False``): a file that passes references only allow-listed globals, so the
    unrestricted unpickler calls nothing else. Tensors are memory-mapped, not read.
    """
    path = Path(path)
    files = sorted(path.rglob("*.pt")) if path.is_dir() else [path]
    for file in files:
        try:
            safe_torch_load(file, mmap=True, deepspeed=path.is_dir())
        except UnsafeCheckpointError:
            raise
        except Exception:  # noqa: BLE001 - not a refusal; the real reader reports format errors
            continue


class _SafeTorch(types.ModuleType):
    """Stands in for ``torch`` inside a third-party module so its ``torch.load`` is the safe one."""

    def __init__(self, deepspeed: bool) -> None:
        super().__init__("torch")
        self._deepspeed = deepspeed

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def load(self, f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **_: Any) -> Any:
        return safe_torch_load(f, map_location=map_location, mmap=mmap, deepspeed=self._deepspeed)


@contextlib.contextmanager
def safe_torch_loads_in(*module_names: str, deepspeed: bool = True) -> Iterator[None]:
    """Within the block, ``torch.load`` called from these (imported) modules is :func:`safe_torch_load`.

    DeepSpeed's readers (``deepspeed.utils.zero_to_fp32``, its checkpoint engine) hard-code
    ``torch.load(..., weights_only=False)``; this swaps the module's ``torch`` name for a proxy
    whose ``load`` applies the allow-list, and restores it afterwards.
    """
    modules = [sys.modules[name] for name in module_names]
    saved = [m.__dict__["torch"] for m in modules]
    proxy = _SafeTorch(deepspeed)
    for m in modules:
        m.torch = proxy  # type: ignore[attr-defined]
    try:
        yield
    finally:
        for m, original in zip(modules, saved, strict=True):
            m.torch = original  # type: ignore[attr-defined]


_INSTALLED = False


def install_safe_loading() -> None:
    """Make every checkpoint read of a training process go through the allow-list (idempotent).

    * registers :func:`checkpoint_safe_globals` with ``torch.serialization.add_safe_globals``, so
      a plain ``torch.load(..., weights_only=True)`` (Lightning's default reader under torch >= 2.6)
      accepts our own checkpoints, e.g. ones with OmegaConf hyperparameters;
    * wraps Lightning's ``DeepSpeedStrategy.load_checkpoint`` (resume from a ``*.ckpt/``
      directory): the directory is checked with :func:`verify_safe_checkpoint` first, and
      DeepSpeed's engine then reads it with :func:`safe_torch_load` instead of its own
      ``weights_only=False`` load.
    """
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals(checkpoint_safe_globals())
    from lightning.pytorch.strategies import DeepSpeedStrategy

    original = DeepSpeedStrategy.load_checkpoint

    def load_checkpoint(self, checkpoint_path, *args: Any, **kwargs: Any):
        if checkpoint_path is not None and "://" not in str(checkpoint_path):
            verify_safe_checkpoint(checkpoint_path)
        try:
            engine_module = "deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine"
            __import__(engine_module)
            guard = safe_torch_loads_in(engine_module)
        except ImportError:  # pragma: no cover - DeepSpeedStrategy needs deepspeed anyway
            guard = contextlib.nullcontext()
        with guard:
            return original(self, checkpoint_path, *args, **kwargs)

    load_checkpoint.__wrapped__ = original  # type: ignore[attr-defined]
    DeepSpeedStrategy.load_checkpoint = load_checkpoint  # type: ignore[method-assign]


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
    """DeepSpeed's own merge of the ZeRO shards, with its ``torch.load`` calls made safe."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag = None if (path / "latest").is_file() else _single_tag(path)
    with safe_torch_loads_in("deepspeed.utils.zero_to_fp32"):
        try:
            return get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag, exclude_frozen_parameters=True)
        except (UnsafeCheckpointError, CheckpointFormatError):
            raise
        except Exception as err:  # noqa: BLE001 - a damaged directory is the user's input error
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CheckpointFormatError(f"cannot read DeepSpeed checkpoint {str(path)!r}: {first}") from err


def _single_tag(path: Path) -> str:
    tags = sorted(p.name for p in path.iterdir() if p.is_dir() and _has_zero_files(p))
    if len(tags) != 1:
        raise CheckpointFormatError(f"{str(path)!r} has no 'latest' file and tags {tags}; pass one")
    return tags[0]


def _load_lightning_file(path: Path) -> dict[str, Tensor]:
    try:
        checkpoint = safe_torch_load(path, map_location="cpu")
    except UnsafeCheckpointError:
        raise
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
