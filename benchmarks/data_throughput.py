"""Data throughput: ShardDataModule vs. the original tutorial's map-style Dataset.

Same images (fill50k-style circles at --resolution px, generated once), same machine, same run:
  * baseline: ``prompt.json`` + ``cv2.imread`` of the source/target PNGs per sample, as the
    original ControlNet repo's ``tutorial_dataset.py`` does, through a DataLoader with N workers;
  * ours: the same samples converted by ``data_prep.fill50k`` to shards, read by
    ``ShardDataModule`` with N workers.
Also reports data_prep's samples/s per worker. Prints both rates and their ratio.

    python benchmarks/data_throughput.py --num-samples 200 --workers 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cn_lightning.data import ShardDataModule  # noqa: E402
from cn_lightning.data.synthetic import write_fill50k_layout  # noqa: E402
from data_prep import fill50k  # noqa: E402


class TutorialDataset(Dataset):
    """The original repo's tutorial_dataset.MyDataset: cv2.imread of source and target PNGs,
    BGR→RGB, source to [0,1], target to [-1,1], HWC float32."""

    def __init__(self, root: str):
        self.root = root
        with open(os.path.join(root, "prompt.json")) as f:
            self.data = [json.loads(line) for line in f]

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, idx: int) -> dict:
        item = self.data[idx]
        source = cv2.imread(os.path.join(self.root, item["source"]))
        target = cv2.imread(os.path.join(self.root, item["target"]))
        source = cv2.cvtColor(source, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        target = (cv2.cvtColor(target, cv2.COLOR_BGR2RGB).astype(np.float32) / 127.5) - 1.0
        return dict(jpg=target, txt=item["prompt"], hint=source)


def time_loader(loader, expected: int) -> float:
    """Samples per second for one full pass (worker start-up included, as in training)."""
    start = time.perf_counter()
    n = 0
    for batch in loader:
        images = batch["jpg"] if "jpg" in batch else batch["image"]
        n += images.shape[0]
    elapsed = time.perf_counter() - start
    assert n == expected, (n, expected)
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-samples", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; best is reported")
    parser.add_argument("--workdir", default=None, help="keep data here (default: temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    n, res, w = args.num_samples, args.resolution, args.workers
    n -= n % args.batch_size

    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or tmp
        layout, shards = os.path.join(root, "fill50k"), os.path.join(root, "shards")
        write_fill50k_layout(layout, n, res, seed=0)

        prep_start = time.perf_counter()
        fill50k_args = [
            "--src",
            layout,
            "--out",
            shards,
            "--resolution",
            str(res),
            "--samples-per-shard",
            str(max(1, n // max(4, 2 * w))),
            "--workers",
            str(w),
            "--overwrite",
        ]
        fill50k.main(fill50k_args)
        prep_wall = time.perf_counter() - prep_start
        stats_dir = os.path.join(shards, ".stats")
        worker_seconds = sum(
            json.load(open(os.path.join(stats_dir, f)))["seconds"]
            for f in os.listdir(stats_dir)
            if not f.startswith("_")
        )

        baseline = DataLoader(
            TutorialDataset(layout),
            batch_size=args.batch_size,
            shuffle=True,
            num_workers=w,
            drop_last=True,
        )
        dm = ShardDataModule(
            train_shards=shards,
            condition_key="outline",
            resolution=res,
            batch_size=args.batch_size,
            num_workers=w,
            shuffle_buffer=100,
            resampled=False,
            samples_per_epoch=n,
        )
        ours = dm.train_dataloader()
        base_rate = max(time_loader(baseline, n) for _ in range(args.repeats))
        our_rate = max(time_loader(ours, n) for _ in range(args.repeats))

    print(
        f"\n{n} samples at {res} px, batch {args.batch_size}, {w} DataLoader workers, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"original tutorial Dataset (cv2.imread PNG): {base_rate:8.1f} samples/s")
    print(f"ShardDataModule (WebDataset shards):        {our_rate:8.1f} samples/s")
    print(f"ratio ours / original:                      {our_rate / base_rate:8.2f}x")
    print(
        f"data_prep.fill50k: {n / worker_seconds:.1f} samples/s per worker "
        f"({n / prep_wall:.1f} samples/s wall with {w} workers, incl. start-up)"
    )


if __name__ == "__main__":
    main()
