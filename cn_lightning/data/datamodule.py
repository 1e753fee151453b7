"""``ShardDataModule``: WebDataset shards → batches for the ControlNet LightningModule.

Batch contract (dict):
    image      float32 (B,3,H,W) in [-1, 1]; (H, W) = (resolution, resolution), or with
               ``buckets`` one bucket's size (every sample of a batch has the same)
    condition  float32 (B,3,H,W) in [0, 1]  (single-channel conditions repeated to 3)
    prompt     list[str];  key  list[str]
    original_size  int64 (B,2): (height, width) of the source image (the ``.json``'s
               ``original_size``, else the stored image's)
    crop_top_left  int64 (B,2): (top, left) of the crop in the image resized to cover (H, W),
               after the flip; with ``target_size`` (int64 (B,2), = (H, W)) SDXL's add_time_ids
    latent     float32 (B,C,h,w), cached VAE posterior mean, unscaled (use_cached_latents only)
    text_embeds         float32 (B,T,D), cached text-encoder hidden states (use_cached_text)
    pooled_text_embeds  float32 (B,P), SDXL's cached pooled embedding (use_cached_text, SDXL)
    n_skipped  int64 scalar: corrupt samples skipped by this worker since its previous batch
"""

from __future__ import annotations

import os

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from cn_lightning import log
from cn_lightning.data.buckets import parse_buckets
from cn_lightning.data.format import (
    TEXT_CACHE_NAME,
    TextCache,
    check_shards,
    expand_shard_urls,
    is_remote_url,
    manifest_num_samples,
    read_manifest,
    read_text_cache,
)
from cn_lightning.data.stream import (
    ShardStream,
    StreamConfig,
    TooFewShardsError,
    check_enough_shards,
)
from cn_lightning.errors import DataError
from cn_lightning.loggers import write_metrics


class ShardCountError(DataError, TooFewShardsError):
    """Finite epoch mode has fewer shards than (rank, worker) readers (a :class:`DataError`, and
    the stream's :class:`TooFewShardsError`)."""


def auto_num_workers(on_gpu: bool, local_processes: int = 1, cpus: int | None = None) -> int:
    """Data-loader workers per training process for ``num_workers: auto``.

    On a GPU the main process mostly queues kernels, so the CPUs of the process (``cpus`` /
    ``local_processes``) go to workers: one fewer than that, between 1 and 8. On a CPU the
    training step's threads already use every core, and a worker competes with them: the
    quickstart (2 cores) steps no faster with one worker than with none, so up to 4 cores per
    process get none, and more get one per 8 cores.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = max(1, (cpus or 1) // max(1, local_processes))
    if on_gpu:
        return max(1, min(8, per_process - 1))
    return 0 if per_process <= 4 else max(1, per_process // 8)


def _check_shard_count(num_shards: int, world_size: int, num_workers: int) -> None:
    try:
        check_enough_shards(num_shards, world_size, num_workers)
    except TooFewShardsError as err:
        if isinstance(err, DataError):
            raise
        raise ShardCountError(str(err)) from None


def _local_folder(urls: list[str]) -> str | None:
    """The folder of the first shard, None for remote shards (no manifest to read)."""
    return None if not urls or is_remote_url(urls[0]) else os.path.dirname(urls[0]) or "."


class EpochDataLoader(DataLoader):
    """DataLoader that tells its ShardStream which epoch starts, before workers are forked,
    so each epoch of the finite mode gets a new shard order and fresh augmentation."""

    def __init__(self, dataset: ShardStream, start_epoch: int = 0, **kwargs):
        super().__init__(dataset, **kwargs)
        self._next_epoch = start_epoch

    def __iter__(self):
        self.dataset.epoch = self._next_epoch
        self._next_epoch += 1
        batches = super().__iter__()
        self.dataset.cfg.skip_batches = 0  # only the resumed epoch starts part-way
        return batches

    # Resumable (Lightning's Stateful protocol): the position itself is Lightning's restored
    # loop state, read by ShardDataModule.resume_position before this loader is built.
    def state_dict(self) -> dict:
        return {"epoch": self.dataset.epoch}

    def load_state_dict(self, state: dict) -> None:
        pass


class ShardDataModule(L.LightningDataModule):
    """Condition/image pairs streamed from WebDataset shards (see docs/data.md).

    ``setup()`` checks the shards before the first step (missing paths, empty folders or
    patterns, an unreadable first shard, a condition key or cached latents the first shard lacks,
    the epoch length and shard count of finite mode) and raises
    :class:`~cn_lightning.errors.DataError` with a one-line message.

    Args:
        train_shards / val_shards: brace pattern, ``::``-joined patterns, list, local directory
            (its manifest's shards) or ``pipe:`` commands.
        condition_key: condition member to read, ``<key>.<condition_key>.png``.
        resampled: True = endless resampling of shards per (rank, worker) - no rank can run dry;
            False = finite epochs, each rank and worker reading a disjoint set of whole shards.
        samples_per_epoch: epoch length in samples over all ranks; every rank yields
            ``samples_per_epoch // (world_size * batch_size)`` batches. Default: the manifest's
            sample count if the shards have one, else endless (resampled) / refused (finite).
        num_workers: data-loader worker processes per rank, or ``auto`` (see
            :func:`auto_num_workers`: 0 on a CPU with up to 4 cores per rank, CPUs per rank
            minus one (1 to 8) on a GPU).
        crop / random_flip: training augmentation, the same for image and condition.
        buckets: aspect-ratio buckets for training: null (default: square ``resolution`` crops),
            ``auto`` (sizes of about ``resolution``² pixels, see
            :func:`~cn_lightning.data.buckets.make_buckets`) or a list of ``[height, width]``
            pairs. Each sample goes to the bucket nearest its aspect ratio and every batch holds
            one bucket only; validation stays square (see docs/data.md).
        bucket_divisor: sides of ``auto`` buckets (and of listed ones) are multiples of this
            (64: SD/SDXL latents / 8, halved three times by the UNet).
        bucket_max_aspect: ``auto`` buckets span aspect ratios 1/this to this.
        use_cached_latents: read ``<key>.latent.npy`` into ``batch["latent"]``.
        use_cached_text: read the cached text-encoder outputs (``<key>.text.npy``, SDXL's
            ``<key>.pooled.npy``) into ``batch["text_embeds"]`` / ``["pooled_text_embeds"]``;
            the empty prompt's come from the cache's ``text_cache.safetensors``
            (:meth:`text_caches`). ``auto`` (default): when the shards' manifest records a text
            cache (per split, from the folder of its first shard); ``true``: required;
            ``false``: never (the prompts are encoded at every step).
        text_cache_file: the text cache file when it is not beside the shards' manifest (remote
            shards): then ``auto`` means on.
        seed: with rank, worker, epoch and position, seeds every random choice.
        holdout_shards: when ``val_shards`` is null, hold out the last N shards of
            ``train_shards`` (in their listed order): never trained on, whatever the seed, ranks
            or workers, and read as the validation shards (sample grids, fidelity, validation
            loss). Ignored when ``val_shards`` is set; with no more shards than that, nothing
            is held out (one warning).
    """

    def __init__(
        self,
        train_shards: str | list[str],
        val_shards: str | list[str] | None = None,
        condition_key: str = "canny",
        resolution: int = 512,
        batch_size: int = 4,
        num_workers: int | str = "auto",
        shuffle_buffer: int = 1000,
        resampled: bool = True,
        samples_per_epoch: int | None = None,
        random_flip: bool = False,
        crop: str = "center",
        use_cached_latents: bool = False,
        use_cached_text: bool | str = "auto",
        text_cache_file: str | None = None,
        seed: int = 0,
        val_batch_size: int | None = None,
        holdout_shards: int = 0,
        buckets: str | list[list[int]] | None = None,
        bucket_divisor: int = 64,
        bucket_max_aspect: float = 2.5,
    ):
        super().__init__()
        if not isinstance(holdout_shards, int) or holdout_shards < 0:
            raise DataError(f"holdout_shards must be an integer >= 0, got {holdout_shards!r}")
        if crop not in ("center", "random"):
            raise DataError(f"crop must be 'center' or 'random', got {crop!r}")
        if use_cached_latents and (crop != "center" or random_flip):
            raise DataError(
                "use_cached_latents needs crop='center' and random_flip=False: the "
                "latents were encoded from the centre crop and cannot follow a "
                "random crop or flip"
            )
        if batch_size < 1 or resolution < 8:
            raise DataError(
                f"batch_size must be >= 1 and resolution >= 8, got batch_size="
                f"{batch_size}, resolution={resolution}"
            )
        if not isinstance(bucket_divisor, int) or bucket_divisor < 1:
            raise DataError(f"bucket_divisor must be an integer >= 1, got {bucket_divisor!r}")
        if not isinstance(bucket_max_aspect, int | float) or bucket_max_aspect < 1:
            raise DataError(f"bucket_max_aspect must be a number >= 1, got {bucket_max_aspect!r}")
        self.buckets = parse_buckets(buckets, resolution, bucket_divisor, bucket_max_aspect)
        self.train_shards = train_shards
        self.val_shards = val_shards
        self.condition_key = condition_key
        self.resolution = resolution
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        if not (num_workers == "auto" or (isinstance(num_workers, int) and num_workers >= 0)):
            raise DataError(f"num_workers must be 'auto' or an integer >= 0, got {num_workers!r}")
        self.num_workers_setting = num_workers
        self.shuffle_buffer = shuffle_buffer
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch
        self.random_flip = random_flip
        self.crop = crop
        self.use_cached_latents = use_cached_latents
        if use_cached_text not in (True, False, "auto"):
            raise DataError(f"use_cached_text must be auto, true or false, got {use_cached_text!r}")
        self.use_cached_text = use_cached_text
        self.text_cache_file = text_cache_file
        self._text_cache: dict[str, TextCache | None] = {}
        self.seed = seed
        # Only without validation shards: with them, holding out training data buys nothing.
        self.holdout_shards = holdout_shards if val_shards is None else 0
        self._holdout_warned = False
        self._resume_position: tuple[int, int] | None = None
        self._skipped = {"train": 0, "val": 0}
        self._checked: set[str] = set()

    # -- resume / distribution ------------------------------------------------------------
    def set_resume_position(self, epoch: int, batches_done: int) -> None:
        """Start the training stream in ``epoch`` after ``batches_done`` of its batches on this
        rank (overrides the position read from the trainer)."""
        self._resume_position = (int(epoch), int(batches_done))

    def resume_position(self) -> tuple[int, int]:
        """(epoch, batches of it this rank already trained on): the explicit
        :meth:`set_resume_position`, else the trainer's restored loop state (Lightning loads
        it from the checkpoint before it builds the dataloaders), else (0, 0)."""
        if self._resume_position is not None:
            return self._resume_position
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 0
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return int(trainer.current_epoch), int(done)

    # The stream position goes into checkpoints (Lightning saves a datamodule's state_dict),
    # with what it depends on: a resume with other workers or ranks cannot replay the stream.
    def state_dict(self) -> dict:
        trainer = getattr(self, "trainer", None)
        epoch, done = self.resume_position() if trainer is not None else (0, 0)
        _, world_size = self._rank_world()
        state = {
            "epoch": epoch,
            "batches_done": done,
            "num_workers": self.num_workers,
            "world_size": world_size,
            "seed": self.seed,
        }
        if self.buckets:
            state["buckets"] = [list(b) for b in self.buckets]
        return state

    def load_state_dict(self, state: dict) -> None:
        _, world_size = self._rank_world()
        now = {"num_workers": self.num_workers, "world_size": world_size, "seed": self.seed}
        changed = [f"{k} {state[k]} -> {v}" for k, v in now.items() if k in state and state[k] != v]
        buckets = [list(b) for b in self.buckets] if self.buckets else None
        if state.get("buckets") != buckets:
            changed.append("buckets")
        if changed:
            log.warning(
                f"the data stream resumes at epoch {state.get('epoch')} "
                f"after {state.get('batches_done')} batches, "
                "but not with the same samples as an uninterrupted run: "
                f"{', '.join(changed)} changed since the checkpoint"
            )

    @property
    def num_workers(self) -> int:
        """Data-loader worker processes per rank: the setting, or for ``auto``
        :func:`auto_num_workers` of this trainer's device and processes per node."""
        if self.num_workers_setting != "auto":
            return int(self.num_workers_setting)
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return auto_num_workers(on_gpu=torch.cuda.is_available(), local_processes=1)
        on_gpu = trainer.strategy.root_device.type != "cpu"
        return auto_num_workers(on_gpu=on_gpu, local_processes=max(1, trainer.num_devices))

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.global_rank), int(trainer.world_size)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    # -- shard lists ------------------------------------------------------------------------
    def train_urls(self) -> list[str]:
        """The shards trained on: ``train_shards`` without the held-out last ones."""
        urls = expand_shard_urls(self.train_shards)
        if not urls:
            raise DataError(f"train_shards {self.train_shards!r} matches no shards")
        return urls[: len(urls) - self._held_out_count(len(urls))]

    def val_urls(self) -> list[str] | None:
        """The validation shards: ``val_shards``, else the held-out training shards, else None."""
        if self.val_shards is not None:
            urls = expand_shard_urls(self.val_shards)
            if not urls:
                raise DataError(f"val_shards {self.val_shards!r} matches no shards")
            return urls
        urls = expand_shard_urls(self.train_shards)
        held_out = self._held_out_count(len(urls))
        return urls[len(urls) - held_out :] if held_out else None

    def _held_out_count(self, num_shards: int) -> int:
        """``holdout_shards``, or 0 (said once) when it would leave nothing to train on: a
        one-shard smoke test of a recipe still runs, its grids scoring training samples."""
        if 0 < num_shards <= self.holdout_shards:
            if not self._holdout_warned:
                self._holdout_warned = True
                log.warning(
                    f"data.holdout_shards={self.holdout_shards} would leave no training shard "
                    f"(train_shards has {num_shards}): nothing is held out; give more shards "
                    "or data.val_shards"
                )
            return 0
        return self.holdout_shards

    # -- checks before the first step -----------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Check the shards the stage reads before any batch (Lightning calls this on every rank
        before it sets up the model) and raise :class:`DataError` with a one-line message.

        With several ranks, each checks what it sees and the results are shared, so all ranks
        stop together: rank 0 raises the error (naming the rank that found it if not itself),
        the other ranks exit with status 2 without printing it again.
        """
        error: Exception | None = None
        try:
            if stage in (None, "fit"):
                self.check_data("train")
            if stage in (None, "fit", "validate"):
                self.check_data("val")
        except Exception as err:
            error = err
        self._raise_shared(error)

    def _raise_shared(self, error: Exception | None) -> None:
        dist = torch.distributed
        if not (
            getattr(self, "trainer", None) is not None
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            if error is not None:
                raise error
            return
        mine = None if error is None else (isinstance(error, DataError), str(error))
        results: list = [None] * dist.get_world_size()
        dist.all_gather_object(results, mine)
        failed = [(r, res) for r, res in enumerate(results) if res is not None]
        if not failed:
            return
        if dist.get_rank() != 0:
            if error is not None and not isinstance(error, DataError):
                raise error  # a bug, not bad data: keep its traceback on this rank
            raise SystemExit(2)  # rank 0 reports it
        if error is not None:
            raise error
        rank, (is_data_error, message) = failed[0]
        raise (DataError if is_data_error else RuntimeError)(f"rank {rank}: {message}")

    def check_data(self, split: str = "train") -> None:
        """Check ``train_shards`` or ``val_shards`` once (see :func:`check_shards`); for the
        finite training mode also the epoch length and the shard count for this world size."""
        spec = self.train_shards if split == "train" else self.val_shards
        if split in self._checked or (split == "val" and spec is None):
            return
        urls = check_shards(
            spec,
            f"{split}_shards",
            condition_key=self.condition_key,
            need_latent=self.use_cached_latents,
            need_text=self.text_cache(split) is not None,
        )
        if split == "train":
            urls = self.train_urls()
            held_out = len(self.val_urls() or []) if self.val_shards is None else 0
            if held_out:
                log.info(
                    f"holding out the last {held_out} of {len(urls) + held_out} train_shards "
                    "as validation data (never trained on)"
                )
        if split == "train" and not self.resampled:
            _, world_size = self._rank_world()
            _check_shard_count(len(urls), world_size, self.num_workers)
            self._batches_per_epoch(urls, world_size)
        self._checked.add(split)

    # -- cached text embeddings -------------------------------------------------------------
    def text_cache(self, split: str = "train") -> TextCache | None:
        """The text cache ``split`` ("train" or "val") reads (its empty-prompt embeddings and
        fingerprint), or None when it encodes prompts on the fly (see ``use_cached_text``)."""
        if split not in self._text_cache:
            self._text_cache[split] = self._find_text_cache(split)
        return self._text_cache[split]

    def text_caches(self) -> list[TextCache]:
        """The distinct text caches of the training and validation shards, for the model to
        compare their fingerprints with its own text encoders' before it trains on them."""
        found = [self.text_cache("train"), self.text_cache("val")]
        caches = {c.path: c for c in found if c is not None}
        return list(caches.values())

    def latent_caches(self) -> dict[str, dict]:
        """``{shard folder: its manifest's "latent" entry}`` of the local shards read with
        ``use_cached_latents`` (the VAE they were made with: ``vae``, ``vae_fingerprint``)."""
        if not self.use_cached_latents:
            return {}
        out = {}
        for urls in (self.train_urls(), self.val_urls() or []):
            folder = _local_folder(urls)
            manifest = read_manifest(folder) if folder else None
            if manifest and isinstance(manifest.get("latent"), dict):
                out[folder] = manifest["latent"]
        return out

    def _find_text_cache(self, split: str) -> TextCache | None:
        if self.use_cached_text is False:
            return None
        try:
            urls = self.train_urls() if split == "train" else self.val_urls()
        except DataError:
            return None  # no shards: check_shards says what is wrong with the spec
        if not urls:
            return None
        name = f"{split}_shards"
        path = self.text_cache_file
        if path is None:
            folder = _local_folder(urls)
            manifest = (read_manifest(folder) if folder else None) or {}
            if isinstance(manifest.get("text"), dict):
                path = os.path.join(folder, manifest["text"].get("file", TEXT_CACHE_NAME))
            elif self.use_cached_text == "auto":
                return None
            else:
                where = f"the manifest in {folder}" if folder else "remote shards have no manifest"
                raise DataError(
                    f"{name}: use_cached_text=true but {where} records no text cache: make "
                    "one with data_prep.cache_latents --text, set data.text_cache_file, or "
                    "set data.use_cached_text=false"
                )
        cache = read_text_cache(path)
        log.info(
            f"{name}: cached text embeddings from {cache.path} ({cache.kind}, made with "
            f"{cache.model}, {cache.fingerprint}): no text encoding per step"
        )
        return cache

    def _text_options(self, split: str) -> dict:
        cache = self.text_cache(split)
        return {"use_cached_text": cache is not None, "text_pooled": bool(cache and cache.pooled)}

    # -- datasets -------------------------------------------------------------------------
    def _batches_per_epoch(self, urls_spec, world_size: int) -> int | None:
        samples = self.samples_per_epoch
        if samples is None:
            samples = manifest_num_samples(urls_spec)
        if samples is None:
            if not self.resampled:
                raise DataError(
                    "finite epoch mode (resampled=False) needs samples_per_epoch, or shards "
                    "with a manifest.json giving their sample count"
                )
            return None
        batches = samples // (world_size * self.batch_size)
        if batches < 1:
            raise DataError(
                f"samples_per_epoch={samples} is less than one batch per rank "
                f"({world_size} ranks x batch_size {self.batch_size})"
            )
        return batches

    def build_train_dataset(
        self, rank: int | None = None, world_size: int | None = None
    ) -> ShardStream:
        """The training stream of one rank (rank/world from the trainer unless given)."""
        if rank is None or world_size is None:
            rank, world_size = self._rank_world()
        urls = self.train_urls()
        if not self.resampled:
            _check_shard_count(len(urls), world_size, self.num_workers)
        cfg = StreamConfig(
            urls=urls,
            condition_key=self.condition_key,
            resolution=self.resolution,
            batch_size=self.batch_size,
            shuffle_buffer=self.shuffle_buffer,
            resampled=self.resampled,
            batches_per_epoch=self._batches_per_epoch(urls, world_size),
            crop=self.crop,
            random_flip=self.random_flip,
            buckets=self.buckets,
            use_cached_latents=self.use_cached_latents,
            **self._text_options("train"),
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            skip_batches=0,
            training=True,
        )
        epoch, done = self.resume_position()
        if cfg.batches_per_epoch is not None and done >= cfg.batches_per_epoch:
            # Saved on the epoch's last batch: Lightning goes on with the next epoch.
            epoch, done = epoch + 1, 0
        cfg.skip_batches = done
        return ShardStream(cfg, epoch=epoch)

    def build_val_dataset(
        self, rank: int | None = None, world_size: int | None = None
    ) -> ShardStream | None:
        """One pass over the validation shards (or the held-out training shards), split by
        sample across ranks and workers."""
        urls = self.val_urls()
        if urls is None:
            return None
        if rank is None or world_size is None:
            rank, world_size = self._rank_world()
        cfg = StreamConfig(
            urls=urls,
            condition_key=self.condition_key,
            resolution=self.resolution,
            batch_size=self.val_batch_size,
            shuffle_buffer=0,
            resampled=False,
            batches_per_epoch=None,
            crop="center",
            random_flip=False,
            use_cached_latents=self.use_cached_latents,
            **self._text_options("val"),
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            training=False,
            drop_last=False,
        )
        return ShardStream(cfg)

    def _loader(self, dataset: ShardStream, start_epoch: int = 0) -> DataLoader:
        workers = self.num_workers
        return EpochDataLoader(
            dataset,
            start_epoch=start_epoch,
            batch_size=None,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers else None,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.build_train_dataset()
        cfg = dataset.cfg
        log.info(
            f"train stream: {len(cfg.urls)} shards, rank {cfg.rank}/{cfg.world_size}, epoch "
            f"{dataset.epoch} after {cfg.skip_batches} batches, "
            f"{cfg.batches_per_epoch or 'endless'} batches/epoch"
            + (f", {len(cfg.buckets)} aspect-ratio buckets" if cfg.buckets else ""),
            all_ranks=True,
        )
        return self._loader(dataset, start_epoch=dataset.epoch)

    def val_dataloader(self) -> DataLoader | list:
        dataset = self.build_val_dataset()
        return [] if dataset is None else self._loader(dataset)

    # -- skipped-sample accounting ----------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Accumulate the workers' skip counts on the host, before the move to the device."""
        if isinstance(batch, dict) and "n_skipped" in batch:
            trainer = getattr(self, "trainer", None)
            split = "train" if trainer is None or trainer.training else "val"
            self._skipped[split] += int(batch["n_skipped"])
        return batch

    def skipped_counts(self) -> dict[str, int]:
        """Corrupt samples skipped so far on this rank: ``{"train": n, "val": m}``."""
        return dict(self._skipped)


class SkippedSamplesLogger(Callback):
    """Logs ``data/skipped_samples_total``: corrupt samples skipped so far in training, summed over
    ranks. Reads the ShardDataModule's counts, else the batches' ``n_skipped``.

    Written straight to the loggers every ``trainer.log_every_n_steps`` optimizer steps and when
    training ends (one all-reduce each time on several ranks, not one per batch).
    """

    def __init__(self, name: str = "data/skipped_samples_total"):
        self.name = name
        self._total = 0
        self._last_step = -1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not isinstance(getattr(trainer, "datamodule", None), ShardDataModule):
            if isinstance(batch, dict) and "n_skipped" in batch:
                self._total += int(batch["n_skipped"])
        step = trainer.global_step
        if step % max(1, trainer.log_every_n_steps) == 0 and step != self._last_step:
            self._log(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._last_step:
            self._log(trainer, pl_module)

    def _log(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step
        dm = getattr(trainer, "datamodule", None)
        total = dm.skipped_counts()["train"] if isinstance(dm, ShardDataModule) else self._total
        value = torch.tensor(float(total), device=pl_module.device)
        if trainer.world_size > 1:  # every rank is here at the same step
            value = trainer.strategy.reduce(value, reduce_op="sum")
        write_metrics(trainer, {self.name: float(value)}, trainer.global_step)
