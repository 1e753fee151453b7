"""Framework overhead: one training step of ControlNetModule under Lightning vs. a plain loop.

The plain loop does the same work with the same diffusers models, the way diffusers'
``examples/controlnet/train_controlnet.py`` does it: VAE encode, text encode, noise, ControlNet,
UNet with residuals, MSE, backward, AdamW step. Both sides consume the same pre-built batches, so
data loading is not measured. Runs alternate (plain, ours, plain, ours, ...) to share the
machine's noise, and the median time per step of each is compared.

    python benchmarks/step_time.py [--preset small] [--size 64] [--batch 8] \\
        [--steps 30] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from plain_loop import build_plain, plain_step  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from cn_lightning.models.module import ControlNetModule  # noqa: E402
from cn_lightning.models.tiny import write_tiny_backbone  # noqa: E402


def make_batches(n: int, batch: int, size: int) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(batch, 3, size, size, generator=g) * 2 - 1,
            "condition": torch.rand(batch, 3, size, size, generator=g),
            "prompt": [f"red circle with blue background {i}" for i in range(batch)],
        }
        for _ in range(n)
    ]


def plain_loop(model_dir: str, batches: list[dict], warmup: int) -> float:
    """Seconds per step of a hand-written PyTorch loop (diffusers' train_controlnet.py style)."""
    parts = build_plain(model_dir, lr=1e-5)
    start = None
    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        plain_step(parts, batch["image"], batch["condition"], batch["prompt"])
    return (time.perf_counter() - start) / (len(batches) - warmup)


class _StepTimer(L.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.end, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.steps = batch_idx + 1 - self.warmup


def lightning_loop(model_dir: str, batches: list[dict], warmup: int) -> float:
    """Seconds per step of ControlNetModule under a Lightning Trainer (logging on)."""
    module = ControlNetModule(model_dir, learning_rate=1e-5)
    timer = _StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        log_every_n_steps=10,
    )
    loader = DataLoader(batches, batch_size=None, shuffle=False)
    trainer.fit(module, train_dataloaders=loader)
    return (timer.end - timer.start) / timer.steps


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=["test", "small"])
    parser.add_argument("--size", type=int, default=64, help="image size in pixels")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(write_tiny_backbone(os.path.join(tmp, "sd"), preset=args.preset))
        batches = make_batches(args.steps + args.warmup, args.batch, args.size)
        plain, ours = [], []
        for r in range(args.repeats):
            plain.append(plain_loop(model_dir, batches, args.warmup))
            ours.append(lightning_loop(model_dir, batches, args.warmup))
            print(
                f"repeat {r}: plain {plain[-1] * 1e3:.1f} ms/step, "
                f"cn_lightning {ours[-1] * 1e3:.1f} ms/step"
            )
    p, o = statistics.median(plain), statistics.median(ours)
    print(
        f"device: cpu x{torch.get_num_threads()} threads | "
        f"preset {args.preset}, {args.size}px, batch {args.batch}"
    )
    print(f"plain PyTorch loop : {p * 1e3:.1f} ms/step (median of {args.repeats})")
    print(f"cn_lightning       : {o * 1e3:.1f} ms/step (median of {args.repeats})")
    print(f"ratio cn_lightning / plain = {o / p:.3f}  (overhead {100 * (o / p - 1):+.1f}%)")


if __name__ == "__main__":
    main()
