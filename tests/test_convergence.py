"""The sudden-convergence rule on synthetic fidelity series (pure functions, no training).

Series come in two kinds: a clean curve plus Gaussian noise of a known standard error (given to
the rule as each point's ``se``), and rounds simulated as the sample logger scores them (16
conditions x 2 seeds, per-sample scores in [0, 1]) reduced by ``round_statistics``.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cn_lightning.callbacks.convergence import (
    DEFAULT_THRESHOLDS,
    SuddenConvergenceDetector,
    detect_sudden_convergence,
    find_sudden_convergence,
)
from cn_lightning.callbacks.samples import SampleGridLogger, round_statistics
from cn_lightning.errors import ConfigError


def _series(clean, every: int, sigma: float, seed: int, end: int = 3000):
    """(steps, values, standard errors) of ``clean(steps)`` sampled every ``every`` steps."""
    steps = np.arange(0, end + 1, every)
    rng = np.random.default_rng(seed)
    values = clean(steps.astype(float)) + rng.normal(0.0, sigma, len(steps))
    return steps.tolist(), values.tolist(), [sigma] * len(steps)


def _jump(at: float, low: float = 0.2, high: float = 0.6):
    return lambda s: np.where(s >= at, high, low)


def _ramp(start: float, length: float, low: float = 0.2, high: float = 0.7):
    return lambda s: low + (high - low) * np.clip((s - start) / length, 0, 1)


# ------------------------------------------------------------------------ sudden jumps
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("every", [25, 100, 250])
def test_jump_found_at_the_first_sampled_step_after_it(seed, every):
    steps, values, se = _series(_jump(1240), every, 0.03, seed)
    expected = math.ceil(1240 / every) * every
    assert detect_sudden_convergence(steps, values, se) == expected


@pytest.mark.parametrize("seed", range(10))
def test_jump_then_slow_improvement_found_at_the_jump(seed):
    clean = lambda s: np.where(s >= 400, 0.6 + 0.2 * np.clip((s - 400) / 600, 0, 1), 0.2)  # noqa: E731
    assert detect_sudden_convergence(*_series(clean, 100, 0.03, seed)) == 400


@pytest.mark.parametrize("seed", range(10))
def test_jump_straddling_a_sampled_step_reports_the_first_point_above_the_midpoint(seed):
    # Steep sigmoid centred 5 steps before a sampled step: that step is ~0.6 of the way up.
    clean = lambda s: 0.2 + 0.5 / (1 + np.exp(-(s - 995) / 12))  # noqa: E731
    assert detect_sudden_convergence(*_series(clean, 100, 0.02, seed)) == 1000


def test_detection_reports_its_figures():
    found = find_sudden_convergence(*_series(_jump(1000), 100, 0.02, 0))
    assert found is not None and found.step == found.change_step == 1000
    assert found.baseline == pytest.approx(0.2, abs=0.02)
    assert found.level == pytest.approx(0.6, abs=0.02)
    assert found.noise == pytest.approx(0.02) and found.rise_steps <= 100
    assert set(found.as_dict()) >= {"step", "effect", "noise", "rise_steps"}


# -------------------------------------------------------------------- "sudden" in steps
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("every", [25, 100, 250])
@pytest.mark.parametrize("length", [1500, 2000, 3000])
def test_ramp_over_more_than_max_rise_steps_is_not_sudden(length, every, seed):
    # However densely it is sampled: the rise is measured in optimizer steps, not points.
    steps, values, se = _series(_ramp(300, length), every, 0.02, seed, end=4000)
    assert detect_sudden_convergence(steps, values, se) is None


@pytest.mark.parametrize("seed", range(10))
def test_rise_within_max_rise_steps_is_sudden_however_many_points_it_spans(seed):
    # 500 steps sampled every 25: twenty points of rise, still sudden in optimizer steps.
    steps, values, se = _series(_ramp(1000, 500), 25, 0.02, seed)
    assert 1000 < detect_sudden_convergence(steps, values, se) <= 1500


def test_max_rise_steps_is_the_threshold():
    steps, values, se = _series(_ramp(300, 2000), 100, 0.02, 0, end=5000)
    assert detect_sudden_convergence(steps, values, se) is None
    assert detect_sudden_convergence(steps, values, se, max_rise_steps=2500) is not None


# ------------------------------------------------------------------- noise and spikes
@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("sigma", [0.02, 0.05])
def test_noisy_flat_series_is_not_detected(seed, sigma):
    assert detect_sudden_convergence(*_series(lambda s: 0.3 + 0 * s, 100, sigma, seed)) is None


@pytest.mark.parametrize("seed", range(10))
def test_transient_spike_is_not_sustained(seed):
    clean = lambda s: np.where((s >= 1000) & (s < 1200), 0.75, 0.2)  # noqa: E731
    assert detect_sudden_convergence(*_series(clean, 100, 0.02, seed)) is None


def test_the_measured_noise_decides():
    # The same rise of 0.15: clear against a standard error of 0.02, noise against 0.05.
    steps, values, _ = _series(_jump(1000, 0.2, 0.35), 100, 0.0, 0)
    assert detect_sudden_convergence(steps, values, [0.02] * len(steps)) == 1000
    assert detect_sudden_convergence(steps, values, [0.05] * len(steps)) is None


def _rounds(succeeds, steps, seed: int, conditions: int = 16, seeds: int = 2):
    """Rounds as the sample logger scores them: each of ``conditions`` held-out conditions
    under ``seeds`` seeds scores ~0.8 when ``succeeds(step, condition)``, else ~0.1 (circle IoU
    of a circle drawn anywhere), reduced to (mean, standard error) per round."""
    rng = np.random.default_rng(seed)
    values, errors = [], []
    for step in steps:
        ok = np.array([[succeeds(step, i) for i in range(conditions)]] * seeds)
        scores = np.where(ok, rng.normal(0.8, 0.1, ok.shape), rng.uniform(0.0, 0.25, ok.shape))
        mean, se = round_statistics(torch.tensor(scores.clip(0, 1)))
        values.append(mean)
        errors.append(se)
    return values, errors


STEPS = list(range(0, 3001, 100))


@pytest.mark.parametrize("seed", range(10))
def test_rounds_where_most_conditions_start_to_follow_are_detected(seed):
    values, errors = _rounds(lambda step, i: step >= 700 and i % 4 != 0, STEPS, seed)
    assert detect_sudden_convergence(STEPS, values, errors) == 700


@pytest.mark.parametrize("seed", range(10))
def test_one_flipped_sample_is_not_convergence(seed):
    # One of 16 conditions follows from step 700 on: the mean moves by ~0.04 < min_effect.
    values, errors = _rounds(lambda step, i: step >= 700 and i == 3, STEPS, seed)
    assert detect_sudden_convergence(STEPS, values, errors) is None


@pytest.mark.parametrize("seed", range(10))
def test_noisy_flat_rounds_are_not_convergence(seed):
    values, errors = _rounds(lambda step, i: False, STEPS, seed)
    assert detect_sudden_convergence(STEPS, values, errors) is None


def test_round_statistics_pools_the_spread_across_seeds():
    nan = float("nan")
    # Condition 0 scores 0.1 and 0.3 (variance 0.02, 1 dof), condition 1 0.5 twice, condition 2
    # is undefined: the standard error is sqrt(0.01 / 4).
    mean, se = round_statistics(torch.tensor([[0.1, 0.5, nan], [0.3, 0.5, nan]]))
    assert mean == pytest.approx(0.35) and se == pytest.approx(0.05)
    # One seed: the spread across conditions stands in (an upper bound).
    mean, se = round_statistics(torch.tensor([[0.1, 0.5, 0.9]]))
    assert mean == pytest.approx(0.5) and se == pytest.approx(0.4 / math.sqrt(3))
    assert round_statistics(torch.full((2, 3), nan)) == (None, None)  # a missing point
    assert round_statistics(torch.tensor([[0.4]])) == (pytest.approx(0.4), None)


# --------------------------------------------------------------- inputs and thresholds
def test_missing_points_are_left_out():
    steps, values, se = _series(_jump(1000), 100, 0.02, 0)
    values[5], se[5] = None, None
    values[15] = float("nan")
    assert detect_sudden_convergence(steps, values, se) == 1000
    assert detect_sudden_convergence(steps, [None] * len(steps)) is None


def test_series_without_standard_errors_falls_back_to_the_baseline_spread():
    steps = [0, 100, 200, 300, 400, 500, 600]
    values = [0.10, 0.11, 0.10, 0.80, 0.82, 0.81, 0.80]
    assert detect_sudden_convergence(steps, values) == 300


def test_quickstart_series_jumping_before_the_third_round():
    # A quickstart run sampled every 100 steps (4 samples, before held-out sets of 16).
    values = [0.05, 0.03, 0.313, 0.28, 0.272, 0.337, 0.279, 0.314, 0.275, 0.332, 0.334]
    steps = list(range(0, 100 * len(values), 100))
    assert detect_sudden_convergence(steps, values, [0.02] * len(values)) == 200


def test_defaults_are_the_documented_thresholds_and_inputs_checked():
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    table = dict(re.findall(r"^\| `(\w+)` \| ([\d.]+) \|", doc, flags=re.M))
    assert {k: float(v) for k, v in table.items()} == {
        k: float(v) for k, v in DEFAULT_THRESHOLDS.items()
    }
    with pytest.raises(ConfigError, match="unknown sudden-convergence thresholds"):
        detect_sudden_convergence([0, 1], [0.1, 0.2], min_efect=0.1)
    with pytest.raises(ConfigError, match="max_rise_steps"):
        SuddenConvergenceDetector(max_rise_steps=0)
    assert detect_sudden_convergence([], []) is None
    with pytest.raises(ValueError):
        detect_sudden_convergence([0, 1], [0.1])
    with pytest.raises(ValueError):
        detect_sudden_convergence([0, 1], [0.1, 0.2], [0.01])


# ------------------------------------------------------------------ the detector is off
def test_detector_is_off_without_fidelity(tmp_path):
    samples = SampleGridLogger(every_n_steps=100)
    samples.fidelity_off_reason = "no condition extractor for 'hed' could be built"
    samples.history = [{"step": s, "sampling_s": 0.1} for s in range(0, 1000, 100)]
    trainer = SimpleNamespace(
        callbacks=[samples], is_global_zero=True, default_root_dir=tmp_path, global_step=900
    )
    detector = SuddenConvergenceDetector()
    detector.on_train_batch_end(trainer, None, None, None, 0)
    detector.on_train_end(trainer, None)
    report = json.loads((tmp_path / "convergence.json").read_text())
    assert report["sudden_convergence_step"] is None and report["detection"] is None
    assert report["detector_off"] == samples.fidelity_off_reason
    assert detector.detected_step is None
    trainer.callbacks = []
    assert "no SampleGridLogger" in detector.off_reason(trainer)
