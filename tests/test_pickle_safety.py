"""No pickle runs code: every entry point that takes a path refuses a crafted pickle in one line.

The crafted files hold an object whose ``__reduce__`` writes a marker file when unpickled (what a
malicious ``.pth``/``.ckpt`` would do with ``os.system``). They are given to ``export``,
``generate``, ``evaluate`` and ``train`` wherever those take a path; the marker must never appear
and the command must exit 2 with one ``cn_lightning: error: ...`` line, no traceback. Our own
checkpoints (OmegaConf hyperparameters, NumPy arrays, DeepSpeed optimizer states) still load.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import cli_error
from PIL import Image

from cn_lightning.errors import UnsafeCheckpointError
from cn_lightning.models.checkpoints import load_trainable_state_dict
from cn_lightning.serialization import safe_torch_load, verify_safe_checkpoint

SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")


class Evil:
    """Unpickling this writes ``marker``: the stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def _evil_file(path: Path, marker: Path, layout: str = "lightning") -> Path:
    """A crafted pickle shaped like a Lightning checkpoint or an original-format ControlNet."""
    if layout == "lightning":
        payload = {
            "state_dict": {"controlnet.conv_in.weight": torch.zeros(4, 4, 3, 3)},
            "hyper_parameters": {"pretrained_model_path": "x", "payload": Evil(marker)},
        }
    else:
        payload = {
            "control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
            "payload": Evil(marker),
        }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def _evil_deepspeed_dir(path: Path, marker: Path) -> Path:
    """A directory laid out like Lightning's DeepSpeed ``*.ckpt/`` with crafted state files."""
    tag = path / "checkpoint"
    tag.mkdir(parents=True)
    (path / "latest").write_text("checkpoint")
    torch.save(
        {"module": {}, "buffer_names": [], "param_shapes": [], "payload": Evil(marker)},
        tag / "mp_rank_00_model_states.pt",
    )
    torch.save(
        {"optimizer_state_dict": {"payload": Evil(marker)}},
        tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    return path


@pytest.fixture()
def marker(tmp_path) -> Path:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "unpickling the crafted file ran its code"


def _assert_refused(line: str, path: Path) -> None:
    assert f"{path}: refusing to unpickle" in line and "(not a safe checkpoint" in line, line


# ------------------------------------------------------------------------------ the reader itself
def test_crafted_pickle_is_refused_and_safe_types_load(tmp_path, marker):
    evil = _evil_file(tmp_path / "evil.ckpt", marker)
    with pytest.raises(
        UnsafeCheckpointError, match=r"refusing to unpickle getattr \(not a safe checkpoint"
    ) as info:
        safe_torch_load(evil)
    assert "\n" not in str(info.value)
    legacy = tmp_path / "legacy.pt"  # torch's pre-zip format goes through the same unpickler
    torch.save({"a": Evil(marker)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError):
        safe_torch_load(legacy, mmap=True)

    # What our checkpoints hold besides tensors loads: OmegaConf hyperparameters, NumPy RNG state.
    from omegaconf import DictConfig, ListConfig

    ours = {
        "state_dict": {"controlnet.conv_in.weight": torch.ones(2)},
        "hyper_parameters": {
            "control_scales": ListConfig([1.0, 0.5]),
            "extra": DictConfig({"a": [1, 2]}),
        },
        "rng": {"numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "path": pathlib.Path("/x"),
    }
    torch.save(ours, tmp_path / "ours.ckpt")
    back = safe_torch_load(tmp_path / "ours.ckpt")
    assert list(back["hyper_parameters"]["control_scales"]) == [1.0, 0.5]
    assert np.array_equal(back["rng"]["numpy"][1], ours["rng"]["numpy"][1])
    assert torch.equal(
        load_trainable_state_dict(tmp_path / "ours.ckpt")["controlnet.conv_in.weight"],
        torch.ones(2),
    )
    verify_safe_checkpoint(tmp_path / "ours.ckpt")


def test_crafted_deepspeed_directory_is_refused(tmp_path, marker):
    directory = _evil_deepspeed_dir(tmp_path / "evil_ds.ckpt", marker)
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
        verify_safe_checkpoint(directory)
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
        load_trainable_state_dict(
            directory
        )  # DeepSpeed's zero_to_fp32, with its torch.load made safe


# ------------------------------------------------------------------------------ export
@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("layout", ["lightning", "original"])
@pytest.mark.parametrize("fmt", ["diffusers", "original"])
def test_export_refuses_crafted_files(tmp_path, marker, capsys, suffix, layout, fmt):
    from cn_lightning.export import main

    evil = _evil_file(tmp_path / f"evil{suffix}", marker, layout)
    out = tmp_path / ("out" if fmt == "diffusers" else "out.safetensors")
    _assert_refused(cli_error(capsys, main, [str(evil), "--format", fmt, "--out", str(out)]), evil)
    assert not out.exists()


def test_export_refuses_a_crafted_deepspeed_directory(tmp_path, marker, capsys):
    from cn_lightning.export import main

    directory = _evil_deepspeed_dir(tmp_path / "evil_ds.ckpt", marker)
    line = cli_error(
        capsys, main, [str(directory), "--format", "diffusers", "--out", str(tmp_path / "out")]
    )
    assert "refusing to unpickle" in line and "evil_ds.ckpt" in line


def _run_module(
    module: str, *args: str, cwd: Path, env: dict | None = None
) -> subprocess.CompletedProcess:
    env = env or dict(
        os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", WANDB_MODE="offline"
    )
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


def _assert_one_line_refusal(result: subprocess.CompletedProcess, path: Path) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("cn_lightning: error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    _assert_refused(lines[0], path)
    return lines[0]


def test_export_module_entry_point(tmp_path, marker):
    evil = _evil_file(tmp_path / "control_evil.pth", marker, "original")
    result = _run_module(
        "cn_lightning.export",
        str(evil),
        "--format",
        "diffusers",
        "--out",
        str(tmp_path / "o"),
        cwd=tmp_path,
    )
    line = _assert_one_line_refusal(result, evil)
    print(line)


# ------------------------------------------------------------------------------ generate / evaluate
@pytest.fixture(scope="module")
def condition(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cond") / "cond.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(path)
    return path


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_generate_refuses_crafted_controlnets(
    tiny_sd_path, condition, tmp_path, marker, capsys, suffix
):
    from cn_lightning.generate import main

    evil = _evil_file(
        tmp_path / f"evil{suffix}",
        marker,
        "original" if suffix in (".pth", ".bin") else "lightning",
    )
    argv = [
        "--base",
        tiny_sd_path,
        "--image",
        str(condition),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "out"),
    ]
    _assert_refused(cli_error(capsys, main, [*argv, "--controlnet", str(evil)]), evil)
    assert not (tmp_path / "out").exists()


def test_generate_refuses_crafted_base_and_deepspeed_directory(
    tiny_sd_path, condition, tmp_path, marker, capsys
):
    from cn_lightning.generate import main

    evil = _evil_file(tmp_path / "sd_evil.ckpt", marker)
    argv = ["--image", str(condition), "--steps", "1", "--out", str(tmp_path / "out")]
    _assert_refused(
        cli_error(capsys, main, [*argv, "--base", str(evil), "--controlnet", str(evil)]), evil
    )
    directory = _evil_deepspeed_dir(tmp_path / "evil_ds.ckpt", marker)
    line = cli_error(capsys, main, [*argv, "--base", tiny_sd_path, "--controlnet", str(directory)])
    assert "refusing to unpickle" in line


def test_generate_module_entry_point(tiny_sd_path, condition, tmp_path, marker):
    evil = _evil_file(tmp_path / "control_evil.pth", marker, "original")
    result = _run_module(
        "cn_lightning.generate",
        "--base",
        tiny_sd_path,
        "--controlnet",
        str(evil),
        "--image",
        str(condition),
        "--steps",
        "1",
        "--out",
        str(tmp_path / "out"),
        cwd=tmp_path,
    )
    _assert_one_line_refusal(result, evil)


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> str:
    from cn_lightning.data.synthetic import ensure_shards

    return ensure_shards(
        str(tmp_path_factory.mktemp("val") / "shards"), num_samples=2, size=32, seed=0
    )


def _eval_argv(val_shards: str, out: Path) -> list[str]:
    return [
        "--val-shards",
        val_shards,
        "--condition-key",
        "outline",
        "--resolution",
        "32",
        "--out",
        str(out),
        "--accelerator",
        "cpu",
        "--steps",
        "1",
        "--num-samples",
        "1",
    ]


@pytest.mark.parametrize("suffix", [".ckpt", ".pth"])
def test_evaluate_refuses_crafted_controlnet_and_base(
    tiny_sd_path, val_shards, tmp_path, marker, capsys, suffix
):
    from cn_lightning.evaluate import main

    evil = _evil_file(
        tmp_path / f"evil{suffix}", marker, "lightning" if suffix == ".ckpt" else "original"
    )
    argv = _eval_argv(val_shards, tmp_path / "out")
    _assert_refused(
        cli_error(capsys, main, [*argv, "--base", tiny_sd_path, "--controlnet", str(evil)]), evil
    )
    _assert_refused(
        cli_error(capsys, main, [*argv, "--base", str(evil), "--controlnet", str(evil)]), evil
    )
    assert not (tmp_path / "out" / "report.json").exists()


def test_evaluate_refuses_crafted_metric_weights(val_shards, tmp_path, marker, capsys):
    from cn_lightning.evaluate import main

    argv = [*_eval_argv(val_shards, tmp_path / "out"), "--images", str(tmp_path)]
    fid = _evil_file(
        tmp_path / "pt_inception.pth", marker
    )  # torch-fidelity unpickles it unrestricted
    _assert_refused(cli_error(capsys, main, [*argv, "--fid-weights", str(fid)]), fid)
    clip = _evil_file(tmp_path / "open_clip_pytorch_model.bin", marker)
    _assert_refused(
        cli_error(capsys, main, [*argv, "--clip-model", "RN50", "--clip-weights", str(clip)]), clip
    )


def test_evaluate_module_entry_point(tiny_sd_path, val_shards, tmp_path, marker):
    directory = _evil_deepspeed_dir(tmp_path / "evil_ds.ckpt", marker)
    result = _run_module(
        "cn_lightning.evaluate",
        *_eval_argv(val_shards, tmp_path / "out"),
        "--base",
        tiny_sd_path,
        "--controlnet",
        str(directory),
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("cn_lightning: error:")]
    assert len(lines) == 1 and "refusing to unpickle" in lines[0], result.stderr[-3000:]


# ------------------------------------------------------------------------------ train
@pytest.fixture(scope="module")
def train_shards(tmp_path_factory) -> str:
    from data_helpers import make_circle_shards

    folder = tmp_path_factory.mktemp("train") / "shards"
    make_circle_shards(folder, num_samples=16, size=32)
    return str(folder)


def _train(
    tiny_sd_path: str, train_shards: str, tmp_path: Path, *extra: str
) -> subprocess.CompletedProcess:
    from distributed_helpers import subprocess_env, tiny_run_overrides

    tmp_path.mkdir(parents=True, exist_ok=True)
    args = [*tiny_run_overrides(tiny_sd_path, train_shards, tmp_path / "run", steps=2), *extra]
    return _run_module("cn_lightning.train", *args, cwd=tmp_path, env=subprocess_env(tmp_path))


@pytest.mark.parametrize(
    ("override", "name", "layout"),
    [
        ("model.controlnet_path", "control_evil.pth", "original"),
        ("model.pretrained_model_path", "sd_evil.ckpt", "lightning"),
        ("ckpt_path", "last_evil.ckpt", "lightning"),
    ],
)
def test_train_refuses_crafted_files(
    tiny_sd_path, train_shards, tmp_path, marker, override, name, layout
):
    evil = _evil_file(tmp_path / name, marker, layout)
    result = _train(tiny_sd_path, train_shards, tmp_path, f"{override}={evil}")
    _assert_one_line_refusal(result, evil)
    assert not (tmp_path / "run" / "controlnet").exists()


def test_train_under_deepspeed_refuses_a_crafted_checkpoint_directory(
    tiny_sd_path, train_shards, tmp_path, marker
):
    directory = _evil_deepspeed_dir(tmp_path / "evil_ds.ckpt", marker)
    result = _train(
        tiny_sd_path,
        train_shards,
        tmp_path,
        "strategy=deepspeed_stage_2",
        "trainer.strategy._target_=distributed_helpers.CPUDeepSpeedStrategy",
        "trainer.devices=1",
        f"ckpt_path={directory}",
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("cn_lightning: error:")]
    assert len(lines) == 1 and "refusing to unpickle" in lines[0] and "evil_ds.ckpt" in lines[0], (
        result.stderr[-3000:]
    )


@pytest.mark.slow
def test_our_own_checkpoints_resume_with_the_allow_list(tiny_sd_path, train_shards, tmp_path):
    """Real checkpoints (list-valued hyperparameters; a DeepSpeed ZeRO-2 directory) pass the checks
    and resume; export reads them."""
    from cn_lightning.export import main as export_main

    scales = "model.control_scales=[1,1,1,1,1,1,1]"

    def train_check_resume(name: str, *overrides: str) -> Path:
        first = _train(tiny_sd_path, train_shards, tmp_path / name, scales, *overrides)
        assert first.returncode == 0, first.stderr[-3000:]
        last = tmp_path / name / "run" / "checkpoints" / "last.ckpt"
        verify_safe_checkpoint(last)
        again = _train(
            tiny_sd_path,
            train_shards,
            tmp_path / f"{name}_resumed",
            scales,
            *overrides,
            f"ckpt_path={last}",
            "trainer.max_steps=4",
        )
        assert again.returncode == 0, again.stderr[-3000:]
        assert "training starts at step 2" in again.stdout, again.stderr[-3000:]
        return last

    train_check_resume("file")
    directory = train_check_resume(
        "deepspeed",
        "strategy=deepspeed_stage_2",
        "trainer.strategy._target_=distributed_helpers.CPUDeepSpeedStrategy",
        "trainer.devices=1",
    )
    assert (
        export_main([str(directory), "--format", "diffusers", "--out", str(tmp_path / "export")])
        == 0
    )
