"""Sample grids and condition fidelity during training, so the model can be seen learning.

At fixed optimizer steps (before training, at log-spaced early steps 1, 2, 4, ... and every
``every_n_steps``) the :class:`SampleGridLogger` samples a fixed set of held-out conditions and
prompts (the first ``num_samples`` validation samples), each under ``seeds_per_sample`` sampling
seeds, with and without the prompt. It logs a grid of the first ``grid_rows`` conditions
(condition | sample | sample without prompt | target: W&B media slider, TensorBoard, PNG under
``samples/``) and the condition fidelity over all of them: per key (``fidelity``, the metric's
own keys, ``*_no_prompt``) the mean over conditions and seeds, NaN scores left out, and its
standard error from the seeds (``<key>_se``, see :func:`round_statistics`), which
:mod:`cn_lightning.callbacks.convergence` uses as the noise of each point when it looks for the
paper's sudden convergence. Score ``(s, i)`` (seed replicate ``s`` of condition ``i``) always
starts from the noise of seed ``seed + s x num_samples + i``, so rounds differ only by weights.

When the condition has no extractor (:func:`~cn_lightning.metrics.fidelity.resolve_fidelity`
returns ``None``, after its one warning), no fidelity is computed or logged and
:attr:`SampleGridLogger.fidelity_off_reason` says why; the grids go on.

Distributed: the (condition, seed) pairs are split evenly across ranks (padded so every rank runs
exactly the same number of forward passes, which ZeRO-3's collective parameter gathering
requires), each rank samples and scores its share, and the scores (and the grid rows' images)
are gathered to every rank. No rank waits on work that another rank skips, so nothing hangs and
nothing is computed twice.
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
# Held-out conditions a fidelity series needs: with fewer, one sample flipping between rounds
# moves the mean by more than 1/16, close to the detector's smallest effect (0.1).
MIN_HELD_OUT = 16


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
    """Sample a fixed held-out set at scheduled steps; log grids, fidelity and its cost.

    Args:
        every_n_steps: sample every this many optimizer steps (0: only at start and end).
        log_spaced: also sample at optimizer steps 1, 2, 4, 8, ... below ``every_n_steps``.
        num_samples: held-out conditions (and prompts) in the fixed set; the fidelity series
            wants at least :data:`MIN_HELD_OUT` (a warning says when there are fewer).
        seeds_per_sample: sampling seeds per condition each round; with 2 or more, the spread
            across seeds gives each point's standard error (with 1, the spread across
            conditions stands in for it, a larger figure).
        grid_rows: conditions shown in the grid (the first ones, first seed).
        num_inference_steps / guidance_scale / sampler: sampling settings (``None``: the model's
            ``sample_steps`` / ``guidance_scale`` / ``sampler``: DDIM or UniPC).
        seed: replicate ``s`` of condition ``i`` starts from the noise of seed
            ``seed + s x num_samples + i``.
        source: ``val`` (the first samples of the validation shards, or of the held-out training
            shards, ``data.holdout_shards``), ``train`` (the first training batch) or ``auto``
            (val when the data module has validation samples).
        at_start: sample before the first optimizer step (the locked model's baseline).
        at_end: sample when training ends.
        out_dir: PNG folder (default ``<trainer.default_root_dir>/samples``).
        fidelity: compute condition fidelity (``val/fidelity``) of every sample.
        condition_key: the condition type for the fidelity metric (default: the data module's).
        extractor_options: options of the condition's extractor (e.g. local weights).
        min_tile_px: enlarge grid tiles smaller than this (nearest neighbour; 0: never).
    """

    COLUMNS = COLUMNS

    def __init__(
        self,
        every_n_steps: int = 500,
        log_spaced: bool = True,
        num_samples: int = MIN_HELD_OUT,
        seeds_per_sample: int = 2,
        grid_rows: int = 4,
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
        for name, value in (
            ("num_samples", num_samples),
            ("seeds_per_sample", seeds_per_sample),
            ("grid_rows", grid_rows),
        ):
            if int(value) < 1:
                raise ConfigError(f"callbacks.samples.{name} must be >= 1; got {value}")
        self.every_n_steps = int(every_n_steps or 0)
        self.log_spaced = log_spaced
        self.num_samples = int(num_samples)
        self.seeds_per_sample = int(seeds_per_sample)
        self.grid_rows = int(grid_rows)
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
        # One entry per sampling round: {"step", "fidelity", "fidelity_se", <metric>, ...}
        self.history: list[dict[str, Any]] = []
        self.total_sampling_s = 0.0
        # Why there is no fidelity series (None: there is one); read by the detector.
        self.fidelity_off_reason: str | None = (
            None if fidelity else "callbacks.samples.fidelity is false"
        )
        self._resolved: Any = None
        self._resolve_pending = bool(fidelity)
        self._train_start: float | None = None
        self._last_logged_step = -1

    @property
    def scores_fidelity(self) -> bool:
        """Whether rounds compute fidelity (on, and the condition has an extractor)."""
        return self.fidelity_off_reason is None

    # ------------------------------------------------------------------------- Lightning
    def on_train_start(self, trainer, pl_module) -> None:
        self._train_start = time.perf_counter()
        if self._resolve_pending:
            self._resolve_pending = False
            key = self.condition_key or getattr(trainer.datamodule, "condition_key", None)
            self.condition_key = key or "unknown"
            # None after one warning (from the metrics module): no extractor, no fidelity.
            self._resolved = resolve_fidelity(self.condition_key, self.extractor_options)
            if self._resolved is None:
                self.fidelity_off_reason = (
                    f"no condition extractor for {self.condition_key!r} could be built "
                    "(see the warning above; callbacks.samples.extractor_options)"
                )

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.fixed_batch is None:
            self.fixed_batch = self._broadcast(trainer, self._pick_fixed_batch(trainer, batch))
            self._check_fixed_set(self.fixed_batch)
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
        if entry.get("fidelity") is not None:
            trainer.callback_metrics["val/fidelity"] = torch.tensor(entry["fidelity"])
        if not trainer.is_global_zero:
            return None
        return self._publish(trainer, step, images, entry)

    def sampling_jobs(self) -> list[tuple[int, int]]:
        """Every ``(seed replicate s, condition i)`` of a round, condition by condition (so an
        even split across ranks gives each rank as many first-seed jobs, which also sample
        without the prompt). Replicate ``s`` of condition ``i`` starts from seed
        ``seed + s x num_samples + i``: replicate 0 keeps seed ``seed + i``."""
        n = len(self.fixed_batch["prompt"])
        return [(s, i) for i in range(n) for s in range(self.seeds_per_sample)]

    def _sample_all_ranks(self, trainer: L.Trainer, pl_module) -> tuple[dict, dict]:
        """Sample this rank's share of the jobs, score it, gather everything in job order.

        Returns the grid's images ((rows, 3, H, W) in [0, 1] per column, and the prompts) and
        the scores, ``{key: (seeds_per_sample, num_samples)}`` float tensors (NaN: undefined).
        """
        jobs = self.sampling_jobs()
        total = len(jobs)
        world, rank = max(1, trainer.world_size), trainer.global_rank
        per_rank = math.ceil(total / world)
        ids = list(range(rank * per_rank, (rank + 1) * per_rank))
        # Padded with the last job: equal work (and forward passes) on every rank.
        local = self._sample_jobs(trainer, pl_module, ids, [jobs[min(j, total - 1)] for j in ids])
        parts = _all_gather_objects(local, world)
        n = len(self.fixed_batch["prompt"])
        scores: dict[str, torch.Tensor] = {}
        rows: dict[int, dict[str, torch.Tensor]] = {}
        for part in parts:
            rows.update(part["rows"])
            for pos, job in enumerate(part["ids"]):
                if job >= total:
                    continue  # padding
                s, i = jobs[job]
                for key, values in part["scores"].items():
                    scores.setdefault(key, torch.full((self.seeds_per_sample, n), math.nan))
                    scores[key][s, i] = values[pos]
        return self._grid_images(rows), scores

    def _sample_jobs(
        self, trainer: L.Trainer, pl_module, ids: list[int], jobs: list[tuple[int, int]]
    ) -> dict:
        """Samples and scores of this rank's jobs (``ids``, padding included): ``scores``
        (key -> (len(ids),) tensor), and the grid rows' images (uint8, CPU) by condition."""
        batch = self.fixed_batch
        indices = [i for _, i in jobs]
        condition = batch["condition"][indices].float() / 255
        seeds = [self.seed + s * len(batch["prompt"]) + i for s, i in jobs]
        # Without the prompt only the first seed: the no-prompt series is a side metric, and
        # a row without guidance is still a third of a job's cost.
        first = [pos for pos, (s, _) in enumerate(jobs) if s == 0]
        samples, no_prompt = self._sample_rows(
            trainer, pl_module, condition, [batch["prompt"][i] for i in indices], seeds, first
        )
        out: dict[str, Any] = {"ids": ids, "scores": {}, "rows": {}}
        # Only the grid's rows travel as images (the rest would be gathered for nothing).
        for k, pos in enumerate(first):
            i = jobs[pos][1]
            if i < self.grid_rows:
                row = {"condition": batch["condition"][i]}
                row["samples"] = _to_uint8(samples[pos : pos + 1])[0]
                row["samples_no_prompt"] = _to_uint8(no_prompt[k : k + 1])[0]
                if "target" in batch:
                    row["target"] = batch["target"][i]
                out["rows"][i] = row
        if self.scores_fidelity:
            out["scores"].update(self._score(samples, condition))
            unguided = self._score(no_prompt, condition[first]) if first else {}
            for key, values in unguided.items():
                # NaN for the other seeds: left out of the no-prompt means.
                column = torch.full((len(jobs),), math.nan)
                column[first] = values
                out["scores"][f"{key}_no_prompt"] = column
        return out

    def _sample_rows(
        self,
        trainer: L.Trainer,
        pl_module,
        condition: torch.Tensor,
        prompts: list[str],
        seeds: list[int],
        unprompted: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One batched sampling call: every row with its prompt (guided), and the rows
        ``unprompted`` again with the empty prompt, from the same noise (both guidance branches
        would then be equal, so guidance 1: the same image at half the cost).

        Returns:
            (B, 3, H, W) and (len(unprompted), 3, H, W) images in [0, 1], fp32, CPU.
        """
        n = len(prompts)
        scale = self.guidance_scale
        if scale is None:
            scale = pl_module.hparams.guidance_scale
        was_training = pl_module.training
        pl_module.eval()
        try:
            with torch.no_grad(), precision_context(trainer, pl_module):
                both = pl_module.sample(
                    torch.cat([condition, condition[unprompted]]),
                    [*prompts, *[""] * len(unprompted)],
                    guidance_scale=[scale] * n + [1.0] * len(unprompted),
                    seed=seeds + [seeds[pos] for pos in unprompted],
                    num_inference_steps=self.num_inference_steps,
                    sampler=self.sampler,
                )
        finally:
            pl_module.train(was_training)
        both = both.float().cpu()
        return both[:n], both[n:]

    def _score(self, images: torch.Tensor, condition: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-sample fidelity scores, ``{key: (B,) float}`` (NaN where undefined)."""
        scored = condition_fidelity(images, condition, self.condition_key, _resolved=self._resolved)
        return {k: v.float() for k, v in scored.items()}

    def _grid_images(self, rows: dict[int, dict[str, torch.Tensor]]) -> dict[str, Any]:
        """The grid's columns, (rows, 3, H, W) in [0, 1], and its prompts, in condition order."""
        order = sorted(rows)
        images: dict[str, Any] = {
            c: torch.stack([rows[i][c] for i in order]).float() / 255
            for c in COLUMNS
            if c in rows[order[0]]
        }
        images["prompts"] = [self.fixed_batch["prompt"][i] for i in order]
        return images

    def _history_entry(self, step: int, scores: dict[str, torch.Tensor], elapsed: float) -> dict:
        """``{"step", <key>: mean or None, <key>_se: its standard error or None, ...,
        "fidelity_n": finite fidelity scores, "sampling_s", "sampling_share"}``."""
        entry: dict[str, Any] = {"step": int(step)}
        for key, matrix in scores.items():
            mean, se = round_statistics(matrix)
            entry[key], entry[f"{key}_se"] = mean, se
        if scores:
            entry["fidelity_n"] = int(torch.isfinite(scores["fidelity"]).sum())
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
        fid = ""
        if entry.get("fidelity") is not None:
            se = entry.get("fidelity_se")
            fid = f" | fidelity {entry['fidelity']:.3f}" + (f" ± {se:.3f}" if se else "")
        caption = f"step {step}{fid} | " + " | ".join(p or '""' for p in images["prompts"])
        metrics = {
            f"val/{k}": v
            for k, v in entry.items()
            if k not in ("step", "sampling_s", "sampling_share") and v is not None
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
        """The fixed set: the first held-out samples, else the first training batch.

        Stored on the CPU: ``condition`` and ``target`` as uint8 (B, 3, H, W), ``prompt``, and
        ``held_out`` (whether the samples are held out from training).
        """
        datamodule = trainer.datamodule
        use_val = self.source == "val" or (self.source == "auto" and _has_val_data(datamodule))
        if use_val and trainer.is_global_zero:
            batch = _first_val_samples(datamodule, self.num_samples)
        n = self.num_samples
        fixed = {
            "condition": _to_uint8(batch["condition"][:n].float()),
            "prompt": [str(p) for p in batch["prompt"][:n]],
            "held_out": bool(use_val),
        }
        if "image" in batch:
            fixed["target"] = _to_uint8((batch["image"][:n].float() + 1) / 2)
        return fixed

    def _check_fixed_set(self, fixed: dict[str, Any]) -> None:
        """One warning line when the fidelity series rests on too few or on training samples."""
        if not self.scores_fidelity:
            return
        n, held_out = len(fixed["prompt"]), fixed.get("held_out", True)
        if not held_out:
            log.warning(
                f"sample grid: fidelity is measured on {n} training samples, not held-out ones "
                "(first training batch); set data.val_shards or data.holdout_shards"
            )
        elif n < MIN_HELD_OUT:
            log.warning(
                f"sample grid: fidelity over only {n} held-out conditions (sudden-convergence "
                f"detection wants >= {MIN_HELD_OUT}); raise callbacks.samples.num_samples or "
                "give data.val_shards / data.holdout_shards more samples"
            )

    def _broadcast(self, trainer: L.Trainer, fixed: dict[str, Any]) -> dict[str, Any]:
        # Ranks see different first batches: everyone takes rank 0's so results are one set.
        if trainer.world_size > 1:
            fixed = trainer.strategy.broadcast(fixed, src=0)
        return fixed


def round_statistics(scores: torch.Tensor) -> tuple[float | None, float | None]:
    """Mean of a round's scores and its standard error from the sampling seeds.

    Args:
        scores: (S, N) scores of N conditions under S seeds; NaN where the metric is undefined.

    Returns:
        ``(mean, se)``: the mean over the finite scores (``None`` when there are none: a missing
        point) and the standard error of that mean under re-drawn seeds: the within-condition
        variance across seeds, pooled over conditions (each with its seeds' degrees of
        freedom), over the number of finite scores. The conditions are the same in every round,
        so the spread between them is not noise of the series; with one seed (or no condition
        scored twice) the spread across all scores stands in, an upper bound. ``None`` when
        there is no spread to measure (fewer than two finite scores).
    """
    values = scores.double()
    finite = torch.isfinite(values)
    count = int(finite.sum())
    if count == 0:
        return None, None
    mean = float(values[finite].mean())
    per_condition = finite.sum(dim=0)
    filled = torch.where(finite, values, torch.zeros_like(values))
    condition_mean = filled.sum(dim=0) / per_condition.clamp(min=1)
    squares = torch.where(finite, (values - condition_mean) ** 2, torch.zeros_like(values))
    dof = int((per_condition - 1).clamp(min=0).sum())
    if dof > 0:
        variance = float(squares.sum()) / dof
    elif count > 1:
        variance = float(values[finite].var())
    else:
        return mean, None
    return mean, math.sqrt(variance / count)


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


def _has_val_data(datamodule) -> bool:
    """Whether the data module has held-out samples (validation or held-out training shards)."""
    val_urls = getattr(datamodule, "val_urls", None)
    if callable(val_urls):
        return bool(val_urls())
    return bool(getattr(datamodule, "val_shards", None))


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
    "MIN_HELD_OUT",
    "SampleGridLogger",
    "images_to_grid",
    "make_grid",
    "precision_context",
    "round_statistics",
    "sampling_schedule",
]
