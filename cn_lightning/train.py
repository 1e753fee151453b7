"""Train a ControlNet: ``python -m cn_lightning.train [+experiment=NAME] [key=value ...]``.

With no arguments this runs the quickstart: a tiny Stable Diffusion backbone and a synthetic
circles data set, both created on first use under ``paths.cache_dir``, trained on the CPU.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf
from hydra.errors import InstantiationException
from omegaconf.errors import OmegaConfBaseException

from cn_lightning.errors import CnLightningError, ConfigError
from cn_lightning.utils.resolvers import register_resolvers

register_resolvers()


def instantiate_list(cfg: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a config dict (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c and "_target_" in c]


def find_resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` if given, else ``<run>/checkpoints/last.ckpt``.

    ``resume: auto`` makes a requeued or relaunched job with the same run directory continue
    where it stopped.
    """
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.exists():
            raise ConfigError(f"ckpt_path {str(path)!r} does not exist")
        return str(path)
    if cfg.get("resume", "auto") == "auto":
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        if last.exists():
            return str(last)
    return None


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    from cn_lightning.utils.checkpoint_io import AtomicCheckpointIO

    strategy = cfg.trainer.get("strategy", "auto")
    plugins = []
    if isinstance(strategy, str) and "deepspeed" not in strategy:
        plugins.append(AtomicCheckpointIO())
    return hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins or None
    )


def train(cfg: DictConfig) -> dict:
    """Compose everything from ``cfg``, fit, export the ControlNet; return the final metrics."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    # The model first: a wrong model path is the most common mistake and fails fastest.
    module = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    callbacks = instantiate_list(cfg.get("callbacks"))
    loggers = instantiate_list(cfg.get("logger"))
    trainer = build_trainer(cfg, callbacks, loggers)
    log_run_summary(cfg, trainer)
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer.fit(module, datamodule=datamodule, ckpt_path=find_resume_checkpoint(cfg))
    out = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("export_controlnet", True):
        export_dir = Path(cfg.paths.output_dir) / "controlnet"
        export_trained_controlnet(trainer, module, export_dir)
    if trainer.is_global_zero:
        print_wandb_sync_hint(loggers)
    return out


def export_trained_controlnet(trainer: L.Trainer, module, out: Path) -> None:
    """Write the trained branch as a diffusers ControlNet folder (rank 0 writes)."""
    from cn_lightning.utils.export import save_controlnet_folder

    if trainer.is_global_zero:
        save_controlnet_folder(module.controlnet, out)
        print(f"[cn_lightning] exported ControlNet to {out}")
    trainer.strategy.barrier("export_controlnet")


def log_run_summary(cfg: DictConfig, trainer: L.Trainer) -> None:
    if not trainer.is_global_zero:
        return
    per_device = cfg.data.get("batch_size", 1)
    accumulate = trainer.accumulate_grad_batches
    world = trainer.world_size
    print(
        f"[cn_lightning] run dir: {cfg.paths.output_dir} | global batch = {per_device} per device "
        f"x {world} devices x {accumulate} accumulation = {per_device * world * accumulate}"
    )


def print_wandb_sync_hint(loggers: list) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_offline", False):
            run_dir = Path(logger.experiment.dir).parent
            print(f"[cn_lightning] W&B ran offline; upload with: wandb sync {run_dir}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except (CnLightningError, OmegaConfBaseException, InstantiationException) as err:
        print(f"cn_lightning: error: {user_message(err)}", file=sys.stderr)
        sys.exit(2)


def user_message(err: BaseException) -> str:
    """One line for the user: the innermost cn_lightning error if Hydra wrapped one."""
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, CnLightningError):
        cause = cause.__cause__
    if not isinstance(cause, CnLightningError):
        cause = err
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
