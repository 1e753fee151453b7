"""Sample grids during training: condition | sample | sample without prompt | target."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image


def make_grid(rows: list[list[torch.Tensor]]) -> np.ndarray:
    """Tile images into one uint8 (H, W, 3) array; ``rows[i][j]`` is (3, h, w) in [0, 1]."""
    row_arrays = [torch.cat(list(r), dim=2) for r in rows]
    grid = torch.cat(row_arrays, dim=1).clamp(0, 1)
    return (grid.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)


def images_to_grid(images: dict[str, Any], columns: tuple[str, ...]) -> np.ndarray:
    """One row per sample with the given columns of :meth:`ControlNetModule.log_images`."""
    present = [c for c in columns if c in images]
    n = images[present[0]].shape[0]
    return make_grid([[images[c][i] for c in present] for i in range(n)])


class SampleGridLogger(L.Callback):
    """Every ``every_n_steps`` optimizer steps, sample a fixed batch and log a grid.

    The fixed batch (conditions, prompts, seeds) is taken once from the first training batch so
    grids at different steps are directly comparable. Grids go to ``<run dir>/samples`` as PNG
    and to W&B / TensorBoard when those loggers are used.
    """

    COLUMNS = ("condition", "samples", "samples_no_prompt", "target")

    def __init__(
        self,
        every_n_steps: int = 500,
        num_samples: int = 4,
        out_dir: str | os.PathLike | None = None,
        at_start: bool = True,
        at_end: bool = True,
        seed: int = 0,
    ) -> None:
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.out_dir = Path(out_dir) if out_dir else None
        self.at_start = at_start
        self.at_end = at_end
        self.seed = seed
        self.fixed_batch: dict[str, Any] | None = None
        self._last_logged_step = -1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fixed_batch is None:
            self.fixed_batch = {
                k: (v[: self.num_samples].detach().clone() if torch.is_tensor(v) else list(v[: self.num_samples]))
                for k, v in batch.items()
                if k in ("condition", "image", "prompt")
            }
            if self.at_start and trainer.global_step == 0:
                self.log_samples(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.log_samples(trainer, pl_module)

    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Sample the fixed batch now; rank 0 writes and logs the grid."""
        step = trainer.global_step
        if self.fixed_batch is None or step == self._last_logged_step:
            return None
        self._last_logged_step = step
        was_training = pl_module.training
        pl_module.eval()
        try:
            images = pl_module.log_images(self.fixed_batch, n=self.num_samples, seed=self.seed)
        finally:
            pl_module.train(was_training)
        if not trainer.is_global_zero:
            return None
        grid = images_to_grid(images, self.COLUMNS)
        path = self._png_path(trainer, step)
        Image.fromarray(grid).save(path)
        caption = f"step {step}: " + " | ".join(images["prompts"])
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [grid], step=step, caption=[caption])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", grid, step, dataformats="HWC")
        return path

    def _png_path(self, trainer: L.Trainer, step: int) -> Path:
        out = self.out_dir or Path(trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        return out / f"step_{step:07d}.png"
