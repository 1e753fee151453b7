"""Add cached VAE latents (``<key>.latent.npy``) to shards, so training skips the VAE encoder.

Each input shard becomes an output shard of the same name in ``--out`` holding all of its
members plus ``<key>.latent.npy``: float16 (C, h, w) = ``vae.encode(image).latent_dist.mean``,
unscaled, of the image centre-cropped to ``--resolution`` exactly as the DataModule does. Train
on them with ``data.use_cached_latents=true`` (which requires centre crop and no flip).

    python -m data_prep.cache_latents --shards "data/circles/*.tar" --model models/sd15 --out d/c
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, Queue

import numpy as np
import torch
from tqdm import tqdm

from cn_lightning.atomic import write_json_atomic
from cn_lightning.data.format import (
    FORMAT_VERSION,
    IMAGE_EXTS,
    LATENT_EXT,
    MANIFEST_NAME,
    decode_image,
    encode_npy,
    expand_shard_urls,
    read_manifest,
    write_shard_atomic,
)
from cn_lightning.data.shard_writer import STATS_DIR, is_finished, stats_path
from cn_lightning.data.stream import SkipCounter, iter_tar
from cn_lightning.data.transforms import center_crop_resize
from data_prep.common import die, resolve_parts


def load_vae(model: str, device: torch.device, dtype: torch.dtype):
    """The frozen VAE from ``<model>/vae`` (diffusers layout), offline."""
    from diffusers import AutoencoderKL

    path = os.path.join(model, "vae")
    if not os.path.isdir(path):
        die(f"--model {model}: no vae/ folder (expected a diffusers model directory)")
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
    return vae.to(device).eval().requires_grad_(False)


@torch.inference_mode()
def encode_batch(vae, images: list[np.ndarray], device: torch.device) -> np.ndarray:
    """uint8 RGB (R,R,3) images → float16 (B,C,h,w) posterior means, unscaled.

    The images go to the device as uint8 (4x fewer bytes; pinned memory on CUDA) and are scaled
    to [-1, 1] there, with the same float32 arithmetic as ``image_to_tensor``.
    """
    x = torch.from_numpy(np.stack(images))
    if device.type == "cuda":
        x = x.pin_memory()
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()
    x = (x / 127.5 - 1.0).to(vae.dtype)  # NCHW as before: the same latents, bit for bit
    return vae.encode(x).latent_dist.mean.float().cpu().numpy().astype(np.float16)


def _prepared_batches(
    url: str, resolution: int, batch_size: int, rejected: list, pool: ThreadPoolExecutor | None
) -> Iterator[list[tuple[dict, np.ndarray]]]:
    """Batches of (sample without ``__url__``/old latent, centre crop) of one shard; the images
    are decoded and cropped by ``pool``'s threads (OpenCV releases the GIL)."""
    counter = SkipCounter()

    def prepare(raw: dict) -> tuple[dict, np.ndarray | None]:
        image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
        image = decode_image(raw[image_ext]) if image_ext else None
        sample = {k: v for k, v in raw.items() if k != "__url__" and k != LATENT_EXT}
        return sample, (center_crop_resize(image, resolution) if image is not None else None)

    raws = iter_tar(url, counter)
    while chunk := list(itertools.islice(raws, batch_size)):
        batch = []
        for sample, crop in pool.map(prepare, chunk) if pool else map(prepare, chunk):
            if crop is None:
                rejected.append(
                    {"input": f"{url}:{sample['__key__']}", "reason": "unreadable_image"}
                )
            else:
                batch.append((sample, crop))
        if batch:
            yield batch
    for reason, n in counter.counts.items():
        rejected.extend({"input": url, "reason": reason} for _ in range(n))


def _prefetched(batches: Iterator, depth: int = 2) -> Iterator:
    """``batches`` produced by a background thread, ``depth`` ahead of the consumer, so reading
    and decoding the next batch overlaps the VAE on this one."""
    done = object()
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in batches:
                if stop.is_set():
                    return
                queue.put(item)
            queue.put(done)
        except BaseException as err:  # noqa: BLE001 - re-raised in the consumer
            queue.put(err)

    thread = threading.Thread(target=produce, name="cache_latents-reader", daemon=True)
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                queue.get_nowait()
            except Empty:
                thread.join(0.01)


def _with_latents(
    url: str,
    vae,
    resolution: int,
    batch_size: int,
    device,
    rejected: list,
    vae_path: str,
    pool: ThreadPoolExecutor | None = None,
    progress: tqdm | None = None,
) -> Iterator[dict]:
    """The samples of one shard with ``latent.npy`` added, encoded in batches."""
    batches = _prepared_batches(url, resolution, batch_size, rejected, pool)
    for batch in _prefetched(batches) if pool else batches:
        latents = encode_batch(vae, [crop for _, crop in batch], device)
        for (sample, _), latent in zip(batch, latents, strict=True):
            meta = json.loads(sample.get("json", b"{}") or b"{}")
            meta["latent"] = {
                "resolution": resolution,
                "crop": "center",
                "vae": vae_path,
                "shape": list(latent.shape),
                "scaled": False,
            }
            sample["json"] = json.dumps(meta).encode()
            sample[LATENT_EXT] = encode_npy(latent)
            yield sample
        if progress is not None:
            progress.update(len(batch))


def build_manifest(out: str, source: dict | None, info: dict, num_shards: int) -> dict:
    """Manifest of the output from the stats of all finished shards (any part)."""
    stats = []
    stats_dir = os.path.join(out, STATS_DIR)
    for name in sorted(os.listdir(stats_dir)):
        if name.endswith(".json") and not name.startswith("_"):
            with open(os.path.join(stats_dir, name)) as f:
                stats.append(json.load(f))
    rejected = [r for s in stats for r in s["rejected"]]
    base = {
        k: v
        for k, v in (source or {}).items()
        if k in ("condition_types", "image_format", "settings", "prefix", "resize")
    }
    return {
        "format": FORMAT_VERSION,
        "tool": "cache_latents",
        **base,
        "complete": len(stats) == num_shards,
        "num_shards": num_shards,
        "num_shards_done": len(stats),
        "num_samples": sum(s["num_samples"] for s in stats),
        "resolution": info["resolution"],
        "latent": info,
        "shards": [{k: s[k] for k in ("name", "num_samples", "bytes")} for s in stats],
        "num_rejected": len(rejected),
        "rejected": rejected,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.cache_latents", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shards", required=True, help="input shards (pattern, list or folder)")
    parser.add_argument("--model", required=True, help="diffusers model folder with vae/")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="crop size (default: the input manifest's resolution)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="images per VAE forward pass (default 16)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device of the VAE (default: cuda when present, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="VAE precision (default float32; the latents are stored as float16)",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=2,
        help="threads reading and decoding the next batch while the VAE encodes "
        "this one (0: in the main thread; default 2)",
    )
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
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input shape per run
    vae = load_vae(args.model, device, getattr(torch, args.dtype))
    info = {
        "resolution": resolution,
        "crop": "center",
        "vae": os.path.abspath(args.model),
        "dtype": "float16",
        "statistic": "posterior mean",
        "scaled": False,
    }

    mine = [u for i, u in enumerate(urls) if i % num_parts == part_index]
    todo = [u for u in mine if not is_finished(args.out, os.path.basename(u))]
    pool = ThreadPoolExecutor(args.decode_threads) if args.decode_threads > 0 else None
    progress = tqdm(total=_expected_samples(source, todo), desc="cache_latents", unit="sample")
    encoded, start_all = 0, time.perf_counter()
    try:
        for url in todo:
            name = os.path.basename(url)
            rejected: list[dict] = []
            start = time.perf_counter()
            samples = _with_latents(
                url, vae, resolution, args.batch_size, device, rejected, info["vae"], pool, progress
            )
            count, nbytes = write_shard_atomic(os.path.join(args.out, name), samples)
            write_json_atomic(
                stats_path(args.out, name),
                {
                    "name": name,
                    "num_samples": count,
                    "bytes": nbytes,
                    "rejected": rejected,
                    "seconds": time.perf_counter() - start,
                },
            )
            encoded += count
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - start_all
    manifest = build_manifest(args.out, source, info, len(urls))
    write_json_atomic(os.path.join(args.out, MANIFEST_NAME), manifest)
    rate = f"{encoded / seconds:.2f} samples/s" if encoded and seconds > 0 else "nothing to do"
    print(
        f"[cache_latents] {manifest['num_samples']} samples with latents in "
        f"{manifest['num_shards_done']}/{manifest['num_shards']} shards -> {args.out} "
        f"(this run: {encoded} samples in {len(todo)} shards, {rate}, skipped "
        f"{len(mine) - len(todo)} finished)"
    )


def _expected_samples(source: dict | None, urls: list[str]) -> int | None:
    """Samples in ``urls`` according to the input manifest (None when it does not say)."""
    counts = {s.get("name"): s.get("num_samples") for s in (source or {}).get("shards", [])}
    known = [counts.get(os.path.basename(u)) for u in urls]
    return sum(known) if all(isinstance(n, int) for n in known) else None


if __name__ == "__main__":
    main(sys.argv[1:])
