"""Real multi-process training on CPU (gloo): DDP and DeepSpeed ZeRO-2/3 through the train CLI.

Each run is 2 processes of the tiny backbone on 32 px circle shards. The DeepSpeed runs are in
the default suite so CI exercises ZeRO for real; the first one also JIT-compiles DeepSpeed's CPU
communication op on a fresh machine (1-2 minutes on 2 cores, cached afterwards).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from distributed_helpers import run_train, subprocess_env, tiny_run_overrides

from cn_lightning.errors import CheckpointFormatError
from cn_lightning.models.checkpoints import load_trainable_state_dict
from cn_lightning.train import find_resume_checkpoint

BRANCH_DTYPE = {
    "32-true": "torch.float32",
    "bf16-mixed": "torch.bfloat16",
    "bf16-true": "torch.bfloat16",
    "16-mixed": "torch.float16",
}


def recorders(run_dir: Path) -> list[str]:
    return [
        "+callbacks.dtypes._target_=distributed_helpers.DtypeRecorder",
        f"+callbacks.dtypes.out_dir={run_dir / 'dtypes'}",
    ]


def assert_dtypes(run_dir: Path, branch: str, ranks: int = 2, frozen: str = "torch.float32"):
    """Every rank trained fp32 master weights with an fp32 loss; the branch ran in ``branch``
    and the frozen VAE and text encoder in ``frozen``."""
    for rank in range(ranks):
        d = json.loads((run_dir / "dtypes" / f"dtypes_rank{rank}.json").read_text())
        assert d == {
            "branch": branch,
            "master": ["torch.float32"],
            "vae": frozen,
            "text_encoder": frozen,
            "loss": "torch.float32",
        }, d


@pytest.fixture(scope="module")
def circle_shards(tmp_path_factory) -> str:
    from data_helpers import make_circle_shards

    out = tmp_path_factory.mktemp("circles")
    make_circle_shards(out, num_samples=64, size=32, samples_per_shard=8)
    return str(out)


def assert_export_matches(run_dir: Path, checkpoint: Path) -> None:
    """The exported folder loads with diffusers and equals the checkpoint's trainable weights."""
    exported = ControlNetModel.from_pretrained(run_dir / "controlnet", local_files_only=True)
    weights = exported.state_dict()
    state = load_trainable_state_dict(checkpoint)
    assert state and all(k.startswith("controlnet.") for k in state), sorted(state)[:5]
    assert set(weights) == {k[len("controlnet.") :] for k in state}
    for key, value in state.items():
        torch.testing.assert_close(weights[key[len("controlnet.") :]], value, rtol=0, atol=0)
    assert all(v.dtype == torch.float32 for v in weights.values())


def test_ddp_two_processes_train_checkpoint_export_on_different_data(
    tiny_sd_path, circle_shards, tmp_path
):
    run_dir = tmp_path / "run"
    args = (
        tiny_run_overrides(tiny_sd_path, circle_shards, run_dir, steps=4)
        + recorders(run_dir)
        + [
            "strategy=ddp",
            "trainer.devices=2",
            "trainer.precision=bf16-mixed",
            "model.frozen_dtype=bf16",
            "+callbacks.keys._target_=distributed_helpers.BatchKeyRecorder",
            f"+callbacks.keys.out_dir={run_dir / 'keys'}",
        ]
    )
    result = run_train(args, subprocess_env(tmp_path), tmp_path)
    assert "global batch = 2 per device x 2 devices x 1 accumulation = 4" in result.stdout
    assert "strategy DDPStrategy" in result.stdout
    keys = [json.loads((run_dir / "keys" / f"keys_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 8  # 4 steps x batch 2 on each rank
    assert not set(keys[0]) & set(keys[1]), "both ranks trained on the same samples"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert saved["global_step"] == 4
    assert not [k for k in saved["state_dict"] if not k.startswith("controlnet.")]
    assert_export_matches(run_dir, checkpoint)
    # bf16 autocast: the branch keeps fp32 weights, the frozen parts follow frozen_dtype.
    assert_dtypes(run_dir, "torch.float32", frozen="torch.bfloat16")


def _deepspeed_args(
    tiny_sd_path: str, shards: str, run_dir: Path, stage: int, steps: int, precision: str
) -> list[str]:
    return (
        tiny_run_overrides(tiny_sd_path, shards, run_dir, steps=steps)
        + recorders(run_dir)
        + [
            f"strategy=deepspeed_stage_{stage}",
            f"trainer.precision={precision}",
            "trainer.strategy._target_=distributed_helpers.CPUDeepSpeedStrategy",
            "trainer.devices=2",
            "logical_batch_size=8",  # 2 per device x 2 ranks x 2 accumulation
        ]
    )


SLOW = pytest.mark.slow


# The recipe users run (bf16-mixed) in the default suite; the other precisions DeepSpeed runs
# on CPU in the slow one.
@pytest.mark.parametrize(
    "stage,precision",
    [
        (2, "bf16-mixed"),
        (3, "bf16-mixed"),
        pytest.param(2, "32-true", marks=SLOW),
        pytest.param(3, "32-true", marks=SLOW),
        pytest.param(2, "16-mixed", marks=SLOW),
        pytest.param(3, "16-mixed", marks=SLOW),
        pytest.param(2, "bf16-true", marks=SLOW),
        pytest.param(3, "bf16-true", marks=SLOW),
    ],
)
def test_deepspeed_two_processes_train_checkpoint_resume_export(
    stage, precision, tiny_sd_path, circle_shards, tmp_path
):
    run_dir = tmp_path / "run"
    env = subprocess_env(tmp_path)
    first = run_train(
        _deepspeed_args(tiny_sd_path, circle_shards, run_dir, stage, 2, precision), env, tmp_path
    )
    assert "global batch = 2 per device x 2 devices x 2 accumulation = 8" in first.stdout
    assert "training starts at step 0" in first.stdout
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_dir(), "DeepSpeed writes checkpoint directories"
    # Only trainable weights: the module file names no frozen UNet, VAE or text encoder tensor.
    for path in checkpoint.glob("*/*model_states.pt"):
        model_states = torch.load(path, map_location="cpu", weights_only=False)
        saved_names = set(model_states["module"]) | {
            n for shapes in model_states.get("param_shapes", []) for n in shapes
        }
        assert saved_names and all(n.startswith("controlnet.") for n in saved_names)
        assert not model_states.get("frozen_param_shapes")
    assert_export_matches(run_dir, checkpoint)

    assert_dtypes(run_dir, BRANCH_DTYPE[precision])
    second = run_train(
        _deepspeed_args(tiny_sd_path, circle_shards, run_dir, stage, 4, precision), env, tmp_path
    )
    assert f"resuming from {checkpoint}" in second.stdout
    assert "training starts at step 2" in second.stdout
    assert (run_dir / "checkpoints" / "step_0000004.ckpt").is_dir()
    assert_export_matches(run_dir, checkpoint)


def test_load_trainable_state_dict_from_lightning_file_and_errors(tmp_path):
    state = {
        "controlnet.conv_in.weight": torch.ones(2, 2, dtype=torch.bfloat16),
        "unet.down_blocks.0.x": torch.zeros(1),
        "unet.up_blocks.0.y": torch.zeros(1),
    }
    torch.save({"state_dict": state, "global_step": 3}, tmp_path / "a.ckpt")
    loaded = load_trainable_state_dict(tmp_path / "a.ckpt")
    assert set(loaded) == {"controlnet.conv_in.weight", "unet.up_blocks.0.y"}
    assert loaded["controlnet.conv_in.weight"].dtype == torch.float32
    (tmp_path / "not_ds").mkdir()
    with pytest.raises(CheckpointFormatError, match="not a DeepSpeed checkpoint"):
        load_trainable_state_dict(tmp_path / "not_ds")
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        load_trainable_state_dict(tmp_path / "missing.ckpt")


def test_resume_picks_the_newest_of_last_and_hpc_checkpoints(tmp_path):
    import os

    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"paths": {"output_dir": str(tmp_path)}, "resume": "auto"})
    assert find_resume_checkpoint(cfg) is None
    (tmp_path / "checkpoints").mkdir()
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    os.utime(last, (1000, 1000))
    assert find_resume_checkpoint(cfg) == str(last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.mkdir()  # DeepSpeed writes directories
    assert find_resume_checkpoint(cfg) == str(hpc)
    cfg.resume = "never"
    assert find_resume_checkpoint(cfg) is None
