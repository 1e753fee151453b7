"""Cached VAE latents give the same loss as encoding on the fly (same noise, same timesteps)."""

from __future__ import annotations

import pytest
import torch
from data_helpers import make_circle_shards

from cn_lightning.data import ShardDataModule
from data_prep import cache_latents


def test_cached_latents_match_on_the_fly_encoding(tmp_path, tiny_sd_path):
    module_mod = pytest.importorskip("cn_lightning.models.module")
    pattern = make_circle_shards(tmp_path / "c", num_samples=4, size=32, samples_per_shard=4)
    cache_latents.main(
        [
            "--shards",
            pattern,
            "--model",
            tiny_sd_path,
            "--out",
            str(tmp_path / "lat"),
            "--resolution",
            "32",
            "--device",
            "cpu",
        ]
    )
    dm = ShardDataModule(
        train_shards=str(tmp_path / "lat"),
        condition_key="outline",
        resolution=32,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=0,
        use_cached_latents=True,
    )
    batch = next(iter(dm.train_dataloader()))
    # "mode" = the posterior mean on the fly, which is what the cache stores.
    model = module_mod.ControlNetModule(tiny_sd_path, ucg_rate=0.0, latent_sampling="mode")
    model.eval()
    with torch.no_grad():
        cached = model.compute_loss(batch, generator=torch.Generator().manual_seed(0))
        on_the_fly = model.compute_loss(
            {k: v for k, v in batch.items() if k != "latent"},
            generator=torch.Generator().manual_seed(0),
        )
    assert torch.isfinite(cached) and cached > 0
    # The cache is float16: agreement to float16 precision, not bit for bit.
    torch.testing.assert_close(cached, on_the_fly, rtol=2e-3, atol=1e-5)
