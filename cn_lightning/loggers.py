"""Logger factories (W&B that falls back to offline mode when no API key is configured) and
the one way callbacks write metrics outside ``LightningModule.log``."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

import torch
from lightning.pytorch.loggers import WandbLogger


def wandb_credentials_available() -> bool:
    """True when ``WANDB_API_KEY`` is set or ``~/.netrc`` holds an api.wandb.ai entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.path.expanduser("~/.netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any("wandb" in host for host in rc.hosts)


def resolve_wandb_mode(mode: str | None = "auto") -> str:
    """``auto`` becomes ``online`` with credentials and ``offline`` without; ``WANDB_MODE`` wins."""
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    if mode in (None, "auto"):
        return "online" if wandb_credentials_available() else "offline"
    return mode


def make_wandb_logger(
    project: str = "cn_lightning",
    save_dir: str = ".",
    name: str | None = None,
    mode: str = "auto",
    run_id: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    log_model: bool = False,
) -> WandbLogger:
    """A ``WandbLogger`` writing under ``save_dir``; offline unless credentials exist.

    ``run_id`` makes a requeued job continue the same W&B run (``resume="allow"``).
    """
    resolved = resolve_wandb_mode(mode)
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    kwargs = {"resume": "allow"} if run_id else {}
    return WandbLogger(
        project=project,
        save_dir=save_dir,
        name=name,
        id=run_id,
        group=group,
        tags=list(tags) if tags else None,
        offline=resolved == "offline",
        mode=resolved,
        log_model=log_model,
        **kwargs,
    )


def offline_wandb_dirs(save_dir: str | os.PathLike) -> list[Path]:
    """The offline run folders a W&B logger left under ``save_dir`` (for ``wandb sync``)."""
    return sorted(Path(save_dir).glob("wandb/offline-run-*"))


def write_metrics(trainer, metrics: dict[str, float], step: int) -> None:
    """Write ``metrics`` straight to every logger (global rank 0) at ``step`` and put them in
    ``trainer.callback_metrics`` (every rank), where ``self.log`` values go: for callbacks that
    compute their metrics only at logging steps instead of calling ``self.log`` every batch."""
    trainer.callback_metrics.update({k: torch.as_tensor(v).cpu() for k, v in metrics.items()})
    if trainer.is_global_zero:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
