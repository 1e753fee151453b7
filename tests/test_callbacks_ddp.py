"""The sample/fidelity/convergence callbacks under real 2-process DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Run as a script: Lightning's DDP launcher starts rank 1 by re-running this file.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from cn_lightning.callbacks.convergence import SuddenConvergenceDetector
    from cn_lightning.callbacks.samples import SampleGridLogger
    from cn_lightning.callbacks.throughput import ThroughputLogger
    from cn_lightning.data import ShardDataModule
    from cn_lightning.models.module import ControlNetModule

    model_path, shards, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    module = ControlNetModule(model_path, sample_steps=2, guidance_scale=3.0)
    data = ShardDataModule(train_shards=shards, condition_key="outline", resolution=32,
                           batch_size=3, num_workers=0, shuffle_buffer=4, resampled=True, seed=0)
    # 3 conditions x 3 seeds = 9 jobs on 2 ranks: 5 each, rank 1's last one is padding (equal
    # forward counts); condition by condition, so both ranks also sample without the prompt.
    samples = SampleGridLogger(every_n_steps=2, num_samples=3, seeds_per_sample=3)
    trainer = L.Trainer(
        default_root_dir=out, accelerator="cpu", devices=2, strategy="ddp", max_steps=2,
        log_every_n_steps=1, callbacks=[samples, SuddenConvergenceDetector(), ThroughputLogger()],
        logger=CSVLogger(out, name="csv", version=""), enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, limit_val_batches=0,
    )
    trainer.fit(module, datamodule=data)
    rank = trainer.global_rank
    (out / f"history_rank{rank}.json").write_text(json.dumps(
        {"history": samples.history, "prompts": samples.fixed_batch["prompt"]}))
    """
)


@pytest.mark.timeout(600)
def test_sampling_callbacks_under_two_process_ddp(tiny_sd_path, tmp_path):
    from data_helpers import make_circle_shards

    shards = make_circle_shards(tmp_path / "shards", num_samples=16, size=32)
    script = tmp_path / "ddp_callbacks_run.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    for key in [k for k in env if k.startswith(("SLURM_", "LOCAL_RANK", "WORLD_SIZE"))]:
        env.pop(key)
    # A hang in a collective would hit this timeout instead of blocking the suite.
    result = subprocess.run(
        [sys.executable, str(script), tiny_sd_path, shards, str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=500,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    ranks = [json.loads((out / f"history_rank{r}.json").read_text()) for r in (0, 1)]
    # Both ranks hold the same fixed set (rank 0's) and the same gathered fidelity series.
    assert ranks[0]["prompts"] == ranks[1]["prompts"] and len(ranks[0]["prompts"]) == 3
    strip = [
        [{k: v for k, v in h.items() if not k.startswith("sampling")} for h in r["history"]]
        for r in ranks
    ]
    assert strip[0] == strip[1]
    assert [h["step"] for h in strip[0]] == [0, 1, 2]  # start, log-spaced 1, every 2 (= end)
    # Every (condition, seed) scored once, padding left out; no prompt: the first seed only.
    assert all(h["fidelity_n"] == 9 and h["fidelity_se"] is not None for h in strip[0])
    # Rank 0 alone writes: one grid per step with all 3 rows, one convergence.json.
    pngs = sorted((out / "samples").glob("*.png"))
    assert [p.name for p in pngs] == [f"step_{s:07d}.png" for s in (0, 1, 2)]
    from PIL import Image

    assert Image.open(pngs[0]).size == (4 * 32, 3 * 32)
    report = json.loads((out / "convergence.json").read_text())
    assert [p["step"] for p in report["series"]] == [0, 1, 2]
    metrics = (out / "csv" / "metrics.csv").read_text()
    assert "val/fidelity" in metrics and "perf/samples_per_s" in metrics
