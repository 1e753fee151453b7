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
import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks.progress import ProgressBar
from torch.utils.flop_counter import FlopCounterMode

from cn_lightning import log
from cn_lightning.atomic import write_json_atomic
from cn_lightning.loggers import write_metrics


class ThroughputLogger(L.Callback):
    """Log samples/s, steps/s, data wait vs compute, peak memory and MFU (see module docstring).

    A batch costs two clock reads and a deque append; the window's rates are computed and written
    straight to the loggers (global rank 0) only every ``trainer.log_every_n_steps`` optimizer
    steps, when Lightning writes its own metrics, and FLOPs are counted once. At the end of
    training a one-line summary (steady s/step, data wait, the sample grids' share of the time) is
    logged, written to the loggers' run summary and, with ``summary_path``, to a JSON file.

    Args:
        window: number of recent batches the rates are averaged over.
        count_flops: count FLOPs per sample on the first batch (``auto``: on GPU or when
            ``peak_tflops`` is given; ``true``/``false`` force it).
        peak_tflops: peak TFLOP/s of one device; default Lightning's table for the GPU and the
            training precision (no MFU on CPU unless given).
        summary_path: where to write the end-of-training summary as JSON (rank 0; ``None``: no
            file).
    """

    def __init__(
        self,
        window: int = 20,
        count_flops: bool | str = "auto",
        peak_tflops: float | None = None,
        summary_path: str | os.PathLike | None = None,
    ) -> None:
        self.window = window
        self.count_flops = count_flops
        self.peak_tflops = peak_tflops
        self.summary_path = Path(summary_path) if summary_path else None
        self.flops_per_sample: float | None = None
        self.peak_flops: float | None = None
        # Per batch: (wall seconds excluding sampling, wait seconds, compute seconds, samples,
        # optimizer steps completed).
        self._batches: collections.deque = collections.deque(maxlen=window)
        self._last_end: float | None = None
        self._sampling_at_end = 0.0
        self._batch_start = 0.0
        self._sampling_at_start = 0.0
        self._wait = 0.0
        self._step_before = 0
        self._last_logged_step = -1
        # (optimizer step, s/step of the window then, data-wait share) at every log point.
        self.windows: list[tuple[int, float, float]] = []
        self._train_start: tuple[float, float, int] | None = None  # (clock, sampling s, step)

    # ------------------------------------------------------------------------- Lightning
    def on_train_start(self, trainer, pl_module) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.peak_flops = self._peak_flops(trainer, pl_module)
        self._last_end = None
        self._train_start = (time.perf_counter(), _sampling_seconds(trainer), trainer.global_step)

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
        self._sampling_at_start = sampling
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = time.perf_counter()
        # A sample grid drawn in this batch's end hooks (they run before this one) is not
        # training: leave it out, as between batches.
        sampling = _sampling_seconds(trainer)
        compute = max(0.0, now - self._batch_start - (sampling - self._sampling_at_start))
        samples = len(batch["prompt"]) if "prompt" in batch else _batch_size(batch)
        step = trainer.global_step
        self._batches.append(
            (self._wait + compute, self._wait, compute, samples, step - self._step_before)
        )
        self._last_end = now
        self._sampling_at_end = sampling
        every = max(1, trainer.log_every_n_steps)
        if step > self._step_before and step % every == 0 and step != self._last_logged_step:
            self._last_logged_step = step
            self._log(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module) -> None:
        summary = self.summary(trainer)
        if summary is None or not trainer.is_global_zero:
            return
        step_s, wait = summary["step_s"], summary["data_wait_share"]
        log.info(
            f"throughput: {summary['steps']} steps in {summary['train_s']:.1f} s, steady "
            + (f"{step_s:.4f} s/step (median window), " if step_s is not None else "- s/step, ")
            + (f"data wait {100 * wait:.1f}% of a step, " if wait is not None else "")
            + f"sample grids {summary['sampling_s']:.1f} s "
            f"({100 * summary['sampling_share']:.1f}% of the training time)"
        )
        values = {f"perf/run_{k}": v for k, v in summary.items() if isinstance(v, (int, float))}
        for logger in trainer.loggers:
            _update_run_summary(logger, values, trainer.global_step)
        if self.summary_path is not None:
            write_json_atomic(self.summary_path, summary)

    def _log(self, trainer, pl_module, step: int) -> None:
        metrics = self.metrics(trainer.world_size, pl_module.device)
        if not metrics:
            return
        if metrics["steps_per_s"] > 0:
            self.windows.append((step, 1 / metrics["steps_per_s"], metrics["data_wait_share"]))
        write_metrics(trainer, {f"perf/{k}": v for k, v in metrics.items()}, step)

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

    def summary(self, trainer) -> dict[str, Any] | None:
        """The run so far in this process: steps, training wall time, steady s/step (the median
        window after the first ``window`` steps), data-wait share, sample-grid time and share."""
        if self._train_start is None:
            return None
        clock, sampling0, step0 = self._train_start
        train_s = time.perf_counter() - clock
        sampling_s = _sampling_seconds(trainer) - sampling0
        windows = self.windows
        if not windows and self._batches:  # a run shorter than one logging interval
            wall, wait, _, _, steps = (sum(col) for col in zip(*self._batches, strict=True))
            if steps and wall > 0:
                windows = [(trainer.global_step, wall / steps, wait / wall)]
        steady = [w for w in windows if w[0] - step0 >= self.window] or windows
        return {
            "steps": trainer.global_step - step0,
            "train_s": round(train_s, 3),
            "step_s": statistics.median(w[1] for w in steady) if steady else None,
            "data_wait_share": statistics.median(w[2] for w in steady) if steady else None,
            "sampling_s": round(sampling_s, 3),
            "sampling_share": sampling_s / train_s if train_s > 0 else 0.0,
            "step_s_windows": [[s, round(t, 6)] for s, t, _ in windows],
        }

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


def _update_run_summary(logger, values: dict[str, float], step: int) -> None:
    """Put ``values`` into a logger's run summary (W&B), or log them once at ``step``."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger):
        logger.experiment.summary.update(values)
    else:
        logger.log_metrics(values, step=step)


def count_flops_per_sample(trainer: L.Trainer, pl_module, batch: dict[str, Any]) -> float:
    """Training FLOPs of one sample of ``batch`` (see the module docstring for the formula).

    Runs the encoders, the ControlNet and the full controlled UNet once on the first sample,
    without gradients, on every rank alike (ZeRO-3 gathers parameters collectively).
    """
    from cn_lightning.callbacks.samples import precision_context

    keys = ("image", "latent", "condition", "prompt", "original_size", "crop_top_left")
    one = {k: v[:1] for k, v in batch.items() if k in keys}
    with torch.no_grad(), precision_context(trainer, pl_module):
        with FlopCounterMode(display=False) as counter:
            if "latent" in one:
                latents = one["latent"].float() * pl_module.vae.config.scaling_factor
            else:
                latents = pl_module.encode_image(one["image"])
            text, pooled = pl_module.encode_text(list(one["prompt"]))
        encoders = counter.get_total_flops()
        timesteps = torch.zeros(1, dtype=torch.long, device=latents.device)
        condition = one["condition"].float()
        # SDXL's pooled prompt and size/crop ids (None for SD 1.x/2.x).
        added = pl_module.added_cond_kwargs(pooled, tuple(condition.shape[-2:]), one)
        # One controlled forward, through the FSDP root under FSDP (forward_entry); the branch's
        # share is read from the running count as the ControlNet enters and leaves.
        forward = pl_module.forward_entry() if hasattr(pl_module, "forward_entry") else pl_module
        marks: list[int] = []
        hooks = [
            pl_module.controlnet.register_forward_pre_hook(
                lambda *_: marks.append(counter.get_total_flops())
            ),
            pl_module.controlnet.register_forward_hook(
                lambda *_: marks.append(counter.get_total_flops())
            ),
        ]
        try:
            with FlopCounterMode(display=False) as counter:
                forward(latents, timesteps, text, condition, added)
        finally:
            for hook in hooks:
                hook.remove()
        control = marks[1] - marks[0]
        unet = counter.get_total_flops() - control
    return float(encoders + 3 * control + 2 * unet)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or this process's peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _sampling_seconds(trainer: L.Trainer) -> float:
    """Seconds the trainer's sample-grid callbacks have spent sampling (in this process)."""
    from cn_lightning.callbacks.samples import SampleGridLogger

    return sum(c.total_sampling_s for c in trainer.callbacks if isinstance(c, SampleGridLogger))


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict):
        for value in batch.values():
            if hasattr(value, "__len__"):
                return len(value)
    return 1


class StepProgressBar(ProgressBar):
    """A one-line progress bar in optimizer steps: ``step 123/1500``, samples/s, loss and ETA.

    Counts optimizer steps (``trainer.global_step``), not batches, so it is right under gradient
    accumulation, after a resume (it starts at the resumed step) and on an endless stream (no
    epochs: the total is ``trainer.max_steps``, else Lightning's estimate when finite, else none).

    - samples/s: samples of all ranks (per-device batch x world size) per wall-clock second over
      the last 20 reads (about 10 s when batches are quick), sample grids included;
    - ETA: the remaining steps at the optimizer-step rate since training started *in this
      process* (a resumed run does not count the steps it did not run);
    - loss: ``train/loss`` as logged with ``prog_bar=True``, plus any other progress-bar metric.

    Cheap: a batch adds a counter and a clock read; the step and the logged values (which
    Lightning already turns into Python numbers after every batch) are read at most
    ``refresh_per_second`` times a second. On a terminal (or in Jupyter) it is a live Rich line,
    redrawn from those values (so the clock moves during sample grids); elsewhere (a SLURM log, a
    pipe) it prints a plain line at most every ``log_every_s`` seconds when the step moved, and
    one at the end.

    Args:
        refresh_per_second: most reads (and redraws) per second.
        leave: keep the finished bar on screen.
        log_every_s: seconds between plain lines when the output is not a terminal.
        console_kwargs: arguments of ``rich.console.Console`` (e.g. ``force_terminal``).
    """

    def __init__(
        self,
        refresh_per_second: float = 2.0,
        leave: bool = True,
        log_every_s: float = 30.0,
        console_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.refresh_per_second = refresh_per_second
        self.leave = leave
        self.log_every_s = log_every_s
        self.console_kwargs = dict(console_kwargs or {})
        self._enabled = True
        self._console = None
        self._live = None
        self._total: int | None = None
        self._start: tuple[float, int] | None = None  # (clock, step) when this process started
        self._step = 0
        self._samples = 0
        self._rates: collections.deque = collections.deque(maxlen=20)  # (clock, samples)
        self._metrics: dict[str, Any] = {}
        self._last_read = -math.inf
        self._last_line: tuple[float, int] | None = None

    # -------------------------------------------------------------------------- Lightning
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def on_train_start(self, trainer, pl_module) -> None:
        now = time.perf_counter()
        self._start = (now, trainer.global_step)
        self._step, self._samples, self._metrics = trainer.global_step, 0, {}
        self._rates.clear()
        self._rates.append((now, 0))
        self._last_line = None
        self._total = _total_steps(trainer)
        if not self._enabled:
            return
        from rich.console import Console

        self._console = Console(**self.console_kwargs)
        live = self._console.is_terminal or self._console.is_jupyter
        if live and not self._console.is_dumb_terminal:
            from rich.live import Live

            self._live = Live(
                get_renderable=self._renderable,
                console=self._console,
                refresh_per_second=min(self.refresh_per_second, 4.0),
                transient=not self.leave,
                redirect_stdout=True,
                redirect_stderr=True,
            )
            self._live.start(refresh=True)
        else:
            self._print_line(now)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += _samples_in(batch) * max(1, trainer.world_size)
        if not self._enabled or self._console is None:
            return
        now = time.perf_counter()
        if now - self._last_read >= 1.0 / max(self.refresh_per_second, 1e-6):
            self._read(trainer, now)
            self._show(now)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._enabled and self._console is not None:
            now = time.perf_counter()
            self._read(trainer, now)
            self._show(now, final=True)
        self._stop()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._stop()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()  # the console and the live display hold locks
        state["_console"] = state["_live"] = None
        return state

    # ------------------------------------------------------------------------------ display
    def status(self, now: float | None = None) -> dict[str, str]:
        """The fields shown, in order: step, percent, samples/s, loss, other metrics, elapsed,
        ETA (from the values read at the last refresh)."""
        now = time.perf_counter() if now is None else now
        step, total = self._step, self._total
        out = {"step": f"step {step}/{total}" if total else f"step {step}"}
        if total:
            out["percent"] = f"{100 * min(step, total) / total:.0f}%"
        rate = self.samples_per_second(now)
        out["samples_per_s"] = f"{rate:.3g} samples/s" if rate is not None else "- samples/s"
        metrics = {
            k: v for k, v in self._metrics.items() if k not in ("v_num", "perf/samples_per_s")
        }
        loss = metrics.pop("train/loss", metrics.pop("loss", None))
        out["loss"] = f"loss {_format_value(loss)}" if loss is not None else "loss -"
        for name, value in metrics.items():
            out[name] = f"{name} {_format_value(value)}"
        if self._start is not None:
            out["elapsed"] = f"elapsed {_format_seconds(now - self._start[0])}"
        if total:
            eta = self.eta_seconds(step, total, now)
            out["eta"] = f"ETA {_format_seconds(eta)}" if eta is not None else "ETA -"
        return out

    def eta_seconds(
        self, step: int, max_steps: int | None, now: float | None = None
    ) -> float | None:
        """Seconds to ``max_steps`` at the step rate since training started in this process."""
        if self._start is None or not max_steps or max_steps <= 0:
            return None
        start_time, start_step = self._start
        done = step - start_step
        elapsed = (time.perf_counter() if now is None else now) - start_time
        if done <= 0 or elapsed <= 0:
            return None
        return max(0.0, (max_steps - step) * elapsed / done)

    def samples_per_second(self, now: float) -> float | None:
        """Samples of all ranks per second over the last refreshes (``None`` before any)."""
        if not self._rates or not self._samples:
            return None
        then, samples = self._rates[0]
        return (self._samples - samples) / (now - then) if now > then else None

    def _read(self, trainer, now: float) -> None:
        """Take the step and the logged values (the only place that touches the trainer)."""
        self._last_read = now
        self._step = trainer.global_step
        self._metrics = _scalars(trainer.progress_bar_metrics)
        self._rates.append((now, self._samples))

    def _show(self, now: float, final: bool = False) -> None:
        if self._live is not None:
            self._live.refresh()
            return
        last = self._last_line
        moved = last is None or self._step != last[1]
        if moved and (final or last is None or now - last[0] >= self.log_every_s):
            self._print_line(now)

    def _print_line(self, now: float) -> None:
        self._last_line = (now, self._step)
        self._console.print(
            " | ".join(self.status(now).values()),
            markup=False,
            highlight=False,
            emoji=False,
            soft_wrap=True,
        )

    def _renderable(self):
        from rich.progress_bar import ProgressBar as RichBar
        from rich.table import Table
        from rich.text import Text

        fields = self.status()
        grid = Table.grid(padding=(0, 1))
        row = [Text(fields.pop("step"), style="bold")]
        if self._total:
            row.append(RichBar(total=self._total, completed=min(self._step, self._total), width=30))
        row.append(Text(" • ".join(fields.values())))
        grid.add_row(*row)
        return grid

    def _stop(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None


def _total_steps(trainer: L.Trainer) -> int | None:
    """``max_steps``, else Lightning's estimate of the run's optimizer steps when finite."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    try:
        estimate = trainer.estimated_stepping_batches
    except Exception:  # noqa: BLE001 - no estimate (endless stream): show no total
        return None
    return int(estimate) if math.isfinite(estimate) and estimate > 0 else None


def _samples_in(batch: Any) -> int:
    if isinstance(batch, dict) and "prompt" in batch:
        return len(batch["prompt"])
    return _batch_size(batch)


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
        for k, v in metrics.items()
    }


def _format_value(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _format_seconds(seconds: float) -> str:
    seconds = int(math.ceil(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def make_progress_bar(
    enabled: bool = True,
    refresh_per_second: float = 2.0,
    leave: bool = True,
    log_every_s: float = 30.0,
) -> L.Callback:
    """The :class:`StepProgressBar`, or a do-nothing callback when ``enabled`` is false.

    Lets the config follow ``trainer.enable_progress_bar``: Lightning refuses a progress-bar
    callback when the progress bar is disabled.
    """
    if enabled:
        return StepProgressBar(
            refresh_per_second=refresh_per_second, leave=leave, log_every_s=log_every_s
        )
    return L.Callback()


__all__ = [
    "StepProgressBar",
    "ThroughputLogger",
    "count_flops_per_sample",
    "make_progress_bar",
    "peak_memory_bytes",
]
