"""Training options a user picks on the command line: logger=none."""

from __future__ import annotations

from distributed_helpers import run_train, subprocess_env, tiny_run_overrides
from lightning.pytorch.callbacks import LearningRateMonitor
from omegaconf import OmegaConf

from cn_lightning.train import build_callbacks


def test_without_a_logger_the_lr_monitor_is_left_out():
    cfg = OmegaConf.create(
        {
            "lr_monitor": {"_target_": "lightning.pytorch.callbacks.LearningRateMonitor"},
            "skipped_samples": {"_target_": "cn_lightning.data.SkippedSamplesLogger"},
        }
    )
    kept = build_callbacks(cfg, loggers=[object()])
    assert [type(c) for c in kept].count(LearningRateMonitor) == 1 and len(kept) == 2
    dropped = build_callbacks(cfg, loggers=[])
    assert len(dropped) == 1 and not any(isinstance(c, LearningRateMonitor) for c in dropped)


def test_tiny_run_with_logger_none_and_the_default_callbacks(tiny_sd_path, tmp_path):
    from data_helpers import make_circle_shards

    make_circle_shards(tmp_path / "shards", num_samples=16, size=32)
    shards = str(tmp_path / "shards")  # the folder: its manifest lists the shards
    run_dir = tmp_path / "run"
    overrides = [
        a
        for a in tiny_run_overrides(tiny_sd_path, shards, run_dir, steps=2)
        if not a.startswith(("callbacks", "logger"))
    ]
    overrides += [
        "logger=none",
        "model.sample_steps=2",
        "callbacks.samples.every_n_steps=0",
        "callbacks.samples.at_start=false",
    ]  # the default callbacks, LR monitor included
    result = run_train(overrides, subprocess_env(tmp_path), tmp_path)
    assert "LearningRateMonitor" not in result.stderr
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert list((run_dir / "samples").glob("step_*.png")), "sample grids go to the run dir"
    assert not (run_dir / "wandb").exists() and not (run_dir / "csv").exists()
