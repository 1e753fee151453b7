"""Cached text embeddings (data_prep.cache_latents --text) and their use in training.

The cache holds what ``ControlNetModule.encode_text`` computes (SD and SDXL), the empty prompt's
embeddings once, and fingerprints of the backbone; training with it draws the same prompt drops
and gives the same loss and gradients as encoding on the fly, and refuses caches of another
backbone in one line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from data_helpers import make_circle_shards, mirror_sample, write_shards

from cn_lightning.data import ShardDataModule
from cn_lightning.data.format import (
    TEXT_CACHE_NAME,
    TEXT_EXT,
    decode_npy,
    decode_prompt,
    expand_shard_urls,
    read_manifest,
    read_text_cache,
    write_shard_atomic,
)
from cn_lightning.data.stream import SkipCounter, StreamConfig, iter_tar, sample_is_usable
from cn_lightning.errors import ConfigError, DataError
from cn_lightning.models.diffusion import drop_prompts
from cn_lightning.models.module import ControlNetModule
from cn_lightning.models.tiny import write_tiny_backbone
from data_prep import cache_latents

F16 = {"rtol": 2e-3, "atol": 2e-3}  # float16 storage


def run_cache(shards: str, model: str, out, *extra: str) -> str:
    options = ["--model", model, "--out", str(out), "--device", "cpu", "--resolution", "32"]
    cache_latents.main(["--shards", shards, *options, *extra])
    return str(out)


def raw_samples(spec) -> list[dict]:
    counter = SkipCounter()
    samples = [s for url in expand_shard_urls(spec) for s in iter_tar(url, counter)]
    assert not counter.counts
    return samples


def data_module(shards: str, **kwargs) -> ShardDataModule:
    options = dict(
        condition_key="outline",
        resolution=32,
        batch_size=6,
        num_workers=0,
        shuffle_buffer=0,
        use_cached_latents=True,
    )
    return ShardDataModule(train_shards=shards, **{**options, **kwargs})


@pytest.fixture(scope="module")
def circles(tmp_path_factory) -> str:
    return make_circle_shards(
        tmp_path_factory.mktemp("circles"), num_samples=6, size=32, samples_per_shard=3
    )


@pytest.fixture(scope="module")
def sd_cache(circles, tiny_sd_path, tmp_path_factory) -> str:
    return run_cache(circles, tiny_sd_path, tmp_path_factory.mktemp("sd_cache") / "c")


@pytest.fixture(scope="module")
def sd_model(tiny_sd_path) -> ControlNetModule:
    return ControlNetModule(tiny_sd_path, latent_sampling="mode").eval()


def test_cached_text_is_encode_text_and_the_empty_prompt_is_stored_once(sd_cache, sd_model):
    manifest = read_manifest(sd_cache)
    text = manifest["text"]
    assert text["fingerprint"] == sd_model.text_fingerprint and text["kind"] == "sd"
    assert manifest["latent"]["vae_fingerprint"] == sd_model.vae_fingerprint
    samples = raw_samples(sd_cache)
    prompts = [decode_prompt(s) for s in samples]
    assert all(prompts) and len(samples) == 6
    expected, pooled = sd_model.encode_text(prompts)
    assert pooled is None
    for sample, row in zip(samples, expected, strict=True):
        stored = decode_npy(sample[TEXT_EXT])
        assert stored.dtype == np.float16 and stored.shape == tuple(row.shape)
        np.testing.assert_allclose(stored.astype(np.float32), row.numpy(), **F16)
        assert "pooled.npy" not in sample
    # The empty prompt: once for the whole cache (float32), not per sample.
    cache = read_text_cache(os.path.join(sd_cache, TEXT_CACHE_NAME))
    assert cache.fingerprint == sd_model.text_fingerprint and cache.empty_pooled is None
    empty, _ = sd_model.encode_text([""])
    np.testing.assert_allclose(cache.empty_hidden, empty[0].numpy(), rtol=1e-6, atol=1e-6)
    assert sorted(os.listdir(sd_cache)).count(TEXT_CACHE_NAME) == 1


def test_sdxl_cache_has_both_encoders_and_the_pooled_embedding(circles, tiny_sdxl_path, tmp_path):
    out = run_cache(circles, tiny_sdxl_path, tmp_path / "xl", "--no-latents")
    model = ControlNetModule(tiny_sdxl_path)
    manifest = read_manifest(out)
    assert "latent" not in manifest and manifest["text"]["kind"] == "sdxl"
    assert manifest["text"]["fingerprint"] == model.text_fingerprint
    samples = raw_samples(out)
    assert "latent.npy" not in samples[0]
    hidden, pooled = model.encode_text([decode_prompt(s) for s in samples])
    for sample, h, p in zip(samples, hidden, pooled, strict=True):
        np.testing.assert_allclose(decode_npy(sample[TEXT_EXT]).astype(np.float32), h, **F16)
        stored = decode_npy(sample["pooled.npy"])
        assert stored.dtype == np.float16 and stored.shape == tuple(p.shape)
        np.testing.assert_allclose(stored.astype(np.float32), p, **F16)
    cache = read_text_cache(os.path.join(out, TEXT_CACHE_NAME))
    empty_hidden, empty_pooled = model.encode_text([""])
    np.testing.assert_allclose(cache.empty_hidden, empty_hidden[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(cache.empty_pooled, empty_pooled[0], rtol=1e-6, atol=1e-6)
    # Through the DataModule, with the same drops and loss as encoding on the fly.
    dm = data_module(out, use_cached_latents=False, batch_size=3)
    batch = next(iter(dm.train_dataloader()))
    assert batch["text_embeds"].shape == (3, *hidden.shape[1:])
    assert batch["pooled_text_embeds"].shape == (3, pooled.shape[1])
    model.check_caches(dm.text_caches())
    with torch.no_grad():
        cached = model.compute_loss(batch, generator=torch.Generator().manual_seed(3))
        plain = {k: v for k, v in batch.items() if "text_embeds" not in k}
        fly = model.compute_loss(plain, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(cached, fly, rtol=2e-3, atol=1e-5)


def test_a_training_step_with_caches_equals_one_without(sd_cache, circles, tiny_sd_path):
    dm = data_module(sd_cache)
    assert dm.text_cache("train") is not None  # auto: the manifest has one
    batch = next(iter(dm.train_dataloader()))
    assert batch["text_embeds"].shape[0] == 6 and batch["text_embeds"].dtype == torch.float32
    plain_dm = data_module(circles, use_cached_latents=False)
    assert plain_dm.text_cache("train") is None
    plain = next(iter(plain_dm.train_dataloader()))
    assert "text_embeds" not in plain and plain["prompt"] == batch["prompt"]
    torch.testing.assert_close(plain["image"], batch["image"])

    def step(batch: dict, cached: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = ControlNetModule(tiny_sd_path, latent_sampling="mode", seed=0)
        if cached:
            model.check_caches(dm.text_caches(), dm.latent_caches())
        generator = torch.Generator().manual_seed(11)
        loss = model.compute_loss(batch, generator=generator)
        loss.backward()
        return loss.detach(), [p.grad for p in model.controlnet.parameters()]

    # The seed makes some prompts dropped and some kept in this batch of 6.
    generator = torch.Generator().manual_seed(11)
    torch.randint(0, 2**62, (1,), generator=generator)  # compute_loss's first draw: the noise seed
    dropped = drop_prompts(batch["prompt"], 0.5, generator)
    assert 0 < dropped.count("") < 6
    loss_cached, grads_cached = step(batch, cached=True)
    loss_plain, grads_plain = step(plain, cached=False)
    torch.testing.assert_close(loss_cached, loss_plain, rtol=2e-3, atol=1e-6)
    for a, b in zip(grads_cached, grads_plain, strict=True):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-5)


def test_half_the_prompts_still_drop_with_the_same_draws(sd_model):
    n = 400
    generator = torch.Generator().manual_seed(5)
    empty = sd_model.empty_text()[0]
    hidden = torch.randn(n, *empty.shape)
    out, pooled = sd_model.cached_text({"text_embeds": hidden}, generator=generator)
    assert pooled is None
    dropped = torch.tensor([torch.equal(row, empty) for row in out])
    kept = torch.tensor([torch.equal(row, h) for row, h in zip(out, hidden, strict=True)])
    assert bool((dropped ^ kept).all())
    assert 0.4 < dropped.float().mean() < 0.6
    # Exactly the rows the prompt path drops with the same generator state.
    prompts = drop_prompts([f"p{i}" for i in range(n)], 0.5, torch.Generator().manual_seed(5))
    assert dropped.tolist() == [p == "" for p in prompts]


def test_a_cache_of_another_backbone_is_refused_in_one_line(sd_cache, tmp_path):
    other = str(write_tiny_backbone(tmp_path / "other", preset="test", seed=1))
    model = ControlNetModule(other)
    dm = data_module(sd_cache)
    with pytest.raises(ConfigError) as err:
        model.check_caches(dm.text_caches())
    message = str(err.value)
    assert "\n" not in message and read_manifest(sd_cache)["text"]["fingerprint"] in message
    assert model.text_fingerprint in message and "data.use_cached_text=false" in message
    with pytest.raises(ConfigError, match="were made with the VAE of") as err:
        model.check_caches([], dm.latent_caches())
    assert "\n" not in str(err.value) and model.vae_fingerprint in str(err.value)
    # Lightning runs the check when fit starts, before any step.
    trainer = _trainer(tmp_path, max_steps=1)
    with pytest.raises(ConfigError, match="the text cache .* was made with"):
        trainer.fit(model, datamodule=dm)


def test_a_missing_text_member_is_a_counted_skip(sd_cache, tmp_path):
    samples = raw_samples(sd_cache)
    broken = []
    for i, sample in enumerate(samples):
        sample = {k: v for k, v in sample.items() if k != "__url__"}
        if i == 1:
            del sample[TEXT_EXT]
        if i == 4:
            sample[TEXT_EXT] = b"not an array"
        broken.append(sample)
    shard = str(tmp_path / "c-000000.tar")
    write_shard_atomic(shard, broken)
    # No manifest beside this shard: the text cache file is named (as for remote shards).
    dm = data_module(shard, batch_size=2, text_cache_file=os.path.join(sd_cache, TEXT_CACHE_NAME))
    stream = dm.build_train_dataset(0, 1)
    stream.cfg.resampled, stream.cfg.batches_per_epoch = False, 2
    batches = list(stream)
    assert sum(int(b["n_skipped"]) for b in batches) == 2
    assert stream.skips.counts == {"bad_text": 2}
    keys = [k for b in batches for k in b["key"]]
    assert samples[1]["__key__"] not in keys and samples[4]["__key__"] not in keys
    cfg = StreamConfig(urls=[], condition_key="outline", use_cached_text=True)
    assert [sample_is_usable(s, cfg) for s in broken] == [True, False, True, True, False, True]


def test_use_cached_text_true_needs_a_cache(circles):
    with pytest.raises(DataError, match="use_cached_text=true but the manifest"):
        data_module(circles, use_cached_latents=False, use_cached_text=True).setup("fit")
    with pytest.raises(DataError, match="use_cached_text must be"):
        data_module(circles, use_cached_text="yes")
    dm = data_module(circles, use_cached_latents=False, use_cached_text=False)
    assert dm.text_cache("train") is None and dm.text_caches() == []


def test_bucketed_latents_and_settings_checked_on_rerun(tiny_sd_path, tmp_path, capsys):
    from diffusers import AutoencoderKL

    from cn_lightning.data.buckets import bucket_transform
    from cn_lightning.data.format import decode_image
    from cn_lightning.data.transforms import image_to_tensor

    shapes = [(24, 48), (48, 24), (32, 32)]  # (height, width)
    write_shards(
        tmp_path / "src", [[mirror_sample(f"k{i}", s, i, "outline") for i, s in enumerate(shapes)]]
    )
    common = ["--bucket-divisor", "8", "--no-text"]
    src = str(tmp_path / "src")
    out = run_cache(src, tiny_sd_path, tmp_path / "b", *common, "--buckets", "24:40,40:24,32:32")
    manifest = read_manifest(out)
    assert manifest["latent"]["buckets"] == [[40, 24], [32, 32], [24, 40]]
    assert "text" not in manifest
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_sd_path, "vae"))
    for sample, bucket in zip(raw_samples(out), [(24, 40), (40, 24), (32, 32)], strict=True):
        latent = decode_npy(sample["latent.npy"])
        assert latent.shape == (4, bucket[0] // 2, bucket[1] // 2)
        image = decode_image(sample["png"])
        crop, _, top_left = bucket_transform(image, image, bucket, crop="center")
        assert json.loads(sample["json"])["latent"]["crop_top_left"] == list(top_left)
        with torch.no_grad():
            expected = vae.encode(image_to_tensor(crop)[None]).latent_dist.mean[0].numpy()
        np.testing.assert_allclose(latent.astype(np.float32), expected, atol=2e-3, rtol=2e-3)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cache(src, tiny_sd_path, tmp_path / "b", *common, "--buckets", "32:32")
    assert "other settings (latent.buckets)" in capsys.readouterr().err


def _trainer(tmp_path: Path, max_steps: int) -> L.Trainer:
    """A plain CPU trainer: no logger, checkpoints, bars or summary."""
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )


def test_training_on_the_caches_never_runs_the_text_encoders(sd_cache, tiny_sd_path, tmp_path):
    model = ControlNetModule(tiny_sd_path, latent_sampling="mode")
    trainer = _trainer(tmp_path, max_steps=2)
    trainer.fit(model, datamodule=data_module(sd_cache, batch_size=3, holdout_shards=1))
    assert trainer.global_step == 2
    assert model._host_frozen == {"text_encoder"}  # kept on the CPU: no split encodes prompts
    assert model._prompt_cache == {}  # the dropped prompts took the cache's empty embedding
