"""The quickstart command end to end, as a user runs it (short version; the full one is slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from diffusers import ControlNetModel
from PIL import Image


def run_train(tmp_path: Path, *overrides: str, timeout: int = 900) -> tuple[subprocess.CompletedProcess, Path]:
    run_dir = tmp_path / "run"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        CN_LIGHTNING_CACHE=str(tmp_path / "cache"),
    )
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run(
        [sys.executable, "-m", "cn_lightning.train", f"hydra.run.dir={run_dir}", *overrides],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result, run_dir


def check_run_directory(run_dir: Path, result: subprocess.CompletedProcess) -> None:
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    controlnet = ControlNetModel.from_pretrained(run_dir / "controlnet", local_files_only=True)
    assert sum(p.numel() for p in controlnet.parameters()) > 0
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert grids, "no sample grids written"
    assert Image.open(grids[-1]).size[0] > 64
    offline_runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert offline_runs, "no offline W&B run"
    assert "wandb sync" in result.stdout


def test_quickstart_short(tmp_path):
    result, run_dir = run_train(tmp_path, "trainer.max_steps=4")
    check_run_directory(run_dir, result)
    assert "global batch = 8 per device x 1 devices x 1 accumulation = 8" in result.stdout


@pytest.mark.slow
def test_quickstart_full(tmp_path):
    result, run_dir = run_train(tmp_path)
    check_run_directory(run_dir, result)
