"""Shared fixtures: offline environment and tiny Stable Diffusion models (SD, SDXL) on disk."""

from __future__ import annotations

import os

import pytest

# No hub, no network: every model loads from a local path; W&B writes offline runs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory) -> str:
    """A tiny SD model in diffusers layout (diffusers' unit-test sizes), written once."""
    from cn_lightning.models.tiny import write_tiny_backbone

    return str(write_tiny_backbone(tmp_path_factory.mktemp("models") / "tiny_sd", preset="test"))


@pytest.fixture(scope="session")
def tiny_sdxl_path(tmp_path_factory) -> str:
    """A tiny SDXL model in diffusers layout (both text encoders), written once."""
    from cn_lightning.models.tiny import write_tiny_backbone

    path = tmp_path_factory.mktemp("models") / "tiny_sdxl"
    return str(write_tiny_backbone(path, preset="sdxl-test"))


@pytest.fixture(scope="session")
def tiny_sd_v_path(tmp_path_factory) -> str:
    """The same tiny model with a v-prediction scheduler."""
    import json

    from cn_lightning.models.tiny import write_tiny_backbone

    path = write_tiny_backbone(tmp_path_factory.mktemp("models") / "tiny_sd_v", preset="test")
    cfg_path = path / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_path.write_text(json.dumps(cfg))
    return str(path)
