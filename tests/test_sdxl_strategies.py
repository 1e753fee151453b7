"""SDXL under every strategy: 2 CPU ranks (gloo) of the tiny SDXL model through the train CLI
(``model=sdxl``) with DDP, DeepSpeed ZeRO-2 and ZeRO-3 (the tests' ``CPUDeepSpeedStrategy``) and
FSDP (the tests' ``CPUFSDPStrategy``): checkpoints hold only the trainable branch, the loss is
finite and no step is skipped, SDXL's pooled embedding and time ids reach the ControlNet in its
dtype (DeepSpeed casts the modules and runs no autocast), and a run killed after a checkpoint
and relaunched ends with the same weights as one never interrupted.

The ZeRO-2 bf16 run is in the default suite; the kill/resume runs (three trainings per strategy,
bf16), the other precisions (fp32, DeepSpeed fp16) and FSDP with the default callbacks (sample
grids, fidelity, FLOP count) are ``slow``.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from distributed_helpers import run_train, subprocess_env, tiny_run_overrides
from safetensors.torch import load_file
from test_distributed import assert_export_matches
from test_resume_exact import _kill_after_checkpoint

from cn_lightning.models.checkpoints import checkpoint_step

DEEPSPEED = "trainer.strategy._target_=distributed_helpers.CPUDeepSpeedStrategy"
STRATEGIES = {
    # DDP under bf16 autocast: fp32 branch, the frozen parts in model.frozen_dtype.
    "ddp": ["strategy=ddp", "model.frozen_dtype=bf16"],
    # DeepSpeed casts the registered UNet and ControlNet to bf16 and runs no autocast;
    # 2 per device x 2 ranks x 2 accumulation.
    "zero2": ["strategy=deepspeed_stage_2", DEEPSPEED, "logical_batch_size=8"],
    "zero3": ["strategy=deepspeed_stage_3", DEEPSPEED, "logical_batch_size=8"],
    # FSDP's bf16 mixed precision: bf16 compute over fp32 shards, frozen and trainable blocks
    # wrapped alike.
    "fsdp": ["strategy=fsdp", "trainer.strategy._target_=distributed_helpers.cpu_fsdp_strategy"],
}


def input_dtype(strategy: str, precision: str) -> str:
    """What reaches the ControlNet's forward: the branch's compute dtype (under DDP's autocast
    the branch keeps fp32 weights; DeepSpeed casts it; FSDP computes in its param dtype)."""
    if strategy == "ddp" or precision == "32-true":
        return "torch.float32"
    return "torch.float16" if precision == "16-mixed" else "torch.bfloat16"


@pytest.fixture(scope="module")
def circle_shards(tmp_path_factory) -> str:
    from data_helpers import make_circle_shards

    out = tmp_path_factory.mktemp("circles")
    make_circle_shards(out, num_samples=64, size=32, samples_per_shard=8)
    return str(out)


def _args(
    tiny_sdxl_path: str,
    shards: str,
    run_dir: Path,
    strategy: str,
    steps: int,
    precision: str = "bf16-mixed",
) -> list[str]:
    return [
        *tiny_run_overrides(tiny_sdxl_path, shards, run_dir, steps=steps),
        "model=sdxl",
        "model.learning_rate=1e-3",
        "trainer.devices=2",
        f"trainer.precision={precision}",
        "data.samples_per_epoch=24",  # epochs of 6 batches per rank: runs cross them
        "+callbacks.added._target_=distributed_helpers.AddedCondRecorder",
        "+callbacks.added.out_dir=${paths.output_dir}/added_cond",
        *STRATEGIES[strategy],
    ]


def assert_trainable_only(checkpoint: Path) -> None:
    """The checkpoint names only ControlNet tensors (SDXL's add_embedding among them): no frozen
    UNet, VAE or text encoder, in the module state nor in the optimizer's."""
    if checkpoint.is_dir():  # DeepSpeed: one model-states file per rank (ZeRO-3) or one
        files = list(checkpoint.glob("*/*model_states.pt"))
        assert files
        for path in files:
            states = torch.load(path, map_location="cpu", weights_only=False)
            names = set(states["module"]) | {
                n for shapes in states.get("param_shapes", []) for n in shapes
            }
            assert names and all(n.startswith("controlnet.") for n in names), sorted(names)[:5]
            assert "controlnet.add_embedding.linear_1.weight" in names
            assert not states.get("frozen_param_shapes")
        return
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    names = set(saved["state_dict"])
    assert names and all(n.startswith("controlnet.") for n in names), sorted(names)[:5]
    assert "controlnet.add_embedding.linear_1.weight" in names
    for optimizer in saved["optimizer_states"]:
        named = [k for k in optimizer["state"] if isinstance(k, str)]  # FSDP keys by name
        assert all(k.startswith("controlnet.") for k in named), named[:5]


def assert_finite_and_nothing_skipped(
    run_dir: Path, stdout: str, dtype: str, skips_allowed: bool = False
) -> None:
    """A finite loss at every step, no step skipped (fp16's loss scaler may skip a few while it
    finds its scale) and the branch's dtype on every input of the ControlNet, SDXL's included."""
    if not skips_allowed:
        assert "non-finite" not in stdout and "optimizer step skipped" not in stdout
    rows = []
    for path in run_dir.rglob("metrics.csv"):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    if not skips_allowed:
        assert all(float(r["train/skipped_nonfinite"]) == 0 for r in rows if r.get("train/loss"))
    for rank in (0, 1):
        seen = json.loads((run_dir / "added_cond" / f"added_cond_rank{rank}.json").read_text())
        assert set(seen) == {"sample", "encoder_hidden_states", "text_embeds", "time_ids"}
        assert set(seen.values()) == {dtype}, seen


def test_sdxl_zero2_bf16_two_ranks_trains_and_checkpoints_the_branch_only(
    tiny_sdxl_path, circle_shards, tmp_path
):
    run_dir = tmp_path / "run"
    args = _args(tiny_sdxl_path, circle_shards, run_dir, "zero2", steps=2)
    result = run_train(args, subprocess_env(tmp_path), tmp_path)
    assert "global batch = 2 per device x 2 devices x 2 accumulation = 8" in result.stdout
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_step(checkpoint) == 2
    assert_trainable_only(checkpoint)
    assert_export_matches(run_dir, checkpoint)
    assert_finite_and_nothing_skipped(run_dir, result.stdout, input_dtype("zero2", "bf16-mixed"))
    weights = load_file(run_dir / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert torch.count_nonzero(weights["controlnet_mid_block.weight"]) > 0, "it trained"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sdxl_killed_and_relaunched_run_equals_uninterrupted(
    strategy, tiny_sdxl_path, circle_shards, tmp_path
):
    env = subprocess_env(tmp_path)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    result = run_train(_args(tiny_sdxl_path, circle_shards, whole, strategy, 4), env, tmp_path)
    checkpoint = whole / "checkpoints" / "last.ckpt"
    assert checkpoint_step(checkpoint) == 4
    assert_trainable_only(checkpoint)
    assert_export_matches(whole, checkpoint)
    assert_finite_and_nothing_skipped(whole, result.stdout, input_dtype(strategy, "bf16-mixed"))

    args = _args(tiny_sdxl_path, circle_shards, broken, strategy, 4)
    _kill_after_checkpoint(args, env, tmp_path, broken / "checkpoints" / "last.ckpt")
    assert not (broken / "controlnet").exists()
    relaunched = run_train(args, env, tmp_path)
    assert "(step 2)" in relaunched.stdout and "training starts at step 2" in relaunched.stdout
    assert checkpoint_step(broken / "checkpoints" / "last.ckpt") == 4
    a = load_file(whole / "controlnet" / "diffusion_pytorch_model.safetensors")
    b = load_file(broken / "controlnet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not a[k].equal(b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[0]}"


@pytest.mark.slow
@pytest.mark.parametrize(
    "strategy,precision",
    [("ddp", "32-true"), ("zero2", "16-mixed"), ("zero3", "32-true"), ("fsdp", "32-true")],
)
def test_sdxl_other_precisions_train_and_checkpoint_the_branch_only(
    strategy, precision, tiny_sdxl_path, circle_shards, tmp_path
):
    run_dir = tmp_path / "run"
    args = _args(tiny_sdxl_path, circle_shards, run_dir, strategy, 2, precision)
    result = run_train(args, subprocess_env(tmp_path), tmp_path)
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint_step(checkpoint) == 2
    assert_trainable_only(checkpoint)
    assert_export_matches(run_dir, checkpoint)
    dtype = input_dtype(strategy, precision)
    assert_finite_and_nothing_skipped(run_dir, result.stdout, dtype, precision == "16-mixed")


def test_fsdp_refuses_the_cpu_and_mixed_dtypes_in_one_line():
    from cn_lightning.errors import ConfigError
    from cn_lightning.strategies import fsdp_strategy

    strategy = fsdp_strategy()
    strategy.parallel_devices = [torch.device("cpu")]
    with pytest.raises(ConfigError, match="strategy=fsdp needs GPUs"):
        strategy.check_device()
    module = torch.nn.Module()
    module.frozen = torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16), requires_grad=False)
    module.trainable = torch.nn.Parameter(torch.zeros(2))
    strategy._lightning_module = module
    with pytest.raises(ConfigError, match="model.frozen_dtype at fp32"):
        strategy.setup(None)


@pytest.mark.slow
def test_sdxl_fsdp_with_the_default_callbacks_draws_grids_and_counts_flops(
    tiny_sdxl_path, circle_shards, tmp_path
):
    """Sample grids, their fidelity and the FLOP count run the model outside a training step:
    under FSDP they enter through the FSDP root (``ControlNetModule.forward_entry``)."""
    run_dir = tmp_path / "run"
    args = [
        "callbacks=default" if a == "callbacks=minimal" else a
        for a in _args(tiny_sdxl_path, circle_shards, run_dir, "fsdp", steps=2)
    ]
    args += [
        f"data.val_shards={circle_shards}",
        "model.sample_steps=2",
        "callbacks.samples.every_n_steps=0",  # at the start and the end
        "callbacks.samples.num_samples=2",
        "callbacks.samples.seeds_per_sample=1",
        "callbacks.throughput.count_flops=true",
        "callbacks.throughput.peak_tflops=1.0",
    ]
    result = run_train(args, subprocess_env(tmp_path), tmp_path)
    grids = sorted(p.name for p in (run_dir / "samples").glob("step_*.png"))
    assert grids == ["step_0000000.png", "step_0000002.png"], grids
    rows = []
    for path in run_dir.rglob("metrics.csv"):
        with open(path) as f:
            rows += list(csv.DictReader(f))
    fidelity = [float(r["val/fidelity"]) for r in rows if r.get("val/fidelity")]
    assert len(fidelity) == 2 and all(math.isfinite(v) for v in fidelity)
    assert (run_dir / "convergence.json").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert_trainable_only(last)
    states = torch.load(last, map_location="cpu", weights_only=False)["callbacks"].values()
    flops = [s.get("flops_per_sample") for s in states if isinstance(s, dict)]
    assert any(f and f > 1e6 for f in flops), flops
    assert "optimizer step skipped" not in result.stdout
