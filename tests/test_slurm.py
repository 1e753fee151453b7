"""SLURM: scripts parse, the dry run prints the srun command, and a requeued job resumes.

The requeue test simulates one SLURM task with SLURM_* variables and a stand-in ``scontrol`` on
PATH (it records its arguments): Lightning recognises SLURM, installs its SIGUSR1 handler, writes
``hpc_ckpt_N.ckpt`` and requeues; the job is then killed and relaunched with the same job id.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from distributed_helpers import REPO, run_train, subprocess_env, tiny_run_overrides

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
JOB_ID = "4242"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_parses_and_is_documented(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    head = script.read_text().split("\n#SBATCH", 1)[0].lower()
    assert "submit" in head or "sbatch" in head, f"{script.name}: no usage at the top"


def _dry_run(script: str, env_extra: dict, *args: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CN_DRY_RUN="1", **env_extra)
    out = subprocess.run(
        ["bash", str(REPO / "slurm" / script), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return shlex.split(out)


def test_train_8xa100_dry_run_prints_the_srun_command(tmp_path):
    slurm = {
        "SLURM_JOB_ID": "777",
        "SLURM_JOB_NAME": "cn_train",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "8",
        "CN_RUNS": str(tmp_path),
        "PYTHON": "python",
    }
    shards = "data.train_shards='/data/canny/{000000..000099}.tar'"
    cmd = _dry_run("train_8xa100.sh", slurm, "+experiment=canny", shards)
    assert cmd == [
        "srun",
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "cn_lightning.train",
        f"hydra.run.dir={tmp_path}/cn_train/777",
        "trainer.devices=8",
        "trainer.num_nodes=1",
        "++logger.wandb.run_id=cn-777",
        "+experiment=canny",
        shards,
    ]
    assert not (tmp_path / "cn_train").exists(), "a dry run must not create anything"


def test_multinode_dry_run_uses_the_allocation(tmp_path):
    slurm = {
        "SLURM_JOB_ID": "9",
        "SLURM_JOB_NAME": "mn",
        "SLURM_NNODES": "4",
        "SLURM_NTASKS_PER_NODE": "8",
        "CN_RUNS": str(tmp_path),
    }
    cmd = _dry_run("train_multinode.sh", slurm, "+experiment=hed", "data.batch_size=8")
    assert cmd[0] == "srun" and "trainer.num_nodes=4" in cmd and "trainer.devices=8" in cmd
    assert f"hydra.run.dir={tmp_path}/mn/9" in cmd and cmd[-2:] == [
        "+experiment=hed",
        "data.batch_size=8",
    ]


def _recording_srun(tmp_path: Path, record: Path | None = None) -> dict[str, str]:
    """PATH with a stand-in ``srun``: it writes its arguments (NUL-separated) to ``record``, or,
    without one, runs them as the real srun runs one task."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    srun = bin_dir / "srun"
    body = f'for a in "$@"; do printf \'%s\\0\' "$a"; done > {record}' if record else 'exec "$@"'
    srun.write_text(f"#!/bin/bash\n{body}\n")
    srun.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_dry_run_pasted_into_a_shell_runs_exactly_the_same_words(tmp_path):
    # The documented form of a brace pattern and other words a shell would change.
    shards = "data.train_shards='/data/canny/data-{000000..000999}.tar'"
    args = ["+experiment=canny", shards, "~callbacks.lr_monitor", "x=$HOME", "it's", "a b", ""]
    slurm = {"SLURM_JOB_ID": "5", "SLURM_JOB_NAME": "cn_train", "CN_RUNS": str(tmp_path / "runs")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(CN_DRY_RUN="1", PYTHON="python", **slurm)
    printed = subprocess.run(
        ["bash", str(REPO / "slurm" / "train_8xa100.sh"), *args],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert printed.count("\n") == 1 and f'"{shards}"' in printed  # as the docs write it
    record = tmp_path / "argv"
    subprocess.run(["bash", "-c", printed], env=_recording_srun(tmp_path, record), check=True)
    argv = record.read_bytes().decode().split("\0")[:-1]
    assert argv == [
        "--kill-on-bad-exit=1",
        "python",
        "-m",
        "cn_lightning.train",
        f"hydra.run.dir={tmp_path}/runs/cn_train/5",
        "trainer.devices=8",
        "trainer.num_nodes=1",
        "++logger.wandb.run_id=cn-5",
        *args,
    ]
    # ... and Hydra accepts the shard pattern as it arrives.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([argv[9]])
    assert override.value() == "/data/canny/data-{000000..000999}.tar"
    assert not (tmp_path / "runs").exists()


def test_prep_array_dry_run_prints_the_command_and_creates_nothing(tmp_path):
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        Image.new("RGB", (40, 36), (40 * i, 200, 90)).save(photos / f"p{i}.jpg")
        (photos / f"p{i}.txt").write_text(f"photo {i}")
    out = tmp_path / "shards"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        CN_DRY_RUN="1",
        SRC=str(photos),
        OUT=str(out),
        RESOLUTION="32",
        SAMPLES_PER_SHARD="2",
        SLURM_CPUS_PER_TASK="0",
        PYTHON=sys.executable,
    )
    work = tmp_path / "submit_dir"
    work.mkdir()
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "prep_shards_array.sh")],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout) == [
        "srun",
        sys.executable,
        "-m",
        "data_prep.from_images",
        "--out",
        str(out),
        "--resolution",
        "32",
        "--samples-per-shard",
        "2",
        "--workers",
        "0",
        "--src",
        str(photos),
        "--condition",
        "canny",
    ]
    assert not out.exists() and not list(work.iterdir()), "a dry run must not create anything"
    # The printed command is the one each array task runs (here: one task, all shards).
    subprocess.run(
        ["bash", "-c", result.stdout],
        env=_recording_srun(tmp_path),
        cwd=work,
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in out.glob("*.tar")) == ["data-000000.tar", "data-000001.tar"]
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 3
    # A model-based condition: its local weights reach from_images.
    env.update(CONDITION="depth", WEIGHTS="/models/my depth", EXTRA_ARGS="--device cuda")
    result = subprocess.run(
        ["bash", str(REPO / "slurm" / "prep_shards_array.sh")],
        env=env,
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert shlex.split(result.stdout)[-6:] == [
        "--condition",
        "depth",
        "--weights",
        "/models/my depth",
        "--device",
        "cuda",
    ]


def _slurm_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    return subprocess_env(
        tmp_path,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME="cn_test",
        SLURM_NTASKS="1",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NNODES="1",
        SLURM_PROCID="0",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_NODELIST="localhost",
    )


def _wait_for(predicate, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, f"training exited early while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_requeued_job_resumes_from_its_checkpoint(tiny_sd_path, tmp_path):
    from data_helpers import make_circle_shards

    make_circle_shards(tmp_path / "shards", num_samples=32, size=32)
    shards = str(tmp_path / "shards")
    run_dir = tmp_path / "runs" / "cn_test" / JOB_ID  # what the sbatch scripts derive
    env = _slurm_env(tmp_path)
    common = [
        a
        for a in tiny_run_overrides(tiny_sd_path, shards, run_dir, steps=0)
        if not a.startswith(("trainer.max_steps", "logger="))
    ]
    common += ["logger=wandb", f"logger.wandb.run_id=cn-{JOB_ID}"]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(
        [sys.executable, "-m", "cn_lightning.train", *common, "trainer.max_steps=100000"],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
    )
    try:
        _wait_for(
            lambda: (run_dir / "checkpoints" / "step_0000002.ckpt").exists(),
            300,
            first,
            "the first checkpoint",
        )
        first.send_signal(signal.SIGUSR1)  # what --signal=SIGUSR1@90 delivers before the limit
        hpc = run_dir / "hpc_ckpt_1.ckpt"
        _wait_for(
            lambda: hpc.exists() and (tmp_path / "scontrol.log").exists(),
            120,
            first,
            "the requeue checkpoint",
        )
    finally:
        # The time limit: SLURM kills the whole job (its cgroup). W&B's service runs in its own
        # session and exits when it sees its parent gone; the relaunch starts a service of its own.
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        log.close()
    out = (tmp_path / "first.log").read_text()
    assert f"[cn_lightning] SLURM job {JOB_ID}: auto-requeue on SIGUSR1" in out
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID]
    assert torch.load(hpc, map_location="cpu", weights_only=False)["global_step"] >= 2
    # Training goes on until SLURM kills the job, so a periodic checkpoint may be newer than the
    # requeue checkpoint: the relaunch must continue from whichever was written last.
    # (last.ckpt may not exist yet if the kill came between the two writes of a periodic save.)
    written = [p for p in (hpc, run_dir / "checkpoints" / "last.ckpt") if p.exists()]
    newest = max(written, key=lambda p: p.stat().st_mtime)
    step = torch.load(newest, map_location="cpu", weights_only=False)["global_step"]

    second = run_train([*common, f"trainer.max_steps={step + 2}"], env, tmp_path)
    assert f"[cn_lightning] SLURM job {JOB_ID}: auto-requeue on SIGUSR1" in second.stdout
    assert f"resuming from {newest}" in second.stdout
    assert f"training starts at step {step}" in second.stdout
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == step + 2
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) >= 2 and all(r.name.endswith(f"-cn-{JOB_ID}") for r in runs)
