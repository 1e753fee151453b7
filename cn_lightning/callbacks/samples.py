"""Sample grids and condition fidelity during training, so the model can be seen learning.

At fixed optimizer steps (before training, at log-spaced early steps 1, 2, 4, ... and every
``every_n_steps``) the :class:`SampleGridLogger` samples a fixed validation set (fixed conditions,
prompts and seeds) with and without the prompt, logs a grid condition | sample | sample without
prompt | target (W&B media slider, TensorBoard, PNG under ``samples/``) and the condition
fidelity of the samples (``val/fidelity``), which :mod:`cn_lightning.callbacks.convergence`
watches for the paper's sudden convergence.

Distributed: the fixed set is split evenly across ranks (padded so every rank runs exactly the
same number of forward passes, which ZeRO-3's collective parameter gathering requires), each rank
samples and scores its share, and the results are gathered to every rank. No rank waits on work
that another rank skips, so nothing hangs and nothing is computed twice.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from PIL import Image

from cn_lightning import log
from cn_lightning.errors import ConfigError, DataError
from cn_lightning.metrics.fidelity import condition_fidelity, resolve_fidelity

COLUMNS = ("condition", "samples", "samples_no_prompt", "target")


def make_grid(rows: list[list[torch.Tensor]], min_tile_px: int = 0) -> np.ndarray:
    """Tile images into one uint8 (H, W, 3) array; ``rows[i][j]`` is (3, h, w) in [0, 1].

    Tiles smaller than ``min_tile_px`` are enlarged by the smallest integer factor that reaches it
    (nearest neighbour, so pixels stay pixels): a 32 px toy sample is unreadable in a dashboard.
    """
    row_arrays = [torch.cat(list(r), dim=2) for r in rows]
    grid = torch.cat(row_arrays, dim=1).clamp(0, 1)
    grid = (grid.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
    tile = min(rows[0][0].shape[-2:])
    if min_tile_px and tile < min_tile_px:
        factor = math.ceil(min_tile_px / tile)
        grid = np.repeat(np.repeat(grid, factor, axis=0), factor, axis=1)
    return grid


def images_to_grid(
    images: dict[str, Any], columns: tuple[str, ...] = COLUMNS, min_tile_px: int = 0
) -> np.ndarray:
    """One row per sample with the given columns of :meth:`ControlNetModule.log_images`."""
    present = [c for c in columns if c in images]
    n = images[present[0]].shape[0]
    return make_grid([[images[c][i] for c in present] for i in range(n)], min_tile_px=min_tile_px)


def sampling_schedule(step: int, every_n_steps: int, log_spaced: bool = True) -> bool:
    """Whether optimizer step ``step`` (>= 1) is a sampling step.

    Log-spaced early steps 1, 2, 4, 8, ... below ``every_n_steps`` show the first changes, then
    every ``every_n_steps``. ``every_n_steps <= 0`` turns both off (start/end only).
    """
    if every_n_steps <= 0 or step <= 0:
        return False
    if step % every_n_steps == 0:
        return True
    return log_spaced and step < every_n_steps and (step & (step - 1)) == 0


class SampleGridLogger(L.Callback):
    """Sample a fixed set at scheduled steps; log grids, fidelity and the cost of sampling.

    Args:
        every_n_steps: sample every this many optimizer steps (0: only at start and end).
        log_spaced: also sample at optimizer steps 1, 2, 4, 8, ... below ``every_n_steps``.
        num_samples: size of the fixed set (rows of the grid).
        num_inference_steps / guidance_scale / sampler: sampling settings (``None``: the model's
            ``sample_steps`` / ``guidance_scale`` / ``sampler``: DDIM or UniPC).
        seed: sample ``i`` of the fixed set always starts from the noise of seed ``seed + i``.
        source: ``val`` (the first samples of the validation shards), ``train`` (the first
            training batch) or ``auto`` (val when the data module has validation shards).
        at_start: sample before the first optimizer step (the locked model's baseline).
        at_end: sample when training ends.
        out_dir: PNG folder (default ``<trainer.default_root_dir>/samples``).
        fidelity: compute condition fidelity (``val/fidelity``) of every sample.
        condition_key: the condition type for the fidelity metric (default: the data module's).
        extractor_options: options of a model-based condition extractor (e.g. local weights).
        min_tile_px: enlarge grid tiles smaller than this (nearest neighbour; 0: never).
    """

    COLUMNS = COLUMNS

    def __init__(
        self,
        every_n_steps: int = 500,
        log_spaced: bool = True,
        num_samples: int = 4,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int = 0,
        source: str = "auto",
        at_start: bool = True,
        at_end: bool = True,
        out_dir: str | os.PathLike | None = None,
        fidelity: bool = True,
        condition_key: str | None = None,
        extractor_options: dict[str, Any] | None = None,
        min_tile_px: int = 0,
    ) -> None:
        if source not in ("auto", "val", "train"):
            raise ConfigError(f"source must be auto, val or train; got {source!r}")
        self.every_n_steps = int(every_n_steps or 0)
        self.log_spaced = log_spaced
        self.num_samples = num_samples
        self.num_inference_steps = num_inference_steps
        self.guidance_scale = guidance_scale
        self.sampler = sampler
        self.seed = seed
        self.source = source
        self.at_start = at_start
        self.at_end = at_end
        self.out_dir = Path(out_dir) if out_dir else None
        self.fidelity = fidelity
        self.condition_key = condition_key
        self.extractor_options = dict(extractor_options or {})
        self.min_tile_px = int(min_tile_px or 0)
        self.fixed_batch: dict[str, Any] | None = None
        # One entry per sampling round: {"step", "fidelity", <metric>, "fidelity_no_prompt", ...}
        self.history: list[dict[str, Any]] = []
        self.total_sampling_s = 0.0
        self._resolved: tuple[str, Any] | None = None
        self._train_start: float | None = None
        self._last_logged_step = -1

    # ------------------------------------------------------------------------- Lightning
    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.perf_counter()
        if self.fidelity and self._resolved is None:
            key = self.condition_key or getattr(trainer.datamodule, "condition_key", None)
            self.condition_key = key or "unknown"
            self._resolved = resolve_fidelity(self.condition_key, self.extractor_options)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fixed_batch is None:
            self.fixed_batch = self._broadcast(trainer, self._pick_fixed_batch(trainer, batch))
        if self.at_start and trainer.global_step == 0 and not self.history:
            self.log_samples(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if sampling_schedule(trainer.global_step, self.every_n_steps, self.log_spaced):
            self.log_samples(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.at_end:
            self.log_samples(trainer, pl_module)

    def state_dict(self) -> dict[str, Any]:
        # The fixed set travels with the checkpoint so a resumed run samples the same images.
        return {
            "history": self.history,
            "fixed_batch": self.fixed_batch,
            "total_sampling_s": self.total_sampling_s,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.fixed_batch = state_dict.get("fixed_batch")
        self.total_sampling_s = float(state_dict.get("total_sampling_s", 0.0))
        if self.history:
            self._last_logged_step = self.history[-1]["step"]

    # -------------------------------------------------------------------------- sampling
    def log_samples(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Path | None:
        """Sample the fixed set now (every rank its share); rank 0 writes and logs the grid.

        Must be called on every rank at the same step (it holds collectives).
        """
        step = trainer.global_step
        if self.fixed_batch is None or step == self._last_logged_step:
            return None
        self._last_logged_step = step
        start = time.perf_counter()
        images, scores = self._sample_all_ranks(trainer, pl_module)
        elapsed = time.perf_counter() - start
        self.total_sampling_s += elapsed
        entry = self._history_entry(step, scores, elapsed)
        self.history.append(entry)
        if self.fidelity:
            trainer.callback_metrics["val/fidelity"] = torch.tensor(entry["fidelity"])
        if not trainer.is_global_zero:
            return None
        return self._publish(trainer, step, images, entry)

    def _sample_all_ranks(self, trainer: L.Trainer, pl_module) -> tuple[dict, dict]:
        """Sample this rank's share of the fixed set, score it, gather everything in order."""
        batch = self.fixed_batch
        n = len(batch["prompt"])
        world, rank = max(1, trainer.world_size), trainer.global_rank
        per_rank = math.ceil(n / world)
        # Padded with the last sample: equal work (and forward passes) on every rank.
        indices = [min(i, n - 1) for i in range(rank * per_rank, (rank + 1) * per_rank)]
        local = self._sample_indices(trainer, pl_module, indices)
        local["index"] = [i for i in range(rank * per_rank, (rank + 1) * per_rank)]
        parts = _all_gather_objects(local, world)
        order = sorted((i, part, j) for part in parts for j, i in enumerate(part["index"]) if i < n)
        images = {
            c: torch.stack([part[c][j] for _, part, j in order]).float() / 255
            for c in COLUMNS
            if c in parts[0]
        }
        images["prompts"] = [batch["prompt"][i] for i, _, _ in order]
        scores = {
            k: torch.stack([part["scores"][k][j] for _, part, j in order])
            for k in parts[0]["scores"]
        }
        return images, scores

    def _sample_indices(self, trainer: L.Trainer, pl_module, indices: list[int]) -> dict:
        """Samples (uint8, CPU) and fidelity scores for the fixed-set ``indices``."""
        batch = self.fixed_batch
        condition = batch["condition"][indices].float() / 255
        prompts = [batch["prompt"][i] for i in indices]
        seeds = [self.seed + i for i in indices]
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), precision_context(trainer, pl_module):
                samples, no_prompt = pl_module.sample_with_and_without_prompt(
                    condition,
                    prompts,
                    seed=seeds,
                    guidance_scale=self.guidance_scale,
                    num_inference_steps=self.num_inference_steps,
                    sampler=self.sampler,
                )
                samples, no_prompt = samples.float().cpu(), no_prompt.float().cpu()
        finally:
            pl_module.train(was_training)
        out = {
            "condition": batch["condition"][indices],
            "samples": _to_uint8(samples),
            "samples_no_prompt": _to_uint8(no_prompt),
            "scores": {},
        }
        if "target" in batch:
            out["target"] = batch["target"][indices]
        if self.fidelity:
            for name, images in (("", samples), ("_no_prompt", no_prompt)):
                scored = condition_fidelity(
                    images, condition, self.condition_key, _resolved=self._resolved
                )
                out["scores"].update({k + name: v for k, v in scored.items()})
        return out

    def _history_entry(self, step: int, scores: dict[str, torch.Tensor], elapsed: float) -> dict:
        entry: dict[str, Any] = {"step": int(step)}
        entry.update({k: float(v.float().mean()) for k, v in scores.items()})
        entry["sampling_s"] = round(elapsed, 4)
        entry["sampling_share"] = round(self.time_share(), 4)
        return entry

    def time_share(self) -> float:
        """Share of the wall time since training started spent sampling here."""
        if self._train_start is None:
            return 0.0
        total = time.perf_counter() - self._train_start
        return self.total_sampling_s / total if total > 0 else 0.0

    # --------------------------------------------------------------------------- logging
    def _publish(self, trainer: L.Trainer, step: int, images: dict, entry: dict) -> Path:
        grid = images_to_grid(images, COLUMNS, min_tile_px=self.min_tile_px)
        path = self._png_path(trainer, step)
        Image.fromarray(grid).save(path)
        fid = f" | fidelity {entry['fidelity']:.3f}" if "fidelity" in entry else ""
        caption = f"step {step}{fid} | " + " | ".join(p or '""' for p in images["prompts"])
        metrics = {
            f"val/{k}": v
            for k, v in entry.items()
            if k not in ("step", "sampling_s", "sampling_share")
        }
        metrics["samples/time_s"] = entry["sampling_s"]
        metrics["samples/time_share"] = entry["sampling_share"]
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, WandbLogger):
                logger.log_image("samples/grid", [grid], step=step, caption=[caption])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples/grid", grid, step, dataformats="HWC")
                logger.experiment.add_text("samples/caption", caption, step)
        log.info(
            f"samples at step {step}{fid}, {entry['sampling_s']:.1f} s "
            f"({100 * entry['sampling_share']:.1f}% of training time) -> {path}"
        )
        return path

    def _png_path(self, trainer: L.Trainer, step: int) -> Path:
        out = self.out_dir or Path(trainer.default_root_dir) / "samples"
        out.mkdir(parents=True, exist_ok=True)
        return out / f"step_{step:07d}.png"

    # ------------------------------------------------------------------------- fixed set
    def _pick_fixed_batch(self, trainer: L.Trainer, batch: dict[str, Any]) -> dict[str, Any]:
        """The fixed set: the first validation samples, else the first training batch.

        Stored on the CPU: ``condition`` and ``target`` as uint8 (B, 3, H, W), ``prompt``.
        """
        use_val = self.source == "val" or (
            self.source == "auto" and getattr(trainer.datamodule, "val_shards", None)
        )
        if use_val and trainer.is_global_zero:
            batch = _first_val_samples(trainer.datamodule, self.num_samples)
        n = self.num_samples
        if len(batch["prompt"]) < n:
            log.warning(
                f"sample grid: only {len(batch['prompt'])} samples available for num_samples={n} "
                "(the fixed set comes from one batch; set data.val_shards for more)"
            )
        fixed = {
            "condition": _to_uint8(batch["condition"][:n].float()),
            "prompt": [str(p) for p in batch["prompt"][:n]],
        }
        if "image" in batch:
            fixed["target"] = _to_uint8((batch["image"][:n].float() + 1) / 2)
        return fixed

    def _broadcast(self, trainer: L.Trainer, fixed: dict[str, Any]) -> dict[str, Any]:
        # Ranks see different first batches: everyone takes rank 0's so results are one set.
        if trainer.world_size > 1:
            fixed = trainer.strategy.broadcast(fixed, src=0)
        return fixed


# ----------------------------------------------------------------------------- helpers
def _first_val_samples(datamodule, n: int) -> dict[str, Any]:
    """The first ``n`` samples of one pass over the validation shards (as a batch dict)."""
    dataset = datamodule.build_val_dataset(rank=0, world_size=1)
    parts: dict[str, list] = {"condition": [], "image": [], "prompt": []}
    for batch in dataset:
        for key in parts:
            if key in batch:
                parts[key].extend(list(batch[key]))
        if len(parts["prompt"]) >= n:
            break
    if not parts["prompt"]:
        skips = getattr(dataset, "skips", None)
        if skips is not None and skips.counts:
            why = f"every sample read was skipped, {skips.describe()}"
        else:
            why = "they hold no samples"
        raise DataError(f"val_shards: no sample for the sample grid: {why}")
    out: dict[str, Any] = {"prompt": parts["prompt"][:n]}
    for key in ("condition", "image"):
        if parts[key]:
            out[key] = torch.stack(parts[key][:n])
    return out


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → uint8 CPU tensor (4x smaller to gather and checkpoint)."""
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)


def _all_gather_objects(obj: Any, world: int) -> list[Any]:
    """Every rank's ``obj`` in rank order (just ``[obj]`` without a process group)."""
    if world <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def precision_context(trainer: L.Trainer, pl_module) -> contextlib.AbstractContextManager:
    """Sample under the training precision: the precision plugin's forward context, plus
    autocast when the trainable weights themselves are half precision (DeepSpeed fp16/bf16),
    since ``sample`` feeds fp32 latents."""
    stack = contextlib.ExitStack()
    stack.enter_context(trainer.precision_plugin.forward_context())
    dtype = next(pl_module.controlnet.parameters()).dtype
    if dtype in (torch.float16, torch.bfloat16) and not torch.is_autocast_enabled(
        pl_module.device.type
    ):
        stack.enter_context(torch.autocast(pl_module.device.type, dtype=dtype))
    return stack


__all__ = [
    "SampleGridLogger",
    "images_to_grid",
    "make_grid",
    "precision_context",
    "sampling_schedule",
]
