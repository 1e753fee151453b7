"""Bad input to the train command gives one clear line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys


def _train(*overrides: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", CN_LIGHTNING_OUTPUTS=str(cwd))
    return subprocess.run(
        [sys.executable, "-m", "cn_lightning.train", *overrides],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def _assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


def test_nonexistent_model_path(tmp_path):
    result = _train(f"model.pretrained_model_path={tmp_path}/no_such_model", cwd=tmp_path)
    _assert_one_line_error(result, "cn_lightning: error:", "no_such_model", "does not exist")
    error_lines = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert len(error_lines) == 1


def test_directory_that_is_not_an_sd_model(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    (tmp_path / "not_a_model" / "readme.txt").write_text("hello")
    result = _train(f"model.pretrained_model_path={tmp_path}/not_a_model", cwd=tmp_path)
    _assert_one_line_error(
        result, "not_a_model", "not a diffusers Stable Diffusion directory", "unet/"
    )


def test_unknown_experiment(tmp_path):
    result = _train("+experiment=no_such_experiment", cwd=tmp_path)
    _assert_one_line_error(result, "no_such_experiment")
    assert "Available options" in result.stderr or "Could not find" in result.stderr
