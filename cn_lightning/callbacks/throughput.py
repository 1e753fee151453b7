"""Throughput, data-wait, memory and model-FLOP-utilisation logging, and a Rich progress bar.

:class:`ThroughputLogger` logs (under ``perf/``), over a sliding window of recent batches:

- ``samples_per_s``: training samples per second over all ranks (per-device batch x world size);
- ``steps_per_s``: optimizer steps per second;
- ``data_wait_s`` / ``compute_s``: mean seconds per batch spent waiting for the next batch (data
  loading, host-to-device copy, other callbacks) and inside the training step, and
  ``data_wait_share``; time spent in the sample grids is excluded from both (it is logged by the
  :class:`SampleGridLogger` as ``samples/time_share``);
- ``peak_memory_gb``: peak CUDA memory allocated on this device, or the process's peak RSS on CPU;
- ``mfu``: model FLOP utilisation = FLOPs per sample x samples/s per device / peak FLOPs of the
  device for the training precision (Lightning's table), on GPU or when ``peak_tflops`` is given.

FLOPs per sample are counted once, on the first batch, with ``torch.utils.flop_counter``:
forward FLOPs of the frozen encoders (VAE, text encoder) + 3 x those of the ControlNet (forward,
weight and input gradients) + 2 x those of the locked UNet (forward, input gradients only, which
the control residuals need). With ``sd_locked=False`` the decoder's weight gradients are not
counted, so MFU is then slightly underestimated.
"""

from __future__ import annotations

import collections
import math
import resource
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import RichProgressBar
from torch.utils.flop_counter import FlopCounterMode


class ThroughputLogger(L.Callback):
    """Log samples/s, steps/s, data wait vs compute, peak memory and MFU (see module docstring).

    Args:
        window: number of recent batches the rates are averaged over.
        count_flops: count FLOPs per sample on the first batch (``auto``: on GPU or when
            ``peak_tflops`` is given; ``true``/``false`` force it).
        peak_tflops: peak TFLOP/s of one device; default Lightning's table for the GPU and the
            training precision (no MFU on CPU unless given).
    """

    def __init__(
        self, window: int = 20, count_flops: bool | str = "auto", peak_tflops: float | None = None
    ) -> None:
        self.window = window
        self.count_flops = count_flops
        self.peak_tflops = peak_tflops
        self.flops_per_sample: float | None = None
        self.peak_flops: float | None = None
        # Per batch: (wall seconds excluding sampling, wait seconds, compute seconds, samples,
        # optimizer steps completed).
        self._batches: collections.deque = collections.deque(maxlen=window)
        self._last_end: float | None = None
        self._sampling_at_end = 0.0
        self._batch_start = 0.0
        self._wait = 0.0
        self._step_before = 0

    # ------------------------------------------------------------------------- Lightning
    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.peak_flops = self._peak_flops(trainer, pl_module)
        self._last_end = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.flops_per_sample is None and self._want_flops(pl_module):
            self.flops_per_sample = count_flops_per_sample(trainer, pl_module, batch)
            now = time.perf_counter()  # the count itself is neither waiting nor training
        sampling = _sampling_seconds(trainer)
        self._wait = 0.0
        if self._last_end is not None:
            self._wait = max(0.0, now - self._last_end - (sampling - self._sampling_at_end))
        self._batch_start = now
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        compute = now - self._batch_start
        samples = len(batch["prompt"]) if "prompt" in batch else _batch_size(batch)
        steps = trainer.global_step - self._step_before
        self._batches.append((self._wait + compute, self._wait, compute, samples, steps))
        self._last_end = now
        self._sampling_at_end = _sampling_seconds(trainer)
        metrics = self.metrics(trainer.world_size, pl_module.device)
        for name, value in metrics.items():
            pl_module.log(
                f"perf/{name}", value, on_step=True, on_epoch=False, batch_size=samples,
                prog_bar=name == "samples_per_s", rank_zero_only=True,
            )

    # --------------------------------------------------------------------------- metrics
    def metrics(self, world_size: int, device: torch.device) -> dict[str, float]:
        """The current window's rates and the peak memory (see the module docstring)."""
        if not self._batches:
            return {}
        wall, wait, compute, samples, steps = (sum(col) for col in zip(*self._batches, strict=True))
        n = len(self._batches)
        out = {
            "samples_per_s": samples * world_size / wall if wall > 0 else 0.0,
            "steps_per_s": steps / wall if wall > 0 else 0.0,
            "data_wait_s": wait / n,
            "compute_s": compute / n,
            "data_wait_share": wait / wall if wall > 0 else 0.0,
            "peak_memory_gb": peak_memory_bytes(device) / 1e9,
        }
        if self.flops_per_sample and self.peak_flops and wall > 0:
            out["mfu"] = self.flops_per_sample * (samples / wall) / self.peak_flops
            out["tflops_per_device"] = self.flops_per_sample * (samples / wall) / 1e12
        return out

    def _want_flops(self, pl_module) -> bool:
        if self.count_flops == "auto":
            return pl_module.device.type == "cuda" or self.peak_tflops is not None
        return bool(self.count_flops)

    def _peak_flops(self, trainer: L.Trainer, pl_module) -> float | None:
        if self.peak_tflops is not None:
            return self.peak_tflops * 1e12
        if pl_module.device.type != "cuda":
            return None
        from lightning.fabric.utilities.throughput import get_available_flops
        from lightning.pytorch.callbacks.throughput_monitor import _plugin_to_compute_dtype

        dtype = _plugin_to_compute_dtype(trainer.precision_plugin)
        return get_available_flops(pl_module.device, dtype)

    def state_dict(self) -> dict[str, Any]:
        return {"flops_per_sample": self.flops_per_sample}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.flops_per_sample = state_dict.get("flops_per_sample")


def count_flops_per_sample(trainer: L.Trainer, pl_module, batch: dict[str, Any]) -> float:
    """Training FLOPs of one sample of ``batch`` (see the module docstring for the formula).

    Runs the encoders, the ControlNet and the full controlled UNet once on the first sample,
    without gradients, on every rank alike (ZeRO-3 gathers parameters collectively).
    """
    from cn_lightning.callbacks.samples import _precision_context

    one = {k: v[:1] for k, v in batch.items() if k in ("image", "latent", "condition", "prompt")}
    with torch.no_grad(), _precision_context(trainer, pl_module):
        with FlopCounterMode(display=False) as counter:
            if "latent" in one:
                latents = one["latent"].float() * pl_module.vae.config.scaling_factor
            else:
                latents = pl_module.encode_image(one["image"])
            text = pl_module.encode_prompt(list(one["prompt"]))
        encoders = counter.get_total_flops()
        timesteps = torch.zeros(1, dtype=torch.long, device=latents.device)
        condition = one["condition"].float()
        with FlopCounterMode(display=False) as counter:
            pl_module.controlnet(latents, timesteps, encoder_hidden_states=text,
                                 controlnet_cond=condition, return_dict=False)
        control = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            pl_module(latents, timesteps, text, condition)
        unet = counter.get_total_flops() - control
    return float(encoders + 3 * control + 2 * unet)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _sampling_seconds(trainer: L.Trainer) -> float:
    from cn_lightning.callbacks.samples import SampleGridLogger

    return sum(c.total_sampling_s for c in trainer.callbacks if isinstance(c, SampleGridLogger))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if hasattr(value, "__len__"):
                return len(value)
    return 1


class StepProgressBar(RichProgressBar):
    """Rich progress bar that also shows the optimizer step, ``max_steps`` and the run's ETA.

    The loss and samples/s appear because they are logged with ``prog_bar=True``; the ETA comes
    from the optimizer steps per second since the start of this fit (sampling included).
    """

    def __init__(self, refresh_rate: int = 1, leave: bool = True) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._fit_start: tuple[float, int] | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._fit_start = (time.perf_counter(), trainer.global_step)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        step, max_steps = trainer.global_step, trainer.max_steps
        items["step"] = f"{step}/{max_steps}" if max_steps and max_steps > 0 else str(step)
        eta = self.eta_seconds(step, max_steps)
        if eta is not None:
            items["eta"] = _format_seconds(eta)
        return items

    def eta_seconds(self, step: int, max_steps: int) -> float | None:
        if self._fit_start is None or not max_steps or max_steps <= 0:
            return None
        start_time, start_step = self._fit_start
        done = step - start_step
        if done <= 0:
            return None
        rate = done / (time.perf_counter() - start_time)
        return max(0.0, (max_steps - step) / rate)


def _format_seconds(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def make_progress_bar(enabled: bool = True, refresh_rate: int = 1, leave: bool = True) -> L.Callback:
    """The :class:`StepProgressBar`, or a do-nothing callback when ``enabled`` is false.

    Lets the config follow ``trainer.enable_progress_bar``: Lightning refuses a progress-bar
    callback when the progress bar is disabled.
    """
    if enabled:
        return StepProgressBar(refresh_rate=refresh_rate, leave=leave)
    return L.Callback()


__all__ = [
    "StepProgressBar",
    "ThroughputLogger",
    "count_flops_per_sample",
    "make_progress_bar",
    "peak_memory_bytes",
]
