"""Tensor files in and out of memory without running code: the one way this package unpickles.

* :func:`safe_torch_load` is ``torch.load(..., weights_only=True)`` with the allow-list of
  :func:`checkpoint_safe_globals` (the few types our own Lightning and DeepSpeed checkpoints hold
  besides tensors and plain containers). A pickle that references anything else (``os.system``,
  ``getattr``, ...) is refused with :class:`~cn_lightning.errors.UnsafeCheckpointError` before
  anything is called.
* :func:`read_state_dict` reads any single tensor file users have on disk (``.safetensors``, or a
  pickled ``.ckpt``/``.pt``/``.pth``/``.bin``) into a flat CPU state dict, with one-line errors.
* :func:`install_safe_loading` routes the reads of a training process (Lightning's, DeepSpeed's)
  through the same allow-list.

What the tensors *mean* (a ControlNet, a training checkpoint, a backbone) is for the readers
above this module: :mod:`cn_lightning.models.checkpoints` and
:mod:`cn_lightning.models.single_file`.
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

from cn_lightning.errors import (
    CheckpointFormatError,
    CnLightningError,
    UnsafeCheckpointError,
    first_line,
)

# The file names a single-file model or ControlNet may have (read), and those we write.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
WRITABLE_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


def checkpoint_safe_globals(deepspeed: bool = False) -> list[Any]:
    """The allow-list: every type a cn_lightning checkpoint holds besides tensors and plain
    containers.

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
        typing.Any,
        collections.defaultdict,
        dict,
        list,
        tuple,
        set,
        int,
        float,
        str,
        bool,
        bytes,
        pathlib.PosixPath,
        pathlib.PurePosixPath,
        pathlib.WindowsPath,
        pathlib.PureWindowsPath,
        np.ndarray,
        np.dtype,
    ]
    multiarray = getattr(getattr(np, "_core", None), "multiarray", None) or np.core.multiarray
    allowed += [
        multiarray._reconstruct,
        multiarray.scalar,
    ]  # arrays and NumPy scalars (np.int64(3))
    allowed += [
        type(np.dtype(t))
        for t in ("bool", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8")
    ]
    try:
        from omegaconf import DictConfig, ListConfig, nodes
        from omegaconf.base import ContainerMetadata, Metadata

        allowed += [DictConfig, ListConfig, ContainerMetadata, Metadata]
        allowed += [
            getattr(nodes, name)
            for name in (
                "AnyNode",
                "StringNode",
                "IntegerNode",
                "FloatNode",
                "BooleanNode",
                "BytesNode",
                "PathNode",
            )
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
        return UnsafeCheckpointError(
            f"{path}: refusing to unpickle {found.group(1)} (not a safe checkpoint: {_SAFE_ONLY})"
        )
    detail = _UNPICKLER_ERROR.search(text) or re.search(
        r"\n\n([^\n]+)\n\nCheck the documentation", text
    )
    reason = "" if detail is None else f" ({detail.group(1).strip().split('. ')[0].rstrip('.')})"
    return UnsafeCheckpointError(
        f"{path}: not a safe checkpoint, or not a checkpoint at all: "
        f"refusing to unpickle it{reason} ({_SAFE_ONLY})"
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

    def load(
        self, f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **_: Any
    ) -> Any:
        return safe_torch_load(f, map_location=map_location, mmap=mmap, deepspeed=self._deepspeed)


@contextlib.contextmanager
def safe_torch_loads_in(*module_names: str, deepspeed: bool = True) -> Iterator[None]:
    """Within the block, ``torch.load`` called from these (imported) modules is
    :func:`safe_torch_load`.

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


def read_state_dict(
    path: str | os.PathLike,
    what: str = "ControlNet",
    error: type[CnLightningError] = CheckpointFormatError,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A single tensor file as a flat CPU state dict, and the file's non-tensor records.

    ``path`` is a ``.safetensors`` file or a pickled dict (``.ckpt``/``.pt``/``.pth``/``.bin``,
    read with :func:`safe_torch_load`); a Lightning-style ``{"state_dict": ...}`` wrapper is
    unwrapped. The records are the safetensors metadata, or the top-level non-tensor entries of a
    pickled dict. ``what`` names the expected content in the one-line ``error`` a file that is
    missing, unreadable or without tensors raises.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file; expected a {what} .safetensors or .ckpt checkpoint")
    if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise error(
            f"{path}: expected a checkpoint file ending in {', '.join(SINGLE_FILE_SUFFIXES)}"
        )
    records: dict[str, Any] = {}
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
            with safe_open(str(path), framework="pt") as f:
                records = dict(f.metadata() or {})
        else:
            state = safe_torch_load(path, map_location="cpu")
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure means "not a readable file"
        raise error(f"{path}: cannot read it as a checkpoint: {first_line(exc)}") from exc
    if isinstance(state, dict):
        records |= {str(k): v for k, v in state.items() if isinstance(v, (str, int, float, bool))}
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        state = (
            {k: v for k, v in state.items() if isinstance(v, Tensor)}
            if isinstance(state, dict)
            else {}
        )
    if not state:
        raise error(f"{path}: holds no tensors; expected a {what} state dict")
    return state, records
