"""SD2.x single files: the prediction type comes from the file where it is recorded, else from
``model.variant``; it is never guessed (the 512 px SD2.1-base file is an epsilon model)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_single_file import make_tiny_sd

from cn_lightning.errors import BackboneLoadError
from cn_lightning.models.single_file import (
    _resolve_variant,
    load_single_file_components,
    recorded_prediction_type,
)


@pytest.mark.parametrize(
    ("records", "expected"),
    [
        ({"modelspec.prediction_type": "v"}, "v_prediction"),
        ({"modelspec.prediction_type": "epsilon"}, "epsilon"),
        ({"ss_v_parameterization": "True"}, "v_prediction"),
        ({"ss_v_parameterization": "False"}, "epsilon"),
        ({"prediction_type": "v_prediction"}, "v_prediction"),
        ({"parameterization": "eps"}, "epsilon"),
        ({"format": "pt"}, None),
        ({}, None),
    ],
)
def test_recorded_prediction_type(records, expected):
    assert recorded_prediction_type(records) == expected


def test_variant_from_the_recorded_prediction_type():
    path = Path("sd2.safetensors")
    assert _resolve_variant("sd2", None, path, "v_prediction") == "sd21"
    assert _resolve_variant("sd2", None, path, "epsilon") == "sd21-base"
    assert (
        _resolve_variant("sd2", "sd21-base", path, "v_prediction") == "sd21-base"
    )  # explicit wins
    assert _resolve_variant("sd1", None, path, None) == "sd15"


def test_sd2_file_without_a_record_asks_for_the_variant(tmp_path: Path) -> None:
    path, _, _ = make_tiny_sd(tmp_path, "sd2")
    with pytest.raises(BackboneLoadError) as info:
        load_single_file_components(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert (
        "model.variant=sd21 (768, v)" in message
        and "model.variant=sd21-base (512, epsilon)" in message
    )


@pytest.mark.parametrize(("record", "expected"), [("v", "v_prediction"), ("epsilon", "epsilon")])
def test_recorded_prediction_type_sets_the_scheduler(
    tmp_path: Path, record: str, expected: str
) -> None:
    path, _, cfg_dir = make_tiny_sd(tmp_path, "sd2")
    tagged = tmp_path / f"tagged-{record}.safetensors"
    save_file(load_file(str(path)), str(tagged), metadata={"modelspec.prediction_type": record})
    comps = load_single_file_components(tagged, config_dir_override=cfg_dir)
    assert comps["noise_scheduler"].config.prediction_type == expected
    # A pickled checkpoint records it as a top-level entry.
    ckpt = tmp_path / f"tagged-{record}.ckpt"
    torch.save({"state_dict": load_file(str(path)), "prediction_type": record}, ckpt)
    comps = load_single_file_components(ckpt, config_dir_override=cfg_dir)
    assert comps["noise_scheduler"].config.prediction_type == expected


def test_train_cli_names_the_variant_in_one_line(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    path, _, _ = make_tiny_sd(tmp_path, "sd2")
    env = dict(
        os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", CN_LIGHTNING_OUTPUTS=str(tmp_path)
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "cn_lightning.train",
            f"model.pretrained_model_path={path}",
            "logger=csv",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("cn_lightning: error:")]
    assert len(lines) == 1 and "model.variant=sd21-base" in lines[0], result.stderr[-2000:]
