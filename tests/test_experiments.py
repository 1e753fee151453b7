"""Every paper experiment composes with the ControlNet 1.1 recipe and runs on tiny data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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
    "canny": "canny",
    "depth": "depth",
    "normal": "normal",
    "mlsd": "mlsd",
    "hed": "hed",
    "seg_ade20k": "seg",
    "openpose": "openpose",
    "scribble": "scribble",
}
# The same recipe on SDXL at 1024 px (conf/recipe/controlnet11_sdxl.yaml).
SDXL_EXPERIMENTS = {"canny_sdxl": "canny", "depth_sdxl": "depth"}


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


@pytest.mark.parametrize("name", sorted(SDXL_EXPERIMENTS))
def test_sdxl_experiment_composes_at_1024_with_logical_batch_256(name, monkeypatch):
    from cn_lightning.batching import BatchPlan

    monkeypatch.setenv("SDXL_PATH", "/models/sdxl-base")
    cfg = _compose(f"+experiment={name}")
    assert cfg.task_name == name
    assert cfg.data.condition_key == SDXL_EXPERIMENTS[name]
    # model=sdxl (its SDXL_PATH and guidance), at SDXL's 1024 px, in bf16.
    assert cfg.model.pretrained_model_path == "/models/sdxl-base"
    assert cfg.model.guidance_scale == 5.0
    assert cfg.data.resolution == 1024
    assert cfg.trainer.precision == "bf16-mixed"
    assert cfg.model.frozen_dtype == "bf16" and cfg.model.gradient_checkpointing is True
    assert cfg.trainer.strategy.stage == 2 and cfg.trainer.strategy.exclude_frozen_parameters
    # The rest of the ControlNet 1.1 recipe.
    assert cfg.model.learning_rate == pytest.approx(1e-5) and cfg.model.ucg_rate == 0.5
    assert cfg.data._target_ == "cn_lightning.data.ShardDataModule"
    assert OmegaConf.is_missing(cfg.data, "train_shards")
    assert cfg.callbacks.samples.every_n_steps == 250
    # Logical batch 256 on one 8-GPU node (4 x 8 x 8), on one GPU (4 x 64) and on two nodes.
    assert cfg.logical_batch_size == 256
    for world, nodes, accumulation in ((8, 1, 8), (1, 1, 64), (16, 2, 4)):
        plan = BatchPlan.resolve(
            cfg.data.batch_size, world, nodes, logical_batch_size=cfg.logical_batch_size
        )
        assert (plan.accumulate_grad_batches, plan.global_batch_size) == (accumulation, 256)
        assert resolve_accumulation(cfg, world_size=world) == accumulation
    # docs/scaling.md's 24 GB setting: ZeRO-2 with the optimizer on the CPU, 1 per GPU.
    small = _compose(
        f"+experiment={name}", "strategy=deepspeed_stage_2_offload", "data.batch_size=1"
    )
    assert small.trainer.strategy.offload_optimizer is True
    assert small.model.optimizer._target_ == "deepspeed.ops.adam.DeepSpeedCPUAdam"
    assert resolve_accumulation(small, world_size=8) == 32
    # A later model= on the command line still wins over the experiment's.
    assert _compose(f"+experiment={name}", "model=sd15").model.guidance_scale == 9.0


def test_single_gpu_and_sd21_variants(monkeypatch):
    monkeypatch.setenv("SD21_PATH", "/models/sd21")
    single = _compose("+experiment=depth", "strategy=single_gpu")
    assert single.trainer.devices == 1 and single.trainer.strategy == "auto"
    assert resolve_accumulation(single, world_size=1) == 256 // single.data.batch_size
    sd21 = _compose("+experiment=depth", "model=sd21")
    assert sd21.model.pretrained_model_path == "/models/sd21"
    assert sd21.data.condition_key == "depth"


@pytest.mark.parametrize(
    "strategy",
    [
        "ddp",
        "deepspeed_stage_2",
        "deepspeed_stage_2_offload",
        "deepspeed_stage_3",
        "fsdp",
        "single_gpu",
        "auto",
    ],
)
def test_strategies_compose(strategy):
    cfg = _compose("+experiment=canny", f"strategy={strategy}")
    target = (
        cfg.trainer.strategy
        if isinstance(cfg.trainer.strategy, str)
        else cfg.trainer.strategy._target_
    )
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
    result = run_train(
        [
            "+experiment=canny",
            "trainer=cpu",
            f"hydra.run.dir={tmp_path / 'run'}",
            "data.train_shards=/nowhere",
        ],
        env,
        tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [ln for ln in result.stderr.splitlines() if "error" in ln.lower()]
    assert errors == ["cn_lightning: error: Missing mandatory value: model.pretrained_model_path"]


def _tiny_experiment_run(
    name: str,
    tiny_sd_path: str,
    tmp_path: Path,
    device: tuple[str, ...] = (
        "strategy=single_gpu",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
    ),
):
    shards = write_condition_shards(tmp_path / "shards")
    run_dir = tmp_path / "run"
    overrides = [
        f"+experiment={name}",
        *device,
        f"hydra.run.dir={run_dir}",
        f"model.pretrained_model_path={tiny_sd_path}",
        f"data.train_shards={shards}",
        "data.resolution=32",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=4",
        "logical_batch_size=4",
        "trainer.max_steps=2",
        "trainer.limit_val_batches=0",
        "trainer.enable_progress_bar=false",
        "trainer.log_every_n_steps=1",
        "model.sample_steps=2",
        "callbacks.samples.every_n_steps=0",
        "++callbacks.samples.at_start=false",
        "callbacks.samples.num_samples=1",
        "logger=csv",
    ]
    result = run_train(overrides, subprocess_env(tmp_path), tmp_path)
    assert (
        "global batch = 2 per device x 1 devices x 2 accumulation = 4 (logical_batch_size 4)"
        in result.stdout
    )
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert list((run_dir / "samples").glob("*.png")), "the recipe's sample logging did not run"
    return result


def test_tiny_run_of_canny_experiment_with_trainer_cpu(tiny_sd_path, tmp_path):
    # The documented switch for a machine without a GPU: trainer=cpu alone, the recipe's own
    # strategy (DDP, one gloo process) and everything else of the experiment.
    result = _tiny_experiment_run("canny", tiny_sd_path, tmp_path, device=("trainer=cpu",))
    assert "| strategy DDPStrategy" in result.stdout


@pytest.mark.slow
def test_tiny_run_of_canny_sdxl_experiment(tmp_path):
    # The SDXL recipe end to end on the tiny SDXL model: ZeRO-2 needs GPUs, so a machine without
    # one names a strategy too (docs/scaling.md); bf16 frozen backbone and gradient checkpointing
    # stay the recipe's.
    from cn_lightning.models.tiny import write_tiny_backbone

    tiny_sdxl = write_tiny_backbone(tmp_path / "tiny_sdxl", preset="sdxl-test")
    device = ("trainer=cpu", "strategy=single_gpu")
    _tiny_experiment_run("canny_sdxl", str(tiny_sdxl), tmp_path, device=device)
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    hparams = ckpt["hyper_parameters"]
    assert hparams["frozen_dtype"] == "bf16" and hparams["gradient_checkpointing"] is True
    assert "controlnet.add_embedding.linear_1.weight" in ckpt["state_dict"]  # an SDXL branch


def test_trainer_cpu_changes_only_the_device(monkeypatch):
    monkeypatch.setenv("SD15_PATH", "/models/sd15")
    gpu = _compose("+experiment=canny")
    cpu = _compose("+experiment=canny", "trainer=cpu")
    assert (cpu.trainer.accelerator, cpu.trainer.devices, cpu.trainer.precision) == (
        "cpu",
        1,
        "32-true",
    )
    assert cpu.trainer.max_steps == gpu.trainer.max_steps == 20000  # the experiment's
    assert cpu.trainer.strategy == gpu.trainer.strategy  # the recipe's DDP
    for key in set(gpu) - {"trainer"}:
        assert cpu[key] == gpu[key], key
    assert resolve_accumulation(cpu, world_size=1) == 256 // cpu.data.batch_size
    single = _compose("+experiment=canny", "trainer=cpu", "strategy=single_gpu")
    assert (single.trainer.accelerator, single.trainer.strategy) == ("cpu", "auto")


def test_gpu_trainer_without_a_gpu_points_to_trainer_cpu(monkeypatch):
    from cn_lightning.train import check_accelerator

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="has no GPU: add trainer=cpu"):
        check_accelerator(_compose("+experiment=canny"))
    check_accelerator(_compose("+experiment=canny", "trainer=cpu"))
    check_accelerator(_compose())  # the quickstart: accelerator auto


def test_help_lists_only_real_experiments():
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        assert sorted(loader.get_group_options("experiment")) == sorted(
            [*EXPERIMENTS, *SDXL_EXPERIMENTS, "quickstart"]
        )
        assert loader.get_group_options("recipe") == ["controlnet11", "controlnet11_sdxl"]
        assert "cpu" in loader.get_group_options("trainer")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(EXPERIMENTS) - {"canny"}))
def test_tiny_run_of_every_other_experiment(name, tiny_sd_path, tmp_path):
    _tiny_experiment_run(name, tiny_sd_path, tmp_path)
