"""Export a trained ControlNet:
``python -m cn_lightning.export SRC --format diffusers|original --out PATH``.

``SRC`` is a Lightning ``.ckpt`` file, a DeepSpeed checkpoint directory, a run directory (its
``checkpoints/last.ckpt``, else its newest checkpoint), or an already exported ControlNet (a
diffusers folder or an original-format file) to convert between the two formats.

* ``--format diffusers`` writes a ``ControlNetModel`` folder (``config.json`` + safetensors), which
  ``StableDiffusionControlNetPipeline`` and ComfyUI load.
* ``--format original`` writes the ``control_model.*`` state dict of the original ControlNet repo
  (``.safetensors``, or ``.pth`` when ``--out`` ends in ``.pth``), which AUTOMATIC1111's and
  ComfyUI's ControlNet loaders read. The conversion is exact (see
  :mod:`cn_lightning.models.convert_original`).

After ``sd_locked: false`` training the UNet decoder was trained too, and the ControlNet only
works with it: the full fine-tuned UNet (the base model's UNet with the trained decoder, fp32
unless ``--dtype``) is written as well, to ``OUT/unet/`` (diffusers folder) or to
``<OUT stem>_unet<suffix>`` (``model.diffusion_model.*`` keys, the SD checkpoint layout).
``--controlnet-only`` skips it. Pickled inputs are read with ``weights_only=True`` and an
allow-list; a pickle that would run code is refused. A thin shell over
:func:`cn_lightning.models.checkpoints.export_controlnet`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from cn_lightning import log
from cn_lightning.cli import ArgumentParser, run_cli
from cn_lightning.models.checkpoints import FORMATS, export_controlnet


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m cn_lightning.export",
        description=(
            "Export a trained ControlNet to a diffusers folder or to the original control_model.* "
            "format (A1111 / ComfyUI)."
        ),
    )
    parser.add_argument(
        "src",
        help=(
            "Lightning .ckpt file, DeepSpeed checkpoint directory, run directory (uses "
            "checkpoints/last.ckpt), or an exported ControlNet "
            "(diffusers folder / original .safetensors)"
        ),
    )
    parser.add_argument(
        "--format", dest="fmt", required=True, choices=FORMATS, help="output format"
    )
    parser.add_argument(
        "--out",
        required=True,
        help=(
            "output folder (diffusers) or file "
            "(original: .safetensors, or .pth/.pt/.ckpt for a pickle)"
        ),
    )
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=("fp32", "fp16", "bf16"),
        help="dtype of the written weights (default fp32)",
    )
    parser.add_argument(
        "--base",
        default=None,
        help=(
            "the Stable Diffusion model the ControlNet was trained on, for its architecture and, "
            "after sd_locked=false training, the frozen part of the UNet "
            "(default: the checkpoint's pretrained_model_path)"
        ),
    )
    parser.add_argument(
        "--controlnet-only",
        action="store_true",
        help=(
            "after sd_locked=false training, write only the ControlNet "
            "(by default the fine-tuned UNet is written too: OUT/unet/ for diffusers, "
            "<OUT stem>_unet<suffix> for original)"
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = export_controlnet(
        args.src,
        args.out,
        fmt=args.fmt,
        dtype=args.dtype,
        base=args.base,
        controlnet_only=args.controlnet_only,
    )
    log.info(f"wrote {args.fmt} ControlNet ({args.dtype}) to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
