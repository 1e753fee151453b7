"""Add cached VAE latents and text-encoder outputs to shards, so training skips both encoders.

Each input shard becomes an output shard of the same name in ``--out`` holding all of its
members plus, per sample:

* ``<key>.latent.npy`` (``--latents``, the default): float16 (C, h, w) =
  ``vae.encode(image).latent_dist.mean``, unscaled, of the image centre-cropped to
  ``--resolution`` exactly as the DataModule does, or with ``--buckets`` to the bucket nearest
  its aspect ratio (resized to cover it, centre crop);
* ``<key>.text.npy`` (``--text``, the default when the model has ``text_encoder/``): float16
  (tokens, hidden), what ``ControlNetModule.encode_text`` gives for the sample's prompt (SD: the
  text encoder's last hidden state; SDXL: both encoders' penultimate states concatenated), and
  for SDXL ``<key>.pooled.npy``, float16 (proj,), the second encoder's projected output.

The empty prompt's embeddings, which replace half of the prompts at training time, are stored
once in ``text_cache.safetensors`` beside ``manifest.json``. The manifest records the
fingerprints of the VAE and of the text encoder(s) + tokenizer(s)
(``cn_lightning.models.fingerprint``); training refuses a cache made with another backbone.
Train with ``data.use_cached_latents=true`` (centre crop, no flip) and
``data.use_cached_text=auto`` (the default: used when the manifest has it).

    python -m data_prep.cache_latents --shards "data/circles/*.tar" --model models/sd15 --out d/c
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty, Queue

import numpy as np
import torch
from tqdm import tqdm

from cn_lightning.atomic import write_json_atomic
from cn_lightning.data.buckets import bucket_transform, nearest_bucket, parse_buckets
from cn_lightning.data.format import (
    FORMAT_VERSION,
    IMAGE_EXTS,
    LATENT_EXT,
    MANIFEST_NAME,
    POOLED_EXT,
    TEXT_CACHE_NAME,
    TEXT_EXT,
    decode_image,
    decode_prompt,
    encode_npy,
    expand_shard_urls,
    read_manifest,
    write_shard_atomic,
    write_text_cache,
)
from cn_lightning.data.shard_writer import STATS_DIR, is_finished, stats_path
from cn_lightning.data.stream import SkipCounter, iter_tar
from cn_lightning.data.transforms import center_crop_resize
from cn_lightning.errors import CnLightningError
from data_prep.common import die, resolve_parts

SETTINGS_NAME = "_cache_settings.json"  # in .stats/: what a rerun must match


def load_vae(model: str, device: torch.device, dtype: torch.dtype):
    """The frozen VAE from ``<model>/vae`` (diffusers layout) or ``<model>`` if that is a VAE
    folder, offline, and its fingerprint (taken in float32, before the cast to ``dtype``)."""
    from diffusers import AutoencoderKL

    from cn_lightning.models.fingerprint import vae_fingerprint

    path = os.path.join(model, "vae")
    if not os.path.isdir(path) and os.path.isfile(os.path.join(model, "config.json")):
        path = model  # a VAE folder itself (e.g. a separate fp16-fix SDXL VAE)
    if not os.path.isdir(path):
        die(f"--model {model}: no vae/ folder (expected a diffusers model directory)")
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=torch.float32)
    fingerprint = vae_fingerprint(vae)
    vae = vae.to(device) if dtype == torch.float32 else vae.to(device, dtype)
    return vae.eval().requires_grad_(False), fingerprint


@dataclass
class TextModels:
    """A backbone's tokenizer(s) and text encoder(s) (two for SDXL) and their fingerprint."""

    tokenizers: list
    encoders: list
    fingerprint: str
    model: str

    @property
    def kind(self) -> str:
        return "sdxl" if len(self.encoders) == 2 else "sd"

    @torch.inference_mode()
    def encode(self, prompts: list[str], device: torch.device):
        """float32 ``(hidden (B, T, D), pooled (B, P) or None)`` numpy arrays, computed by
        :func:`cn_lightning.models.diffusion.encode_text` (what training computes)."""
        from cn_lightning.models.diffusion import encode_text

        hidden, pooled = encode_text(self.tokenizers, self.encoders, prompts, device)
        return (
            hidden.float().cpu().numpy(),
            None if pooled is None else pooled.float().cpu().numpy(),
        )


def load_text_models(model: str, device: torch.device, dtype: torch.dtype) -> TextModels:
    from cn_lightning.models.backbone import load_text_encoders
    from cn_lightning.models.fingerprint import text_fingerprint

    try:
        tokenizers, encoders = load_text_encoders(model, torch.float32)
    except CnLightningError as err:
        die(f"--text: {err}")
    fingerprint = text_fingerprint(tokenizers, encoders)
    encoders = [e.to(device, dtype) for e in encoders]
    return TextModels(tokenizers, encoders, fingerprint, os.path.abspath(model))


def to_float16(array: np.ndarray, what: str) -> np.ndarray:
    out = array.astype(np.float16)
    if not np.isfinite(out).all():
        raise OverflowError(f"{what} does not fit float16 (largest |value| {np.abs(array).max()})")
    return out


@torch.inference_mode()
def encode_batch(vae, images: list[np.ndarray], device: torch.device) -> np.ndarray:
    """uint8 RGB (H,W,3) images of one size → float16 (B,C,h,w) posterior means, unscaled.

    The images go to the device as uint8 (4x fewer bytes; pinned memory on CUDA) and are scaled
    to [-1, 1] there, with the same float32 arithmetic as ``image_to_tensor``.
    """
    x = torch.from_numpy(np.stack(images))
    if device.type == "cuda":
        x = x.pin_memory()
    x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).contiguous().float()
    x = (x / 127.5 - 1.0).to(vae.dtype)  # NCHW as before: the same latents, bit for bit
    return vae.encode(x).latent_dist.mean.float().cpu().numpy().astype(np.float16)


@dataclass
class Prepared:
    """One sample ready for the encoders."""

    sample: dict  # the members to write (without __url__ and the members made anew)
    prompt: str
    crop: np.ndarray | None = None  # uint8 (H, W, 3), with latents
    crop_top_left: tuple[int, int] | None = None  # with buckets


class Cropper:
    """The image the latent is encoded from: the centre square crop at ``resolution``, or with
    ``buckets`` the centre crop of the bucket nearest the image's aspect ratio (as the
    DataModule crops with the same buckets, crop=center, no flip)."""

    def __init__(self, resolution: int, buckets: list[tuple[int, int]] | None):
        self.resolution, self.buckets = resolution, buckets

    def __call__(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int] | None]:
        if not self.buckets:
            return center_crop_resize(image, self.resolution), None
        bucket = nearest_bucket(image.shape[0], image.shape[1], self.buckets)
        crop, _, top_left = bucket_transform(image, image, bucket, crop="center")
        return crop, top_left


def _prepared_batches(
    url: str,
    cropper: Cropper | None,
    drop: tuple[str, ...],
    batch_size: int,
    rejected: list,
    pool: ThreadPoolExecutor | None,
) -> Iterator[list[Prepared]]:
    """Batches of prepared samples of one shard; with ``cropper`` the images are decoded and
    cropped by ``pool``'s threads (OpenCV releases the GIL), and unreadable ones rejected."""
    counter = SkipCounter()

    def prepare(raw: dict) -> Prepared | None:
        sample = {k: v for k, v in raw.items() if k != "__url__" and k not in drop}
        item = Prepared(sample, decode_prompt(raw))
        if cropper is not None:
            image_ext = next((e for e in IMAGE_EXTS if e in raw), None)
            image = decode_image(raw[image_ext]) if image_ext else None
            if image is None:
                return None
            item.crop, item.crop_top_left = cropper(image)
        return item

    raws = iter_tar(url, counter)
    while chunk := list(itertools.islice(raws, batch_size)):
        batch = []
        items = pool.map(prepare, chunk) if pool else map(prepare, chunk)
        for raw, item in zip(chunk, items, strict=True):
            if item is None:
                rejected.append({"input": f"{url}:{raw['__key__']}", "reason": "unreadable_image"})
            else:
                batch.append(item)
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


def _encode_latents(vae, batch: list[Prepared], device) -> list[np.ndarray]:
    """The latents of a batch, one VAE pass per crop size (buckets), in the batch's order."""
    out: list[np.ndarray | None] = [None] * len(batch)
    by_shape: dict[tuple, list[int]] = {}
    for i, item in enumerate(batch):
        by_shape.setdefault(item.crop.shape, []).append(i)
    for rows in by_shape.values():
        latents = encode_batch(vae, [batch[i].crop for i in rows], device)
        for i, latent in zip(rows, latents, strict=True):
            out[i] = latent
    return out


def _with_caches(
    url: str,
    caches: Caches,
    batch_size: int,
    device,
    rejected: list,
    pool: ThreadPoolExecutor | None = None,
    progress: tqdm | None = None,
) -> Iterator[dict]:
    """The samples of one shard with their cached members added, encoded in batches."""
    drop = (LATENT_EXT,) * bool(caches.vae) + (TEXT_EXT, POOLED_EXT) * bool(caches.text)
    cropper = Cropper(caches.resolution, caches.buckets) if caches.vae else None
    batches = _prepared_batches(url, cropper, drop, batch_size, rejected, pool)
    for batch in _prefetched(batches) if pool else batches:
        latents = _encode_latents(caches.vae, batch, device) if caches.vae else None
        if caches.text:
            hidden, pooled = caches.text.encode([item.prompt for item in batch], device)
        for i, item in enumerate(batch):
            sample = item.sample
            if latents is not None:
                latent = latents[i]
                meta = json.loads(sample.get("json", b"{}") or b"{}")
                meta["latent"] = {
                    "resolution": caches.resolution,
                    "crop": "center",
                    "vae": caches.latent_info["vae"],
                    "shape": list(latent.shape),
                    "scaled": False,
                }
                if item.crop_top_left is not None:
                    meta["latent"]["bucket"] = list(item.crop.shape[:2])
                    meta["latent"]["crop_top_left"] = list(item.crop_top_left)
                sample["json"] = json.dumps(meta).encode()
                sample[LATENT_EXT] = encode_npy(latent)
            if caches.text:
                where = f"{url}:{sample['__key__']}"
                sample[TEXT_EXT] = encode_npy(to_float16(hidden[i], f"{where}: text embedding"))
                if pooled is not None:
                    sample[POOLED_EXT] = encode_npy(to_float16(pooled[i], f"{where}: pooled"))
            yield sample
        if progress is not None:
            progress.update(len(batch))


@dataclass
class Caches:
    """What this run adds: latents (``vae`` set) and/or text embeddings (``text`` set)."""

    vae: object | None
    text: TextModels | None
    resolution: int | None
    buckets: list[tuple[int, int]] | None
    latent_info: dict | None
    text_info: dict | None


def build_manifest(
    out: str, source: dict | None, caches: Caches, num_shards: int, resolution: int | None
) -> dict:
    """Manifest of the output from the stats of all finished shards (any part)."""
    stats = []
    stats_dir = os.path.join(out, STATS_DIR)
    for name in sorted(os.listdir(stats_dir)):
        if name.endswith(".json") and not name.startswith("_"):
            with open(os.path.join(stats_dir, name)) as f:
                stats.append(json.load(f))
    rejected = [r for s in stats for r in s["rejected"]]
    source = source or {}
    base = {
        k: v
        for k, v in source.items()
        if k in ("condition_types", "image_format", "settings", "prefix", "resize")
    }
    manifest = {
        "format": FORMAT_VERSION,
        "tool": "cache_latents",
        **base,
        "complete": len(stats) == num_shards,
        "num_shards": num_shards,
        "num_shards_done": len(stats),
        "num_samples": sum(s["num_samples"] for s in stats),
        "resolution": resolution,
    }
    # Caches this run did not make are passed through from the input, members and all.
    latent = caches.latent_info or source.get("latent")
    text = caches.text_info or source.get("text")
    if latent:
        manifest["latent"] = latent
    if text:
        manifest["text"] = text
    manifest.update(
        shards=[{k: s[k] for k in ("name", "num_samples", "bytes")} for s in stats],
        num_rejected=len(rejected),
        rejected=rejected,
    )
    return manifest


def parse_bucket_arg(spec: str | None, resolution: int | None, divisor: int):
    """``--buckets``: None, ``auto`` or ``H:W,H:W,...`` → the bucket list (or None)."""
    if spec is None or spec.lower() in ("none", ""):
        return None
    if resolution is None:
        die("--buckets needs --resolution (or an input manifest with a resolution)")
    value: str | list[list[int]] = spec
    if spec.lower() != "auto":
        try:
            value = [[int(v) for v in pair.split(":")] for pair in spec.split(",") if pair]
        except ValueError:
            die(f"--buckets {spec!r}: expected auto or HEIGHT:WIDTH pairs, e.g. 1024:1024,832:1216")
    try:
        return parse_buckets(value, resolution, divisor)
    except CnLightningError as err:
        die(f"--buckets: {err}")


def _check_settings(out: str, settings: dict) -> None:
    """Refuse to mix shards cached with other settings in one ``--out`` (reruns resume)."""
    path = os.path.join(out, STATS_DIR, SETTINGS_NAME)
    try:
        with open(path) as f:
            previous = json.load(f)
    except (OSError, ValueError):
        write_json_atomic(path, settings)
        return
    if previous != settings:
        diff = []
        for part in sorted(set(previous) | set(settings)):
            old, new = previous.get(part), settings.get(part)
            if isinstance(old, dict) and isinstance(new, dict):
                diff += [f"{part}.{k}" for k in sorted({*old, *new}) if old.get(k) != new.get(k)]
            elif old != new:
                diff.append(part)
        die(
            f"--out {out} holds shards cached with other settings ({', '.join(diff)}); use "
            "another --out, or remove it to start again"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data_prep.cache_latents", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--shards", required=True, help="input shards (pattern, list or folder)")
    parser.add_argument(
        "--model", required=True, help="diffusers model folder (vae/, text_encoder/, ...)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--latents",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="add <key>.latent.npy from the model's vae/ (default: on)",
    )
    parser.add_argument(
        "--text",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add <key>.text.npy (and SDXL's <key>.pooled.npy) from the model's text encoder(s) "
        "(default: on when the model has text_encoder/)",
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="crop size (default: the input manifest's resolution)",
    )
    parser.add_argument(
        "--buckets",
        default=None,
        help="aspect-ratio buckets for the latents: auto, or HEIGHT:WIDTH pairs "
        "(1024:1024,832:1216,...); each latent is then of the centre crop of the bucket nearest "
        "the image's aspect ratio (default: square --resolution crops)",
    )
    parser.add_argument(
        "--bucket-divisor",
        type=int,
        default=64,
        help="bucket sides are multiples of this (default 64)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="images (prompts) per VAE (text encoder) forward pass (default 16)",
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device of the encoders (default: cuda when present, else cpu)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        default="float32",
        help="encoder precision (default float32, like model.frozen_dtype=fp32; everything is "
        "stored as float16)",
    )
    parser.add_argument(
        "--decode-threads",
        type=int,
        default=2,
        help="threads reading and decoding the next batch while the encoders run on "
        "this one (0: in the main thread; default 2)",
    )
    parser.add_argument("--num-parts", type=int, default=None)
    parser.add_argument("--part-index", type=int, default=None)
    args = parser.parse_args(argv)

    if args.text is None:
        args.text = os.path.isdir(os.path.join(args.model, "text_encoder"))
    if not args.latents and not args.text:
        die("nothing to cache: --no-latents and --no-text (or a model without text_encoder/)")
    urls = [u for u in expand_shard_urls(args.shards) if os.path.isfile(u)]
    if not urls:
        die(f"--shards {args.shards}: no local shards found")
    src_dir = os.path.dirname(urls[0])
    if any(os.path.abspath(os.path.dirname(u)) == os.path.abspath(args.out) for u in urls):
        die("--out must differ from the input shards' folder (shards are rewritten by name)")
    source = read_manifest(src_dir)
    resolution = args.resolution or (source or {}).get("resolution")
    if args.latents and not resolution:
        die("--resolution is needed: the input manifest gives no fixed resolution")
    buckets = parse_bucket_arg(args.buckets, resolution, args.bucket_divisor)
    if buckets and not args.latents:
        die("--buckets shapes the latents: it needs --latents")
    num_parts, part_index = resolve_parts(args.num_parts, args.part_index)
    os.makedirs(os.path.join(args.out, STATS_DIR), exist_ok=True)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not buckets  # one input shape per run
    dtype = getattr(torch, args.dtype)

    vae = latent_info = text = text_info = None
    if args.latents:
        vae, vae_fp = load_vae(args.model, device, dtype)
        latent_info = {
            "resolution": resolution,
            "crop": "center",
            "vae": os.path.abspath(args.model),
            "vae_fingerprint": vae_fp,
            "dtype": "float16",
            "statistic": "posterior mean",
            "scaled": False,
            "buckets": [list(b) for b in buckets] if buckets else None,
            "bucket_divisor": args.bucket_divisor if buckets else None,
            "compute_dtype": args.dtype,
        }
    if args.text:
        text = load_text_models(args.model, device, dtype)
        empty_hidden, empty_pooled = text.encode([""], device)
        text_info = {
            "fingerprint": text.fingerprint,
            "kind": text.kind,
            "model": text.model,
            "file": TEXT_CACHE_NAME,
            "dtype": "float16",
            "shape": list(empty_hidden.shape[1:]),
            "pooled_shape": None if empty_pooled is None else list(empty_pooled.shape[1:]),
            "compute_dtype": args.dtype,
        }
    # The weights' fingerprints, not the folders' paths, say what made the cache.
    _check_settings(
        args.out,
        {
            part: {k: v for k, v in info.items() if k not in ("vae", "model")} if info else None
            for part, info in (("latent", latent_info), ("text", text_info))
        },
    )
    cache_file = os.path.join(args.out, TEXT_CACHE_NAME)
    if text is not None:
        meta = {"fingerprint": text.fingerprint, "kind": text.kind, "model": text.model}
        write_text_cache(
            cache_file,
            meta,
            empty_hidden[0],
            None if empty_pooled is None else empty_pooled[0],
        )
    elif (source or {}).get("text") and os.path.isfile(os.path.join(src_dir, TEXT_CACHE_NAME)):
        shutil.copyfile(os.path.join(src_dir, TEXT_CACHE_NAME), cache_file)  # passed through
    caches = Caches(vae, text, resolution, buckets, latent_info, text_info)

    mine = [u for i, u in enumerate(urls) if i % num_parts == part_index]
    todo = [u for u in mine if not is_finished(args.out, os.path.basename(u))]
    pool = ThreadPoolExecutor(args.decode_threads) if args.decode_threads > 0 else None
    made = "+".join(n for n, on in (("latents", vae), ("text", text)) if on)
    progress = tqdm(total=_expected_samples(source, todo), desc=f"cache {made}", unit="sample")
    encoded, start_all = 0, time.perf_counter()
    try:
        for url in todo:
            name = os.path.basename(url)
            rejected: list[dict] = []
            start = time.perf_counter()
            samples = _with_caches(url, caches, args.batch_size, device, rejected, pool, progress)
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
    except OverflowError as err:
        die(f"{err}: use --dtype float32")
    finally:
        progress.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - start_all
    manifest = build_manifest(args.out, source, caches, len(urls), resolution)
    write_json_atomic(os.path.join(args.out, MANIFEST_NAME), manifest)
    rate = f"{encoded / seconds:.2f} samples/s" if encoded and seconds > 0 else "nothing to do"
    print(
        f"[cache_latents] {manifest['num_samples']} samples with {made} in "
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
