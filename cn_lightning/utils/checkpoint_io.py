"""Checkpoint IO that never leaves a half-written checkpoint behind and never unpickles code.

Importing this module calls :func:`cn_lightning.utils.checkpoints.install_safe_loading`, so the
training process reads every checkpoint (Lightning ``.ckpt`` files through this class, DeepSpeed
``*.ckpt/`` directories through the guarded ``DeepSpeedStrategy.load_checkpoint``) with the
allow-list of safe types.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cn_lightning.utils.checkpoints import install_safe_loading, safe_torch_load

install_safe_loading()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to ``<path>.tmp`` and rename it into place; read it safely.

    A run killed mid-save (SLURM preemption, out-of-disk) keeps the previous ``last.ckpt`` intact
    instead of leaving a truncated file that resuming would choke on. Remote URLs fall back to
    Lightning's own writer and reader.

    Reading (``trainer.fit(ckpt_path=...)``) is ``torch.load(weights_only=True)`` with the
    allow-list of :func:`~cn_lightning.utils.checkpoints.checkpoint_safe_globals`: a file whose
    pickle would call anything else is refused with
    :class:`~cn_lightning.errors.UnsafeCheckpointError` (one line, exit 2 from the CLI).
    OmegaConf values in ``hyper_parameters`` are saved as plain lists/dicts.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        checkpoint = _plain_hyperparameters(checkpoint)
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if "://" in str(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return safe_torch_load(path, map_location=map_location)


def _plain_hyperparameters(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """``checkpoint`` with OmegaConf containers in its hyperparameters turned into plain Python."""
    try:
        from omegaconf import Container
    except ImportError:  # pragma: no cover - omegaconf comes with hydra
        return checkpoint
    out = checkpoint
    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        hparams = checkpoint.get(key)
        if not isinstance(hparams, dict) or not any(isinstance(v, Container) for v in hparams.values()):
            continue
        if out is checkpoint:
            out = dict(checkpoint)
        out[key] = {k: _to_plain(v) if isinstance(v, Container) else v for k, v in hparams.items()}
    return out


def _to_plain(value: Any) -> Any:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException:  # an interpolation that no longer resolves: keep it as text
        return OmegaConf.to_container(value, resolve=False)
