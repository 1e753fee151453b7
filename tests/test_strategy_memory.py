"""benchmarks/strategy_memory.py without running it: the SDXL ControlNet it builds, its theory
column and its refusal to start a run the host's memory cannot hold (docs/scaling.md, SDXL)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module("strategy_memory")
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_sdxl_controlnet_sizes(bench):
    # Real size: the 1.25 B-parameter SDXL ControlNet; SD1.5's stays the 361 M of the paper.
    assert bench.count_params(1.0, "sdxl") == 1_251_014_160
    assert bench.count_params(1.0, "sd15") == 361_279_120
    assert bench.count_params(0.5, "sd15") == 93_031_600  # docs/scaling.md's SD1.5 table
    # Reduced widths stay divisible by 32 groups and by SDXL's 5 / 10 / 20 heads.
    assert bench.unet_config("sdxl", 0.5)["block_out_channels"] == [160, 320, 640]
    assert bench.unet_config("sdxl", 0.25)["block_out_channels"] == [160, 160, 320]
    for scale in (0.1, 0.25, 0.5, 0.75, 1.0):
        widths = bench.unet_config("sdxl", scale)["block_out_channels"]
        assert all(w % 32 == 0 and w % 20 == 0 for w in widths), widths


def test_theory_per_rank(bench):
    psi, n = 1_000, 2

    def pgo(strategy: str, precision: str) -> tuple[float, ...]:
        return tuple(bench.theory(strategy, psi, n, precision).values())

    assert pgo("ddp", "bf16") == (4000, 4000, 8000)  # bf16-mixed stores fp32
    assert pgo("zero2", "bf16") == (2000, 1000, 6000)
    assert pgo("zero3", "bf16") == (1000, 1000, 6000)
    assert pgo("zero3", "fp32") == (2000, 2000, 6000)
    # --steps 1: no Adam moments yet, the fp32 master partition only.
    assert bench.theory("zero3", psi, n, "bf16", adam=False)["optimizer"] == 2000
    assert bench.theory("ddp", psi, n, "bf16", adam=False)["optimizer"] == 0


def test_refuses_a_run_that_does_not_fit(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(bench, "available_memory", lambda: 8 * bench.GIB)
    started = []
    monkeypatch.setattr(bench.mp, "spawn", lambda *a, **k: started.append(a))
    argv = ["--model", "sdxl", "--scale", "1.0", "--precision", "bf16", "--out", str(tmp_path)]
    assert bench.main([*argv, "--strategies", "zero3"]) == 2
    assert not started
    assert "zero3: needs about" in capsys.readouterr().err
