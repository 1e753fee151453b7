"""Detect the paper's "sudden convergence" in the condition-fidelity series.

The rule (:func:`detect_sudden_convergence`), over points ``(steps[i], v[i])``: the change
completes at the first index ``k >= min_baseline_points`` such that, with ``baseline`` = median of
``v[:k]``, ``noise`` = max(``noise_floor``, 1.4826 x MAD of ``v[:k]``), ``level`` = median of
``v[k:]`` and ``effect = level - baseline``:

1. **effect**: ``effect >= min_effect`` (absolute; fidelity is in [0, 1]) and
   ``effect >= min_snr * noise``: the model leaves a flat baseline for good;
2. **sudden**: ``v[k] - v[k - rise_points] >= jump_share * effect``: most of the rise happens
   within ``rise_points`` sampling intervals (2 lets the jump straddle one sampled point), where a
   ramp rises a little between every pair of points;
3. **plateau**: the ``persistence`` points ``v[k : k + persistence]`` vary by at most
   ``plateau_spread * effect`` (the start of a ramp keeps rising);
4. **sustained**: those ``persistence`` points all lie above ``baseline + effect / 2``, and so does
   at least ``sustain_fraction`` of ``v[k:]``.

The reported step is the first sampled step above the midpoint among the last ``rise_points``
points up to ``k``: the first sampled step at which the model follows the condition (the change
happened between it and the previous sampled step). The rule needs ``persistence`` points after
the change, so online it fires ``persistence - 1`` sampling rounds later, and it is re-evaluated
on every new point (a detection that later turns out to be the start of a ramp is withdrawn).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.loggers import WandbLogger

from cn_lightning import log
from cn_lightning.atomic import write_json_atomic
from cn_lightning.errors import ConfigError

# The one home of the rule's thresholds (the configs and docs/observability.md refer to it).
DEFAULT_THRESHOLDS: dict[str, float | int] = {
    "min_effect": 0.1,
    "min_snr": 4.0,
    "noise_floor": 0.02,
    "jump_share": 0.6,
    "rise_points": 2,
    "plateau_spread": 0.4,
    "persistence": 3,
    "min_baseline_points": 3,
    "sustain_fraction": 0.8,
}


def detect_sudden_convergence(
    steps: Sequence[int], values: Sequence[float], **thresholds: float | int
) -> int | None:
    """The optimizer step of a sudden, sustained jump in ``values``, or ``None``.

    Args:
        steps: increasing optimizer steps of the points (the first is usually the baseline at 0).
        values: the fidelity at those steps (higher = follows the condition better).
        thresholds: overrides of :data:`DEFAULT_THRESHOLDS` (see the module docstring).
    """
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    t = resolve_thresholds(thresholds)
    min_effect, min_snr, noise_floor = t["min_effect"], t["min_snr"], t["noise_floor"]
    jump_share, plateau_spread, sustain_fraction = (
        t["jump_share"],
        t["plateau_spread"],
        t["sustain_fraction"],
    )
    persistence, rise_points, min_baseline_points = (
        t["persistence"],
        t["rise_points"],
        t["min_baseline_points"],
    )
    v = np.asarray(values, dtype=np.float64)
    persistence, rise_points = max(1, int(persistence)), max(1, int(rise_points))
    start = max(1, int(min_baseline_points))
    for k in range(start, len(v) - persistence + 1):
        midpoint = _sudden_jump_midpoint(
            v,
            k,
            min_effect,
            min_snr,
            noise_floor,
            jump_share,
            rise_points,
            plateau_spread,
            persistence,
            sustain_fraction,
        )
        if midpoint is not None:
            # The rise may straddle a sampled point: report the first point past the midpoint.
            first = next(
                j for j in range(max(start, k - rise_points + 1), k + 1) if v[j] > midpoint
            )
            return int(steps[first])
    return None


def resolve_thresholds(overrides: dict[str, float | int]) -> dict[str, float | int]:
    """:data:`DEFAULT_THRESHOLDS` with ``overrides``; an unknown name is a :class:`ConfigError`."""
    unknown = set(overrides) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise ConfigError(
            f"unknown sudden-convergence thresholds {sorted(unknown)}; "
            f"known: {sorted(DEFAULT_THRESHOLDS)}"
        )
    return {**DEFAULT_THRESHOLDS, **overrides}


def _sudden_jump_midpoint(
    v: np.ndarray,
    k: int,
    min_effect: float,
    min_snr: float,
    noise_floor: float,
    jump_share: float,
    rise_points: int,
    plateau_spread: float,
    persistence: int,
    sustain_fraction: float,
) -> float | None:
    """The midpoint level when a sudden sustained jump completes at index ``k``, else None."""
    before, window, after = v[:k], v[k : k + persistence], v[k:]
    baseline = float(np.median(before))
    noise = max(noise_floor, 1.4826 * float(np.median(np.abs(before - baseline))))
    # The level reached is judged on everything after k: the first points of a ramp look like
    # a small step, its later points reveal that the rise goes on.
    effect = float(np.median(after)) - baseline
    if effect < min_effect or effect < min_snr * noise:
        return None
    if v[k] - v[max(0, k - rise_points)] < jump_share * effect:
        return None
    # A plateau, not the first points of a ramp: the new level varies little.
    if np.ptp(window) > plateau_spread * effect:
        return None
    midpoint = baseline + effect / 2
    if (window > midpoint).all() and (after > midpoint).mean() >= sustain_fraction:
        return midpoint
    return None


class SuddenConvergenceDetector(L.Callback):
    """Watch the fidelity series of the :class:`SampleGridLogger` and mark sudden convergence.

    On detection it prints a line, sets ``sudden_convergence_step`` in the W&B run summary (and
    logs it as a metric for other loggers) and writes ``convergence.json``; at the end of
    training ``convergence.json`` is rewritten with the whole series (rank 0 writes). With
    ``stop_after_steps`` set, training stops that many optimizer steps after the detected step.

    Args:
        metric: key of the series to watch (``fidelity``, ``fidelity_no_prompt`` or a metric name).
        stop_after_steps: stop training this many steps after convergence (``None``: never).
        out_path: the JSON file (default ``<trainer.default_root_dir>/convergence.json``).
        thresholds: :func:`detect_sudden_convergence` keyword arguments.
    """

    def __init__(
        self,
        metric: str = "fidelity",
        stop_after_steps: int | None = None,
        out_path: str | os.PathLike | None = None,
        **thresholds: float | int,
    ) -> None:
        self.thresholds = resolve_thresholds(thresholds)
        self.metric = metric
        self.stop_after_steps = stop_after_steps
        self.out_path = Path(out_path) if out_path else None
        self.detected_step: int | None = None
        self.announced_at_step: int | None = None
        self._seen = 0

    # ---------------------------------------------------------------------------- series
    def series(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """The sample logger's fidelity history: ``[{"step": s, "fidelity": f, ...}, ...]``."""
        from cn_lightning.callbacks.samples import SampleGridLogger

        for callback in trainer.callbacks:
            if isinstance(callback, SampleGridLogger):
                return callback.history
        return []

    def detect(self, history: list[dict[str, Any]]) -> int | None:
        points = [(h["step"], h[self.metric]) for h in history if self.metric in h]
        if not points:
            return None
        steps, values = zip(*points, strict=True)
        return detect_sudden_convergence(steps, values, **self.thresholds)

    # ------------------------------------------------------------------------- Lightning
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        history = self.series(trainer)
        if len(history) != self._seen:
            # Re-evaluated on every new point: later points can withdraw or move a detection.
            self._seen = len(history)
            step = self.detect(history)
            if step != self.detected_step:
                self._update(trainer, step, history)
        # Every rank holds the same (gathered) series, so every rank stops at the same step.
        if (
            self.detected_step is not None
            and self.stop_after_steps is not None
            and trainer.global_step >= self.detected_step + self.stop_after_steps
        ):
            if not trainer.should_stop:
                log.info(
                    f"stopping at step {trainer.global_step}, "
                    f"{self.stop_after_steps} steps after sudden convergence"
                )
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        # The sample logger (listed first) has added its final point by now.
        history = self.series(trainer)
        step = self.detect(history)
        if step != self.detected_step:
            self._update(trainer, step, history)
        self.write_json(trainer, history)

    def _update(self, trainer: L.Trainer, step: int | None, history: list[dict[str, Any]]) -> None:
        self.detected_step = step
        self.announced_at_step = trainer.global_step if step is not None else None
        if step is None:
            log.info("sudden convergence withdrawn: the rise goes on (ramp)")
        else:
            log.info(
                f"sudden convergence at step {step}: {self.metric} jumped from "
                f"its baseline (detected at step {trainer.global_step})"
            )
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.experiment.summary["sudden_convergence_step"] = step
                elif step is not None:
                    logger.log_metrics({"sudden_convergence_step": step}, step=trainer.global_step)
        self.write_json(trainer, history)

    def write_json(self, trainer: L.Trainer, history: list[dict[str, Any]]) -> Path | None:
        """Write ``convergence.json`` (rank 0): detected step, rule, thresholds, series."""
        if not trainer.is_global_zero:
            return None
        path = self.out_path or Path(trainer.default_root_dir) / "convergence.json"
        payload = {
            "sudden_convergence_step": self.detect(history),
            "announced_at_step": self.announced_at_step,
            "metric": self.metric,
            "thresholds": self.thresholds,
            "rule": RULE,
            "series": history,
        }
        return write_json_atomic(path, payload, indent=2)

    def state_dict(self) -> dict[str, Any]:
        return {"detected_step": self.detected_step, "announced_at_step": self.announced_at_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.detected_step = state_dict.get("detected_step")
        self.announced_at_step = state_dict.get("announced_at_step")


RULE = (
    "first k >= min_baseline_points with effect = median(v[k:]) - median(v[:k]) >= "
    "max(min_effect, min_snr * max(noise_floor, 1.4826 * MAD(v[:k]))); "
    "v[k] - v[k - rise_points] >= jump_share * effect; "
    "ptp(v[k:k+persistence]) <= plateau_spread * effect; "
    "v[k:k+persistence] all and >= sustain_fraction of v[k:] above median(v[:k]) + effect / 2; "
    "reported step: first of the last rise_points points up to k above that midpoint"
)

__all__ = ["DEFAULT_THRESHOLDS", "SuddenConvergenceDetector", "detect_sudden_convergence"]
