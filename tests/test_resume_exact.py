"""Exact resume: a run killed with SIGKILL and relaunched with the same command ends with weights
bit-identical to an uninterrupted run (single device, and 2-rank DDP), and ``last.ckpt`` always
holds the final step."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed_helpers import run_train, subprocess_env, tiny_run_overrides
from safetensors.torch import load_file

from cn_lightning.models.checkpoints import checkpoint_step

STEPS = 9


@pytest.fixture(scope="module")
def circle_shards(tmp_path_factory) -> str:
    from data_helpers import make_circle_shards

    out = tmp_path_factory.mktemp("circles")
    make_circle_shards(out, num_samples=64, size=32, samples_per_shard=8)
    return str(out)


def _args(tiny_sd_path: str, shards: str, run_dir: Path, extra: list[str]) -> list[str]:
    return tiny_run_overrides(tiny_sd_path, shards, run_dir, steps=STEPS) + [
        "callbacks.model_checkpoint.every_n_train_steps=4",
        # Epochs of 6 batches per rank: the kill lands mid-epoch and the run crosses epochs.
        "data.num_workers=1",
        *extra,
    ]


def _kill_after_checkpoint(args: list[str], env: dict, cwd: Path, checkpoint: Path) -> None:
    """Start training, SIGKILL its whole process group as soon as ``checkpoint`` exists."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cn_lightning.train", *args],
        cwd=cwd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 600
        while not checkpoint.exists():
            assert proc.poll() is None, "training ended before the checkpoint to kill at"
            assert time.monotonic() < deadline, "no checkpoint within 10 minutes"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _weights(run_dir: Path) -> dict:
    return load_file(run_dir / "controlnet" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(["data.samples_per_epoch=12"], id="single-device"),
        pytest.param(
            [
                "strategy=ddp",
                "trainer.devices=2",
                "data.samples_per_epoch=24",
                "data.resampled=false",
                "trainer.precision=bf16-mixed",
                "+callbacks.draws._target_=distributed_helpers.DrawRecorder",
                "+callbacks.draws.out_dir=${paths.output_dir}/draws",
            ],
            id="ddp-2-ranks-bf16-finite-epochs",
        ),
        *[
            pytest.param(
                [
                    f"strategy=deepspeed_stage_{stage}",
                    "trainer.devices=2",
                    "trainer.strategy._target_=distributed_helpers.CPUDeepSpeedStrategy",
                    "trainer.precision=bf16-mixed",
                    "data.samples_per_epoch=24",
                    "logical_batch_size=8",
                ],  # 2 per rank x 2 ranks x 2 accumulation
                id=f"zero{stage}-2-ranks-bf16-accumulation",
                marks=pytest.mark.slow,
            )
            for stage in (2, 3)
        ],
    ],
)
def test_killed_and_relaunched_run_equals_uninterrupted(
    tiny_sd_path, circle_shards, tmp_path, extra
):
    env = subprocess_env(tmp_path)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_train(_args(tiny_sd_path, circle_shards, whole, extra), env, tmp_path)
    assert checkpoint_step(whole / "checkpoints" / "last.ckpt") == STEPS

    args = _args(tiny_sd_path, circle_shards, broken, extra)
    # The first last.ckpt is step 4's (written right after step_0000004.ckpt; DeepSpeed's
    # directory appears whole, with its "latest" file).
    _kill_after_checkpoint(args, env, tmp_path, broken / "checkpoints" / "last.ckpt")
    assert not (broken / "controlnet").exists()
    relaunched = run_train(args, env, tmp_path)
    assert "(step 4)" in relaunched.stdout and "training starts at step 4" in relaunched.stdout

    a, b = _weights(whole), _weights(broken)
    assert a.keys() == b.keys()
    different = [k for k in a if not a[k].equal(b[k])]
    assert not different, f"{len(different)} of {len(a)} tensors differ, e.g. {different[0]}"
    assert checkpoint_step(broken / "checkpoints" / "last.ckpt") == STEPS
    if (whole / "draws").is_dir():
        _assert_per_rank_draws(whole, broken)


def _assert_per_rank_draws(whole: Path, broken: Path) -> None:
    """Two ranks draw different timesteps and noise in the same step; the relaunched run draws
    exactly what the uninterrupted one drew in the steps it redid."""
    draws = {
        (run.name, rank): json.loads((run / "draws" / f"draws_rank{rank}.json").read_text())
        for run in (whole, broken)
        for rank in (0, 1)
    }
    for step in draws["whole", 0]:
        t0, noise0 = draws["whole", 0][step]
        t1, noise1 = draws["whole", 1][step]
        assert noise0 != noise1 and t0 != t1, f"ranks drew alike at step {step}"
    redone = draws["broken", 0].keys()
    assert sorted(map(int, redone)) == list(range(4, STEPS))
    for rank in (0, 1):
        for step in redone:
            assert draws["broken", rank][step] == draws["whole", rank][step], (rank, step)


def test_last_checkpoint_is_the_final_step_and_a_finished_run_changes_nothing(
    tiny_sd_path, circle_shards, tmp_path
):
    """Training ends on an epoch boundary between two periodic checkpoints (the quickstart's
    case): last.ckpt still holds the final step, and relaunching says so and writes nothing."""
    env = subprocess_env(tmp_path)
    run_dir = tmp_path / "run"
    args = tiny_run_overrides(tiny_sd_path, circle_shards, run_dir, steps=8) + [
        "callbacks.model_checkpoint.every_n_train_steps=5",
        "data.samples_per_epoch=8",
    ]
    run_train(args, env, tmp_path)
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step_0000005.ckpt"]
    assert checkpoint_step(checkpoints / "last.ckpt") == 8
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}

    again = run_train(args, env, tmp_path)
    assert "this run already finished" in again.stdout and "holds step 8" in again.stdout
    assert "training starts" not in again.stdout
    after = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file()}
    changed = [p for p in before if after.get(p) != before[p]]
    # Hydra rewrites the run's composed config and log on every launch; nothing else changes.
    assert all(".hydra" in p.parts or p.suffix == ".log" for p in changed), changed
