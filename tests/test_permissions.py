"""Exports get the user's umask permissions, not the private ones of ``mkdtemp``/``mkstemp``."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

from cn_lightning.atomic import atomic_directory, atomic_file
from cn_lightning.models.backbone import load_backbone
from cn_lightning.models.checkpoints import save_controlnet_folder, save_original


@pytest.fixture(params=[0o022, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _all_modes(root: Path) -> set[tuple[str, int]]:
    return {("dir" if p.is_dir() else "file", _mode(p)) for p in [root, *root.rglob("*")]}


def test_atomic_writers_follow_the_umask(tmp_path, umask):
    with atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "weights.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "weights.bin", 0o600)  # as safetensors / mkstemp would leave it
    with atomic_file(tmp_path / "file.txt") as tmp:
        tmp.write_text("x")
    assert _all_modes(tmp_path / "folder") == {("dir", 0o777 & ~umask), ("file", 0o666 & ~umask)}
    assert _mode(tmp_path / "file.txt") == 0o666 & ~umask


def test_exports_are_readable_by_the_group_under_umask_022(tiny_sd_path, tmp_path):
    from cn_lightning.export import main as export_main
    from cn_lightning.inference import save_png

    old = os.umask(0o022)
    try:
        unet = load_backbone(tiny_sd_path).unet
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_embedding_out_channels=(4, 8, 8, 16)
        )
        folder = save_controlnet_folder(controlnet, tmp_path / "controlnet", unet=unet)
        assert (
            export_main(
                [str(folder), "--format", "original", "--out", str(tmp_path / "c.safetensors")]
            )
            == 0
        )
        assert (
            export_main([str(folder), "--format", "diffusers", "--out", str(tmp_path / "again")])
            == 0
        )
        save_original({"x": torch.zeros(1)}, tmp_path / "x.pth")
        save_png(Image.new("RGB", (8, 8)), tmp_path / "out" / "000000.png")
    finally:
        os.umask(old)
    for root in (folder, tmp_path / "again"):
        assert (root / "unet" / "config.json").is_file()
        assert _all_modes(root) == {("dir", 0o755), ("file", 0o644)}, root
    for path in ("c.safetensors", "c_unet.safetensors", "x.pth", "out/000000.png"):
        assert _mode(tmp_path / path) == 0o644, path
