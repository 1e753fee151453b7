"""What ``python -m cn_lightning.train`` tells its user: the progress bar counts optimizer steps
out of ``max_steps`` (under gradient accumulation, and from the resumed step after a resume), and
each ``[cn_lightning]`` line appears once on the console and once in ``<run dir>/train.log``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from distributed_helpers import run_train, subprocess_env, tiny_run_overrides


@pytest.fixture(scope="module")
def circle_shards(tmp_path_factory) -> str:
    from data_helpers import make_circle_shards

    out = tmp_path_factory.mktemp("circles")
    make_circle_shards(out, num_samples=32, size=32, samples_per_shard=8)
    return str(out)


def _args(tiny_sd_path: str, shards: str, run_dir: Path, steps: int, *extra: str) -> list[str]:
    base = [
        a
        for a in tiny_run_overrides(tiny_sd_path, shards, run_dir, steps)
        if not a.startswith("trainer.enable_progress_bar")
    ]
    return base + [
        "trainer.enable_progress_bar=true",
        "trainer.accumulate_grad_batches=2",
        # callbacks=minimal has the bar too. Its output is not a terminal here, so it prints
        # plain lines; log_every_s=0 makes that one line per optimizer step.
        "+callbacks.progress_bar.log_every_s=0",
        "+callbacks.progress_bar.refresh_per_second=1000",
        *extra,
    ]


def _bar(stdout: str) -> list[tuple[int, int]]:
    """The (step, total) of each progress line."""
    return [(int(a), int(b)) for a, b in re.findall(r"^step (\d+)/(\d+) \|", stdout, re.M)]


def test_bar_counts_optimizer_steps_and_lines_reach_train_log(
    tiny_sd_path, circle_shards, tmp_path
):
    env = subprocess_env(tmp_path)
    run_dir = tmp_path / "run"
    first = run_train(_args(tiny_sd_path, circle_shards, run_dir, 4), env, tmp_path)
    # 8 batches, 4 optimizer steps: every step once, never past max_steps.
    assert _bar(first.stdout) == [(s, 4) for s in range(5)], first.stdout
    last = [x for x in first.stdout.splitlines() if x.startswith("step 4/4 |")][0]
    assert "100%" in last and "samples/s" in last and "loss " in last and "ETA 0:00:00" in last
    assert "Epoch" not in first.stdout + first.stderr

    log = (run_dir / "train.log").read_text()
    for line in (
        f"[cn_lightning] run dir: {run_dir} | global batch = 2 per device x 1 devices x "
        "2 accumulation = 4",
        "[cn_lightning] training starts at step 0",
        f"[cn_lightning] exported ControlNet to {run_dir / 'controlnet'}",
    ):
        assert first.stdout.count(line) == 1, (line, first.stdout)  # once, on stdout
        assert line not in first.stderr
        assert log.count(line) == 1, (line, log)
    assert "step 4/4" not in log  # the bar stays on the console

    # Resume to 6 steps (last.ckpt holds step 4), with W&B offline: the bar starts at the
    # resumed step; train.log (appended to) gets this run's lines, the wandb sync hint included.
    second = run_train(
        _args(tiny_sd_path, circle_shards, run_dir, 6, "logger=wandb"), env, tmp_path
    )
    assert _bar(second.stdout) == [(4, 6), (5, 6), (6, 6)], second.stdout
    log = (run_dir / "train.log").read_text()
    for line in (
        "[cn_lightning] resuming from",
        "[cn_lightning] training starts at step 4",
        "[cn_lightning] W&B ran offline; upload with: wandb sync",
    ):
        assert second.stdout.count(line) == 1, (line, second.stdout)
        assert log.count(line) == 1, (line, log)
    assert log.count("[cn_lightning] exported ControlNet to") == 2
