"""The shard format (a public contract, see docs/data.md) and the helpers to read and write it.

A shard ``<prefix>-NNNNNN.tar`` groups members by key (WebDataset / img2dataset convention):
``<key>.jpg|png|webp`` target image, ``<key>.txt`` prompt, ``<key>.json`` metadata,
``<key>.<condition>.png`` condition images, optional ``<key>.latent.npy`` (float16 (C,h,w)).
A ``manifest.json`` beside the shards records counts, conditions, resolution and rejects.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
from collections.abc import Iterable

import cv2
import numpy as np
import webdataset as wds

FORMAT_VERSION = "cn_lightning.shards/v1"
MANIFEST_NAME = "manifest.json"
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
LATENT_EXT = "latent.npy"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")


def shard_name(prefix: str, index: int) -> str:
    """``<prefix>-NNNNNN.tar``."""
    return f"{prefix}-{index:06d}.tar"


def brace_pattern(directory: str, prefix: str, num_shards: int) -> str:
    """Brace pattern covering shards 0..num_shards-1, e.g. ``dir/circles-{000000..000007}.tar``."""
    if num_shards == 1:
        return os.path.join(directory, shard_name(prefix, 0))
    return os.path.join(directory, f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar")


def sanitize_key(text: str) -> str:
    """A WebDataset-safe key: no dots or slashes (the key ends at the first dot of a member)."""
    key = re.sub(r"[^A-Za-z0-9_\-]+", "_", text).strip("_")
    return key or "sample"


def check_key(key: str) -> str:
    """Raise if ``key`` would be split wrongly by WebDataset (dots, slashes, spaces)."""
    if not _KEY_RE.match(key):
        raise ValueError(f"invalid sample key {key!r}: use letters, digits, '_' and '-' only")
    return key


def encode_image(image: np.ndarray, fmt: str = "png", quality: int = 95) -> bytes:
    """uint8 RGB (H,W,3) or grey (H,W) → encoded bytes (png, jpg or webp)."""
    fmt = "jpg" if fmt == "jpeg" else fmt
    if image.ndim == 3:
        image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params: list[int] = []
    if fmt == "jpg":
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    elif fmt == "webp":
        params = [cv2.IMWRITE_WEBP_QUALITY, quality]
    elif fmt == "png":
        params = [cv2.IMWRITE_PNG_COMPRESSION, 1]  # fast; PNG stays lossless at any level
    ok, buf = cv2.imencode("." + fmt, image, params)
    if not ok:
        raise ValueError(f"could not encode image as {fmt}")
    return buf.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    """Encoded bytes → uint8 RGB (H,W,3), or None if the bytes are not a decodable image."""
    if not data:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None or image.size == 0:
        return None
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def read_image_file(path: str) -> np.ndarray | None:
    """Read an image file → uint8 RGB (H,W,3), None if unreadable."""
    try:
        with open(path, "rb") as f:
            return decode_image(f.read())
    except OSError:
        return None


def encode_npy(array: np.ndarray) -> bytes:
    """``np.save`` bytes (what ``<key>.latent.npy`` holds)."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    """Inverse of :func:`encode_npy`; refuses pickled objects."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_shard_atomic(path: str, samples: Iterable[dict[str, bytes | str]]) -> tuple[int, int]:
    """Write samples (``{"__key__": k, "jpg": bytes, "txt": bytes, ...}``) to ``path``.

    Written to ``path + ".tmp"`` first and renamed at the end, so a killed run never leaves a
    half-written shard that a rerun would take as finished. Returns (num_samples, num_bytes).
    """
    tmp = f"{path}.tmp"
    count = 0
    with open(tmp, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0.0) as writer:
        for sample in samples:
            check_key(sample["__key__"])
            writer.write({k: (v.encode() if isinstance(v, str) and k != "__key__" else v)
                          for k, v in sample.items()})
            count += 1
    os.replace(tmp, path)
    return count, os.path.getsize(path)


def write_json_atomic(path: str, obj) -> None:
    """JSON to ``path`` via a per-process temp file and ``os.replace`` (safe for concurrent
    SLURM array tasks writing the same manifest)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def read_manifest(directory: str) -> dict | None:
    """The manifest in ``directory``, or None if missing or unreadable."""
    try:
        with open(os.path.join(directory, MANIFEST_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def expand_shard_urls(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """Shard URLs from a brace pattern (``a-{000000..000009}.tar``), a ``::``-separated string,
    a list of any of these, a local directory (its manifest's shards, else ``*.tar``) or
    ``pipe:`` commands (passed through)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for item in specs:
        item = str(item)
        if not item.startswith("pipe:") and os.path.isdir(item):
            urls.extend(_shards_in_directory(item))
        else:
            urls.extend(wds.shardlists.expand_urls(item))
    return urls


def _shards_in_directory(directory: str) -> list[str]:
    manifest = read_manifest(directory)
    if manifest and manifest.get("shards"):
        return [os.path.join(directory, s["name"]) for s in manifest["shards"]]
    return sorted(glob.glob(os.path.join(directory, "*.tar")))


def manifest_num_samples(spec: str | list[str]) -> int | None:
    """Total sample count from the manifests of local shards in ``spec``, if all are known."""
    urls = expand_shard_urls(spec)
    dirs = {os.path.dirname(u) for u in urls}
    if any(u.startswith("pipe:") or "://" in u for u in urls):
        return None
    per_shard: dict[str, int] = {}
    for d in dirs:
        manifest = read_manifest(d)
        if not manifest:
            return None
        for s in manifest.get("shards", []):
            per_shard[os.path.join(d, s["name"])] = int(s["num_samples"])
    try:
        return sum(per_shard[u] for u in urls)
    except KeyError:
        return None
