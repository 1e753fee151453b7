"""Precision on one device, through the real ``train()`` (in-process, for speed): each precision
the CPU runs trains, checkpoints, resumes and exports with fp32 master weights and an fp32
loss; precisions that cannot train a ControlNet correctly are refused in one line at start-up.
Multi-rank precisions (DDP, ZeRO-2, ZeRO-3) are in test_distributed.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from distributed_helpers import REPO
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from cn_lightning.errors import ConfigError
from cn_lightning.models.checkpoints import checkpoint_step
from cn_lightning.train import train


@pytest.fixture(scope="module")
def circle_shards(tmp_path_factory) -> str:
    from data_helpers import make_circle_shards

    out = tmp_path_factory.mktemp("circles")
    make_circle_shards(out, 32, 32, 8)
    return str(out)  # the folder: its manifest lists the shards


def _cfg(tiny_sd_path: str, shards: str, run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"paths.output_dir={run_dir}",
                f"model.pretrained_model_path={tiny_sd_path}",
                f"data.train_shards={shards}",
                "data.resolution=32",
                "data.batch_size=2",
                "data.num_workers=0",
                "data.shuffle_buffer=8",
                "data.condition_key=outline",
                "trainer.accelerator=cpu",
                "trainer.enable_progress_bar=false",
                "+trainer.enable_model_summary=false",
                "callbacks=minimal",
                "logger=csv",
                "callbacks.model_checkpoint.every_n_train_steps=2",
                "+callbacks.dtypes._target_=distributed_helpers.DtypeRecorder",
                f"+callbacks.dtypes.out_dir={run_dir / 'dtypes'}",
                *overrides,
            ],
        )


@pytest.mark.parametrize(
    "precision,frozen",
    [("bf16-mixed", "bf16"), ("32-true", "fp16")],
)
def test_single_device_precision_trains_resumes_and_exports(
    tiny_sd_path, circle_shards, tmp_path, precision, frozen
):
    run_dir = tmp_path / "run"
    common = (f"trainer.precision={precision}", f"model.frozen_dtype={frozen}")
    train(_cfg(tiny_sd_path, circle_shards, run_dir, "trainer.max_steps=2", *common))
    dtypes = json.loads((run_dir / "dtypes" / "dtypes_rank0.json").read_text())
    frozen_dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16", "fp32": "torch.float32"}
    assert dtypes == {
        "branch": "torch.float32",
        "master": ["torch.float32"],
        "vae": frozen_dtype[frozen],
        "text_encoder": frozen_dtype[frozen],
        "loss": "torch.float32",
    }

    train(_cfg(tiny_sd_path, circle_shards, run_dir, "trainer.max_steps=3", *common))
    last = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_step(last) == 3
    saved = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    exported = load_file(run_dir / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert len(exported) == len(saved)
    for key, value in saved.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
        assert torch.equal(exported[key.removeprefix("controlnet.")], value), key


@pytest.mark.parametrize(
    "precision,reason",
    [
        ("bf16-true", "no fp32 master weights"),
        ("16-true", "no fp32 master weights"),
        ("16-mixed", "needs a GPU"),
    ],  # Lightning would train bf16 instead, silently
)
def test_precisions_the_cpu_cannot_train_correctly_are_refused_at_start(
    tiny_sd_path, circle_shards, tmp_path, precision, reason
):
    cfg = _cfg(tiny_sd_path, circle_shards, tmp_path / "run", f"trainer.precision={precision}")
    with pytest.raises(ConfigError, match=reason):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_trainable_copy_is_made_from_the_fp32_unet(tiny_sd_path):
    """With a bf16 frozen backbone the ControlNet still starts from the exact fp32 encoder."""
    from diffusers import UNet2DConditionModel

    from cn_lightning.models.module import ControlNetModule

    module = ControlNetModule(tiny_sd_path, frozen_dtype="bf16")
    fp32 = UNet2DConditionModel.from_pretrained(Path(tiny_sd_path) / "unet")
    assert module.unet.dtype == torch.bfloat16
    weight = module.controlnet.down_blocks[0].resnets[0].conv1.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, fp32.down_blocks[0].resnets[0].conv1.weight)
    assert not torch.equal(weight, weight.bfloat16().float())  # bf16 would have rounded it
