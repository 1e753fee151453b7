"""End to end: the quickstart's train CLI against a plain PyTorch loop, on the same shards.

``ours`` is ``python -m cn_lightning.train`` (the quickstart config) for ``--steps`` optimizer
steps, with its sample grids, logging and data stream, timed from process start to exit. The
``plain`` loop does what diffusers' ``examples/controlnet/train_controlnet.py`` does on the same
task: the quickstart's shards decoded once into an in-memory map-style dataset, a shuffling
``DataLoader`` without workers, the toy backbone, a ControlNet copied from its UNet (the toy's 4x
condition encoder), AdamW at the quickstart's learning rate, 50% empty prompts, fp32; no sample
grids, no logging. Both are measured in this one run, one after the other:

* steady s/step (median over steps after ``--warmup``; ours from its ``perf/steps_per_s``
  windows, which exclude sampling) and their ratio;
* ours: the share of wall time in the sample grids (``convergence.json``), the data-wait share
  of the training steps (``perf/data_wait_share``), and the rest (start-up, logging,
  checkpoints, export), as what the steps and grids do not explain;
* total wall time of each.

    python benchmarks/end_to_end.py [--steps 300] [--warmup 50] [--seed 42] [-- OVERRIDE ...]

Overrides after ``--`` go to the train CLI (e.g. ``data.num_workers=0``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CN_LIGHTNING_CACHE", "~/.cache/cn_lightning")).expanduser()


def run_ours(steps: int, seed: int, out: Path, overrides: list[str]) -> dict:
    """The train CLI for ``steps`` steps; its wall time and what its logs say about the time."""
    cmd = [
        sys.executable,
        "-m",
        "cn_lightning.train",
        f"hydra.run.dir={out}",
        f"trainer.max_steps={steps}",
        f"seed={seed}",
        "logger=csv",
        "export_controlnet=false",
        *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"the train CLI failed ({result.returncode}):\n{result.stderr[-2000:]}")
    rows = list(csv.DictReader(open(out / "csv" / "metrics.csv")))
    rates = [
        (int(r["step"]), float(r["perf/steps_per_s"])) for r in rows if r.get("perf/steps_per_s")
    ]
    waits = [float(r["perf/data_wait_share"]) for r in rows if r.get("perf/data_wait_share")]
    series = json.loads((out / "convergence.json").read_text()).get("series", [])
    sampling = sum(float(p.get("sampling_s", 0.0)) for p in series)
    return {"wall_s": wall, "rates": rates, "data_wait_share": waits, "sampling_s": sampling}


def load_shards(url_dir: Path, resolution: int) -> list[tuple]:
    """Every (image, condition, prompt) of the quickstart's train shards, decoded once."""
    from cn_lightning.data.format import IMAGE_EXTS, decode_image, expand_shard_urls, tar_samples
    from cn_lightning.data.transforms import (
        center_crop_resize,
        condition_to_tensor,
        image_to_tensor,
    )

    samples = []
    for url in expand_shard_urls(str(url_dir)):
        with open(url, "rb") as stream:
            for raw in tar_samples(stream, url):
                image_bytes = next(raw[ext] for ext in IMAGE_EXTS if ext in raw)
                image = center_crop_resize(decode_image(image_bytes), resolution)
                condition = center_crop_resize(decode_image(raw["outline.png"]), resolution, True)
                prompt = raw["txt"].decode() if isinstance(raw["txt"], bytes) else raw["txt"]
                samples.append((image_to_tensor(image), condition_to_tensor(condition), prompt))
    return samples


def run_plain(steps: int, warmup: int, seed: int, lr: float, batch_size: int) -> dict:
    """diffusers' train_controlnet.py loop on the same data, timed per step."""
    import torch
    from plain_loop import build_plain, plain_step
    from torch.utils.data import DataLoader

    from cn_lightning.config import asset, circle_shards

    start = time.perf_counter()
    torch.manual_seed(seed)
    shards = Path(circle_shards(str(CACHE / "circles_32px_4000"), 4000, 32))
    data = load_shards(shards, 32)
    parts = build_plain(asset("toy_sd"), lr)

    def collate(batch):
        images, conditions, prompts = zip(*batch, strict=True)
        return torch.stack(images), torch.stack(conditions), list(prompts)

    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate
    )
    times, step = [], 0
    while step < steps:
        for images, conditions, prompts in loader:
            t0 = time.perf_counter()
            plain_step(parts, images, conditions, prompts)
            times.append(time.perf_counter() - t0)
            step += 1
            if step >= steps:
                break
    return {"wall_s": time.perf_counter() - start, "step_s": times[warmup:]}


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of s/step")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lr", type=float, default=3e-4, help="the quickstart's learning rate")
    parser.add_argument("--batch-size", type=int, default=8, help="the quickstart's batch")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 20:
        sys.exit("--steps must exceed --warmup by more than one 20-step throughput window")

    with tempfile.TemporaryDirectory() as tmp:
        ours = run_ours(args.steps, args.seed, Path(tmp) / "ours", overrides)
    plain = run_plain(args.steps, args.warmup, args.seed, args.lr, args.batch_size)

    steady = [1 / rate for step, rate in ours["rates"] if step >= args.warmup and rate > 0]
    if not steady:
        sys.exit("no perf/steps_per_s after the warm-up in the run's metrics.csv")
    ours_step, plain_step = statistics.median(steady), statistics.median(plain["step_s"])
    wall = ours["wall_s"]
    steps_s = ours_step * args.steps
    other = max(wall - steps_s - ours["sampling_s"], 0.0)
    wait = statistics.median(ours["data_wait_share"]) if ours["data_wait_share"] else float("nan")
    print(f"end to end, {args.steps} steps (warm-up {args.warmup}), seed {args.seed}, {overrides}")
    print("| | plain loop | cn_lightning train CLI | ratio |")
    print("|---|---|---|---|")
    print(f"| steady s/step | {plain_step:.4f} | {ours_step:.4f} | {ours_step / plain_step:.2f}x |")
    print(f"| wall time (s) | {plain['wall_s']:.1f} | {wall:.1f} | {wall / plain['wall_s']:.2f}x |")
    print(
        f"ours: sample grids {ours['sampling_s']:.1f} s ({100 * ours['sampling_s'] / wall:.1f}% "
        f"of wall), training steps {steps_s:.1f} s ({100 * steps_s / wall:.1f}%; data wait "
        f"{100 * wait:.1f}% of a step), start-up/logging/checkpoints {other:.1f} s "
        f"({100 * other / wall:.1f}%)"
    )


if __name__ == "__main__":
    main()
