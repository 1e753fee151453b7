"""ShardDataModule: batch contract, paired augmentation, corrupt data, multi-rank splitting,
seeding and resume."""

from __future__ import annotations

import os
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from data_helpers import (
    make_circle_shards,
    mirror_sample,
    truncate_file,
    write_raw_tar,
    write_shards,
)

from cn_lightning.data import ShardDataModule, SkippedSamplesLogger, TooFewShardsError
from cn_lightning.data.format import encode_image, encode_npy


@pytest.fixture(scope="module")
def circles(tmp_path_factory) -> str:
    """6 shards x 8 samples of 32 px circles."""
    return make_circle_shards(tmp_path_factory.mktemp("circles"), 48, 32, 8)


def dm_for(shards, **kw) -> ShardDataModule:
    args = dict(
        condition_key="outline", resolution=32, batch_size=4, num_workers=0, shuffle_buffer=16
    )
    args.update(kw)
    return ShardDataModule(train_shards=shards, **args)


def keys_of(loader, max_batches: int | None = None) -> list[str]:
    keys = []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        keys.extend(batch["key"])
    return keys


def test_batch_contract(circles):
    dm = dm_for(circles, resolution=24, num_workers=1)
    loader = dm.train_dataloader()
    assert len(loader) == 48 // 4  # samples_per_epoch from the manifest
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 24, 24) and batch["image"].dtype == torch.float32
    assert batch["condition"].shape == (4, 3, 24, 24) and batch["condition"].dtype == torch.float32
    assert -1 <= batch["image"].min() < 0 < batch["image"].max() <= 1
    assert batch["condition"].min() == 0 and batch["condition"].max() == 1
    assert (batch["condition"][:, 0] == batch["condition"][:, 2]).all()  # grey → 3 channels
    assert len(batch["prompt"]) == 4 and "circle with" in batch["prompt"][0]
    assert len(batch["key"]) == 4 and batch["n_skipped"].item() == 0


def test_shard_specs_directory_list_and_pipe(circles):
    folder = os.path.dirname(circles)
    first, second = (
        os.path.join(folder, "circles-000000.tar"),
        os.path.join(folder, "circles-000001.tar"),
    )
    for spec in (folder, [first, second], f"pipe:cat {first}::pipe:cat {second}"):
        dm = dm_for(spec, resampled=False, samples_per_epoch=16, shuffle_buffer=0)
        keys = keys_of(dm.train_dataloader())
        assert len(keys) == 16, spec
    assert sorted(keys) == [f"{i:09d}" for i in range(16)]


def test_same_crop_and_flip_for_image_and_condition(tmp_path):
    samples = [mirror_sample(f"m{i}", (40, 56), seed=i) for i in range(8)]
    shards = write_shards(tmp_path, [samples])
    dm = ShardDataModule(
        train_shards=shards,
        condition_key="canny",
        resolution=32,
        batch_size=8,
        num_workers=0,
        crop="random",
        random_flip=True,
        samples_per_epoch=8,
        seed=1,
    )
    batch = next(iter(dm.train_dataloader()))
    assert torch.allclose((batch["image"] + 1) / 2, batch["condition"], atol=1e-5)
    # The crops really are random (not all centred) - compare with the centre crop.
    centre = next(
        iter(
            ShardDataModule(
                train_shards=shards,
                condition_key="canny",
                resolution=32,
                batch_size=8,
                num_workers=0,
                samples_per_epoch=8,
                shuffle_buffer=0,
            ).train_dataloader()
        )
    )
    by_key = dict(zip(centre["key"], centre["condition"], strict=True))
    assert any(
        not torch.equal(c, by_key[k]) for k, c in zip(batch["key"], batch["condition"], strict=True)
    )


def make_corrupt_set(tmp_path, circles) -> list[str]:
    """Two good circle shards, a truncated one, and one with four kinds of bad sample."""
    folder = os.path.dirname(circles)
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    paths = []
    for i in range(3):
        dst = str(bad_dir / f"circles-{i:06d}.tar")
        shutil.copy(os.path.join(folder, f"circles-{i:06d}.tar"), dst)
        paths.append(dst)
    truncate_file(paths[2], 0.5)
    good = np.zeros((32, 32), np.uint8)
    bad = str(bad_dir / "broken-000000.tar")
    write_raw_tar(
        bad,
        {
            "a.png": b"not an image",
            "a.outline.png": encode_image(good),
            "a.txt": b"bad bytes",
            "b.png": encode_image(np.zeros((32, 32, 3), np.uint8)),
            "b.txt": b"no condition",
            "c.png": encode_image(np.zeros((32, 32, 3), np.uint8)),
            "c.outline.png": encode_image(np.zeros((16, 32), np.uint8)),
            "c.txt": b"wrong size",
            "d.png": encode_image(np.zeros((32, 32, 3), np.uint8)),
            "d.outline.png": encode_image(good),
            "d.txt": b"fine",
        },
    )
    return [*paths, bad]


def test_corrupt_samples_and_tar_are_skipped_and_counted(tmp_path, circles):
    shards = make_corrupt_set(tmp_path, circles)
    dm = dm_for(shards, resampled=False, samples_per_epoch=4, batch_size=1, shuffle_buffer=0)
    # One pass in finite mode over all four shards (the quota of 4 batches is met early, so
    # read to the end with a bigger quota instead).
    dm.samples_per_epoch = 8 + 8 + 1
    batches = list(dm.train_dataloader())
    keys = [k for b in batches for k in b["key"]]
    skipped = sum(int(b["n_skipped"]) for b in batches)
    assert "d" in keys and not {"a", "b", "c"} & set(keys)
    # a (bad bytes), b (no condition), c (wrong size) and the truncated tar: 4 skips,
    # all seen before the last batch of this single pass.
    assert skipped == 4 and len(keys) == 17


class TinyModule(L.LightningModule):
    """A 1-parameter model: enough to run real Trainer loops over the DataModule."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen_keys: list[str] = []

    def training_step(self, batch, batch_idx):
        self.seen_keys.extend(batch["key"])
        return (batch["condition"].mean() - batch["image"].mean() * self.w) ** 2

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def trainer(tmp_path, **kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    args.update(kw)
    return L.Trainer(**args)


def test_training_continues_over_corrupt_data_and_logs_the_count(tmp_path, circles):
    shards = make_corrupt_set(tmp_path, circles)
    dm = dm_for(shards, batch_size=2, num_workers=2, shuffle_buffer=4)  # resampled, endless
    model = TinyModule()
    t = trainer(
        tmp_path, max_steps=30, callbacks=[SkippedSamplesLogger()], enable_checkpointing=False
    )
    t.fit(model, datamodule=dm)
    assert t.global_step == 30
    total = dm.skipped_counts()["train"]
    assert total > 0
    assert t.callback_metrics["data/skipped_samples_total"].item() == total


def test_finite_mode_gives_ranks_disjoint_shards_and_equal_batches(tmp_path):
    # Uneven shards: 5, 9, 3, 7 samples.
    sizes = [5, 9, 3, 7]
    shards = write_shards(
        tmp_path,
        [
            [mirror_sample(f"s{j}_{i}", (32, 32), i, "outline") for i in range(n)]
            for j, n in enumerate(sizes)
        ],
    )
    dm = dm_for(shards, resampled=False, samples_per_epoch=24, batch_size=2, num_workers=1)
    per_rank = []
    for rank in range(2):
        ds = dm.build_train_dataset(rank=rank, world_size=2)
        loader = dm._loader(ds)
        keys = keys_of(loader)
        assert len(loader) == 6 and len(keys) == 12  # 24 // (2 ranks * 2)
        per_rank.append({k.split("_")[0] for k in keys})
    assert not per_rank[0] & per_rank[1]
    assert per_rank[0] | per_rank[1] == {"s0", "s1", "s2", "s3"}


def test_finite_mode_refuses_too_few_shards(circles):
    dm = dm_for(circles, resampled=False, num_workers=2)
    with pytest.raises(TooFewShardsError, match=r"4 rank\(s\) x 2 worker\(s\) = 8 readers.*6"):
        dm.build_train_dataset(rank=0, world_size=4)
    dm.build_train_dataset(rank=0, world_size=3)  # 6 shards for 3 x 2 readers is fine
    with pytest.raises(ValueError, match="samples_per_epoch"):
        ShardDataModule(
            train_shards=[f"pipe:cat {circles}"], resampled=False, num_workers=0
        ).build_train_dataset(0, 1)


def test_same_seed_same_stream_other_seed_other_stream(circles):
    def stream(seed: int) -> list[str]:
        dm = dm_for(circles, seed=seed, num_workers=2, crop="random", random_flip=True)
        batches = list(zip(range(6), dm.train_dataloader(), strict=False))
        return [k for _, b in batches for k in b["key"]], torch.cat(
            [b["image"] for _, b in batches]
        )

    (keys_a, images_a), (keys_b, images_b) = stream(7), stream(7)
    assert keys_a == keys_b and torch.equal(images_a, images_b)
    assert stream(8)[0] != keys_a


@pytest.mark.parametrize(
    "mode",
    [
        dict(num_workers=0),  # resampled, epochs from the manifest
        dict(num_workers=2),  # round-robin over two workers
        dict(num_workers=2, resampled=False, samples_per_epoch=40),  # finite epochs
        dict(num_workers=1, samples_per_epoch=None, crop="random", random_flip=True),
    ],
)
def test_resumed_stream_continues_exactly_where_it_stopped(tmp_path, circles, mode):
    """Skipping the batches already trained on gives the uninterrupted stream's next batches,
    pixel for pixel (augmentation included), in every mode."""
    if mode.get("samples_per_epoch", 0) is None:  # endless: no manifest to read the length
        folder = tmp_path / "no_manifest"
        shutil.copytree(os.path.dirname(circles), folder)
        (folder / "manifest.json").unlink()
        shards = str(folder / "circles-{000000..000005}.tar")
        mode = {k: v for k, v in mode.items() if k != "samples_per_epoch"}
    else:
        shards = circles
    dm = dm_for(shards, **mode)
    full = list(zip(range(10), dm.train_dataloader(), strict=False))
    for done in (0, 3, 7):
        dm.set_resume_position(0, done)
        resumed = list(zip(range(10 - done), dm.train_dataloader(), strict=False))
        assert len(resumed) == len(full[done:])
        for (_, a), (_, b) in zip(full[done:], resumed, strict=True):
            assert a["key"] == b["key"]
            assert torch.equal(a["image"], b["image"]) and torch.equal(
                a["condition"], b["condition"]
            )


def test_resumed_trainer_sees_exactly_the_uninterrupted_batches(tmp_path, circles):
    """A Trainer resumed from a mid-epoch checkpoint and one resumed at the epoch's last batch
    train on exactly the batches of an uninterrupted run, without repeats or gaps."""

    def make_dm():
        return dm_for(circles, num_workers=2, shuffle_buffer=8)  # 12 batches per epoch

    full = TinyModule()
    trainer(tmp_path, max_steps=20).fit(full, datamodule=make_dm())
    for stop in (5, 12):  # mid-epoch, and on the epoch's last batch
        # As a killed run leaves it: a periodic checkpoint, saved after the step's batch.
        every = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=tmp_path / f"ck{stop}", every_n_train_steps=stop, save_top_k=-1
        )
        first, resumed = TinyModule(), TinyModule()
        trainer(tmp_path, max_steps=stop, callbacks=[every]).fit(first, datamodule=make_dm())
        ckpt = str(next((tmp_path / f"ck{stop}").glob("*.ckpt")))
        trainer(tmp_path, max_steps=20).fit(resumed, datamodule=make_dm(), ckpt_path=ckpt)
        assert first.seen_keys + resumed.seen_keys == full.seen_keys, stop


def test_validation_is_split_by_sample_across_ranks(circles):
    dm = dm_for(circles, val_shards=circles, num_workers=2)
    seen = []
    for rank in range(2):
        seen.append(keys_of(dm._loader(dm.build_val_dataset(rank=rank, world_size=2))))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == [f"{i:09d}" for i in range(48)]


def test_cached_latents_are_batched_and_need_centre_crop(tmp_path):
    samples = []
    for i in range(4):
        s = mirror_sample(f"l{i}", (32, 32), i, "outline")
        s["latent.npy"] = encode_npy(np.full((4, 16, 16), i, np.float16))
        samples.append(s)
    shards = write_shards(tmp_path, [samples])
    dm = dm_for(shards, use_cached_latents=True, samples_per_epoch=4, shuffle_buffer=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (4, 4, 16, 16) and batch["latent"].dtype == torch.float32
    assert batch["latent"][2].eq(2).all()
    with pytest.raises(ValueError, match="centre crop"):
        dm_for(shards, use_cached_latents=True, random_flip=True)


def test_stream_position_is_checkpointed_and_a_changed_layout_is_reported(
    tmp_path, circles, caplog
):
    """The datamodule's state (saved in every checkpoint) holds the position and what it
    depends on; resuming with other workers says the samples will differ."""
    every = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=5)
    trainer(tmp_path, max_steps=5, callbacks=[every]).fit(
        TinyModule(), datamodule=dm_for(circles, num_workers=1)
    )
    ckpt = torch.load(next((tmp_path / "ck").glob("*.ckpt")), weights_only=True)
    assert ckpt["ShardDataModule"] == {
        "epoch": 0,
        "batches_done": 5,
        "num_workers": 1,
        "world_size": 1,
        "seed": 0,
    }
    with caplog.at_level("WARNING"):
        dm_for(circles, num_workers=2).load_state_dict(ckpt["ShardDataModule"])
    assert "num_workers 1 -> 2 changed since the checkpoint" in caplog.text
