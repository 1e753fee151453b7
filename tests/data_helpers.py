"""Helpers for the data tests: tiny real shards, images and corrupt inputs on disk."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np

from cn_lightning.data.format import encode_image, write_shard_atomic


def make_circle_shards(
    out: Path, num_samples: int = 48, size: int = 32, samples_per_shard: int = 8, seed: int = 0
) -> str:
    """Synthetic-circles shards in ``out``; returns their brace pattern."""
    from cn_lightning.data.synthetic import build_shards

    summary, _ = build_shards(
        str(out), num_samples, size, seed, samples_per_shard, workers=0, progress=False
    )
    return os.path.join(str(out), summary.manifest["pattern"])


def mirror_sample(
    key: str, size: tuple[int, int], seed: int, condition: str = "canny", image_fmt: str = "png"
) -> dict:
    """A sample whose condition is the image itself (lossless PNG), so any crop/flip mismatch
    between image and condition is visible pixel for pixel."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
    return {
        "__key__": key,
        image_fmt: encode_image(image, image_fmt),
        f"{condition}.png": encode_image(image, "png"),
        "txt": f"prompt {key}",
        "json": json.dumps({"i": seed}),
    }


def write_shards(out: Path, samples_per_shard: list[list[dict]], prefix: str = "s") -> list[str]:
    """Write each list of samples as one shard; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, samples in enumerate(samples_per_shard):
        path = str(out / f"{prefix}-{i:06d}.tar")
        write_shard_atomic(path, samples)
        paths.append(path)
    return paths


def truncate_file(path: str, keep_fraction: float = 0.5) -> None:
    """Cut a tar in the middle of its members, as a crashed copy would."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep_fraction) // 512 * 512 + 100])


def write_raw_tar(path: str, members: dict[str, bytes]) -> None:
    """A tar with exactly these members (for hand-made broken samples)."""
    with tarfile.open(path, "w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def constant_seg_predictor(image: np.ndarray) -> np.ndarray:
    """A stand-in 'segmentation model' for the plug-in test: left half wall(0), right sky(2)."""
    labels = np.zeros(image.shape[:2], np.int64)
    labels[:, image.shape[1] // 2 :] = 2
    return labels


def save_tiny_vae(path: Path) -> str:
    """The tiny VAE of the contract, saved as ``path/vae``; returns ``path``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        block_out_channels=[4, 8],
        norm_num_groups=2,
        latent_channels=4,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        in_channels=3,
        out_channels=3,
    )
    vae.save_pretrained(str(path / "vae"))
    return str(path)
