"""Shared command-line machinery of the data_prep tools: flags, parts from the SLURM array
environment, one-line errors and the end-of-run report.

The shard writing itself (part/shard planning, parallel atomic shard writing, resumability and
the manifest) lives in :mod:`cn_lightning.data.shard_writer`; its names are re-exported here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from cn_lightning.data import shard_writer
from cn_lightning.data.format import MANIFEST_NAME
from cn_lightning.data.shard_writer import (
    CONFIG_NAME,
    STATS_DIR,
    PrepConfig,
    RejectedInput,
    RunSummary,
    SampleMaker,
    ShardSettingsError,
    build_manifest,
    finalize_manifest,
    is_finished,
    plan_shards,
)
from cn_lightning.data.transforms import RESIZE_MODES
from cn_lightning.errors import fail

__all__ = [
    "CONFIG_NAME",
    "STATS_DIR",
    "PrepConfig",
    "RejectedInput",
    "RunSummary",
    "SampleMaker",
    "ShardSettingsError",
    "add_common_args",
    "build_manifest",
    "config_from_args",
    "default_workers",
    "die",
    "finalize_manifest",
    "is_finished",
    "parse_options",
    "plan_shards",
    "print_summary",
    "resolve_parts",
    "run_shards",
]


def die(message: str, code: int = 2) -> NoReturn:
    """Exit with a one-line error (no traceback) for bad command-line input."""
    script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    prog = f"python -m data_prep.{script[:-3]}" if script.endswith(".py") else "data_prep"
    fail(message, prog, code)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["low_threshold=50", "weights=/m.pth"]`` → dict; values parsed as JSON when possible."""
    options: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            die(f"expected NAME=VALUE, got {pair!r}")
        try:
            options[name] = json.loads(value)
        except ValueError:
            options[name] = value
    return options


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 1)))


def add_common_args(
    parser: argparse.ArgumentParser,
    *,
    prefix: str,
    src_required: bool = True,
    default_resolution: int | None = 512,
) -> None:
    """The flags every tool shares (see docs/data.md)."""
    if src_required:
        parser.add_argument("--src", required=True, help="input location")
    parser.add_argument(
        "--out",
        required=True,
        help="output directory for <prefix>-NNNNNN.tar shards and manifest.json",
    )
    parser.add_argument("--prefix", default=prefix, help="shard name prefix (default: %(default)s)")
    parser.add_argument(
        "--resolution",
        type=int,
        default=default_resolution,
        help="target size in pixels for the resize policy (default: %(default)s)",
    )
    parser.add_argument(
        "--resize",
        choices=RESIZE_MODES,
        default="center_crop",
        help="center_crop: shorter side to --resolution then centre crop to a "
        "square; shorter_side: keep aspect (crop at training time; what aspect-ratio "
        "buckets, data.buckets, need); none: keep original size (default: %(default)s)",
    )
    parser.add_argument(
        "--image-format",
        choices=("jpg", "png", "webp"),
        default=None,
        help="encoding of the target image (default: tool-specific)",
    )
    parser.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality")
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="parallel worker processes, 0 = in-process (default: %(default)s)",
    )
    parser.add_argument(
        "--samples-per-shard",
        type=int,
        default=1000,
        help="samples per shard, bounds shard count and size (default: %(default)s)",
    )
    parser.add_argument(
        "--num-parts",
        type=int,
        default=None,
        help="split the shards into N parts (default: $SLURM_ARRAY_TASK_COUNT or 1)",
    )
    parser.add_argument(
        "--part-index",
        type=int,
        default=None,
        help="which part to build (default: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, or 0)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="delete shards and manifest of an earlier run in --out first",
    )


def resolve_parts(num_parts: int | None, part_index: int | None) -> tuple[int, int]:
    """(num_parts, part_index) from flags, else from the SLURM array environment, else (1, 0)."""
    env = os.environ
    if num_parts is None:
        num_parts = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if part_index is None:
        if "SLURM_ARRAY_TASK_ID" in env:
            part_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        else:
            part_index = 0
    if num_parts < 1 or not 0 <= part_index < num_parts:
        die(f"--part-index must be in [0, {num_parts}), got {part_index}")
    return num_parts, part_index


def config_from_args(
    args: argparse.Namespace,
    tool: str,
    *,
    image_format: str,
    condition_types: list[str],
    settings: dict[str, Any],
) -> PrepConfig:
    """Validate the common flags and build the run config."""
    if args.samples_per_shard < 1:
        die("--samples-per-shard must be >= 1")
    if args.resolution is not None and args.resolution < 8:
        die("--resolution must be >= 8")
    num_parts, part_index = resolve_parts(args.num_parts, args.part_index)
    if args.overwrite and num_parts > 1:
        die("--overwrite deletes every part's shards; run it once without --num-parts")
    return PrepConfig(
        out=args.out,
        prefix=args.prefix,
        tool=tool,
        resolution=args.resolution,
        resize=args.resize,
        image_format=args.image_format or image_format,
        quality=args.quality,
        samples_per_shard=args.samples_per_shard,
        workers=max(0, args.workers),
        num_parts=num_parts,
        part_index=part_index,
        condition_types=condition_types,
        settings=settings,
        overwrite=args.overwrite,
    )


def run_shards(
    items: Sequence[Any], maker: SampleMaker, cfg: PrepConfig, extra: dict[str, Any] | None = None
) -> RunSummary:
    """:func:`cn_lightning.data.shard_writer.run_shards`, with a one-line error (no traceback)
    when ``--out`` holds shards built with other settings."""
    try:
        return shard_writer.run_shards(items, maker, cfg, extra)
    except ShardSettingsError as err:
        die(str(err))


def print_summary(summary: RunSummary, cfg: PrepConfig) -> None:
    """One short report at the end of a run."""
    m = summary.manifest
    state = "complete" if m["complete"] else f"{m['num_shards_done']}/{m['num_shards']} shards"
    print(
        f"[{cfg.tool}] part {cfg.part_index}/{cfg.num_parts}: built {summary.shards_built} "
        f"shards ({summary.samples_written} samples, {summary.rejected} rejected), skipped "
        f"{summary.shards_skipped} finished; {summary.samples_per_second_per_worker:.3g} "
        f"samples/s per worker. Dataset: {m['num_samples']} samples, {state}. "
        f"Manifest: {os.path.join(cfg.out, MANIFEST_NAME)}"
    )
