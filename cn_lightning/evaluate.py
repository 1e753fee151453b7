"""Evaluate a ControlNet over validation shards: condition fidelity, FID and CLIP score.

    python -m cn_lightning.evaluate --val-shards 'val/shard-{000000..000003}.tar' \\
        --condition-key canny --base BASE --controlnet CN --out eval/ \\
        [--weights EXTRACTOR_WEIGHTS --extractor-device cuda] \\
        [--fid-weights pt_inception-2015-12-05-6726825d.pth] \\
        [--clip-model ViT-L-14 --clip-weights open_clip_pytorch_model.bin] [--devices 8] [--wandb]

Condition fidelity extracts the condition back from every image with the condition's own
extractor (``--weights``: its local weights, for the model-based ones: hed, depth, openpose, ...)
and compares it with the input condition by the metric ControlNet++ reports for it. Writes
``report.json`` and ``report.md`` to ``--out`` and prints the table (condition | metric | value |
samples); ``--devices N`` splits the shards over N processes. A thin shell over
:mod:`cn_lightning.evaluation`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from cn_lightning import log
from cn_lightning.cli import ArgumentParser, run_cli
from cn_lightning.errors import ConfigError
from cn_lightning.evaluation import EvalConfig, evaluate
from cn_lightning.metrics.quality import INCEPTION_HINT
from cn_lightning.models.diffusion import SAMPLERS


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="python -m cn_lightning.evaluate", description=__doc__.split("\n")[0])
    p.add_argument(
        "--val-shards",
        required=True,
        help="validation shards: brace pattern, list (::), or folder with manifest",
    )
    p.add_argument(
        "--condition-key",
        required=True,
        help="condition member of the shards (canny, outline, seg, ...)",
    )
    p.add_argument("--out", required=True, help="folder for report.json, report.md (and images/)")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="centre-crop size of the samples (default: the base model's native size, 512 for "
        "SD1.5, 1024 for SDXL; 512 with --images)",
    )
    p.add_argument(
        "--base", help="Stable Diffusion model: SD1.x/SD2.x/SDXL diffusers directory or single file"
    )
    p.add_argument("--variant", help="architecture of a single-file base (sd15, sd21, sd21-base)")
    p.add_argument(
        "--controlnet",
        nargs="+",
        help="ControlNet: diffusers folder, original-format file, checkpoint or run dir; "
        "several are summed (composition), each reading its --control-key condition",
    )
    p.add_argument("--images", help="score existing images <DIR>/<key>.png instead of generating")
    p.add_argument("--num-samples", type=int, help="at most this many samples (default: all)")
    p.add_argument(
        "--batch-size", type=int, default=4, help="images generated at once per device (default 4)"
    )
    p.add_argument(
        "--num-workers", type=int, default=0, help="data loader workers per device (default 0)"
    )
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default 20)")
    p.add_argument(
        "--guidance",
        dest="guidance_scale",
        type=float,
        default=None,
        help="CFG scale (default: the base model's pipeline default, 7.5 SD, 5.0 SDXL)",
    )
    p.add_argument(
        "--control-scale",
        type=float,
        nargs="+",
        default=[1.0],
        help="ControlNet conditioning scale: one for all or one per ControlNet (default 1.0)",
    )
    p.add_argument(
        "--control-key",
        nargs="+",
        help="the shard condition each ControlNet reads (default: --condition-key, the scored "
        "one), e.g. --controlnet CN_X CN_Y --control-key xline yline",
    )
    p.add_argument("--negative-prompt", default="", help="negative prompt (default empty)")
    p.add_argument(
        "--no-prompt",
        action="store_true",
        help="generate without prompts (guess mode), as in the paper's ablation",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="base seed; each sample adds a hash of its key"
    )
    p.add_argument(
        "--sampler", default="ddim", choices=sorted(SAMPLERS), help="scheduler (default ddim)"
    )
    p.add_argument(
        "--weights",
        help="local weights of the condition's extractor, for its fidelity (model-based "
        "conditions: hed, softedge, lineart, mlsd, scribble, depth, normal, openpose, ...)",
    )
    p.add_argument(
        "--extractor-device",
        help="device of that extractor: auto, cpu, cuda, cuda:1, ... (default: each process's)",
    )
    p.add_argument(
        "--fid-weights",
        help="local Inception weights file for FID (torch-fidelity's pt_inception-*.pth)",
    )
    p.add_argument(
        "--fid-feature",
        type=int,
        default=None,
        choices=(64, 192, 768, 2048),
        help="Inception feature layer for FID, with --fid-weights (default 2048, the standard one)",
    )
    p.add_argument(
        "--clip-model",
        help="open_clip architecture (e.g. ViT-L-14) or local-dir:FOLDER for CLIP score",
    )
    p.add_argument("--clip-weights", help="local open_clip weights file for --clip-model NAME")
    p.add_argument(
        "--save-images", action="store_true", help="also write the generated images to OUT/images/"
    )
    p.add_argument(
        "--wandb",
        action="store_true",
        help="log the metrics and a sample table to W&B (offline without a key)",
    )
    p.add_argument(
        "--wandb-project", default="cn_lightning", help="W&B project (default cn_lightning)"
    )
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        help="processes/GPUs; the shards are split between them (default 1)",
    )
    p.add_argument("--accelerator", default="auto", help="auto, cpu or gpu (default auto)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "fp32", "fp16", "bf16"),
        help="default: fp16 on GPU, fp32 on CPU",
    )
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
        log.info(f"wrote {result['report']} and {result['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
