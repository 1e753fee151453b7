"""Detect the paper's "sudden convergence" in the condition-fidelity series.

The series comes from :class:`~cn_lightning.callbacks.samples.SampleGridLogger`: every sampling
round scores a fixed set of held-out conditions, each under several sampling seeds, and records
the mean fidelity ``v`` and its standard error ``se`` over the seeds: the spread of one
condition's scores across seeds, pooled over the conditions, over the square root of the number
of scores. That is how far the round's mean would move if only the sampling noise were drawn
again, with the same weights and conditions: the measurement noise of one point, measured at
every point rather than guessed from how flat the first points look.

The rule (:func:`find_sudden_convergence`) works on points ``(steps[i], v[i], se[i])``; points
whose value is missing or NaN (a round where the metric is undefined for every sample) are left
out. It tries each index ``k >= min_baseline_points`` as the first point at the new level (the
window ``v[k : k + persistence]``) and accepts the first ``k`` where all of these hold:

1. **levels**: ``level`` = median of the points within ``2 x max_rise_steps`` optimizer steps
   from ``steps[k]`` (at least the window), ``reached`` = median of the window; ``r`` = the last
   point before ``k`` still in the baseline band (its smoothed value at most ``baseline + lo x
   (reached - baseline)``, ``lo = (1 - jump_share) / 2``), ``baseline`` = median of ``v[:r + 1]``
   (``r`` moves back until both agree: a ramp must not drag the baseline up), with at least
   ``min_baseline_points`` points up to ``r``; ``effect = level - baseline``;
2. **effect**: ``effect >= min_effect`` (absolute; fidelity is in [0, 1]) and ``effect >=
   min_snr x noise``, ``noise`` = max(``noise_floor``, root mean square of ``se`` over the points
   used): the rise stands far above the measured noise of one point. (A series without ``se``,
   such as an older checkpoint's, falls back to 1.4826 x MAD of the baseline points.)
3. **sudden, in optimizer steps**: the rise time, from the crossing of ``baseline + lo x rise``
   to that of ``baseline + (1 - lo) x rise`` (``rise = reached - baseline``; 10% to 90% by
   default), interpolated linearly between sampled points on the smoothed series (running
   median over +-``max_rise_steps`` / 8 steps, at most 5 points), divided by ``jump_share``
   (the whole rise) and scaled by ``effect / rise`` when the level goes on above ``reached``
   (the time to the whole effect at the rise's own rate), is at most ``max_rise_steps``,
   however often the series is sampled. A linear ramp over R steps measures about R; a jump
   between two sampled points measures the sampling interval (twice it when a sampled point
   falls mid-jump);
4. **plateau**: after the rise the level climbs at most ``plateau_spread`` times as fast as it
   did in the rise (the median of the later half of the points over those ``2 x
   max_rise_steps`` steps minus that of the earlier half, per step between their middles,
   against ``rise`` over the rise time): a ramp goes on at the rate it rose, while after a jump
   learning goes on slowly;
5. **sustained**: the window lies above ``baseline + effect / 2``, and so does at least
   ``sustain_fraction`` of all points from ``k`` on: a transient spike is not convergence.

The reported step is the first sampled step after ``r`` above that midpoint: the first sampled
step at which the model follows the condition (the change happened between it and the previous
sampled step). With at least 16 conditions in the round and ``min_effect`` 0.1, no single
sample flipping (its score moves the mean by at most 1/16) can make a detection. Online, the
rule needs ``persistence`` points after the change, so it fires ``persistence - 1`` sampling
rounds later; it is re-evaluated on every new point, so a detection that later turns out to be
the start of a ramp is withdrawn.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
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
    "noise_floor": 0.01,
    "jump_share": 0.8,
    "max_rise_steps": 1000,
    "plateau_spread": 0.4,
    "persistence": 3,
    "min_baseline_points": 2,
    "sustain_fraction": 0.8,
}


# Rise crossings are located on a running median over the points within +-SMOOTH_SHARE x
# max_rise_steps steps and +-SMOOTH_POINTS places: the noise of single points shrinks, a jump's
# edge stays put (a wider window would erase a jump with few points after it yet).
SMOOTH_SHARE = 0.125
SMOOTH_POINTS = 2
# The level after a change is judged over LEVEL_HORIZON x max_rise_steps.
LEVEL_HORIZON = 2


@dataclass(frozen=True)
class Detection:
    """What the rule found: the reported step and the figures it was judged on."""

    step: int  # first sampled step after the rise began above baseline + effect / 2
    change_step: int  # steps[k]: the first point of the plateau window
    baseline: float
    level: float
    effect: float
    noise: float  # the standard error the effect was compared with
    rise_steps: float  # estimated duration of the whole rise, in optimizer steps

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def detect_sudden_convergence(
    steps: Sequence[int],
    values: Sequence[float | None],
    errors: Sequence[float | None] | None = None,
    **thresholds: float | int,
) -> int | None:
    """The optimizer step of a sudden, sustained jump in ``values``, or ``None``.

    Args:
        steps: increasing optimizer steps of the points (the first is usually the baseline at 0).
        values: the fidelity at those steps (higher = follows the condition better); ``None`` or
            NaN marks a missing point.
        errors: the standard error of each value from the sampling seeds (``None``: unknown).
        thresholds: overrides of :data:`DEFAULT_THRESHOLDS` (see the module docstring).
    """
    found = find_sudden_convergence(steps, values, errors, **thresholds)
    return None if found is None else found.step


def find_sudden_convergence(
    steps: Sequence[int],
    values: Sequence[float | None],
    errors: Sequence[float | None] | None = None,
    **thresholds: float | int,
) -> Detection | None:
    """Like :func:`detect_sudden_convergence`, with the figures behind the decision."""
    if len(steps) != len(values) or (errors is not None and len(errors) != len(values)):
        raise ValueError(
            f"{len(steps)} steps, {len(values)} values"
            + ("" if errors is None else f" and {len(errors)} errors")
        )
    t_all = resolve_thresholds(thresholds)
    s, v, se = _finite_points(steps, values, errors)
    persistence = max(1, int(t_all["persistence"]))
    start = max(1, int(t_all["min_baseline_points"]))
    # Crossings are located on the smoothed series (the levels use medians of raw points).
    smooth = _running_median(s, v, float(t_all["max_rise_steps"]) * SMOOTH_SHARE)
    for k in range(start, len(v) - persistence + 1):
        found = _jump_at(s, v, smooth, se, k, t_all)
        if found is not None:
            return found
    return None


def resolve_thresholds(overrides: dict[str, float | int]) -> dict[str, float | int]:
    """:data:`DEFAULT_THRESHOLDS` with ``overrides``; a bad name or value is a ConfigError."""
    unknown = set(overrides) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise ConfigError(
            f"unknown sudden-convergence thresholds {sorted(unknown)}; "
            f"known: {sorted(DEFAULT_THRESHOLDS)}"
        )
    merged = {**DEFAULT_THRESHOLDS, **overrides}
    if not 0 < float(merged["jump_share"]) <= 1 or float(merged["max_rise_steps"]) <= 0:
        raise ConfigError(
            "sudden-convergence thresholds: jump_share must be in (0, 1] and max_rise_steps > 0; "
            f"got {merged['jump_share']} and {merged['max_rise_steps']}"
        )
    return merged


def _finite_points(
    steps: Sequence[int], values: Sequence[float | None], errors: Sequence[float | None] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, values, standard errors) as float arrays, points without a finite value left out
    (an unknown standard error stays NaN)."""
    v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    e = (
        np.full(len(v), np.nan)
        if errors is None
        else np.array([np.nan if x is None else float(x) for x in errors], dtype=np.float64)
    )
    keep = np.isfinite(v)
    return np.asarray(steps, dtype=np.float64)[keep], v[keep], e[keep]


def _jump_at(
    s: np.ndarray,
    v: np.ndarray,
    smooth: np.ndarray,
    se: np.ndarray,
    k: int,
    t: dict[str, float | int],
) -> Detection | None:
    """The detection when point ``k`` is the first at the new level, else None (rules 1-5)."""
    persistence, max_rise = max(1, int(t["persistence"])), float(t["max_rise_steps"])
    jump_share = float(t["jump_share"])
    lo_share = (1 - jump_share) / 2
    # 1. The level: the points within LEVEL_HORIZON x max_rise_steps from k (at least the
    # window): the level must hold that long, and a ramp shows as a level still rising.
    local = max(
        k + persistence, int(np.searchsorted(s, s[k] + LEVEL_HORIZON * max_rise, side="right"))
    )
    level = float(np.median(v[k:local]))
    window = v[k : k + persistence]
    # The rise is timed up to the level the window reached: improvement after the jump is
    # not part of it.
    reached = float(np.median(window))
    r = _rise_start(v, smooth, k, reached, lo_share)
    if r is None or r + 1 < int(t["min_baseline_points"]):
        return None
    baseline = float(np.median(v[: r + 1]))
    effect = level - baseline
    # 2. The effect against the measured noise of one point.
    noise = _noise(se[:local], v[: r + 1], float(t["noise_floor"]))
    if effect < float(t["min_effect"]) or effect < float(t["min_snr"]) * noise:
        return None
    # 5. Sustained: a transient spike is not convergence.
    midpoint = baseline + effect / 2
    if not (window > midpoint).all() or (v[k:] > midpoint).mean() < float(t["sustain_fraction"]):
        return None
    # 3. Sudden: the central jump_share of the rise, scaled to the whole rise, in steps.
    rise = reached - baseline
    low, high = baseline + lo_share * rise, baseline + (1 - lo_share) * rise
    rise_steps = _rise_steps(s, smooth, r, low, high) / jump_share
    # 4. A plateau: afterwards the level rises at most plateau_spread times as fast as it did in
    # the rise (a ramp goes on at the rate it rose; after a jump, learning goes on slowly).
    drift = _drift(s[k:local], v[k:local], max_rise)
    if drift * rise_steps > float(t["plateau_spread"]) * rise * max_rise:
        return None
    # At the rate it rose, reaching the whole effect would take this long (a ramp stopped short
    # by the window must not look shorter than it is).
    rise_steps *= max(1.0, effect / rise)
    if rise_steps > max_rise:
        return None
    first = r + 1 + int(np.argmax(v[r + 1 : k + 1] > midpoint))
    return Detection(
        step=int(s[first]),
        change_step=int(s[k]),
        baseline=baseline,
        level=level,
        effect=effect,
        noise=noise,
        rise_steps=rise_steps,
    )


def _drift(s: np.ndarray, v: np.ndarray, per_steps: float) -> float:
    """How much the level still rises in ``per_steps`` steps: the median of the later half of
    the points minus that of the earlier half, scaled by ``per_steps`` over the steps between
    their middles, at most doubled (a difference over a few steps, near the end of the series,
    says little about a thousand)."""
    half = len(v) // 2
    if half == 0:
        return 0.0
    span = float(np.median(s[-half:]) - np.median(s[:half]))
    rise = float(np.median(v[-half:]) - np.median(v[:half]))
    return rise * per_steps / max(span, per_steps / 2)


def _running_median(s: np.ndarray, v: np.ndarray, half_width: float) -> np.ndarray:
    """Each point's median over the points within ``half_width`` steps and
    :data:`SMOOTH_POINTS` places of it: noise shrinks, isolated spikes go, and a jump's edge
    stays where it is (a median filter keeps an edge with enough points on either side)."""
    index = np.arange(len(s))
    lo = np.maximum(np.searchsorted(s, s - half_width, side="left"), index - SMOOTH_POINTS)
    hi = np.minimum(np.searchsorted(s, s + half_width, side="right"), index + SMOOTH_POINTS + 1)
    return np.array([np.median(v[a:b]) for a, b in zip(lo, hi, strict=True)])


def _rise_start(
    v: np.ndarray, smooth: np.ndarray, k: int, level: float, lo_share: float
) -> int | None:
    """The last index before ``k`` whose smoothed value is in the baseline band, with the
    baseline taken over the points up to it: moved back until consistent (a ramp drags a
    plain median of ``v[:k]`` up, so the band must be judged on the points before the rise)."""
    r = k - 1
    while r >= 0:
        baseline = float(np.median(v[: r + 1]))
        if level <= baseline:
            return None
        band = baseline + lo_share * (level - baseline)
        if smooth[r] <= band:
            return r
        below = np.nonzero(smooth[:r] <= band)[0]
        # At least half of v[:r + 1] lies at or below its median, so r only moves back.
        r = int(below[-1]) if below.size else -1
    return None


def _noise(errors: np.ndarray, baseline_values: np.ndarray, floor: float) -> float:
    """The standard error of one point: the root mean square of the measured ones; for a
    series without them, 1.4826 x MAD of the baseline (the fallback of older series)."""
    known = errors[np.isfinite(errors)]
    if known.size:
        sigma = float(np.sqrt(np.mean(known**2)))
    else:
        sigma = 1.4826 * float(np.median(np.abs(baseline_values - np.median(baseline_values))))
    return max(floor, sigma)


def _rise_steps(s: np.ndarray, v: np.ndarray, r: int, low: float, high: float) -> float:
    """Steps from the upward crossing of ``low`` right after point ``r`` to the first crossing
    of ``high`` after it, each interpolated linearly between the two sampled points around it
    (so the figure does not grow with the sampling interval)."""
    above = np.nonzero(v[r + 1 :] >= high)[0]
    if not above.size:
        return math.inf
    return _crossing(s, v, r + int(above[0]), high) - _crossing(s, v, r, low)


def _crossing(s: np.ndarray, v: np.ndarray, i: int, line: float) -> float:
    """The step at which the straight line from point ``i`` to ``i + 1`` reaches ``line``."""
    dv = v[i + 1] - v[i]
    frac = 0.0 if dv <= 0 else min(1.0, max(0.0, (line - v[i]) / dv))
    return float(s[i] + frac * (s[i + 1] - s[i]))


class SuddenConvergenceDetector(L.Callback):
    """Watch the fidelity series of the :class:`SampleGridLogger` and mark sudden convergence.

    On detection it prints a line, sets ``sudden_convergence_step`` in the W&B run summary (and
    logs it as a metric for other loggers) and writes ``convergence.json``; at the end of
    training ``convergence.json`` is rewritten with the whole series (rank 0 writes). With
    ``stop_after_steps`` set, training stops that many optimizer steps after the detected step.

    The detector is off, silently (``convergence.json`` says why), when there is no fidelity
    series: no sample logger, fidelity turned off, or no extractor for the condition (the
    fidelity module has already said so once).

    Args:
        metric: key of the series to watch (``fidelity``, ``fidelity_no_prompt`` or a metric
            name); its standard error is read from ``<metric>_se``.
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
    def _sample_logger(self, trainer: L.Trainer):
        from cn_lightning.callbacks.samples import SampleGridLogger

        return next((c for c in trainer.callbacks if isinstance(c, SampleGridLogger)), None)

    def series(self, trainer: L.Trainer) -> list[dict[str, Any]]:
        """The sample logger's fidelity history: ``[{"step": s, "fidelity": f, ...}, ...]``."""
        samples = self._sample_logger(trainer)
        return samples.history if samples is not None else []

    def off_reason(self, trainer: L.Trainer) -> str | None:
        """Why there is no series to watch (``None``: the detector is on)."""
        samples = self._sample_logger(trainer)
        if samples is None:
            return "no SampleGridLogger callback (callbacks.samples) produces a fidelity series"
        return samples.fidelity_off_reason

    def find(self, history: list[dict[str, Any]]) -> Detection | None:
        points = [h for h in history if h.get(self.metric) is not None]
        if not points:
            return None
        return find_sudden_convergence(
            [h["step"] for h in points],
            [h[self.metric] for h in points],
            [h.get(f"{self.metric}_se") for h in points],
            **self.thresholds,
        )

    def detect(self, history: list[dict[str, Any]]) -> int | None:
        found = self.find(history)
        return None if found is None else found.step

    # ------------------------------------------------------------------------- Lightning
    def on_train_start(self, trainer, pl_module) -> None:
        samples = self._sample_logger(trainer)
        every, max_rise = getattr(samples, "every_n_steps", 0), self.thresholds["max_rise_steps"]
        if self.off_reason(trainer) is None and every > max_rise / 2:
            log.warning(
                f"sudden convergence: samples every {every} steps cannot show a rise within "
                f"max_rise_steps={max_rise}; set callbacks.samples.every_n_steps <= "
                f"{int(max_rise // 2)}"
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.off_reason(trainer) is not None:
            return
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
        if self.off_reason(trainer) is None:
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
        """Write ``convergence.json`` (rank 0): detected step and why, rule, thresholds, series."""
        if not trainer.is_global_zero:
            return None
        path = self.out_path or Path(trainer.default_root_dir) / "convergence.json"
        off = self.off_reason(trainer)
        found = None if off is not None else self.find(history)
        payload = {
            "sudden_convergence_step": None if found is None else found.step,
            "announced_at_step": self.announced_at_step,
            "detector_off": off,
            "detection": None if found is None else found.as_dict(),
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
    "first k >= min_baseline_points such that, with level = median(v within 2 * max_rise_steps "
    "from steps[k]), reached = median(v[k:k+persistence]), lo = (1 - jump_share) / 2, "
    "r = last index < k with smoothed v[r] <= baseline + lo * (reached - baseline) and "
    "baseline = median(v[:r+1]), r + 1 >= min_baseline_points, effect = level - baseline: "
    "effect >= max(min_effect, min_snr * max(noise_floor, rms(se))); "
    "v[k:k+persistence] all and >= sustain_fraction of v[k:] above baseline + effect / 2; "
    "rise time = interpolated steps from the crossing of baseline + lo * rise to that of "
    "baseline + (1 - lo) * rise (rise = reached - baseline) / jump_share; the level's climb "
    "after k per step <= plateau_spread * rise / rise time; rise time * max(1, effect / rise) "
    "<= max_rise_steps; reported step: first point after r above baseline + effect / 2"
)

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Detection",
    "SuddenConvergenceDetector",
    "detect_sudden_convergence",
    "find_sudden_convergence",
]
