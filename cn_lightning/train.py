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
import torch
from hydra.errors import InstantiationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cn_lightning import log
from cn_lightning.batching import BatchPlan
from cn_lightning.config import register_resolvers
from cn_lightning.errors import CnLightningError, ConfigError, error_line
from cn_lightning.models.checkpoints import (
    AtomicCheckpointIO,
    checkpoint_step,
    export_from_trainer,
    newest_run_checkpoint,
)
from cn_lightning.serialization import install_safe_loading

register_resolvers()


def instantiate_list(cfg: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a config dict (callbacks, loggers)."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c and "_target_" in c]


def build_callbacks(cfg: DictConfig | None, loggers: list) -> list:
    """The callbacks of ``cfg`` (``cfg.callbacks``). Without a logger (``logger=none``) the
    ``LearningRateMonitor`` is left out: it has nothing to log to, and Lightning refuses it."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    callbacks = instantiate_list(cfg)
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    return callbacks


def find_resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` if given, else the run directory's newest.

    With ``resume: auto`` the candidates are ``<run>/checkpoints/last.ckpt`` and the
    ``<run>/hpc_ckpt_N.ckpt`` Lightning writes when SLURM signals a requeue; the most recently
    written one wins, so a requeued or relaunched job with the same run directory continues
    where it stopped. Files and DeepSpeed checkpoint directories both count.
    """
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
        if not path.exists():
            raise ConfigError(f"ckpt_path {str(path)!r} does not exist")
        return str(path)
    if cfg.get("resume", "auto") != "auto":
        return None
    newest = newest_run_checkpoint(cfg.paths.output_dir)
    return str(newest) if newest else None


def check_precision(cfg: DictConfig) -> None:
    """Refuse, before anything is built, precision and strategy pairs that cannot train a
    ControlNet correctly, rather than crashing or degrading mid-run."""
    precision = str(cfg.trainer.get("precision", "32-true"))
    strategy = cfg.trainer.get("strategy", "auto")
    if precision in ("bf16-true", "16-true", "bf16", "16", "half") and not uses_deepspeed(strategy):
        raise ConfigError(
            f"trainer.precision={precision} casts the trainable ControlNet itself to half "
            "precision, with no fp32 master weights, under this strategy: use bf16-mixed (or "
            "16-mixed), or a DeepSpeed strategy, which keeps fp32 master weights"
        )
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if precision in ("16-mixed", "16") and on_cpu and not uses_deepspeed(strategy):
        # Lightning would silently train in bf16 instead.
        raise ConfigError(
            f"trainer.precision={precision} (fp16 autocast with loss scaling) needs a GPU; on "
            "the CPU use trainer.precision=bf16-mixed"
        )


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU trainer (the experiments' ``trainer=gpu``) on a machine without one: say how to run
    on the CPU instead of Lightning's ``No supported gpu backend found!``."""
    if str(cfg.trainer.get("accelerator", "auto")) not in ("gpu", "cuda"):
        return
    mps = getattr(torch.backends, "mps", None)
    if torch.cuda.is_available() or (mps is not None and mps.is_available()):
        return
    raise ConfigError(
        f"trainer.accelerator={cfg.trainer.accelerator} but this machine has no GPU: add "
        "trainer=cpu to run on the CPU (e.g. to smoke-test a recipe on small data)"
    )


def uses_deepspeed(strategy: object) -> bool:
    """True for a DeepSpeed strategy given as a name, a config dict or an instance."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    if isinstance(strategy, DeepSpeedStrategy):
        return True
    if isinstance(strategy, str):
        return "deepspeed" in strategy
    if isinstance(strategy, DictConfig | dict):
        return "deepspeed" in str(strategy.get("_target_", "")).lower()
    return False


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` (strategy included), with atomic checkpoint writes.

    DeepSpeed writes its own checkpoint directories (no ``CheckpointIO``); every other strategy,
    named or given as an object (DDP, FSDP with full state dicts), gets :class:`AtomicCheckpointIO`.
    The gradient accumulation that reaches ``logical_batch_size`` is set once the Trainer knows
    its world size (devices x nodes), before ``fit``.
    """
    plugins = [] if uses_deepspeed(cfg.trainer.get("strategy", "auto")) else [AtomicCheckpointIO()]
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins or None
    )
    plan = batch_plan(cfg, trainer.world_size, trainer.num_nodes)
    trainer.accumulate_grad_batches = plan.accumulate_grad_batches
    return trainer


def batch_plan(cfg: DictConfig, world_size: int, num_nodes: int = 1) -> BatchPlan:
    """The :class:`BatchPlan` of ``cfg`` on ``world_size`` processes (``data.batch_size`` per
    device; ``logical_batch_size`` or ``trainer.accumulate_grad_batches``)."""
    return BatchPlan.resolve(
        per_device_batch_size=int(cfg.data.get("batch_size", 1)),
        world_size=world_size,
        num_nodes=num_nodes,
        logical_batch_size=cfg.get("logical_batch_size"),
        accumulate_grad_batches=cfg.trainer.get("accumulate_grad_batches"),
    )


def resolve_accumulation(cfg: DictConfig, world_size: int) -> int:
    """Accumulation steps: ``logical_batch_size / (per-device batch x world size)`` when the
    config states a logical batch, else ``trainer.accumulate_grad_batches``."""
    return batch_plan(cfg, world_size).accumulate_grad_batches


class _StartStepReporter(L.Callback):
    """Says the optimizer step training starts at (0, or the resumed step)."""

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        log.info(f"training starts at step {trainer.global_step}")


def train(cfg: DictConfig) -> dict:
    """Compose everything from ``cfg``, fit, export the ControlNet; return the final metrics."""
    install_safe_loading()  # every checkpoint read, ours and DeepSpeed's, with an allow-list
    check_precision(cfg)
    check_accelerator(cfg)
    resume_from = find_resume_checkpoint(cfg)
    done = checkpoint_step(resume_from) if resume_from else 0
    max_steps = int(cfg.trainer.get("max_steps") or -1)
    if resume_from and 0 < max_steps <= done:
        # Before anything is built or logged: a finished run is left exactly as it is.
        log.info(
            f"this run already finished: {resume_from} holds step {done} of "
            f"trainer.max_steps={max_steps}; nothing to do (raise trainer.max_steps to "
            "train on, or set hydra.run.dir for a new run)"
        )
        return {}
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    # The model first: a wrong model path is the most common mistake and fails fastest.
    module = hydra.utils.instantiate(cfg.model)
    datamodule = hydra.utils.instantiate(cfg.data)
    loggers = instantiate_list(cfg.get("logger"))
    callbacks = [*build_callbacks(cfg.get("callbacks"), loggers), _StartStepReporter()]
    trainer = build_trainer(cfg, callbacks, loggers)
    log_run_summary(cfg, trainer)
    hparams = OmegaConf.to_container(cfg, resolve=True)
    hparams["scale"] = batch_plan(cfg, trainer.world_size, trainer.num_nodes).as_dict()
    for logger in loggers:
        logger.log_hyperparams(hparams)
    if resume_from:
        log.info(f"resuming from {resume_from} (step {done})")
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    out = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("export_controlnet", True):
        export_dir = Path(cfg.paths.output_dir) / "controlnet"
        export_from_trainer(trainer, module, export_dir)
    if trainer.is_global_zero:
        print_wandb_sync_hint(loggers)
    return out


def log_run_summary(cfg: DictConfig, trainer: L.Trainer) -> None:
    """Say the run directory, the global batch and how it is made (rank 0)."""
    if not trainer.is_global_zero:
        return
    plan = batch_plan(cfg, trainer.world_size, trainer.num_nodes)
    log.info(
        f"run dir: {cfg.paths.output_dir} | global batch = "
        f"{plan.describe(cfg.get('logical_batch_size'))} "
        f"| strategy {type(trainer.strategy).__name__}"
    )
    print_cluster_summary(trainer)


def print_cluster_summary(trainer: L.Trainer) -> None:
    """Say when SLURM was detected and whether Lightning will requeue the job on its signal."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    env = trainer._accelerator_connector.cluster_environment
    if isinstance(env, SLURMEnvironment):
        signal = getattr(env.requeue_signal, "name", env.requeue_signal)
        requeue = f"auto-requeue on {signal}" if env.auto_requeue else "no auto-requeue"
        log.info(f"SLURM job {env.job_id()}: {requeue}")


def print_wandb_sync_hint(loggers: list) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and getattr(logger, "_offline", False):
            run_dir = Path(logger.experiment.dir).parent
            log.info(f"W&B ran offline; upload with: wandb sync {run_dir}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except SIGTERMException:
        # RunCheckpoint saved last.ckpt at the step boundary (unless mid-accumulation).
        log.warning(
            "stopped by SIGTERM; relaunch the same command to resume from "
            f"{Path(cfg.paths.output_dir) / 'checkpoints' / 'last.ckpt'}"
        )
        sys.exit(128 + 15)
    except (CnLightningError, OmegaConfBaseException, InstantiationException) as err:
        # Every rank meets the same error (the checks agree across ranks); one line says it.
        if rank_zero_only.rank == 0:
            print(error_line(err), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    main()
