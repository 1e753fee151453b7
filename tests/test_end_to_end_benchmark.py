"""benchmarks/end_to_end.py runs both trainings and prints its ratios (a short run)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("interleave", ["0", "2"])
def test_end_to_end_benchmark_prints_both_loops_and_the_shares(tmp_path, interleave):
    env = {"CN_LIGHTNING_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [
            *(sys.executable, "benchmarks/end_to_end.py", "--steps", "45", "--warmup", "20"),
            *("--interleave", interleave),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    rows = dict(
        re.findall(
            r"\| (plain loop|cn_lightning train CLI) \| ([\d.]+) \| [\d.]+ \| [\d.]+ \| - \|", out
        )
    )
    assert set(rows) == {"plain loop", "cn_lightning train CLI"}, out
    plain, ours = float(rows["plain loop"]), float(rows["cn_lightning train CLI"])
    assert plain > 0 and ours > 0
    ratio = re.search(r"ours / plain loop: steady s/step ([\d.]+)x, fast phase [\d.]+x, wall", out)
    assert ratio and abs(float(ratio.group(1)) - ours / plain) < 0.01, out
    shares = re.search(
        r"sample grids [\d.]+ s \(([\d.]+)% .*\(([\d.]+)%; data wait .*\(([\d.]+)%\)", out
    )
    assert shares, out
    values = [float(v) for v in shares.groups()]
    assert all(0 <= v <= 100 for v in values) and sum(values) >= 99  # the rest is never negative
