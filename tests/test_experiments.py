"""Every paper experiment composes with the ControlNet 1.1 recipe and runs on tiny data."""

from __future__ import annotations

from pathlib import Path

import pytest
from distributed_helpers import (
    REPO,
    run_train,
    subprocess_env,
    write_condition_shards,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cn_lightning.errors import ConfigError
from cn_lightning.train import resolve_accumulation

EXPERIMENTS = {
    "canny": "canny", "depth": "depth", "normal": "normal", "mlsd": "mlsd", "hed": "hed",
    "seg_ade20k": "seg", "openpose": "openpose", "scribble": "scribble",
}


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_composes_with_the_recipe(name, monkeypatch):
    monkeypatch.setenv("SD15_PATH", "/models/sd15")
    cfg = _compose(f"+experiment={name}")
    assert cfg.task_name == name
    assert cfg.model.pretrained_model_path == "/models/sd15"
    assert cfg.model.learning_rate == pytest.approx(1e-5)
    assert cfg.model.ucg_rate == 0.5
    assert cfg.data.resolution == 512
    assert cfg.data.condition_key == EXPERIMENTS[name]
    assert cfg.data._target_ == "cn_lightning.data.ShardDataModule"
    assert OmegaConf.is_missing(cfg.data, "train_shards")
    assert cfg.logical_batch_size == 256
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.callbacks.samples.every_n_steps > 0
    # 8 x A100 and one GPU reach the same logical batch.
    assert cfg.data.batch_size * 8 * resolve_accumulation(cfg, world_size=8) == 256
    assert cfg.data.batch_size * resolve_accumulation(cfg, world_size=1) == 256


def test_single_gpu_and_sd21_variants(monkeypatch):
    monkeypatch.setenv("SD21_PATH", "/models/sd21")
    single = _compose("+experiment=depth", "strategy=single_gpu")
    assert single.trainer.devices == 1 and single.trainer.strategy == "auto"
    assert resolve_accumulation(single, world_size=1) == 256 // single.data.batch_size
    sd21 = _compose("+experiment=depth", "model=sd21")
    assert sd21.model.pretrained_model_path == "/models/sd21"
    assert sd21.data.condition_key == "depth"


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_stage_2", "deepspeed_stage_2_offload",
                                      "deepspeed_stage_3", "fsdp", "single_gpu", "auto"])
def test_strategies_compose(strategy):
    cfg = _compose("+experiment=canny", f"strategy={strategy}")
    target = cfg.trainer.strategy if isinstance(cfg.trainer.strategy, str) else cfg.trainer.strategy._target_
    assert target
    if strategy.startswith("deepspeed"):
        assert cfg.trainer.strategy.exclude_frozen_parameters is True
    if strategy == "deepspeed_stage_2_offload":
        assert cfg.model.optimizer._target_ == "deepspeed.ops.adam.DeepSpeedCPUAdam"


def test_logical_batch_errors():
    cfg = _compose("+experiment=canny")
    with pytest.raises(ConfigError, match="not divisible"):
        resolve_accumulation(cfg, world_size=3)
    both = _compose("+experiment=canny", "trainer.accumulate_grad_batches=4")
    with pytest.raises(ConfigError, match="not both"):
        resolve_accumulation(both, world_size=8)
    plain = _compose("trainer.accumulate_grad_batches=3")
    assert resolve_accumulation(plain, world_size=2) == 3


def test_cfg_job_and_missing_backbone_is_one_clear_line(tmp_path):
    env = subprocess_env(tmp_path)
    env.pop("SD15_PATH", None)
    job = run_train(["+experiment=scribble", "--cfg", "job"], env, tmp_path)
    assert "logical_batch_size: 256" in job.stdout and "condition_key: scribble" in job.stdout
    result = run_train(["+experiment=canny", f"hydra.run.dir={tmp_path / 'run'}",
                        "data.train_shards=/nowhere"], env, tmp_path, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["cn_lightning: error: Missing mandatory value: model.pretrained_model_path"]


def _tiny_experiment_run(name: str, tiny_sd_path: str, tmp_path: Path) -> None:
    shards = write_condition_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    overrides = [
        f"+experiment={name}", "strategy=single_gpu", f"hydra.run.dir={run_dir}",
        f"model.pretrained_model_path={tiny_sd_path}", f"data.train_shards={shards}",
        "data.resolution=32", "data.batch_size=2", "data.num_workers=0", "data.shuffle_buffer=4",
        "logical_batch_size=4", "trainer.accelerator=cpu", "trainer.precision=32-true",
        "trainer.max_steps=2", "trainer.limit_val_batches=0", "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1", "model.sample_steps=2", "callbacks.samples.every_n_steps=0",
        "++callbacks.samples.at_start=false", "callbacks.samples.num_samples=1", "logger=csv",
    ]
    result = run_train(overrides, subprocess_env(tmp_path), tmp_path)
    assert "global batch = 2 per device x 1 devices x 2 accumulation = 4 (logical_batch_size 4)" in result.stdout
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert list((run_dir / "samples").glob("*.png")), "the recipe's sample logging did not run"


def test_tiny_run_of_canny_experiment(tiny_sd_path, tmp_path):
    _tiny_experiment_run("canny", tiny_sd_path, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(EXPERIMENTS) - {"canny"}))
def test_tiny_run_of_every_other_experiment(name, tiny_sd_path, tmp_path):
    _tiny_experiment_run(name, tiny_sd_path, tmp_path)
