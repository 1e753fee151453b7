"""Aspect-ratio buckets: real tar shards of mixed aspect ratios through the ShardDataModule.

Batches never mix buckets; image and condition get the same resize, crop and flip; bucket use
follows the data's aspect distribution; a resumed stream continues exactly; every rank yields
its quota; SDXL's add_time_ids carry each sample's size and crop; the train CLI runs on buckets.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from data_helpers import write_shards
from distributed_helpers import run_train, subprocess_env, tiny_run_overrides
from PIL import Image

from cn_lightning.data import ShardDataModule, ShardStream, StreamConfig
from cn_lightning.data.buckets import make_buckets, nearest_bucket, parse_buckets
from cn_lightning.data.format import encode_image, encode_npy
from cn_lightning.data.stream import image_header_hw
from cn_lightning.errors import DataError

COND = "outline"  # not a discrete condition: resized like the image
BUCKETS = [[32, 32], [24, 40], [40, 24], [16, 48]]
# Stored (height, width) of the four aspect classes (nearest buckets 32x32, 24x40, 40x24,
# 16x48) and how often each is drawn; each leaves a few pixels to crop once resized to cover
# its bucket. Half the samples are stored 1.25 times larger.
CLASSES = {(48, 56): 0.4, (36, 70): 0.3, (76, 40): 0.2, (26, 90): 0.1}
NUM_SHARDS, PER_SHARD = 8, 12


def mixed_sample(key: str, size: tuple[int, int], seed: int, meta: dict | None = None) -> dict:
    """Noise image (lossless PNG) whose condition is its green channel: any difference in
    resize, crop or flip between the two shows pixel for pixel."""
    image = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return {
        "__key__": key,
        "png": encode_image(image, "png"),
        f"{COND}.png": encode_image(np.ascontiguousarray(image[:, :, 1]), "png"),
        "txt": f"prompt {key}",
        "json": json.dumps(
            meta if meta is not None else {"original_size": [size[0] * 10, size[1] * 10]}
        ),
    }


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> tuple[list[str], dict[str, tuple[int, int]]]:
    """8 shards x 12 samples of four aspect ratios; returns (paths, key -> stored size)."""
    rng = np.random.default_rng(0)
    classes, probs = list(CLASSES), list(CLASSES.values())
    sizes: dict[str, tuple[int, int]] = {}
    shards = []
    for s in range(NUM_SHARDS):
        samples = []
        for i in range(PER_SHARD):
            h, w = classes[rng.choice(len(classes), p=probs)]
            scale = 1.25 if rng.random() < 0.5 else 1.0
            size = (round(h * scale), round(w * scale))
            key = f"s{s}_{i:02d}"
            sizes[key] = size
            samples.append(mixed_sample(key, size, seed=s * 100 + i))
        shards.append(samples)
    return write_shards(tmp_path_factory.mktemp("mixed"), shards), sizes


def dm_for(shards, **kw) -> ShardDataModule:
    args = dict(
        condition_key=COND,
        resolution=32,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=16,
        buckets=BUCKETS,
        bucket_divisor=8,
        crop="random",
        random_flip=True,
    )
    args.update(kw)
    return ShardDataModule(train_shards=shards, **args)


def take(loader, n: int) -> list[dict]:
    return [b for _, b in zip(range(n), loader, strict=False)]


def expected_bucket(size: tuple[int, int]) -> tuple[int, int]:
    return nearest_bucket(*size, [tuple(b) for b in BUCKETS])


def test_bucket_lists_and_one_line_errors():
    assert parse_buckets(None, 512) is None and parse_buckets("none", 512) is None
    auto = parse_buckets("auto", 1024)
    assert auto == make_buckets(1024) and (1024, 1024) in auto and (832, 1216) in auto
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 1024**2 for h, w in auto)
    assert parse_buckets([[64, 128], [64, 64], [64, 128]], 64) == [(64, 64), (64, 128)]
    from omegaconf import OmegaConf  # what Hydra passes

    assert parse_buckets(OmegaConf.create([[24, 40], [32, 32]]), 32, 8) == [(32, 32), (24, 40)]
    for bad, message in [
        ("square", "expected null, 'auto' or a list"),
        ([[32, 30]], "not a multiple of data.bucket_divisor=8"),
        ([[32]], "is not a \\[height, width\\] pair"),
        ([32, 32], "is not a \\[height, width\\] pair"),
        ([], "empty list"),
    ]:
        with pytest.raises(DataError, match=message) as info:
            dm_for("unused-{000..001}.tar", buckets=bad)
        assert "\n" not in str(info.value)
    with pytest.raises(DataError, match="not a multiple of 64"):
        dm_for("unused.tar", buckets="auto", bucket_divisor=64)  # resolution 32
    with pytest.raises(DataError, match="bucket_max_aspect"):
        dm_for("unused.tar", buckets="auto", bucket_max_aspect=0.5)


def test_bucket_list_is_in_the_checkpointed_state(caplog):
    """Resuming with another bucket list cannot replay the stream: said at load time."""
    state = dm_for("unused.tar").state_dict()
    assert sorted(state["buckets"]) == sorted(BUCKETS)
    assert "buckets" not in dm_for("unused.tar", buckets=None).state_dict()
    with caplog.at_level("WARNING"):
        dm_for("unused.tar").load_state_dict(state)
    assert "changed since the checkpoint" not in caplog.text
    with caplog.at_level("WARNING"):
        dm_for("unused.tar", buckets=None).load_state_dict(state)
    assert "buckets changed since the checkpoint" in caplog.text


def test_no_batch_mixes_buckets_and_condition_stays_aligned(mixed):
    """(a) every batch is one bucket, the one nearest each sample's aspect ratio; (b) the
    condition is its image's green channel after the random crop and flip, pixel for pixel."""
    paths, sizes = mixed
    batches = take(dm_for(paths, samples_per_epoch=None).train_dataloader(), 40)
    seen, crops = set(), set()
    for batch in batches:
        shape = tuple(batch["image"].shape[-2:])
        assert list(shape) in BUCKETS
        assert batch["condition"].shape == batch["image"].shape == (4, 3, *shape)
        assert batch["target_size"].tolist() == [list(shape)] * 4
        assert all(expected_bucket(sizes[k]) == shape for k in batch["key"])
        # original_size: the .json's (10x the stored size here)
        assert batch["original_size"].tolist() == [[10 * v for v in sizes[k]] for k in batch["key"]]
        green = (batch["image"][:, 1] + 1) / 2
        for c in range(3):
            torch.testing.assert_close(batch["condition"][:, c], green, rtol=0, atol=1e-6)
        seen.add(shape)
        crops.update(map(tuple, batch["crop_top_left"].tolist()))
    assert len(seen) == len(BUCKETS)
    assert len(crops) > 8, "random crops at many offsets"


def coordinate_sample(key: str, size: tuple[int, int], meta: dict | None) -> dict:
    """R = column, G = row: the output's first pixel says where the crop started."""
    h, w = size
    image = np.zeros((h, w, 3), np.uint8)
    image[:, :, 0] = np.arange(w)[None, :]
    image[:, :, 1] = np.arange(h)[:, None]
    sample = mixed_sample(key, size, 0, meta)
    sample["png"] = encode_image(image, "png")
    sample[f"{COND}.png"] = encode_image(np.ascontiguousarray(image[:, :, 0]), "png")
    if meta is None:
        del sample["json"]
    return sample


def test_crop_top_left_and_original_size_known_cases(tmp_path):
    """(f) A 2:1 image into a 1:1 bucket with the centre crop: left = (W' - bw) / 2; the
    original size is the .json's, else the stored image's; and under a random crop and flip
    crop_top_left is where the crop starts in the (flipped) resized image."""
    shards = write_shards(
        tmp_path / "centre",
        [
            [
                coordinate_sample("meta", (48, 96), {"original_size": [480, 960]}),
                coordinate_sample("nometa", (48, 96), None),
                coordinate_sample("badmeta", (48, 96), {"original_size": [0, "x"]}),
                coordinate_sample("flat", (48, 96), {"original_size": [480, 960]}),
            ]
        ],
    )
    for flip in (False, True):  # a centred crop stays centred after a flip
        dm = dm_for(shards, buckets=[[32, 32]], crop="center", random_flip=flip, seed=3)
        dm.samples_per_epoch, dm.shuffle_buffer = 4, 0
        batch = next(iter(dm.train_dataloader()))
        # 48x96 covers 32x32 at 32x64: centre crop at left (64 - 32) / 2 = 16
        assert batch["crop_top_left"].tolist() == [[0, 16]] * 4
        assert batch["target_size"].tolist() == [[32, 32]] * 4
        assert dict(zip(batch["key"], batch["original_size"].tolist(), strict=True)) == {
            "meta": [480, 960],
            "nometa": [48, 96],
            "badmeta": [48, 96],
            "flat": [480, 960],
        }

    # No resize (the stored sizes already cover their buckets): the crop's first pixel is the
    # stored image's (top, left), or (top, W - 1 - left) when flipped.
    stored = {(24, 40): (24, 64), (40, 24): (72, 24)}
    samples = [
        coordinate_sample(f"c{i}", stored[b], None) for i, b in enumerate([(24, 40), (40, 24)] * 16)
    ]
    dm = dm_for(write_shards(tmp_path / "coords", [samples]), buckets=[[24, 40], [40, 24]])
    dm.samples_per_epoch, dm.shuffle_buffer = 32, 0
    flips = Counter()
    for batch in dm.train_dataloader():
        pixels = ((batch["image"] + 1) * 127.5).round().long()  # (B, 3, bh, bw): R = x, G = y
        for px, (top, left), (bh, bw) in zip(
            pixels, batch["crop_top_left"].tolist(), batch["target_size"].tolist(), strict=True
        ):
            w = stored[(bh, bw)][1]
            flipped = bool(px[0, 0, 1] < px[0, 0, 0])
            flips[flipped] += 1
            assert int(px[1, 0, 0]) == top
            assert int(px[0, 0, 0]) == (w - 1 - left if flipped else left)
            assert 0 <= top <= stored[(bh, bw)][0] - bh and 0 <= left <= w - bw
    assert flips[True] and flips[False]


def test_bucket_use_follows_the_data_aspect_distribution(mixed):
    """(c) Over many batches of the endless stream (shards drawn uniformly with replacement),
    each bucket's share of samples is the data's, within 4 standard deviations of the draw of
    shards plus the samples still waiting in buffers when counting stops."""
    paths, sizes = mixed
    per_shard = Counter()  # (shard, bucket) -> samples
    for key, size in sizes.items():
        per_shard[key.split("_")[0], expected_bucket(size)] += 1
    buckets = [tuple(b) for b in BUCKETS]
    num_batches, batch_size, buffer = 250, 4, 16
    dm = dm_for(paths, samples_per_epoch=None, shuffle_buffer=buffer, batch_size=batch_size)
    counts = Counter(
        tuple(b["target_size"][0].tolist()) for b in take(dm.train_dataloader(), num_batches)
    )
    m = num_batches * batch_size
    draws = m / PER_SHARD  # shards read, about
    waiting = buffer + len(buckets) * (batch_size - 1)
    for bucket in buckets:
        per = np.array([per_shard[f"s{s}", bucket] for s in range(NUM_SHARDS)], float)
        expected = per.sum() / len(sizes)
        sigma = math.sqrt(draws * per.var()) / m
        share = counts[bucket] * batch_size / m
        assert abs(share - expected) <= 4 * sigma + waiting / m, (bucket, share, expected, sigma)


@pytest.mark.parametrize("drop_last", [False, True])
def test_one_finite_pass_uses_every_sample_once_per_bucket(mixed, drop_last):
    """One pass over the shards: every sample in a batch of its bucket exactly once; the
    part-filled buckets at the end are smaller batches, or dropped with drop_last."""
    paths, sizes = mixed
    cfg = StreamConfig(
        urls=paths,
        condition_key=COND,
        resolution=32,
        batch_size=5,
        shuffle_buffer=0,
        resampled=False,
        buckets=[tuple(b) for b in BUCKETS],
        training=False,  # the one single-pass mode (training epochs end at their quota)
        drop_last=drop_last,
    )
    batches = list(ShardStream(cfg))
    data = Counter(expected_bucket(s) for s in sizes.values())
    got = Counter()
    for b in batches:
        bucket = tuple(b["target_size"][0].tolist())
        assert all(expected_bucket(sizes[k]) == bucket for k in b["key"])
        got[bucket] += len(b["key"])
    keys = [k for b in batches for k in b["key"]]
    assert len(keys) == len(set(keys))
    if drop_last:
        assert got == {b: n // 5 * 5 for b, n in data.items() if n >= 5}
        assert all(len(b["key"]) == 5 for b in batches)
    else:
        assert got == data and sorted(keys) == sorted(sizes)


def _same(a: dict, b: dict) -> None:
    assert a["key"] == b["key"]
    for name in ("image", "condition", "crop_top_left", "original_size", "target_size"):
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "finite"])
def test_resume_continues_exactly_with_buckets(mixed, num_workers, resampled):
    """(d) After skip_batches=K the stream's batches are the uninterrupted run's batches K..,
    pixel for pixel: skipped samples go to their buckets by header size, and the buckets left
    part-filled keep them for the batches after K."""
    paths, _ = mixed
    dm = dm_for(paths, num_workers=num_workers, resampled=resampled, samples_per_epoch=96)
    full = take(dm.train_dataloader(), 14)
    assert len({tuple(b["target_size"][0].tolist()) for b in full}) > 1
    for done in (3, 8):
        dm.set_resume_position(0, done)
        resumed = take(dm.train_dataloader(), 14 - done)
        assert len(resumed) == 14 - done
        for a, b in zip(full[done:], resumed, strict=True):
            _same(a, b)


@pytest.mark.parametrize("resampled", [True, False], ids=["resampled", "finite"])
def test_two_ranks_each_yield_their_quota(tmp_path, resampled):
    """(e) Two ranks (two workers each) yield exactly their batches per epoch, even when one
    rank's shards hold a rare bucket: no rank waits on another for a bucket."""
    shards = []
    for s in range(4):
        # shards 0 and 2 are mostly one rare aspect ratio
        sizes = [(26, 90)] * 7 + [(48, 56)] if s % 2 == 0 else list(CLASSES) * 2
        shards.append([mixed_sample(f"r{s}_{i}", size, s * 10 + i) for i, size in enumerate(sizes)])
    paths = write_shards(tmp_path, shards)
    dm = dm_for(paths, num_workers=2, resampled=resampled, samples_per_epoch=32, batch_size=2)
    keys = []
    for rank in range(2):
        loader = dm._loader(dm.build_train_dataset(rank=rank, world_size=2))
        batches = list(loader)
        assert len(loader) == len(batches) == 8  # 32 // (2 ranks x 2)
        assert all(len(set(map(tuple, b["target_size"].tolist()))) == 1 for b in batches)
        keys.append({k for b in batches for k in b["key"]})
    if not resampled:
        shards_of = [{k.split("_")[0] for k in ks} for ks in keys]
        assert not shards_of[0] & shards_of[1], "finite mode: disjoint shards per rank"


def test_cached_latents_must_fit_the_bucket(tmp_path):
    """A cached latent of the bucket's shape (divided by the VAE factor) is batched; another
    shape is a counted bad_latent skip, when decoding and when skipping on resume."""
    samples = []
    for i in range(8):
        s = mixed_sample(f"l{i}", (36, 70) if i % 2 else (48, 56), i)
        h, w = (24, 40) if i % 2 else (32, 32)
        shape = (4, h // 2, w // 2) if i != 3 else (4, 16, 16)  # l3: a square latent
        s["latent.npy"] = encode_npy(np.full(shape, i, np.float16))
        samples.append(s)
    shards = write_shards(tmp_path, [samples])
    dm = dm_for(shards, use_cached_latents=True, crop="center", random_flip=False, batch_size=1)
    dm.samples_per_epoch, dm.shuffle_buffer = 7, 0
    batches = list(dm.train_dataloader())
    assert [b["key"][0] for b in batches] == ["l0", "l1", "l2", "l4", "l5", "l6", "l7"]
    assert sum(int(b["n_skipped"]) for b in batches) == 1
    for b in batches:
        assert tuple(b["latent"].shape[-2:]) == tuple(v // 2 for v in b["image"].shape[-2:])
    dm.set_resume_position(0, 4)  # l3 is not counted when skipping either
    assert [b["key"][0] for b in dm.train_dataloader()] == ["l5", "l6", "l7"]


def test_header_size_follows_exif_orientation():
    """The skip path routes by header size; it must turn as OpenCV's decoder does."""
    from cn_lightning.data.format import decode_image

    for fmt in ("JPEG", "PNG", "WEBP"):
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees
        buf = io.BytesIO()
        Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(buf, fmt, exif=exif.tobytes())
        data = buf.getvalue()
        assert image_header_hw(data) == decode_image(data).shape[:2] == (40, 20), fmt
    assert image_header_hw(encode_image(np.zeros((20, 40, 3), np.uint8), "png")) == (20, 40)


def test_square_mode_passes_real_size_and_crop(tmp_path):
    """Without buckets the batch carries the same keys: square target, the crop of the
    shorter-side resize, the original size."""
    shards = write_shards(tmp_path, [[coordinate_sample("a", (48, 96), {"original_size": [7, 9]})]])
    dm = dm_for(shards, buckets=None, crop="center", random_flip=False, batch_size=1)
    dm.samples_per_epoch = 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (1, 3, 32, 32)
    assert batch["target_size"].tolist() == [[32, 32]]
    assert batch["crop_top_left"].tolist() == [[0, 16]]
    assert batch["original_size"].tolist() == [[7, 9]]


def test_prep_with_shorter_side_inspect_and_train_in_buckets(tmp_path, capsys):
    """data_prep.from_images --resize shorter_side keeps each photo's aspect ratio and records
    its size; inspect_shards reads the non-square shards (sizes line, contact sheet); the
    DataModule puts each sample in its bucket with the photo's size as original_size."""
    from data_prep import from_images
    from data_prep import inspect_shards as inspect_tool

    src, out = tmp_path / "photos", tmp_path / "shards"
    src.mkdir()
    photos = {"wide": (60, 150), "tall": (120, 72), "square": (64, 64)}  # (height, width)
    rng = np.random.default_rng(0)
    for name, size in photos.items():
        (src / f"{name}.txt").write_text(name)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(src / f"{name}.png")
    from_images.main(
        ["--src", str(src), "--out", str(out), "--resolution", "32", "--resize", "shorter_side"]
        + ["--condition", "canny", "--image-format", "png", "--workers", "0"]
    )
    sheet = tmp_path / "sheet.png"
    with pytest.raises(SystemExit) as exc:
        inspect_tool.main([str(out), "--condition", "canny", "--sheet", str(sheet)])
    printed = capsys.readouterr().out
    assert exc.value.code == 0 and sheet.is_file(), printed
    assert "image sizes: 3 distinct; aspect ratios (w/h) 0.6 to 2.5" in printed

    dm = ShardDataModule(
        train_shards=str(out),
        condition_key="canny",
        resolution=32,
        batch_size=1,
        num_workers=0,
        buckets="auto",
        bucket_divisor=8,
        resampled=False,  # one epoch: the manifest's 3 samples, once each
        shuffle_buffer=0,
    )
    got = {b["key"][0]: b for b in dm.train_dataloader()}
    assert set(got) == set(photos)
    assert got["wide"]["target_size"].tolist() == [[24, 40]]
    assert got["tall"]["target_size"].tolist() == [[40, 24]]
    assert got["square"]["target_size"].tolist() == [[32, 32]]
    for name, size in photos.items():
        assert got[name]["original_size"].tolist() == [list(size)]
    # wide: stored 32x80, resized to cover 24x40 at 24x60, centre crop at left (60 - 40) / 2
    assert got["wide"]["crop_top_left"].tolist() == [[0, 10]]


def test_sdxl_time_ids_carry_each_samples_size_and_crop(mixed, tiny_sdxl_path):
    """(g, SDXL) A real bucketed batch through the tiny SDXL module's loss: add_time_ids are
    (original size, crop top-left, bucket size) per sample, and the target size the module
    derives from the latents is the bucket's."""
    from cn_lightning.models.module import ControlNetModule

    module = ControlNetModule(tiny_sdxl_path)
    paths, _ = mixed
    batch = next(
        b
        for b in dm_for(paths, samples_per_epoch=None, batch_size=2).train_dataloader()
        if b["image"].shape[-1] != b["image"].shape[-2]
    )
    seen = []
    original = module.added_cond_kwargs

    def spy(pooled, target_size, batch=None):
        out = original(pooled, target_size, batch)
        seen.append(out["time_ids"])
        return out

    module.added_cond_kwargs = spy
    loss = module.compute_loss(batch, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    expected = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], 1)
    assert seen[0].tolist() == expected.float().tolist()


class BucketRecorder(L.Callback):
    """Writes the (height, width) of every training batch to ``<out_dir>/shapes_rank<R>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.shapes: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.shapes.append(list(batch["image"].shape[-2:]))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"shapes_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.shapes))


def _cli_args(tiny_sd_path, mixed, run_dir: Path, steps: int) -> list[str]:
    paths, _ = mixed
    return tiny_run_overrides(tiny_sd_path, str(Path(paths[0]).parent), run_dir, steps) + [
        "data.samples_per_epoch=32",  # no manifest: give the epoch length
        "data.buckets=auto",
        "data.bucket_divisor=8",
        "data.crop=random",
        "data.random_flip=true",
        "+callbacks.shapes._target_=test_buckets.BucketRecorder",
        f"+callbacks.shapes.out_dir={run_dir / 'shapes'}",
    ]


@pytest.mark.slow  # about 40 s on 2 cores
def test_train_cli_runs_on_buckets(tiny_sd_path, mixed, tmp_path):
    """(g) The training command on the tiny SD backbone with data.buckets=auto: non-square
    batches train, checkpoint and export."""
    run_dir = tmp_path / "run"
    result = run_train(
        _cli_args(tiny_sd_path, mixed, run_dir, steps=6), subprocess_env(tmp_path), tmp_path
    )
    assert "3 aspect-ratio buckets" in result.stdout + result.stderr
    shapes = json.loads((run_dir / "shapes" / "shapes_rank0.json").read_text())
    assert len(shapes) == 6 and {tuple(s) for s in shapes} - {(32, 32)}, shapes
    assert (run_dir / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_ddp_two_ranks_train_on_buckets(tiny_sd_path, mixed, tmp_path):
    """(e, for real) Two DDP processes on buckets: each rank trains its own buckets' batches,
    step for step, and neither waits for the other."""
    run_dir = tmp_path / "run"
    args = _cli_args(tiny_sd_path, mixed, run_dir, steps=6) + [
        "strategy=ddp",
        "trainer.devices=2",
        "data.resampled=false",
    ]
    run_train(args, subprocess_env(tmp_path), tmp_path)
    shapes = [json.loads((run_dir / "shapes" / f"shapes_rank{r}.json").read_text()) for r in (0, 1)]
    assert len(shapes[0]) == len(shapes[1]) == 6
    assert shapes[0] != shapes[1], "the ranks trained different buckets in some step"
