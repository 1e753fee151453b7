"""Parallel, resumable, atomic shard writing and the manifest: the engine behind every shard
builder (the ``data_prep`` tools and :mod:`cn_lightning.data.synthetic`).

Every builder enumerates its inputs in a deterministic order and cuts them into shards of
``samples_per_shard`` items: shard ``i`` holds items ``[i*S, (i+1)*S)``. Shard ``i`` belongs to
part ``i % num_parts``, so SLURM array tasks split the work without talking to each other. A shard
counts as finished when its tar and its stats file ``.stats/<shard>.json`` both exist (both are
written atomically), so a rerun skips finished shards and redoes interrupted ones. After its
shards, every run rebuilds ``manifest.json`` from all stats files present; the last part to finish
writes the complete manifest.
"""

from __future__ import annotations

import glob
import json
import multiprocessing as mp
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from cn_lightning.atomic import write_json_atomic
from cn_lightning.data.format import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    brace_pattern,
    shard_name,
    write_shard_atomic,
)
from cn_lightning.errors import DataError

STATS_DIR = ".stats"
CONFIG_NAME = "_config.json"


class RejectedInput(Exception):
    """An input that cannot become a sample; ``reason`` is a short code for the manifest."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class ShardSettingsError(DataError):
    """The output folder already holds shards built with other content settings."""


@dataclass
class PrepConfig:
    """What a tool run produces and how; ``settings`` are the tool-specific content settings."""

    out: str
    prefix: str
    tool: str
    resolution: int | None
    resize: str
    image_format: str
    quality: int
    samples_per_shard: int
    workers: int
    num_parts: int = 1
    part_index: int = 0
    condition_types: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    overwrite: bool = False
    progress: bool = True

    def fingerprint(self, num_inputs: int) -> dict[str, Any]:
        """Everything that determines shard content (not workers or parts)."""
        return {
            "format": FORMAT_VERSION,
            "tool": self.tool,
            "prefix": self.prefix,
            "resolution": self.resolution,
            "resize": self.resize,
            "image_format": self.image_format,
            "quality": self.quality,
            "samples_per_shard": self.samples_per_shard,
            "num_inputs": num_inputs,
            "condition_types": self.condition_types,
            "settings": self.settings,
        }


# --------------------------------------------------------------------------- worker side
class SampleMaker:
    """Turns one input item into one sample dict; subclasses implement :meth:`make`.

    Instances are sent to each worker once; heavy state (extractor models) should be created
    lazily in :meth:`setup`, which runs once per process. A maker that is faster on many items
    at once (a model on a GPU) sets ``batch_size`` and overrides :meth:`make_many`.
    """

    batch_size: int = 1

    def setup(self) -> None:  # noqa: B027 (optional hook)
        """Per-process initialisation (load models, ...)."""

    def make(self, item: Any) -> dict[str, bytes | str]:
        raise NotImplementedError

    def make_many(self, items: Sequence[Any]) -> list[dict[str, bytes | str] | Exception]:
        """One sample dict, or the exception that rejects it, per item, in order."""
        out: list[dict[str, bytes | str] | Exception] = []
        for item in items:
            try:
                out.append(self.make(item))
            except Exception as err:  # noqa: BLE001 - recorded as a reject by the caller
                out.append(err)
        return out

    def describe(self, item: Any) -> str:
        """Name of the input for the manifest's reject list."""
        return str(item)


_MAKER: SampleMaker | None = None


def _init_worker(maker: SampleMaker) -> None:
    global _MAKER
    _MAKER = maker
    maker.setup()


def _build_shard(task: tuple[str, int, Sequence[Any]]) -> dict[str, Any]:
    """Worker: build one shard from its items; rejects are recorded, never fatal."""
    path, index, items = task
    assert _MAKER is not None
    maker = _MAKER
    rejected: list[dict[str, str]] = []
    start = time.perf_counter()

    def samples():
        step = max(1, int(maker.batch_size))
        for start in range(0, len(items), step):
            chunk = items[start : start + step]
            try:
                results = maker.make_many(chunk)
            except Exception as err:  # noqa: BLE001 - a failed batch rejects its items
                results = [err] * len(chunk)
            for item, result in zip(chunk, results, strict=True):
                if not isinstance(result, Exception):
                    yield result
                elif isinstance(result, RejectedInput):
                    rejected.append(
                        {
                            "input": maker.describe(item),
                            "reason": result.reason,
                            "detail": result.detail,
                        }
                    )
                else:  # one bad file must not kill a million-sample run
                    rejected.append(
                        {
                            "input": maker.describe(item),
                            "reason": type(result).__name__,
                            "detail": str(result)[:300],
                        }
                    )

    count, nbytes = write_shard_atomic(path, samples())
    return {
        "name": os.path.basename(path),
        "index": index,
        "num_samples": count,
        "bytes": nbytes,
        "num_inputs": len(items),
        "rejected": rejected,
        "seconds": time.perf_counter() - start,
        "pid": os.getpid(),
    }


# --------------------------------------------------------------------------- driver side
@dataclass
class RunSummary:
    """What one run did: its own shards and throughput, plus the manifest state afterwards."""

    shards_built: int
    shards_skipped: int
    samples_written: int
    rejected: int
    wall_seconds: float
    worker_seconds: float
    manifest: dict[str, Any]

    @property
    def samples_per_second_per_worker(self) -> float:
        return self.samples_written / self.worker_seconds if self.worker_seconds else 0.0


def stats_path(out: str, name: str) -> str:
    """Where the stats of shard ``name`` go; written last, so they mark the shard finished."""
    return os.path.join(out, STATS_DIR, name.replace(".tar", ".json"))


def _clear_previous(cfg: PrepConfig) -> None:
    """--overwrite: remove only what an earlier run of this prefix wrote."""
    for path in glob.glob(os.path.join(cfg.out, f"{cfg.prefix}-*.tar*")):
        os.remove(path)
    for path in glob.glob(os.path.join(cfg.out, STATS_DIR, "*.json")):
        os.remove(path)
    manifest = os.path.join(cfg.out, MANIFEST_NAME)
    if os.path.exists(manifest):
        os.remove(manifest)


def _check_config(cfg: PrepConfig, num_inputs: int) -> None:
    """Refuse to mix shards built with different settings in one directory."""
    path = os.path.join(cfg.out, STATS_DIR, CONFIG_NAME)
    fingerprint = cfg.fingerprint(num_inputs)
    if os.path.exists(path):
        with open(path) as f:
            previous = json.load(f)
        if previous != fingerprint:
            diff = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise ShardSettingsError(
                f"{cfg.out} holds shards built with different settings ({', '.join(diff)}); "
                "use another --out or pass --overwrite"
            )
    else:
        write_json_atomic(path, fingerprint)


def is_finished(out: str, name: str) -> bool:
    """A shard is finished when its tar and its stats file both exist."""
    return os.path.exists(os.path.join(out, name)) and os.path.exists(stats_path(out, name))


def plan_shards(num_items: int, samples_per_shard: int) -> list[tuple[int, int, int]]:
    """(shard index, first item, end item) for every shard."""
    return [
        (i, start, min(start + samples_per_shard, num_items))
        for i, start in enumerate(range(0, num_items, samples_per_shard))
    ]


def run_shards(
    items: Sequence[Any], maker: SampleMaker, cfg: PrepConfig, extra: dict[str, Any] | None = None
) -> RunSummary:
    """Build this part's unfinished shards in parallel, then rebuild the manifest.

    Raises :class:`ShardSettingsError` if ``cfg.out`` holds shards built with other content
    settings (and ``cfg.overwrite`` is off)."""
    os.makedirs(os.path.join(cfg.out, STATS_DIR), exist_ok=True)
    if cfg.overwrite:
        _clear_previous(cfg)
    _check_config(cfg, len(items))
    plan = plan_shards(len(items), cfg.samples_per_shard)
    mine = [p for p in plan if p[0] % cfg.num_parts == cfg.part_index]
    todo = [p for p in mine if not is_finished(cfg.out, shard_name(cfg.prefix, p[0]))]
    tasks = [
        (os.path.join(cfg.out, shard_name(cfg.prefix, i)), i, list(items[a:b])) for i, a, b in todo
    ]
    start = time.perf_counter()
    built = _execute(tasks, maker, cfg)
    wall = time.perf_counter() - start
    manifest = finalize_manifest(cfg, len(plan), len(items), extra or {})
    return RunSummary(
        shards_built=len(built),
        shards_skipped=len(mine) - len(todo),
        samples_written=sum(s["num_samples"] for s in built),
        rejected=sum(len(s["rejected"]) for s in built),
        wall_seconds=wall,
        worker_seconds=sum(s["seconds"] for s in built),
        manifest=manifest,
    )


def _execute(tasks: list, maker: SampleMaker, cfg: PrepConfig) -> list[dict[str, Any]]:
    """Run shard tasks in-process (workers=0/1) or in a process pool; record stats as each
    shard completes so an interrupted run keeps what it finished."""
    done: list[dict[str, Any]] = []
    total = sum(len(t[2]) for t in tasks)
    bar = tqdm(
        total=total,
        unit="sample",
        desc=f"{cfg.tool} part {cfg.part_index}",
        disable=not cfg.progress or total == 0,
        dynamic_ncols=True,
    )

    def record(stats: dict[str, Any]) -> None:
        write_json_atomic(stats_path(cfg.out, stats["name"]), stats)
        done.append(stats)
        bar.update(stats["num_inputs"])
        bar.set_postfix(rejected=sum(len(s["rejected"]) for s in done))

    try:
        if cfg.workers <= 1 or len(tasks) <= 1:
            _init_worker(maker)
            for task in tasks:
                record(_build_shard(task))
        else:
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(
                min(cfg.workers, len(tasks)), initializer=_init_worker, initargs=(maker,)
            ) as pool:
                for stats in pool.imap_unordered(_build_shard, tasks):
                    record(stats)
    finally:
        bar.close()
    return done


def _load_all_stats(out: str) -> list[dict[str, Any]]:
    stats = []
    for path in sorted(glob.glob(os.path.join(out, STATS_DIR, "*.json"))):
        if os.path.basename(path) == CONFIG_NAME:
            continue
        try:
            with open(path) as f:
                stats.append(json.load(f))
        except (OSError, ValueError):
            continue  # a concurrent writer's temp file or a damaged stats file: shard redone
    return stats


def build_manifest(
    cfg: PrepConfig, num_shards: int, num_inputs: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """The manifest from the stats of all finished shards (any part)."""
    stats = [
        s
        for s in _load_all_stats(cfg.out)
        if s["name"].startswith(cfg.prefix + "-")
        and os.path.exists(os.path.join(cfg.out, s["name"]))
    ]
    stats.sort(key=lambda s: s["index"])
    rejected = [r | {"shard": s["name"]} for s in stats for r in s["rejected"]]
    return {
        "format": FORMAT_VERSION,
        "tool": cfg.tool,
        "prefix": cfg.prefix,
        "complete": len(stats) == num_shards,
        "num_shards": num_shards,
        "num_shards_done": len(stats),
        "num_inputs": num_inputs,
        "num_samples": sum(s["num_samples"] for s in stats),
        "condition_types": cfg.condition_types,
        "image_format": cfg.image_format,
        "resolution": cfg.resolution,
        "resize": cfg.resize,
        "samples_per_shard": cfg.samples_per_shard,
        "pattern": os.path.basename(brace_pattern(cfg.out, cfg.prefix, max(num_shards, 1))),
        "shards": [
            {
                "name": s["name"],
                "num_samples": s["num_samples"],
                "bytes": s["bytes"],
                "num_rejected": len(s["rejected"]),
            }
            for s in stats
        ],
        "num_rejected": len(rejected),
        "rejected_by_reason": dict(Counter(r["reason"] for r in rejected)),
        "rejected": rejected,
        "settings": cfg.settings,
        **extra,
    }


def finalize_manifest(
    cfg: PrepConfig, num_shards: int, num_inputs: int, extra: dict[str, Any]
) -> dict[str, Any]:
    """Write the manifest; rebuild while other parts keep adding stats, so the last writer
    always sees every finished shard."""
    while True:
        manifest = build_manifest(cfg, num_shards, num_inputs, extra)
        write_json_atomic(os.path.join(cfg.out, MANIFEST_NAME), manifest)
        if len(_load_all_stats(cfg.out)) <= manifest["num_shards_done"]:
            return manifest
