"""Add cached VAE latents (``<key>.latent.npy``) to shards, so training skips the VAE encoder.

Each input shard becomes an output shard of the same name in ``--out`` holding all of its
members plus ``<key>.latent.npy``: float16 (C, h, w) = ``vae.encode(image).latent_dist.mean``,
unscaled, of the image centre-cropped to ``--resolution`` exactly as the DataModule does. Train
on them with ``data.use_cached_latents=true`` (which requires centre crop and no flip).

    python -m data_prep.cache_latents --shards "data/circles/*.tar" --model models/sd15 --out d/c
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from cn_lightning.data.format import (
    FORMAT_VERSION,
    IMAGE_EXTS,
    LATENT_EXT,
    MANIFEST_NAME,
    decode_image,
    encode_npy,
    expand_shard_urls,
    read_manifest,
    write_json_atomic,
    write_shard_atomic,
)
from cn_lightning.data.stream import SkipCounter, iter_tar
from cn_lightning.data.transforms import center_crop_resize, image_to_tensor
from data_prep.common import STATS_DIR, die, resolve_parts


def load_vae(model: str, device: torch.device, dtype: torch.dtype):
    """The frozen VAE from ``<model>/vae`` (diffusers layout), offline."""
    from diffusers import AutoencoderKL

    path = os.path.join(model, "vae")
    if not os.path.isdir(path):
        die(f"--model {model}: no vae/ folder (expected a diffusers model directory)")
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.no_grad()
def encode_batch(vae, images: list[np.ndarray], device: torch.device) -> np.ndarray:
    """uint8 RGB (R,R,3) images → float16 (B,C,h,w) posterior means, unscaled."""
    x = torch.stack([image_to_tensor(im) for im in images]).to(device, vae.dtype)
    return vae.encode(x).latent_dist.mean.float().cpu().numpy().astype(np.float16)


def _with_latents(url: str, vae, resolution: int, batch_size: int, device, rejected: list,
                  vae_path: str) -> Iterator[dict]:
    """The samples of one shard with ``latent.npy`` added, encoded in batches."""
    counter = SkipCounter()
    pending: list[tuple[dict, np.ndarray]] = []

    def flush():
        latents = encode_batch(vae, [im for _, im in pending], device)
        for (sample, _), latent in zip(pending, latents, strict=True):
            meta = json.loads(sample.get("json", b"{}") or b"{}")
            meta["latent"] = {"resolution": resolution, "crop": "center", "vae": vae_path,
                              "shape": list(latent.shape), "scaled": False}
            sample["json"] = json.dumps(meta).encode()
            sample[LATENT_EXT] = encode_npy(latent)
            yield sample
        pending.clear()

    for raw in iter_tar(url, counter):
        image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        image = decode_image(raw[image_ext]) if image_ext else None
        if image is None:
            rejected.append({"input": f"{url}:{raw['__key__']}", "reason": "unreadable_image"})
            continue
        sample = {k: v for k, v in raw.items() if k != "__url__" and k != LATENT_EXT}
        pending.append((sample, center_crop_resize(image, resolution)))
        if len(pending) == batch_size:
            yield from flush()
    if pending:
        yield from flush()
    for reason, n in counter.counts.items():
        rejected.extend({"input": url, "reason": reason} for _ in range(n))


def build_manifest(out: str, source: dict | None, info: dict, num_shards: int) -> dict:
    """Manifest of the output from the stats of all finished shards (any part)."""
    stats = []
    stats_dir = os.path.join(out, STATS_DIR)
    for name in sorted(os.listdir(stats_dir)):
        if name.endswith(".json") and not name.startswith("_"):
            with open(os.path.join(stats_dir, name)) as f:
                stats.append(json.load(f))
    rejected = [r for s in stats for r in s["rejected"]]
    base = {k: v for k, v in (source or {}).items()
            if k in ("condition_types", "image_format", "settings", "prefix", "resize")}
    return {"format": FORMAT_VERSION, "tool": "cache_latents", **base,
            "complete": len(stats) == num_shards, "num_shards": num_shards,
            "num_shards_done": len(stats), "num_samples": sum(s["num_samples"] for s in stats),
            "resolution": info["resolution"], "latent": info,
            "shards": [{k: s[k] for k in ("name", "num_samples", "bytes")} for s in stats],
            "num_rejected": len(rejected), "rejected": rejected}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.cache_latents",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", required=True, help="input shards (pattern, list or folder)")
    parser.add_argument("--model", required=True, help="diffusers model folder with vae/")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--resolution", type=int, default=None,
                        help="crop size (default: the input manifest's resolution)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32")
    parser.add_argument("--num-parts", type=int, default=None)
    parser.add_argument("--part-index", type=int, default=None)
    args = parser.parse_args(argv)

    urls = [u for u in expand_shard_urls(args.shards) if os.path.isfile(u)]
    if not urls:
        die(f"--shards {args.shards}: no local shards found")
    if any(os.path.abspath(os.path.dirname(u)) == os.path.abspath(args.out) for u in urls):
        die("--out must differ from the input shards' folder (shards are rewritten by name)")
    source = read_manifest(os.path.dirname(urls[0]))
    resolution = args.resolution or (source or {}).get("resolution")
    if not resolution:
        die("--resolution is needed: the input manifest gives no fixed resolution")
    num_parts, part_index = resolve_parts(args.num_parts, args.part_index)
    os.makedirs(os.path.join(args.out, STATS_DIR), exist_ok=True)
    device = torch.device(args.device)
    vae = load_vae(args.model, device, getattr(torch, args.dtype))
    info = {"resolution": resolution, "crop": "center", "vae": os.path.abspath(args.model),
            "dtype": "float16", "statistic": "posterior mean", "scaled": False}

    mine = [u for i, u in enumerate(urls) if i % num_parts == part_index]
    for url in tqdm(mine, desc="cache_latents", unit="shard"):
        name = os.path.basename(url)
        stats_path = os.path.join(args.out, STATS_DIR, name.replace(".tar", ".json"))
        if os.path.exists(os.path.join(args.out, name)) and os.path.exists(stats_path):
            continue  # finished by an earlier run
        rejected: list[dict] = []
        start = time.perf_counter()
        samples = _with_latents(url, vae, resolution, args.batch_size, device, rejected,
                                info["vae"])
        count, nbytes = write_shard_atomic(os.path.join(args.out, name), samples)
        write_json_atomic(stats_path, {"name": name, "num_samples": count, "bytes": nbytes,
                                       "rejected": rejected,
                                       "seconds": time.perf_counter() - start})
    manifest = build_manifest(args.out, source, info, len(urls))
    write_json_atomic(os.path.join(args.out, MANIFEST_NAME), manifest)
    print(f"[cache_latents] {manifest['num_samples']} samples with latents in "
          f"{manifest['num_shards_done']}/{manifest['num_shards']} shards -> {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
