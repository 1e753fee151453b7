"""Evaluate a ControlNet over validation shards: condition fidelity, FID and CLIP score.

For every validation sample, an image is generated from its condition and prompt
(:class:`cn_lightning.inference.PipelineSource`, seeded by the sample key, so the result does not
depend on how the shards are split over devices), or read from ``<images>/<key>.png`` (images made
by any other tool, :class:`FolderSource`). Metrics are computed on the 8-bit images:

* condition fidelity: :class:`cn_lightning.metrics.ConditionFidelity`, the training-time tracker's
  metric: the condition is extracted back from each image with the condition's own extractor
  (model-based ones from ``weights``, on ``extractor_device``) and compared with the input
  condition by the metric ControlNet++ reports for it (edge F1 / precision / recall, SSIM, depth
  RMSE, normal angle, pose OKS, segmentation mIoU; circle IoU for the toy). Without the
  extractor's weights it is left out, with a warning and a line in the report that say how to
  get it;
* FID against the shards' target images and CLIP score (:mod:`cn_lightning.metrics.quality`).

:func:`evaluate` runs on ``devices`` processes (Lightning Fabric, DDP), reduces the metrics with
torchmetrics and writes ``report.json`` and ``report.md``, a table laid out like ControlNet++'s
(condition, metric, value, number of samples; one row per number), and optionally a W&B run.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics
from PIL import Image
from torch import Tensor

from cn_lightning.atomic import write_json_atomic, write_text_atomic
from cn_lightning.errors import ConfigError
from cn_lightning.inference import (
    EXTRA_CONDITION,
    PipelineSource,
    control_plan,
    resolve_device,
    save_png,
)
from cn_lightning.loggers import resolve_wandb_mode
from cn_lightning.metrics import ConditionFidelity
from cn_lightning.metrics.fidelity import fidelity_rows
from cn_lightning.metrics.quality import ClipScore, build_clip_score, build_fid, quantize, to_uint8


@dataclass
class EvalConfig:
    """What to evaluate and how; stored in the report."""

    val_shards: str
    condition_key: str
    out: str
    # None: the base model's native size (512 SD1.5, 1024 SDXL; :func:`resolve_defaults`).
    resolution: int | None = None
    base: str | None = None
    # One ControlNet, or several whose residuals are summed (composition, as generate does).
    controlnet: str | list[str] | None = None
    images: str | None = None
    variant: str | None = None
    num_samples: int | None = None
    batch_size: int = 4
    num_workers: int = 0
    steps: int = 20
    # None: the base model's pipeline default (7.5 SD, 5.0 SDXL).
    guidance_scale: float | None = None
    # One scale for all ControlNets, or one each.
    control_scale: float | list[float] = 1.0
    # The shard condition each ControlNet reads (one for all, or one each); None: condition_key,
    # the condition that is scored.
    control_key: str | list[str] | None = None
    negative_prompt: str = ""
    no_prompt: bool = False
    seed: int = 0
    sampler: str = "ddim"
    fid_weights: str | None = None
    fid_feature: int = 2048
    clip_model: str | None = None
    clip_weights: str | None = None
    save_images: bool = False
    wandb: bool = False
    wandb_project: str = "cn_lightning"
    devices: int = 1
    accelerator: str = "auto"
    dtype: str = "auto"
    weights: str | None = None
    extractor_device: str | None = None

    def __post_init__(self) -> None:
        # One ControlNet given as a list (the command line's nargs) is the single-ControlNet
        # case: reports and W&B configs keep plain values.
        for name in ("controlnet", "control_scale", "control_key"):
            value = getattr(self, name)
            if isinstance(value, list | tuple) and len(value) == 1:
                setattr(self, name, value[0])


# Centre-crop size when scoring existing images (--images) without --resolution.
IMAGES_RESOLUTION = 512


def resolve_defaults(cfg: EvalConfig, source: Any) -> EvalConfig:
    """``cfg`` with what the backbone decides filled in: the resolution (the base model's native
    size; :data:`IMAGES_RESOLUTION` for ``--images``) and the guidance scale (the pipeline's
    default), as the source that generates the images has them."""
    resolution = cfg.resolution or getattr(source, "native_size", IMAGES_RESOLUTION)
    guidance = cfg.guidance_scale
    if guidance is None:
        guidance = getattr(source, "guidance_scale", None)
    return replace(cfg, resolution=resolution, guidance_scale=guidance)


# ------------------------------------------------------------------------------ metrics and images
def extractor_options(cfg: EvalConfig, device: str | None = None) -> dict[str, Any]:
    """Options of the condition's extractor for the fidelity metric: for a model-based one its
    ``weights`` (``--weights``), ``device`` (``--extractor-device``, else ``device``: this
    process's) and ``batch_size``; none for a classical one, which refuses ``--weights``."""
    from cn_lightning.conditions import list_extractors
    from cn_lightning.conditions.random_weights import needs_weights

    model_based = cfg.condition_key in list_extractors() and needs_weights(cfg.condition_key)
    if not model_based:
        if cfg.weights or cfg.extractor_device:
            flag = "--weights" if cfg.weights else "--extractor-device"
            raise ConfigError(
                f"{flag}: condition {cfg.condition_key!r} has no model-based extractor "
                "(its fidelity needs no weights); leave it out"
            )
        return {}
    options: dict[str, Any] = {
        "device": cfg.extractor_device or device or "auto",
        "batch_size": cfg.batch_size,
    }
    if cfg.weights:
        options["weights"] = os.path.expanduser(cfg.weights)
    return options


def build_metrics(cfg: EvalConfig, device: str | None = None) -> dict[str, torchmetrics.Metric]:
    """Fidelity always (inactive, with ``unavailable`` saying why, when its extractor cannot be
    built); FID with ``fid_weights``; CLIP score with ``clip_model``."""
    metrics: dict[str, torchmetrics.Metric] = {
        "fidelity": ConditionFidelity(cfg.condition_key, extractor_options(cfg, device))
    }
    if cfg.fid_weights:
        metrics["fid"] = build_fid(cfg.fid_weights, cfg.fid_feature)
    if cfg.clip_model:
        metrics["clip_score"] = build_clip_score(cfg.clip_model, cfg.clip_weights)
    return metrics


class FolderSource:
    """Reads ``<folder>/<key>.png`` for each sample: images generated by any other tool."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(os.path.expanduser(folder))
        if not self.folder.is_dir():
            raise ConfigError(f"--images {str(self.folder)!r} is not a directory")

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        h, w = batch["condition"].shape[-2:]
        out = []
        for key in batch["key"]:
            path = self.folder / f"{key}.png"
            if not path.is_file():
                raise ConfigError(f"no image for validation sample {key!r}: expected {path}")
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"))
            if image.shape[:2] != (h, w):
                raise ConfigError(
                    f"{path} is {image.shape[1]}x{image.shape[0]}; its condition is {w}x{h}"
                )
            out.append(torch.from_numpy(image.copy()).permute(2, 0, 1))
        return torch.stack(out).float() / 255


def val_batches(cfg: EvalConfig, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """This rank's share of the validation samples (split by the DataModule), in batches."""
    check_val_shards(cfg.val_shards)
    batches = _val_loader(cfg, cfg.condition_key, rank, world_size)
    extra = _extra_condition_keys(cfg)
    if not extra:
        yield from batches
        return
    # ControlNets that read other conditions of the same samples (--control-key): the same
    # shards read once per condition, in the same order (validation reading is deterministic).
    others = [iter(_val_loader(cfg, key, rank, world_size)) for key in extra]
    for batch in batches:
        for key, stream in zip(extra, others, strict=True):
            part = next(stream, None)
            if part is None or list(part["key"]) != list(batch["key"]):
                raise ConfigError(
                    f"the validation samples with a {key!r} condition are not those with a "
                    f"{cfg.condition_key!r} one: every sample needs both (--control-key)"
                )
            batch[EXTRA_CONDITION.format(key)] = part["condition"]
        yield batch


def _val_loader(cfg: EvalConfig, condition_key: str, rank: int, world_size: int):
    """A DataLoader of this rank's validation batches with ``condition_key`` as the condition."""
    from torch.utils.data import DataLoader

    from cn_lightning.data import ShardDataModule

    dm = ShardDataModule(
        train_shards=cfg.val_shards,
        val_shards=cfg.val_shards,
        condition_key=condition_key,
        resolution=cfg.resolution,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
    )
    dataset = dm.build_val_dataset(rank=rank, world_size=world_size)
    return DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)


def _extra_condition_keys(cfg: EvalConfig) -> list[str]:
    """The conditions the ControlNets read besides the scored one (``--control-key``)."""
    if cfg.images or not cfg.controlnet:
        return []
    keys = [key for _, _, key in control_plan(cfg)]
    return [k for k in dict.fromkeys(keys) if k != cfg.condition_key]


def check_val_shards(spec: str) -> None:
    """Fail early when the pattern names no shards, or only local files that do not exist."""
    from cn_lightning.data.format import expand_shard_urls

    urls = expand_shard_urls(spec)
    local = [u for u in urls if "://" not in u and not u.startswith("pipe:")]
    if not urls or (len(local) == len(urls) and not any(Path(u).exists() for u in local)):
        example = f" (e.g. {local[0]!r} does not exist)" if local else ""
        raise ConfigError(f"--val-shards {spec!r} matches no shards{example}")


# ------------------------------------------------------------------------------ the loop
def evaluate_split(
    cfg: EvalConfig,
    source: Any,
    metrics: dict[str, torchmetrics.Metric],
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Score this rank's samples: updates ``metrics`` and returns per-sample records."""
    from tqdm.auto import tqdm

    cfg = resolve_defaults(cfg, source)
    limit = math.ceil(cfg.num_samples / world_size) if cfg.num_samples else None
    fidelity = _active_fidelity(metrics)
    records: list[dict[str, Any]] = []
    bar = tqdm(total=limit, desc=f"evaluate [rank {rank}]", unit="img", disable=not progress)
    for batch in val_batches(cfg, rank, world_size):
        if limit is not None and len(records) >= limit:
            break
        batch = _truncate(batch, None if limit is None else limit - len(records))
        images = quantize(source(batch)).cpu()
        condition = batch["condition"].float().cpu()
        scores: dict[str, Tensor] = {}
        if fidelity is not None:
            fidelity.update(images, condition)
            scores = fidelity.batch_scores
        clip = _update_quality(metrics, images, batch)
        for i, key in enumerate(batch["key"]):
            record = {"key": key, "prompt": batch["prompt"][i]}
            record.update({name: float(values[i]) for name, values in scores.items()})
            if clip is not None:
                record["clip_score"] = float(clip[i])
            records.append(record)
        if cfg.save_images:
            _save_images(images, batch["key"], Path(cfg.out) / "images")
        bar.update(len(batch["key"]))
    bar.close()
    return records


def _active_fidelity(metrics: dict[str, torchmetrics.Metric]) -> ConditionFidelity | None:
    """The fidelity metric, unless it has no extractor to measure with."""
    fidelity = metrics.get("fidelity")
    if isinstance(fidelity, ConditionFidelity) and fidelity.resolved is not None:
        return fidelity
    return None


def _update_quality(
    metrics: dict[str, torchmetrics.Metric], images: Tensor, batch: dict[str, Any]
) -> Tensor | None:
    """FID (real = the shard's targets) and CLIP score updates; returns per-sample CLIP scores."""
    if "fid" in metrics:
        device = metrics["fid"].device
        metrics["fid"].update(quantize((batch["image"].float() + 1) / 2).to(device), real=True)
        metrics["fid"].update(images.to(device), real=False)
    if "clip_score" not in metrics:
        return None
    clip: ClipScore = metrics["clip_score"]  # type: ignore[assignment]
    scores = clip.scores(images, batch["prompt"])
    clip.update(scores)
    return scores


def _truncate(batch: dict[str, Any], n: int | None) -> dict[str, Any]:
    if n is None or n >= len(batch["key"]):
        return batch
    size = len(batch["key"])

    def cut(value: Any) -> Any:
        per_sample = isinstance(value, list) or (isinstance(value, Tensor) and value.ndim > 0)
        return value[:n] if per_sample and len(value) == size else value

    return {k: cut(v) for k, v in batch.items()}


def _save_images(images: Tensor, keys: Sequence[str], folder: Path) -> None:
    for image, key in zip(images, keys, strict=True):
        save_png(Image.fromarray(to_uint8(image)), folder / f"{key}.png")


def compute_metrics(metrics: dict[str, torchmetrics.Metric], num_samples: int) -> dict[str, float]:
    """Reduce every metric over all ranks (torchmetrics) into plain floats (an inactive fidelity
    metric, which measured nothing, is left out)."""
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        if name == "fid" and num_samples < 2:
            raise ConfigError(
                "FID needs at least 2 samples; raise --num-samples or add validation shards"
            )
        if name == "fidelity" and _active_fidelity(metrics) is None:
            continue
        value = metric.compute()
        if isinstance(value, dict):
            out.update({k: float(v) for k, v in value.items()})
        else:
            out[name] = float(value)
    return out


QUALITY_ROWS = (("fid", "FID"), ("clip_score", "CLIP score"))


def results_table(
    cfg: EvalConfig,
    metrics: dict[str, torchmetrics.Metric],
    values: dict[str, float],
    records: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One row per reported number, as ControlNet++ lays out its tables: ``condition``,
    ``metric`` (what it is), ``key`` (its name in ``values``), ``value`` and ``samples`` (the
    samples behind it: those where the fidelity metric is defined, e.g. pose maps with a
    person)."""
    rows = []
    fidelity = _active_fidelity(metrics)
    if fidelity is not None and fidelity.metric_name is not None:
        for key, label in fidelity_rows(fidelity.metric_name):
            n = sum(1 for r in records if key in r and math.isfinite(r[key]))
            rows.append(_row(cfg, label, key, values.get(key, math.nan), n))
    for key, label in QUALITY_ROWS:
        if key in values:
            rows.append(_row(cfg, label, key, values[key], len(records)))
    return rows


def _row(cfg: EvalConfig, label: str, key: str, value: float, n: int) -> dict[str, Any]:
    return {
        "condition": cfg.condition_key,
        "metric": label,
        "key": key,
        "value": value,
        "samples": n,
    }


def fidelity_note(metrics: dict[str, torchmetrics.Metric]) -> str | None:
    """Why the report has no fidelity, when it has none."""
    fidelity = metrics.get("fidelity")
    if isinstance(fidelity, ConditionFidelity) and fidelity.resolved is None:
        return f"condition fidelity not measured: {fidelity.unavailable}"
    return None


# ------------------------------------------------------------------------------ report
def write_report(
    cfg: EvalConfig,
    values: dict[str, float],
    records: list[dict[str, Any]],
    table: list[dict[str, Any]] | None = None,
    note: str | None = None,
) -> tuple[Path, Path]:
    """``report.json`` (settings, metrics, the table, per-sample scores) and ``report.md``,
    written atomically."""
    out = Path(os.path.expanduser(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    table = table if table is not None else results_table(cfg, {}, values, records)
    report: dict[str, Any] = {
        "num_samples": len(records),
        "metrics": values,
        "table": table,
        "settings": asdict(cfg),
        "samples": records,
    }
    if note:
        report["note"] = note
    json_path = out / "report.json"
    write_json_atomic(json_path, report)
    md_path = write_text_atomic(out / "report.md", markdown_table(cfg, table, len(records), note))
    return json_path, md_path


def markdown_table(
    cfg: EvalConfig, table: list[dict[str, Any]], n: int, note: str | None = None
) -> str:
    """The table as Markdown (condition | metric | value | samples), with what was evaluated
    above it and ``note`` below it."""
    what = cfg.images or cfg.controlnet
    if isinstance(what, list | tuple):
        what = "` + `".join(what)
    lines = [
        f"# Evaluation of `{what}`",
        "",
        f"{n} samples from `{cfg.val_shards}` "
        f"(condition `{cfg.condition_key}`, {cfg.resolution} px)",
        "",
        "| condition | metric | value | samples |",
        "|---|---|---|---|",
    ]
    for row in table:
        value = f"{row['value']:.4f}" if math.isfinite(row["value"]) else "n/a"
        metric = f"{row['metric']} (`{row['key']}`)"
        lines.append(f"| {row['condition']} | {metric} | {value} | {row['samples']} |")
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def log_to_wandb(cfg: EvalConfig, values: dict[str, float], records: list[dict[str, Any]]) -> str:
    """Log the metrics and a per-sample table to W&B (offline without credentials); returns the
    run dir."""
    import wandb

    run = wandb.init(
        project=cfg.wandb_project,
        dir=cfg.out,
        mode=resolve_wandb_mode("auto"),
        job_type="evaluate",
        config=asdict(cfg),
    )
    run.log({f"eval/{k}": v for k, v in values.items()})
    run.summary.update({f"eval/{k}": v for k, v in values.items()})
    if records:
        columns = list(records[0])
        run.log(
            {
                "eval/samples": wandb.Table(
                    columns=columns, data=[[r.get(c) for c in columns] for r in records]
                )
            }
        )
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir


# ------------------------------------------------------------------------------ entry points
def run_rank(fabric: Any, cfg: EvalConfig) -> dict[str, Any]:
    """One process's part: score its split, reduce, and (rank 0) write the report."""
    _, dtype = resolve_device(str(fabric.device), cfg.dtype)
    metrics = {k: m.to(fabric.device) for k, m in build_metrics(cfg, str(fabric.device)).items()}
    source = FolderSource(cfg.images) if cfg.images else PipelineSource(cfg, fabric.device, dtype)
    cfg = resolve_defaults(cfg, source)
    records = evaluate_split(
        cfg, source, metrics, fabric.global_rank, fabric.world_size, fabric.is_global_zero
    )
    records = _gather_records(records, fabric.world_size)
    if not records:
        raise ConfigError(
            f"no validation samples with a {cfg.condition_key!r} condition in {cfg.val_shards!r} "
            f"(is --condition-key the <key>.<condition>.png member of the shards?)"
        )
    values = compute_metrics(metrics, len(records))
    table = results_table(cfg, metrics, values, records)
    note = fidelity_note(metrics)
    result = {
        "metrics": values,
        "table": table,
        "num_samples": len(records),
        "samples": records,
    }
    if fabric.is_global_zero:
        json_path, md_path = write_report(cfg, values, records, table, note)
        result.update(report=str(json_path), markdown=str(md_path))
        if cfg.wandb:
            result["wandb_dir"] = log_to_wandb(cfg, values, records)
    fabric.barrier()
    return result


def _gather_records(records: list[dict[str, Any]], world_size: int) -> list[dict[str, Any]]:
    if world_size == 1 or not torch.distributed.is_initialized():
        return records
    gathered: list[list[dict[str, Any]]] = [[] for _ in range(world_size)]
    torch.distributed.all_gather_object(gathered, records)
    return sorted((r for part in gathered for r in part), key=lambda r: r["key"])


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate on ``cfg.devices`` devices (Lightning Fabric; DDP when more than one)."""
    import lightning as L

    if cfg.images is None and not (cfg.base and cfg.controlnet):
        raise ConfigError(
            "give --base and --controlnet to generate images, "
            "or --images DIR to score existing ones"
        )
    check_val_shards(cfg.val_shards)
    extractor_options(cfg)  # a --weights the condition cannot use fails here, before any launch
    if cfg.images is None:
        control_plan(cfg)  # so do --control-scale / --control-key counts that do not fit
    strategy = "ddp" if cfg.devices > 1 else "auto"
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy)
    return fabric.launch(run_rank, cfg)
