"""benchmarks/gpu_recipe.py: its plumbing on the CPU (--allow-cpu, tiny size) and its refusal
without a GPU. The real run (SD1.5 size, 512 px, bf16-mixed, three strategies) needs a GPU."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import subprocess_env

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_recipe.py"


def _env(tmp_path: Path) -> dict[str, str]:
    return subprocess_env(tmp_path)


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.mark.slow  # ~100 s: three processes, each importing the whole stack
def test_cpu_plumbing_reports_rates_memory_mfu_and_ratios(tmp_path):
    out = tmp_path / "out.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--allow-cpu",
        "--size",
        "tiny",
        "--steps",
        "3",
        "--resolution",
        "32",
        "--batch-size",
        "2",
        "--num-samples",
        "8",
        "--strategies",
        "single_gpu",
        "deepspeed_stage_2",
        "--peak-tflops",
        "0.5",
        "--work-dir",
        str(tmp_path / "work"),
        "--json",
        str(out),
    ]
    result = subprocess.run(
        cmd, capture_output=True, text=True, cwd=tmp_path, env=_env(tmp_path), timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads(out.read_text())

    run = report["strategies"]["single_gpu"]
    assert run["status"] == "ok"
    for key in (
        "samples_per_s",
        "s_per_step",
        "peak_memory_gb",
        "mfu",
        "time_ratio",
        "memory_ratio",
    ):
        assert _positive(run[key]), (key, run)
    assert report["ratios"]["single_gpu"] == {
        "time": run["time_ratio"],
        "memory": run["memory_ratio"],
    }

    base = report["unet_finetune"]
    assert base["status"] == "ok"
    for key in ("s_per_step", "samples_per_s", "peak_memory_gb", "mfu", "flops_per_sample"):
        assert _positive(base[key]), (key, base)
    assert math.isclose(run["time_ratio"], run["s_per_step"] / base["s_per_step"])
    assert report["paper"]["time_ratio"] == 1.34 and report["paper"]["memory_ratio"] == 1.23

    # DeepSpeed needs a GPU: skipped on the CPU with a note, not failed.
    assert report["strategies"]["deepspeed_stage_2"]["status"] == "skipped"
    assert "deepspeed_stage_2: skipped on CPU" in result.stdout
    # The table.
    assert "unet_finetune (ref.)" in result.stdout and "1.34x time" in result.stdout
    # The train CLI really ran, with the requested settings.
    assert "strategy SingleDeviceStrategy" in result.stdout
    assert "global batch = 2 per device x 1 devices" in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_gpu_exits_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--json", str(tmp_path / "o.json")],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(tmp_path),
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpu_recipe: error:") and "CUDA" in lines[0]
    assert "--allow-cpu" in lines[0]
    assert not (tmp_path / "o.json").exists()
