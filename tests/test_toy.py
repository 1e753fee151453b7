"""The toy world: a pretrained toy backbone, and a ControlNet that learns to place its circle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cn_lightning.config import asset
from cn_lightning.models.backbone import load_backbone
from cn_lightning.models.diffusion import encode_prompt
from cn_lightning.models.toy import colour_statistics, nearest_colour_names, text_to_image

# Well-separated palette colours, so a wrong colour cannot pass as a near neighbour.
PAIRS = [
    ("red", "blue"),
    ("yellow", "navy"),
    ("lime", "maroon"),
    ("white", "black"),
    ("cyan", "purple"),
    ("blue", "yellow"),
    ("black", "white"),
    ("magenta", "green"),
]


def prompted_colour_accuracy(path: str, palette: dict[str, tuple[int, int, int]]):
    """Sample the backbone at ``path`` without control on ``PAIRS`` (four noise seeds per prompt:
    circles land at random places, some mostly off the image) and name the drawn colours against
    ``palette`` restricted to the pairs' colours. Returns the share of backgrounds and of circles
    drawn in the prompt's colour, and the colours read ((N, 3) each)."""
    from cn_lightning.data.synthetic import circle_prompt

    backbone = load_backbone(path)

    def encode(prompts: list[str]) -> torch.Tensor:
        return encode_prompt(
            backbone.tokenizer, backbone.text_encoder, prompts, torch.device("cpu")
        )

    pairs = PAIRS * 4
    prompts = [circle_prompt(a, b) for a, b in pairs]
    images = text_to_image(
        backbone.unet,
        backbone.vae,
        encode,
        backbone.noise_scheduler,
        prompts,
        size=32,
        steps=20,
        guidance_scale=3.0,
        seed=0,
    )
    bg, fg = colour_statistics(images)
    names = {name: palette[name] for pair in PAIRS for name in pair}
    bg_ok = [n == b for n, (_, b) in zip(nearest_colour_names(bg, names), pairs, strict=True)]
    fg_ok = [n == a for n, (a, _) in zip(nearest_colour_names(fg, names), pairs, strict=True)]
    return float(np.mean(bg_ok)), float(np.mean(fg_ok)), bg, fg


def test_committed_toy_backbone_draws_circles_of_the_prompted_colours():
    from cn_lightning.data.synthetic import COLOURS

    backgrounds, circles, bg, fg = prompted_colour_accuracy(asset("toy_sd"), COLOURS)
    assert backgrounds >= 0.85, bg
    assert circles >= 0.7, fg


def run_pretrain_toy(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m cn_lightning.pretrain_toy`` with tiny settings (2 steps per stage, 64 circles,
    a 2-prompt check) into ``tmp_path / "run"``, its data cache under ``tmp_path``; ``overrides``
    come first (e.g. ``--config-name finetune_toy``). Asserts it exits 0."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", CN_LIGHTNING_CACHE=str(tmp_path / "cache"))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cn_lightning.pretrain_toy",
            *overrides,
            f"hydra.run.dir={tmp_path / 'run'}",
            "unet.steps=2",
            "data.batch_size=4",
            "check.num_prompts=2",
            "check.steps=2",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_pretrain_toy_command_writes_a_loadable_backbone(tmp_path):
    shards = "${cn.circle_shards:" + str(tmp_path / "c") + ",64,32}"
    result = run_pretrain_toy(tmp_path, "vae.steps=2", f"data.train_shards={shards}")
    out = tmp_path / "run" / "toy_sd"
    backbone = load_backbone(out)
    assert backbone.vae_scale_factor == 4
    assert (out / "PROVENANCE.json").is_file() and "toy backbone written" in result.stdout


def test_committed_backbone_says_how_it_was_made():
    provenance = json.loads((Path(asset("toy_sd")) / "PROVENANCE.json").read_text())
    assert provenance["command"].startswith("python -m cn_lightning.pretrain_toy")
    assert provenance["seed"] == 0 and provenance["config"]["seed"] == 0
    assert set(provenance["train_seconds"]) == {"vae", "unet"}


def test_the_quickstart_config_uses_the_committed_backbone():
    from hydra import compose, initialize_config_dir

    from cn_lightning.config import register_resolvers

    register_resolvers()
    with initialize_config_dir(
        str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"
    ):
        cfg = compose("train")
    assert cfg.model.pretrained_model_path == asset("toy_sd")
    assert cfg.data.resolution == 32


def test_a_missing_asset_is_a_clear_config_error():
    from cn_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="packaged asset 'nope' not found"):
        asset("nope")
