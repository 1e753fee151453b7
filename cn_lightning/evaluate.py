"""Evaluate a ControlNet over validation shards: condition fidelity, FID and CLIP score.

    python -m cn_lightning.evaluate --val-shards 'val/shard-{000000..000003}.tar' \\
        --condition-key canny --resolution 512 --base SD15 --controlnet CN --out eval/ \\
        [--fid-weights pt_inception-2015-12-05-6726825d.pth] \\
        [--clip-model ViT-L-14 --clip-weights open_clip_pytorch_model.bin] [--devices 8] [--wandb]

For every validation sample, an image is generated from its condition and prompt with diffusers'
``StableDiffusionControlNetPipeline`` (seeded by the sample key, so the result does not depend on
how the shards are split over devices), or read from ``--images DIR/<key>.png`` (images made by
any other tool). Metrics are computed on the 8-bit images:

* condition fidelity: :class:`cn_lightning.metrics.ConditionFidelity`, the training-time tracker's
  metric (Canny edge F1, circle IoU, segmentation mIoU, SSIM — by condition type);
* FID against the shards' target images: torchmetrics' ``FrechetInceptionDistance`` with Inception
  weights from a local file (torch-fidelity's ``pt_inception-2015-12-05-6726825d.pth``);
* CLIP score (100 x cosine of image and prompt embeddings, floored at 0) with an open_clip model
  from local weights.

Writes ``report.json`` and ``report.md`` to ``--out``; ``--devices N`` splits the shards over N
processes (Lightning Fabric, DDP) and reduces the metrics with torchmetrics.
"""

from __future__ import annotations

import math
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchmetrics
from PIL import Image
from torch import Tensor

from cn_lightning.errors import ConfigError
from cn_lightning.utils.cli import ArgumentParser, run_cli

INCEPTION_HINT = (
    "torch-fidelity's Inception weights pt_inception-2015-12-05-6726825d.pth (from "
    "github.com/toshas/torch-fidelity releases), copied to a local path"
)


@dataclass
class EvalConfig:
    """What to evaluate and how; stored in the report."""

    val_shards: str
    condition_key: str
    out: str
    resolution: int = 512
    base: str | None = None
    controlnet: str | None = None
    images: str | None = None
    variant: str | None = None
    num_samples: int | None = None
    batch_size: int = 4
    num_workers: int = 0
    steps: int = 20
    guidance_scale: float = 7.5
    control_scale: float = 1.0
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


# ------------------------------------------------------------------------------ metrics
def build_fid(weights_path: str, feature: int = 2048) -> torchmetrics.Metric:
    """torchmetrics' FID with Inception weights read from a local file.

    ``feature`` picks the Inception layer: 2048 (the standard pool features), or 768/192/64
    (earlier layers: cheaper, e.g. for smoke tests, but not comparable with published FIDs).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    from cn_lightning.utils.checkpoints import verify_safe_checkpoint

    path = Path(os.path.expanduser(weights_path))
    if not path.is_file():
        raise ConfigError(f"FID Inception weights {str(path)!r} not found: expected {INCEPTION_HINT}")
    # torch-fidelity reads the file with torch.load(weights_only=False): check it first, so a
    # downloaded pickle that would run code is refused before it is unpickled.
    verify_safe_checkpoint(path)
    try:
        return FrechetInceptionDistance(feature=feature, normalize=True, feature_extractor_weights_path=str(path))
    except (RuntimeError, KeyError, OSError, EOFError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{str(path)!r} is not an Inception weights file ({INCEPTION_HINT}): {first}") from err


class ClipScore(torchmetrics.Metric):
    """CLIP score of images against prompts with an open_clip model: mean of 100 x max(cos, 0).

    :meth:`scores` gives the per-sample values of images (B, 3, H, W) in [0, 1] and their
    prompts; ``update(scores)`` accumulates them (so the scores are computed once per sample).
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    @torch.no_grad()
    def scores(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        device = next(self.model.parameters()).device
        pixels = torch.stack([self.preprocess(Image.fromarray(to_uint8(im))) for im in images]).to(device)
        image_emb = self.model.encode_image(pixels).float()
        text_emb = self.model.encode_text(self.tokenizer(list(prompts)).to(device)).float()
        cos = torch.nn.functional.cosine_similarity(image_emb, text_emb, dim=-1)
        return 100 * cos.clamp(min=0)

    def update(self, scores: Tensor) -> None:
        self.score_sum += scores.sum().to(self.score_sum)
        self.count += len(scores)

    def compute(self) -> Tensor:
        return (self.score_sum / self.count.clamp(min=1)).float()


def build_clip_score(model_name: str, weights: str | None) -> ClipScore:
    """open_clip from local weights: ``NAME`` + a weights file, or ``local-dir:FOLDER`` (config + weights)."""
    import open_clip

    from cn_lightning.utils.checkpoints import verify_safe_checkpoint

    if model_name.startswith("local-dir:"):
        folder = Path(os.path.expanduser(model_name.removeprefix("local-dir:")))
        if not (folder / "open_clip_config.json").is_file():
            raise ConfigError(f"--clip-model {model_name!r}: no open_clip_config.json in {str(folder)!r}")
        name, kwargs = f"local-dir:{folder}", {"weights_only": True}
        pickled = [f for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    else:
        if weights is None:
            raise ConfigError(f"--clip-model {model_name!r} needs --clip-weights: a local open_clip weights file")
        path = Path(os.path.expanduser(weights))
        if not path.is_file():
            raise ConfigError(f"CLIP weights {str(path)!r} not found: expected a local open_clip checkpoint file")
        if model_name not in open_clip.list_models():
            raise ConfigError(f"unknown open_clip architecture {model_name!r} (see open_clip.list_models())")
        name, kwargs = model_name, {"pretrained": str(path), "load_weights": True, "weights_only": True}
        pickled = [] if path.suffix == ".safetensors" else [path]
    for file in pickled:  # a refused pickle gets our one-line error (open_clip's is a traceback)
        verify_safe_checkpoint(file)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, **kwargs)
    except (RuntimeError, KeyError, OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"cannot load CLIP model {model_name!r}: {first}") from err
    return ClipScore(model, preprocess, open_clip.get_tokenizer(name))


def build_metrics(cfg: EvalConfig) -> dict[str, torchmetrics.Metric]:
    """Fidelity always; FID with ``fid_weights``; CLIP score with ``clip_model``."""
    from cn_lightning.metrics import ConditionFidelity

    metrics: dict[str, torchmetrics.Metric] = {"fidelity": ConditionFidelity(cfg.condition_key)}
    if cfg.fid_weights:
        metrics["fid"] = build_fid(cfg.fid_weights, cfg.fid_feature)
    if cfg.clip_model:
        metrics["clip_score"] = build_clip_score(cfg.clip_model, cfg.clip_weights)
    return metrics


def to_uint8(image: Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] to uint8 (H, W, 3)."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def quantize(images: Tensor) -> Tensor:
    """Round to 8 bits, as the images are saved and seen; metrics are computed on these."""
    return (images.float().clamp(0, 1) * 255).round() / 255


# ------------------------------------------------------------------------------ images
def sample_seed(seed: int, key: str) -> int:
    """A per-sample seed from the sample key: the same image whatever the device split."""
    return (seed + zlib.crc32(key.encode("utf-8"))) % (2**63)


class PipelineSource:
    """Generates each batch's images with the ControlNet pipeline."""

    def __init__(self, cfg: EvalConfig, device: torch.device, dtype: torch.dtype) -> None:
        from cn_lightning.generate import build_pipeline, load_controlnets
        from cn_lightning.models.backbone import load_backbone

        if not cfg.base or not cfg.controlnet:
            raise ConfigError("give --base and --controlnet to generate images, or --images DIR to score existing ones")
        backbone = load_backbone(cfg.base, dtype, variant=cfg.variant)
        # A ControlNet trained with sd_locked=false brings its fine-tuned UNet (it replaces backbone.unet).
        controlnets = load_controlnets([cfg.controlnet], backbone, dtype)
        self.pipe = build_pipeline(backbone, controlnets, cfg.sampler).to(device)
        self.pipe.set_progress_bar_config(disable=True)
        self.cfg, self.device = cfg, device

    def __call__(self, batch: dict[str, Any]) -> Tensor:
        cfg = self.cfg
        prompts = ["" if cfg.no_prompt else p for p in batch["prompt"]]
        condition = batch["condition"].to(self.device, self.pipe.unet.dtype)
        h, w = condition.shape[-2:]
        generators = [torch.Generator().manual_seed(sample_seed(cfg.seed, k)) for k in batch["key"]]
        return self.pipe(
            prompt=prompts,
            negative_prompt=[cfg.negative_prompt] * len(prompts),
            image=condition,
            height=h,
            width=w,
            num_inference_steps=cfg.steps,
            guidance_scale=cfg.guidance_scale,
            controlnet_conditioning_scale=cfg.control_scale,
            guess_mode=cfg.no_prompt,
            generator=generators,
            output_type="pt",
        ).images.float()


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
                raise ConfigError(f"{path} is {image.shape[1]}x{image.shape[0]}; its condition is {w}x{h}")
            out.append(torch.from_numpy(image.copy()).permute(2, 0, 1))
        return torch.stack(out).float() / 255


def val_batches(cfg: EvalConfig, rank: int, world_size: int) -> Iterator[dict[str, Any]]:
    """This rank's share of the validation samples (split by the DataModule), in batches."""
    from torch.utils.data import DataLoader

    from cn_lightning.data import ShardDataModule

    check_val_shards(cfg.val_shards)
    dm = ShardDataModule(
        train_shards=cfg.val_shards, val_shards=cfg.val_shards, condition_key=cfg.condition_key,
        resolution=cfg.resolution, batch_size=cfg.batch_size, num_workers=cfg.num_workers, seed=cfg.seed,
    )
    dataset = dm.build_val_dataset(rank=rank, world_size=world_size)
    yield from DataLoader(dataset, batch_size=None, num_workers=cfg.num_workers)


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

    from cn_lightning.metrics import condition_fidelity

    limit = math.ceil(cfg.num_samples / world_size) if cfg.num_samples else None
    fidelity = metrics["fidelity"]
    records: list[dict[str, Any]] = []
    bar = tqdm(total=limit, desc=f"evaluate [rank {rank}]", unit="img", disable=not progress)
    for batch in val_batches(cfg, rank, world_size):
        if limit is not None and len(records) >= limit:
            break
        batch = _truncate(batch, None if limit is None else limit - len(records))
        images = quantize(source(batch)).cpu()
        condition = batch["condition"].float().cpu()
        scores = condition_fidelity(images, condition, cfg.condition_key)
        fidelity.update(images, condition)
        clip = _update_quality(metrics, images, batch)
        for i, key in enumerate(batch["key"]):
            record = {"key": key, "prompt": batch["prompt"][i], "fidelity": float(scores["fidelity"][i])}
            if clip is not None:
                record["clip_score"] = float(clip[i])
            records.append(record)
        if cfg.save_images:
            _save_images(images, batch["key"], Path(cfg.out) / "images")
        bar.update(len(batch["key"]))
    bar.close()
    return records


def _update_quality(metrics: dict[str, torchmetrics.Metric], images: Tensor, batch: dict[str, Any]) -> Tensor | None:
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
    from cn_lightning.generate import save_png

    for image, key in zip(images, keys, strict=True):
        save_png(Image.fromarray(to_uint8(image)), folder / f"{key}.png")


def compute_metrics(metrics: dict[str, torchmetrics.Metric], num_samples: int) -> dict[str, float]:
    """Reduce every metric over all ranks (torchmetrics) into plain floats."""
    out: dict[str, float] = {}
    for name, metric in metrics.items():
        if name == "fid" and num_samples < 2:
            raise ConfigError("FID needs at least 2 samples; raise --num-samples or add validation shards")
        value = metric.compute()
        if isinstance(value, dict):
            out.update({k: float(v) for k, v in value.items()})
        else:
            out[name] = float(value)
    return out


# ------------------------------------------------------------------------------ report
def write_report(cfg: EvalConfig, values: dict[str, float], records: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``report.json`` (settings, metrics, per-sample scores) and ``report.md``, written atomically."""
    from cn_lightning.data.format import write_json_atomic

    out = Path(os.path.expanduser(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    report = {"num_samples": len(records), "metrics": values, "settings": asdict(cfg), "samples": records}
    json_path = out / "report.json"
    write_json_atomic(str(json_path), report)
    md_path = out / "report.md"
    _write_text_atomic(md_path, markdown_table(cfg, values, len(records)))
    return json_path, md_path


def markdown_table(cfg: EvalConfig, values: dict[str, float], n: int) -> str:
    """The metrics as a Markdown table, with what was evaluated above it."""
    what = cfg.images or cfg.controlnet
    lines = [
        f"# Evaluation of `{what}`",
        "",
        f"{n} samples from `{cfg.val_shards}` (condition `{cfg.condition_key}`, {cfg.resolution} px)",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    lines += [f"| {name} | {value:.4f} |" for name, value in values.items()]
    return "\n".join(lines) + "\n"


def _write_text_atomic(path: Path, text: str) -> None:
    from cn_lightning.utils.atomic import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(text)


def log_to_wandb(cfg: EvalConfig, values: dict[str, float], records: list[dict[str, Any]]) -> str:
    """Log the metrics and a per-sample table to W&B (offline without credentials); returns the run dir."""
    import wandb

    from cn_lightning.utils.loggers import resolve_wandb_mode

    run = wandb.init(project=cfg.wandb_project, dir=cfg.out, mode=resolve_wandb_mode("auto"),
                     job_type="evaluate", config=asdict(cfg))
    run.log({f"eval/{k}": v for k, v in values.items()})
    run.summary.update({f"eval/{k}": v for k, v in values.items()})
    if records:
        columns = list(records[0])
        run.log({"eval/samples": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in records])})
    run_dir = str(Path(run.dir).parent)
    run.finish()
    return run_dir


# ------------------------------------------------------------------------------ entry points
def run_rank(fabric: Any, cfg: EvalConfig) -> dict[str, Any]:
    """One process's part: score its split, reduce, and (rank 0) write the report."""
    from cn_lightning.generate import resolve_device

    _, dtype = resolve_device(str(fabric.device), cfg.dtype)
    metrics = {k: m.to(fabric.device) for k, m in build_metrics(cfg).items()}
    source = FolderSource(cfg.images) if cfg.images else PipelineSource(cfg, fabric.device, dtype)
    records = evaluate_split(cfg, source, metrics, fabric.global_rank, fabric.world_size, fabric.is_global_zero)
    records = _gather_records(records, fabric.world_size)
    if not records:
        raise ConfigError(
            f"no validation samples with a {cfg.condition_key!r} condition in {cfg.val_shards!r} "
            f"(is --condition-key the <key>.<condition>.png member of the shards?)"
        )
    values = compute_metrics(metrics, len(records))
    result = {"metrics": values, "num_samples": len(records), "samples": records}
    if fabric.is_global_zero:
        json_path, md_path = write_report(cfg, values, records)
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
        raise ConfigError("give --base and --controlnet to generate images, or --images DIR to score existing ones")
    check_val_shards(cfg.val_shards)
    strategy = "ddp" if cfg.devices > 1 else "auto"
    fabric = L.Fabric(accelerator=cfg.accelerator, devices=cfg.devices, strategy=strategy)
    return fabric.launch(run_rank, cfg)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m cn_lightning.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--val-shards", required=True, help="validation shards: brace pattern, list (::), or folder with manifest")
    p.add_argument("--condition-key", required=True, help="condition member of the shards (canny, outline, seg, ...)")
    p.add_argument("--out", required=True, help="folder for report.json, report.md (and images/)")
    p.add_argument("--resolution", type=int, default=512, help="centre-crop size of the samples (default 512)")
    p.add_argument("--base", help="Stable Diffusion model (diffusers directory or single file)")
    p.add_argument("--variant", help="architecture of a single-file base (sd15, sd21, sd21-base)")
    p.add_argument("--controlnet", help="ControlNet: diffusers folder, original-format file, checkpoint or run dir")
    p.add_argument("--images", help="score existing images <DIR>/<key>.png instead of generating")
    p.add_argument("--num-samples", type=int, help="at most this many samples (default: all)")
    p.add_argument("--batch-size", type=int, default=4, help="images generated at once per device (default 4)")
    p.add_argument("--num-workers", type=int, default=0, help="data loader workers per device (default 0)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument("--guidance", dest="guidance_scale", type=float, default=7.5, help="CFG scale (default 7.5)")
    p.add_argument("--control-scale", type=float, default=1.0, help="ControlNet conditioning scale (default 1.0)")
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument("--no-prompt", action="store_true", help="generate without prompts (guess mode), as in the paper's ablation")
    p.add_argument("--seed", type=int, default=0, help="base seed; each sample adds a hash of its key")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "unipc"), help="scheduler (default ddim)")
    p.add_argument("--fid-weights", help="local Inception weights file for FID (torch-fidelity's pt_inception-*.pth)")
    p.add_argument(
        "--fid-feature", type=int, default=None, choices=(64, 192, 768, 2048),
        help="Inception feature layer for FID, with --fid-weights (default 2048, the standard one)",
    )
    p.add_argument("--clip-model", help="open_clip architecture (e.g. ViT-L-14) or local-dir:FOLDER for CLIP score")
    p.add_argument("--clip-weights", help="local open_clip weights file for --clip-model NAME")
    p.add_argument("--save-images", action="store_true", help="also write the generated images to OUT/images/")
    p.add_argument("--wandb", action="store_true", help="log the metrics and a sample table to W&B (offline without a key)")
    p.add_argument("--wandb-project", default="cn_lightning", help="W&B project (default cn_lightning)")
    p.add_argument("--devices", type=int, default=1, help="processes/GPUs; the shards are split between them (default 1)")
    p.add_argument("--accelerator", default="auto", help="auto, cpu or gpu (default auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"), help="default: fp16 on GPU, fp32 on CPU")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fid_feature is not None and not args.fid_weights:
        raise ConfigError(
            f"--fid-feature {args.fid_feature} needs --fid-weights: FID is computed only with the "
            f"Inception weights file ({INCEPTION_HINT})"
        )
    if args.fid_feature is None:
        args.fid_feature = EvalConfig.fid_feature
    cfg = EvalConfig(**vars(args))
    for name in ("batch_size", "steps", "devices"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1")
    result = evaluate(cfg)
    if result.get("report"):
        print(Path(result["markdown"]).read_text(), end="")
        print(f"[cn_lightning] wrote {result['report']} and {result['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
