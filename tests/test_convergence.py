"""The sudden-convergence rule on synthetic fidelity series (pure function, no training)."""

from __future__ import annotations

import numpy as np
import pytest

from cn_lightning.callbacks.convergence import DEFAULT_THRESHOLDS, detect_sudden_convergence

# The sampling steps of a run with every_n_steps=25: baseline, log-spaced, then periodic.
STEPS = [0, 1, 2, 4, 8, 16] + list(range(25, 1001, 25))
S = np.asarray(STEPS, dtype=float)


def _noise(seed: int, sigma: float) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, sigma, len(S))


@pytest.mark.parametrize("seed", range(10))
def test_clear_jump_found_at_the_right_step(seed):
    values = np.where(S >= 400, 0.75, 0.2) + _noise(seed, 0.03)
    assert detect_sudden_convergence(STEPS, values) == 400


@pytest.mark.parametrize("seed", range(10))
def test_jump_then_slow_improvement_found(seed):
    values = np.where(S >= 400, 0.6 + 0.2 * (S - 400) / 600, 0.2) + _noise(seed, 0.03)
    assert detect_sudden_convergence(STEPS, values) == 400


@pytest.mark.parametrize("seed", range(10))
def test_steep_sigmoid_straddling_a_sampled_step(seed):
    # Midway between two sampled steps: half the rise in each interval (rise_points=2).
    values = 0.2 + 0.55 / (1 + np.exp(-(S - 512) / 6)) + _noise(seed, 0.02)
    assert detect_sudden_convergence(STEPS, values) == 525


def test_early_jump_in_the_log_spaced_part():
    values = np.where(S >= 50, 0.7, 0.2)
    assert detect_sudden_convergence(STEPS, values) == 50


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize(
    "name, clean",
    [
        ("slow ramp", 0.2 + 0.6 * S / 1000),
        ("ramp over 500 steps", 0.2 + 0.6 * np.clip((S - 300) / 500, 0, 1)),
        ("ramp over 200 steps", 0.2 + 0.6 * np.clip((S - 300) / 200, 0, 1)),
        ("flat", np.full(len(S), 0.3)),
    ],
)
def test_ramps_and_noise_are_not_sudden(name, clean, seed):
    values = clean + _noise(seed, 0.03)
    assert detect_sudden_convergence(STEPS, values) is None, name


@pytest.mark.parametrize("seed", range(10))
def test_transient_spike_is_not_sustained(seed):
    values = np.where((S >= 400) & (S < 450), 0.75, 0.2) + _noise(seed, 0.02)
    assert detect_sudden_convergence(STEPS, values) is None


def test_small_jump_below_min_effect_ignored_and_threshold_configurable():
    values = np.where(S >= 400, 0.27, 0.2)
    assert detect_sudden_convergence(STEPS, values) is None
    assert detect_sudden_convergence(STEPS, values, min_effect=0.05, noise_floor=0.01) == 400


def test_needs_persistence_points_after_the_jump():
    steps, values = [0, 1, 2, 4, 8, 16], [0.2, 0.2, 0.21, 0.2, 0.8, 0.8]
    assert detect_sudden_convergence(steps, values) is None  # 2 points after, persistence 3
    assert detect_sudden_convergence(steps + [25], values + [0.81]) == 8
    assert detect_sudden_convergence(steps, values, persistence=2) == 8


def test_quickstart_like_short_series():
    steps = [0, 1, 2, 4, 8, 16, 25, 50, 75, 100, 125, 150, 175, 200, 225, 250, 275, 300]
    values = [
        0.15,
        0.16,
        0.14,
        0.15,
        0.16,
        0.15,
        0.17,
        0.14,
        0.16,
        0.15,
        0.55,
        0.7,
        0.75,
        0.72,
        0.78,
        0.8,
        0.79,
        0.8,
    ]
    assert detect_sudden_convergence(steps, values) == 125


def test_defaults_are_the_documented_thresholds_and_inputs_checked():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([\d.]+) \|", doc, flags=re.M))
    assert {k: float(v) for k, v in table.items()} == {
        k: float(v) for k, v in DEFAULT_THRESHOLDS.items()
    }
    with pytest.raises(ValueError, match="unknown sudden-convergence thresholds"):
        detect_sudden_convergence([0, 1], [0.1, 0.2], min_efect=0.1)
    assert detect_sudden_convergence([], []) is None
    with pytest.raises(ValueError):
        detect_sudden_convergence([0, 1], [0.1])
