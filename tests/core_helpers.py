"""Helpers for the core tests: a small in-memory batch source for Trainer runs."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset


def random_batch(batch_size: int = 2, size: int = 32, seed: int = 0) -> dict:
    """A batch in the DataModule's format: image in [-1, 1], condition in [0, 1], prompts."""
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(batch_size, 3, size, size, generator=g) * 2 - 1,
        "condition": (torch.rand(batch_size, 3, size, size, generator=g) > 0.5).float(),
        "prompt": [f"red circle with blue background {i}" for i in range(batch_size)],
    }


class _RandomPairs(Dataset):
    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        b = random_batch(1, self.size, seed=i)
        return {"image": b["image"][0], "condition": b["condition"][0], "prompt": b["prompt"][0]}


class RandomPairsDataModule(L.LightningDataModule):
    """Deterministic random image/condition pairs, for Trainer-level tests of the module."""

    def __init__(self, n: int = 16, size: int = 32, batch_size: int = 2) -> None:
        super().__init__()
        self.n, self.size, self.batch_size = n, size, batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            _RandomPairs(self.n, self.size), batch_size=self.batch_size, shuffle=False
        )
