"""The sample stream behind :class:`~cn_lightning.data.ShardDataModule`.

Per DataLoader worker: shard URLs → tar members grouped into raw samples → shuffle buffer →
decode + paired resize/crop/flip (corrupt samples skipped and counted) → batches of tensors,
each of one aspect-ratio bucket (see :mod:`cn_lightning.data.buckets`) when buckets are set.
Batching happens in the worker (the DataLoader uses ``batch_size=None``), so every rank yields
exactly the number of batches it was given, whatever the shard sizes.
"""

from __future__ import annotations

import io
import json
import random
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen

from cn_lightning import log
from cn_lightning.conditions import is_discrete
from cn_lightning.data.buckets import Bucket, bucket_transform, nearest_bucket
from cn_lightning.data.format import (
    IMAGE_EXTS,
    LATENT_EXT,
    POOLED_EXT,
    TEXT_EXT,
    decode_image,
    decode_npy,
    decode_prompt,
    tar_samples,
)
from cn_lightning.data.transforms import condition_to_tensor, image_to_tensor
from cn_lightning.errors import DataError

SKIP_REASONS = (
    "open_error",
    "corrupt_tar",
    "missing_image",
    "missing_condition",
    "decode_error",
    "size_mismatch",
    "bad_latent",
    "bad_text",
)
_CONDITION_EXTS = ("png", "jpg", "jpeg", "webp")
_MAX_WARNINGS = 10
_MAX_CONSECUTIVE_FAILURES = 10_000
# An endless stream is cut into segments of this many batches per worker, each seeded on its
# own, so a resumed run replays at most one segment to find its place.
ENDLESS_SEGMENT_BATCHES = 1000


class TooFewShardsError(ValueError):
    """Finite epoch mode needs at least one shard per (rank, worker)."""


@dataclass
class StreamConfig:
    """Everything a worker needs to produce its batches (picklable)."""

    urls: list[str]
    condition_key: str = "canny"
    resolution: int = 512
    batch_size: int = 4
    shuffle_buffer: int = 1000
    resampled: bool = True
    batches_per_epoch: int | None = None  # per rank; None = endless (resampled) or one pass
    crop: str = "center"
    random_flip: bool = False
    # Aspect-ratio buckets, (height, width) pixels (buckets.parse_buckets); None = square
    # resolution x resolution crops. Batches never mix buckets.
    buckets: list[tuple[int, int]] | None = None
    use_cached_latents: bool = False
    # <key>.text.npy into "text_embeds" (and with text_pooled, SDXL's <key>.pooled.npy into
    # "pooled_text_embeds"): cached text-encoder outputs from data_prep.cache_latents --text.
    use_cached_text: bool = False
    text_pooled: bool = False
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    # Batches of this rank's current epoch already trained on (a resumed run skips them).
    skip_batches: int = 0
    training: bool = True  # False: validation (split by sample, no shuffle/augmentation)
    drop_last: bool = True


def derive_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers (seed, rank, worker, step, epoch, ...)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
        .generate_state(2)
        .astype(np.uint64)
        .view(np.uint64)[0]
    )


def check_enough_shards(num_shards: int, world_size: int, num_workers: int) -> None:
    """Finite mode splits whole shards over ranks x workers; refuse if some would get none."""
    needed = world_size * max(1, num_workers)
    if num_shards < needed:
        raise TooFewShardsError(
            f"finite epoch mode (resampled=False) splits shards over {world_size} rank(s) x "
            f"{max(1, num_workers)} worker(s) = {needed} readers, but there are only "
            f"{num_shards} shard(s): some readers would get no data and DDP would hang. Use "
            "resampled=True (the default), fewer num_workers, or more, smaller shards "
            "(data_prep --samples-per-shard)."
        )


class SkipCounter:
    """Counts skipped samples by reason; ``take()`` returns the count since the last take."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}  # reason -> the first skipped sample and why
        self._reported = 0

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, f"{where}{f': {detail}' if detail else ''}")
        if sum(self.counts.values()) <= _MAX_WARNINGS:
            log.warning(
                f"skipping {where} ({reason}){f': {detail}' if detail else ''}", all_ranks=True
            )

    def describe(self) -> str:
        """One line: how many were skipped, by reason, with the first case of each."""
        parts = [
            f"{reason} x{n} (first: {self.first[reason]})" for reason, n in self.counts.items()
        ]
        return (
            f"{sum(self.counts.values())} skipped: " + "; ".join(parts) if parts else "none skipped"
        )

    def take(self) -> int:
        total = sum(self.counts.values())
        delta, self._reported = total - self._reported, total
        return delta


def iter_tar(url: str, counter: SkipCounter) -> Iterator[dict[str, bytes | str]]:
    """Raw samples (``{"__key__", "__url__", ext: bytes}``) of one shard, local path or
    ``pipe:``/URL. A shard that cannot be opened or breaks off (truncated, corrupt) is counted
    once and the stream moves on to the next shard."""
    try:
        stream = gopen(url, "rb")
    except Exception as err:
        counter.skip("open_error", url, str(err))
        return
    try:
        with closing(stream):
            yield from tar_samples(stream, url)
    except Exception as err:  # the sample being read when the tar broke off is dropped
        counter.skip("corrupt_tar", url, f"{type(err).__name__}: {err}")


def shuffle_buffer(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle with a buffer of ``size`` items (size <= 1: no shuffle)."""
    if size <= 1:
        yield from samples
        return
    buf: list = []
    for sample in samples:
        if len(buf) < size:
            buf.append(sample)
            continue
        i = rng.randrange(size)
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def _first(sample: dict, names: list[str]) -> bytes | None:
    for name in names:
        if name in sample:
            return sample[name]
    return None


def decode_sample(
    raw: dict, cfg: StreamConfig, rng: random.Random, counter: SkipCounter
) -> dict | None:
    """Raw sample → ``{"image": (3,H,W) in [-1,1], "condition": (3,H,W) in [0,1], "prompt",
    "key", "original_size", "crop_top_left", "target_size"[, "latent": (C,h,w)][,
    "text_embeds": (T,D)[, "pooled_text_embeds": (P,)]]}``, or None (counted) if anything is
    missing or broken.

    (H, W) is the bucket nearest the image's aspect ratio (``cfg.buckets``), else
    (resolution, resolution); see :func:`sample_geometry` for the three (2,) int64 sizes.
    """
    where = f"{raw['__url__']}:{raw['__key__']}"
    image_bytes = _first(raw, list(IMAGE_EXTS))
    if image_bytes is None:
        counter.skip("missing_image", where)
        return None
    cond_bytes = _first(raw, [f"{cfg.condition_key}.{e}" for e in _CONDITION_EXTS])
    if cond_bytes is None:
        counter.skip("missing_condition", where, f"no {cfg.condition_key}.png")
        return None
    image, condition = decode_image(image_bytes), decode_image(cond_bytes)
    if image is None or condition is None:
        counter.skip("decode_error", where, "image" if image is None else "condition")
        return None
    if image.shape[:2] != condition.shape[:2]:
        counter.skip(
            "size_mismatch", where, f"image {image.shape[:2]} vs condition {condition.shape[:2]}"
        )
        return None
    out: dict = {}
    if cfg.use_cached_latents:
        try:
            if LATENT_EXT not in raw:
                raise KeyError(
                    f"no <key>.{LATENT_EXT} (use_cached_latents needs shards from "
                    "data_prep.cache_latents)"
                )
            latent = decode_npy(raw[LATENT_EXT])
            if latent.ndim != 3:
                raise ValueError(f"expected a (C, h, w) array, got shape {latent.shape}")
            out["latent"] = torch.from_numpy(latent.astype(np.float32))
        except Exception as err:
            counter.skip("bad_latent", where, f"{type(err).__name__}: {err}")
            return None
    if cfg.use_cached_text:
        try:
            out.update(decode_text(raw, cfg.text_pooled))
        except Exception as err:
            counter.skip("bad_text", where, f"{type(err).__name__}: {err}")
            return None
    stored = (int(image.shape[0]), int(image.shape[1]))
    bucket = sample_bucket(stored, cfg)
    if cfg.buckets and "latent" in out and not latent_fits(tuple(out["latent"].shape), bucket):
        counter.skip(
            "bad_latent",
            where,
            f"latent {tuple(out['latent'].shape)} is not the {bucket[0]}x{bucket[1]} bucket's "
            "(cache the latents with the same buckets)",
        )
        return None
    crop = cfg.crop if cfg.training else "center"
    # With bucket (resolution, resolution) this is the square path's shorter-side resize and
    # crop, pixel for pixel.
    image, condition, crop_top_left = bucket_transform(
        image,
        condition,
        bucket,
        crop=crop,
        flip=cfg.random_flip and cfg.training,
        rng=rng,
        discrete_condition=is_discrete(cfg.condition_key),
    )
    out.update(
        image=image_to_tensor(image),
        condition=condition_to_tensor(condition),
        prompt=decode_prompt(raw),
        key=str(raw["__key__"]),
        **sample_geometry(raw, stored, crop_top_left, bucket),
    )
    return out


def sample_bucket(size: tuple[int, int], cfg: StreamConfig) -> Bucket:
    """The training size of an image of ``size`` (height, width): the bucket nearest its aspect
    ratio, or (resolution, resolution) without buckets."""
    if cfg.buckets:
        return nearest_bucket(size[0], size[1], cfg.buckets)
    return (cfg.resolution, cfg.resolution)


def latent_fits(shape: tuple[int, ...] | None, bucket: Bucket) -> bool:
    """A cached (C, h, w) latent fits ``bucket`` if it is the bucket divided by one integer
    factor (the VAE's: 8 for SD/SDXL, 2 for the tiny test models)."""
    if shape is None or len(shape) != 3 or min(shape[1:]) < 1:
        return False
    (h, w), (bh, bw) = shape[1:], bucket
    return bh % h == 0 and bw % w == 0 and bh // h == bw // w


def meta_original_size(raw: dict) -> tuple[int, int] | None:
    """``original_size`` [height, width] from the sample's ``.json`` (what data_prep records:
    the source image's size before its resize), None if absent or not two positive ints."""
    try:
        value = json.loads(raw["json"])["original_size"]
        height, width = value
    except Exception:
        return None
    ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (height, width))
    return (height, width) if ok else None


def sample_geometry(
    raw: dict, stored: tuple[int, int], crop_top_left: tuple[int, int], bucket: Bucket
) -> dict[str, torch.Tensor]:
    """SDXL's size conditioning of one sample, (2,) int64 each: ``original_size`` (height,
    width: the ``.json``'s ``original_size``, else the stored image's), ``crop_top_left``
    (top, left of the crop in the image resized to cover the bucket, measured after a flip)
    and ``target_size`` (the bucket: the batch's image size)."""
    original = meta_original_size(raw) or stored
    return {
        name: torch.tensor(value, dtype=torch.int64)
        for name, value in (
            ("original_size", original),
            ("crop_top_left", crop_top_left),
            ("target_size", bucket),
        )
    }


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from an encoded image's header, None if it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.size
    except Exception:
        return None


def npy_header_ndim(data: bytes | None) -> int | None:
    """Dimensions of an ``.npy`` array from its header, None if it is not one."""
    shape = npy_header_shape(data)
    return None if shape is None else len(shape)


def image_header_hw(data: bytes | None) -> tuple[int, int] | None:
    """(height, width) of an encoded image as :func:`decode_image` returns it (OpenCV turns it
    by its EXIF orientation), read from the header only; None if it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            # Only an EXIF block read with the header: PNG's getexif() would decode the pixels.
            turned = "exif" in image.info and image.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:
        return None
    return (width, height) if turned else (height, width)


def npy_header_shape(data: bytes | None) -> tuple[int, ...] | None:
    """Shape of an ``.npy`` array from its header, None if it is not one."""
    if not data:
        return None
    try:
        buf = io.BytesIO(data)
        major, _ = np.lib.format.read_magic(buf)
        read = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        return tuple(read(buf)[0])
    except Exception:
        return None


def raw_bucket(raw: dict, cfg: StreamConfig) -> Bucket | None:
    """The bucket :func:`decode_sample` puts a usable sample in, read from its headers (used when
    skipping already-trained batches): None if its cached latent does not fit that bucket."""
    if not cfg.buckets:
        return (cfg.resolution, cfg.resolution)
    size = image_header_hw(_first(raw, list(IMAGE_EXTS)))
    if size is None:
        return None
    bucket = sample_bucket(size, cfg)
    if cfg.use_cached_latents and not latent_fits(npy_header_shape(raw.get(LATENT_EXT)), bucket):
        return None
    return bucket


def decode_text(raw: dict, pooled: bool) -> dict[str, torch.Tensor]:
    """``{"text_embeds": float32 (T, D)[, "pooled_text_embeds": float32 (P,)]}`` from a sample's
    cached ``<key>.text.npy`` (and ``<key>.pooled.npy``); raises if missing or malformed."""
    out = {}
    for ext, name, ndim, what in (
        (TEXT_EXT, "text_embeds", 2, "(tokens, hidden)"),
        (POOLED_EXT, "pooled_text_embeds", 1, "(proj,)"),
    ):
        if ext == POOLED_EXT and not pooled:
            break
        if ext not in raw:
            raise KeyError(f"no <key>.{ext} (use_cached_text needs data_prep.cache_latents --text)")
        array = decode_npy(raw[ext])
        if array.ndim != ndim:
            raise ValueError(f"<key>.{ext}: expected a {what} array, got shape {array.shape}")
        out[name] = torch.from_numpy(array.astype(np.float32))
    return out


def text_headers_ok(raw: dict, pooled: bool) -> bool:
    """What :func:`decode_text` would decide, from the ``.npy`` headers only."""
    if npy_header_ndim(raw.get(TEXT_EXT)) != 2:
        return False
    return not pooled or npy_header_ndim(raw.get(POOLED_EXT)) == 1


def sample_is_usable(raw: dict, cfg: StreamConfig) -> bool:
    """What :func:`decode_sample` would decide, read from the members' headers only (no
    pixel decoding): used to skip already-trained batches quickly on resume. A sample whose
    header is sound but whose pixels are corrupt passes here and fails the decode."""
    image_bytes = _first(raw, list(IMAGE_EXTS))
    cond_bytes = _first(raw, [f"{cfg.condition_key}.{e}" for e in _CONDITION_EXTS])
    if image_bytes is None or cond_bytes is None:
        return False
    sizes = [image_header_size(image_bytes), image_header_size(cond_bytes)]
    if None in sizes or sizes[0] != sizes[1]:
        return False
    if cfg.use_cached_text and not text_headers_ok(raw, cfg.text_pooled):
        return False
    if cfg.use_cached_latents:
        return npy_header_ndim(raw.get(LATENT_EXT)) == 3
    return True


def collate(samples: list[dict], n_skipped: int) -> dict:
    """List of decoded samples → the batch dict of the DataModule contract."""
    batch = {
        "image": torch.stack([s["image"] for s in samples]),
        "condition": torch.stack([s["condition"] for s in samples]),
        "prompt": [s["prompt"] for s in samples],
        "key": [s["key"] for s in samples],
        "n_skipped": torch.tensor(n_skipped, dtype=torch.int64),
    }
    if "latent" in samples[0]:
        batch["latent"] = torch.stack([s["latent"] for s in samples])
    for name in ("text_embeds", "pooled_text_embeds"):  # (B, T, D) and (B, P), cached text
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    for name in ("original_size", "crop_top_left", "target_size"):  # (B, 2) int64 each
        if name in samples[0]:
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


class ShardStream(IterableDataset):
    """Iterable of ready batches for one rank; see the module docstring.

    Seeding: each worker's randomness comes from (seed, rank, worker, epoch, segment), each
    sample's augmentation from (that seed, sample index), and the finite-mode shard order from
    (seed, epoch), shared by all ranks. Two runs with the same seed, world size and
    ``num_workers`` produce the same stream, and a run resumed after ``skip_batches`` batches of
    an epoch continues it exactly where the uninterrupted run would be.
    """

    def __init__(self, cfg: StreamConfig, epoch: int = 0):
        super().__init__()
        if not cfg.urls:
            raise DataError("no shard URLs given")
        self.cfg = cfg
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch on this rank (only when the epoch length is set)."""
        if self.cfg.batches_per_epoch is None:
            raise TypeError("endless stream: no length")
        return self.cfg.batches_per_epoch

    # -- per worker -----------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _quota(self, worker: int, num_workers: int) -> int | None:
        """This worker's share of the rank's batches (round-robin order of the DataLoader)."""
        total = self.cfg.batches_per_epoch
        if total is None:
            return None
        return total // num_workers + (1 if worker < total % num_workers else 0)

    def _my_shards(self, worker: int, num_workers: int) -> list[str]:
        """Finite mode: the same shuffled order on every rank, then a disjoint slice each."""
        cfg = self.cfg
        check_enough_shards(len(cfg.urls), cfg.world_size, num_workers)
        order = list(cfg.urls)
        random.Random(derive_seed(cfg.seed, self.epoch, 1)).shuffle(order)
        return order[cfg.rank :: cfg.world_size][worker::num_workers]

    def _shard_urls(self, rng: random.Random, worker: int, num_workers: int) -> Iterator[str]:
        cfg = self.cfg
        if not cfg.training:
            yield from cfg.urls  # validation reads everything and splits by sample
            return
        if cfg.resampled:
            while True:  # endless: no rank can run out, so DDP never waits on a finished rank
                yield rng.choice(cfg.urls)
        mine = self._my_shards(worker, num_workers)
        while True:
            yield from mine
            if cfg.batches_per_epoch is None:
                return  # one pass
            rng.shuffle(mine)  # more passes until the quota is met (equal batches per rank)

    def _raw_samples(self, rng, counter, worker, num_workers) -> Iterator[dict]:
        cfg = self.cfg
        readers, reader = cfg.world_size * num_workers, cfg.rank * num_workers + worker
        index = 0  # running sample index: validation keeps every readers-th sample
        empty_run = 0
        for url in self._shard_urls(rng, worker, num_workers):
            got = False
            for raw in iter_tar(url, counter):
                got = True
                index += 1
                if not cfg.training and (index - 1) % readers != reader:
                    continue
                yield raw
            empty_run = 0 if got else empty_run + 1
            if empty_run > max(10, 2 * len(cfg.urls)):
                # Endless/cycling modes would spin forever on unreadable shards.
                raise DataError(
                    f"{empty_run} shards in a row gave no samples; "
                    f"skipped so far: {dict(counter.counts)}"
                )

    @staticmethod
    def _skip_for(done: int, worker: int, num_workers: int) -> int:
        """This worker's share of the rank's ``done`` already-trained batches (round-robin)."""
        return done // num_workers + (1 if worker < done % num_workers else 0)

    def __iter__(self) -> Iterator[dict]:
        # Read the position now: the loader resets skip_batches right after creating us.
        return self._iterate(self.epoch, self.cfg.skip_batches)

    def _iterate(self, epoch: int, skip_batches: int) -> Iterator[dict]:
        cfg = self.cfg
        loader_worker, num_workers = self._worker()
        # The DataLoader takes batches round-robin from worker 0 on. After skip_batches, the
        # next batch belongs to the uninterrupted run's worker (skip_batches % num_workers), so
        # each worker takes over the stream of the one that stood at its place.
        worker = (loader_worker + skip_batches) % num_workers
        quota = self._quota(worker, num_workers)
        if quota == 0:
            return
        counter = SkipCounter()
        self.skips = counter  # what this iteration skipped, for in-process readers' messages
        skip = self._skip_for(skip_batches, worker, num_workers)
        if not cfg.training:
            raw = self._raw_samples(random.Random(cfg.seed), counter, worker, num_workers)
            yield from self._batches(raw, cfg.seed, counter, None, 0)
            return
        # Segments: the epoch (finite), or ENDLESS_SEGMENT_BATCHES at a time (endless). Each
        # is seeded by (seed, rank, worker, epoch, segment) alone, so a resumed run rebuilds
        # the segment it stopped in and skips the batches it already trained on.
        length = quota if quota is not None else ENDLESS_SEGMENT_BATCHES
        segment, skip = divmod(skip, length)
        while quota is None or segment == 0:
            seed = derive_seed(cfg.seed, cfg.rank, worker, epoch, segment)
            rng = random.Random(seed)
            raw = shuffle_buffer(
                self._raw_samples(rng, counter, worker, num_workers), cfg.shuffle_buffer, rng
            )
            yield from self._batches(raw, seed, counter, length, skip)
            segment, skip = segment + 1, 0

    def _batches(self, raw, seed: int, counter, quota: int | None, skip: int) -> Iterator[dict]:
        """Up to ``quota`` batches from ``raw``, the first ``skip`` of them only counted.

        Sample ``n`` of the segment draws its augmentation from its own seed (seed, n), so
        skipping (which checks samples without decoding them) leaves the rest unchanged.

        Every bucket (without buckets: the one square size) fills its own list, and a batch is
        made when one holds ``batch_size`` samples: no batch mixes buckets, and the batches
        count towards ``quota`` whatever their bucket. Skipping routes each sample to its bucket
        by its header size; the samples of buckets the skipped batches left part-filled are kept
        (undecoded, decoded with their own seed when their bucket fills), so the batches after
        ``skip`` are the uninterrupted run's. Part-filled buckets at the end of a pass are
        dropped (``drop_last``) or each made into a smaller batch.
        """
        cfg = self.cfg
        # Per bucket: decoded samples, or (n, raw) samples kept while skipping.
        pending: dict[Bucket, list] = {}
        made = failures = 0
        decoded_any = False
        for n, sample in enumerate(raw):
            if made < skip:
                bucket = raw_bucket(sample, cfg) if sample_is_usable(sample, cfg) else None
                if bucket is not None:
                    waiting = pending.setdefault(bucket, [])
                    waiting.append((n, sample))
                    if len(waiting) == cfg.batch_size:
                        pending[bucket], made = [], made + 1
                continue
            rng = random.Random(derive_seed(seed, n))
            decoded = decode_sample(sample, cfg, rng, counter)
            if decoded is None:
                failures += 1
                if failures > _MAX_CONSECUTIVE_FAILURES:
                    raise DataError(
                        f"{failures} samples in a row could not be used; "
                        f"skipped: {dict(counter.counts)}"
                    )
                continue
            decoded_any, failures = True, 0
            bucket = _bucket_of(decoded)
            waiting = pending.setdefault(bucket, [])
            waiting.append(decoded)
            if len(waiting) < cfg.batch_size:
                continue
            ready = self._decode_kept(waiting, bucket, pending, seed, counter)
            pending[bucket] = ready[cfg.batch_size :]
            if len(ready) < cfg.batch_size:  # a kept sample did not decode after all
                pending[bucket] = ready
                continue
            yield collate(ready[: cfg.batch_size], counter.take())
            made += 1
            if quota is not None and made >= quota:
                return
        if not cfg.drop_last:
            for bucket in list(pending):
                ready = self._decode_kept(pending.pop(bucket), bucket, pending, seed, counter)
                if ready and (quota is None or made < quota):
                    yield collate(ready, counter.take())
                    made += 1
        if quota is not None and made < quota:
            raise DataError(
                f"rank {cfg.rank}: the shards gave only {made} of {quota} batches "
                f"({'no decodable samples' if not decoded_any else 'too few samples'}); "
                f"skipped: {dict(counter.counts)}"
            )

    def _decode_kept(
        self, waiting: list, bucket: Bucket, pending: dict, seed: int, counter: SkipCounter
    ) -> list[dict]:
        """``waiting`` with the samples kept while skipping decoded (with their own seeds);
        those that fail are dropped (counted), one that decodes to another bucket than its
        header said moves to that bucket's list."""
        ready = []
        for item in waiting:
            if isinstance(item, tuple):
                n, sample = item
                item = decode_sample(sample, self.cfg, random.Random(derive_seed(seed, n)), counter)
                if item is None:
                    continue
                if _bucket_of(item) != bucket:
                    pending.setdefault(_bucket_of(item), []).append(item)
                    continue
            ready.append(item)
        return ready


def _bucket_of(decoded: dict) -> Bucket:
    height, width = decoded["target_size"].tolist()
    return (height, width)
