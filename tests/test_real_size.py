"""The real SD1.5 architecture (random weights from the shipped configs) trains one step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "cn_lightning" / "models" / "configs" / "sd15"


def write_random_sd15(out: Path) -> Path:
    """SD1.5 in diffusers layout with random weights, built from the shipped configs only."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cn_lightning.models.single_file import load_clip_tokenizer

    torch.manual_seed(0)
    UNet2DConditionModel.from_config(
        json.loads((CONFIGS / "unet" / "config.json").read_text())
    ).save_pretrained(out / "unet")
    AutoencoderKL.from_config(
        json.loads((CONFIGS / "vae" / "config.json").read_text())
    ).save_pretrained(out / "vae")
    text_cfg = CLIPTextConfig.from_pretrained(CONFIGS / "text_encoder")
    CLIPTextModel(text_cfg).save_pretrained(out / "text_encoder")
    load_clip_tokenizer(CONFIGS / "tokenizer").save_pretrained(out / "tokenizer")
    DDPMScheduler.from_pretrained(CONFIGS / "scheduler").save_pretrained(out / "scheduler")
    return out


@pytest.mark.slow
def test_sd15_architecture_trains_one_step_at_256px(tmp_path):
    from cn_lightning.models.module import ControlNetModule

    path = write_random_sd15(tmp_path / "sd15")
    module = ControlNetModule(str(path), learning_rate=1e-5, gradient_checkpointing=True)
    assert sum(p.numel() for p in module.controlnet.parameters()) == 361_279_120
    batch = {
        "image": torch.rand(1, 3, 256, 256) * 2 - 1,
        "condition": torch.rand(1, 3, 256, 256),
        "prompt": ["a photo of a cat"],
    }
    optimizer = module.configure_optimizers()
    before = module.controlnet.controlnet_mid_block.weight.detach().clone()
    loss = module.compute_loss(batch)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(before, module.controlnet.controlnet_mid_block.weight)
