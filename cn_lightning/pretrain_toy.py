"""Pretrain the toy backbone: ``python -m cn_lightning.pretrain_toy [key=value ...]``.

Trains, from scratch, a small text-to-image latent diffusion model on synthetic circles (stage 1:
VAE; stage 2: UNet + text encoder on the frozen VAE) with Lightning on the same shards the
ControlNet quickstart uses, writes it in diffusers layout to ``out_dir`` and checks on held-out
prompts that it draws the prompted colours. Deterministic by ``seed``.

``python -m cn_lightning.pretrain_toy --config-name finetune_toy`` fine-tunes the packaged toy
backbone instead (``init_from``: no VAE stage, the UNet from the backbone's weights) into a toy
"community model" that draws the colour names in another palette
(``cn_lightning/assets/toy_sd_community``, ``conf/finetune_toy.yaml``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from cn_lightning import log
from cn_lightning.callbacks.samples import make_grid
from cn_lightning.config import register_resolvers
from cn_lightning.models.tiny import write_tokenizer
from cn_lightning.models.toy import (
    ToyDiffusionModule,
    ToyVAEModule,
    colour_statistics,
    latent_scaling_factor,
    nearest_colour_names,
    save_toy_backbone,
)

register_resolvers()


def fit_stage(
    cfg: DictConfig, module: L.LightningModule, datamodule, name: str, steps: int
) -> float:
    """Fit one stage for ``steps`` optimizer steps; return its wall time in seconds."""
    run_dir = Path(cfg.paths.output_dir)
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        max_steps=steps,
        default_root_dir=str(run_dir / name),
        logger=CSVLogger(str(run_dir), name=name, version=""),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def held_out_prompts(n: int, seed: int) -> tuple[list[str], list[tuple[str, str]]]:
    """``n`` random (colour A, colour B) prompts from the synthetic-circles palette."""
    from cn_lightning.data.synthetic import COLOURS, circle_prompt

    names = sorted(COLOURS)
    rng = np.random.default_rng(seed)
    pairs = [tuple(rng.choice(names, size=2, replace=False)) for _ in range(n)]
    return [circle_prompt(a, b) for a, b in pairs], pairs


def colour_check(module: ToyDiffusionModule, cfg: DictConfig, out_png: Path) -> dict:
    """Share of held-out prompts whose drawn background / circle colour is the prompted one, in
    the palette the model was trained on (``check.palette``); for another palette, also in the
    toy's own (``toy_palette_*``: how often it still draws the original colours)."""
    from cn_lightning.data.synthetic import PALETTES

    palette = cfg.check.get("palette", "toy")
    prompts, pairs = held_out_prompts(cfg.check.num_prompts, cfg.check.seed)
    module.eval()
    images = module.generate(
        prompts,
        size=cfg.data.resolution,
        steps=cfg.check.steps,
        guidance_scale=cfg.check.guidance_scale,
        seed=cfg.check.seed,
    )
    bg, fg = colour_statistics(images)
    rows = [list(images[i : i + 8]) for i in range(0, len(images), 8)]
    Image.fromarray(make_grid(rows)).save(out_png)
    out = {}
    for name in dict.fromkeys([palette, "toy"]):
        prefix = "" if name == palette else f"{name}_palette_"
        bg_names = nearest_colour_names(bg, PALETTES[name])
        fg_names = nearest_colour_names(fg, PALETTES[name])
        out[prefix + "background_accuracy"] = float(
            np.mean([n == b for n, (_, b) in zip(bg_names, pairs, strict=True)])
        )
        out[prefix + "circle_accuracy"] = float(
            np.mean([n == a for n, (a, _) in zip(fg_names, pairs, strict=True)])
        )
    return {**out, "grid": str(out_png)}


def pretrain(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    init_from = cfg.get("init_from")
    datamodule = hydra.utils.instantiate(cfg.data)
    train_seconds = {}
    if init_from:
        # Fine-tuning a toy backbone: its VAE and tokenizer as they are, no VAE stage.
        tokenizer_dir = Path(init_from) / "tokenizer"
        vae_dir = Path(init_from) / "vae"
    else:
        tokenizer_dir = run_dir / "tokenizer"
        write_tokenizer(tokenizer_dir)
        vae_module = ToyVAEModule(
            learning_rate=cfg.vae.learning_rate, kl_weight=cfg.vae.kl_weight, seed=cfg.seed
        )
        train_seconds["vae"] = fit_stage(cfg, vae_module, datamodule, "stage1_vae", cfg.vae.steps)
        vae = vae_module.vae.cpu().eval()
        probe = next(iter(datamodule.train_dataloader()))["image"]
        vae.register_to_config(scaling_factor=latent_scaling_factor(vae, probe))
        vae_dir = run_dir / "stage1_vae" / "vae"
        vae.save_pretrained(vae_dir)

    unet_module = ToyDiffusionModule(
        vae_dir=str(vae_dir),
        tokenizer_dir=str(tokenizer_dir),
        learning_rate=cfg.unet.learning_rate,
        ucg_rate=cfg.unet.ucg_rate,
        seed=cfg.seed,
        init_from=str(init_from) if init_from else None,
        train_text_encoder=cfg.unet.get("train_text_encoder", True),
    )
    train_seconds["unet"] = fit_stage(cfg, unet_module, datamodule, "stage2_unet", cfg.unet.steps)
    unet_module.cpu()
    check = colour_check(unet_module, cfg, run_dir / "colour_check.png")
    provenance = {
        "command": "python -m cn_lightning.pretrain_toy " + " ".join(sys.argv[1:]),
        "config": OmegaConf.to_container(cfg, resolve=False),
        "seed": cfg.seed,
        "train_seconds": {k: round(v, 1) for k, v in train_seconds.items()},
        "torch_threads": torch.get_num_threads(),
        "colour_check": {k: v for k, v in check.items() if k != "grid"},
    }
    out = save_toy_backbone(
        cfg.out_dir,
        unet_module.unet,
        unet_module.vae,
        unet_module.text_encoder,
        tokenizer_dir,
        unet_module.noise_scheduler,
        provenance,
    )
    summary = {"out_dir": str(out), **provenance["train_seconds"], **check}
    if init_from:
        summary["init_from"] = str(init_from)
    log.info(f"toy backbone written to {out}: {json.dumps(summary)}")
    return summary


@hydra.main(version_base="1.3", config_path="../conf", config_name="pretrain_toy")
def main(cfg: DictConfig) -> None:
    pretrain(cfg)


if __name__ == "__main__":
    main()
