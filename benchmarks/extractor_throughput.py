"""Condition extraction throughput: samples/s per worker of every extractor, on this machine.

At million scale, extraction is the expensive part of data preparation: decoding, resizing and
encoding cost the same for every condition, the extractor's network does not. For each
extractor this runs, in the same run and on the same photo-like images (no download):

  * ``extract``: the extractor alone, ``--batch-size`` images per call, after one warm-up batch;
  * ``from_images``: ``python -m data_prep.from_images --workers 1`` end to end (read, resize,
    extract, encode, write shards), as data_prep reports it: samples/s per worker;

and prints both with the ratio of each extractor's ``from_images`` rate to Canny's (the
classical reference, measured in the same run). Model-based extractors get random weights in
their real on-disk format (:mod:`cn_lightning.conditions.random_weights`): the same network
sizes as the published weights. The transformers models' random folders are small configs (for
tests); here they are replaced by the published architectures' configs: Depth Anything V2 Small
(24.8 M parameters) for depth and normal, SegFormer-b0 (3.8 M; the ADE20K models users pick are
often b5, 85 M) for seg.

    python benchmarks/extractor_throughput.py --num-images 16 --resolution 512 --batch-size 4
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cn_lightning.conditions import (  # noqa: E402
    extract_batch,
    get_extractor,
    list_extractors,
    needs_weights,
)
from cn_lightning.conditions.random_weights import write_random_weights  # noqa: E402
from cn_lightning.data.synthetic import scene_image  # noqa: E402

REFERENCE = "canny"
# Extractors that need more than a photo (outline: the toy's own drawings; seg with a
# predictor plug-in is covered by its weights) are left out of the default list.
SKIP = ("outline",)


def real_size(name: str, folder: str) -> None:
    """Replace the small random transformers model in ``folder`` by the published
    architecture's size (random weights; the image processor stays)."""
    import transformers

    from cn_lightning.conditions.seg import ADE20K_CLASSES

    if name in ("depth", "normal"):
        config = transformers.DepthAnythingConfig()  # Depth-Anything-V2-Small's layout
        model = transformers.DepthAnythingForDepthEstimation(config)
    elif name == "seg":
        labels = dict(enumerate(ADE20K_CLASSES))
        config = transformers.SegformerConfig(
            num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()}
        )
        model = transformers.SegformerForSemanticSegmentation(config)  # b0
    else:
        return
    model.save_pretrained(folder)


def write_photos(folder: str, n: int, size: int) -> list:
    """``n`` photo-like scenes with captions, as a user's folder of photos."""
    os.makedirs(folder, exist_ok=True)
    images = []
    for i in range(n):
        image = scene_image(i, size, size)
        Image.fromarray(image).save(os.path.join(folder, f"photo_{i:05d}.jpg"), quality=95)
        with open(os.path.join(folder, f"photo_{i:05d}.txt"), "w") as f:
            f.write(f"scene {i}")
        images.append(image)
    return images


def parameters(extractor) -> int:
    model = getattr(extractor, "model", None)
    if hasattr(model, "parameters"):
        return sum(p.numel() for p in model.parameters())
    return 0


def time_extract(extractor, images: list, batch_size: int) -> float:
    """Images per second of ``extractor`` alone over ``images``, after a warm-up batch."""
    extract_batch(extractor, images[:batch_size])
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        extract_batch(extractor, images[i : i + batch_size])
    return len(images) / (time.perf_counter() - start)


def time_from_images(name: str, src: str, out: str, args, weights: str | None) -> float:
    """data_prep.from_images' own samples/s per worker (start-up excluded)."""
    cmd = [
        sys.executable,
        "-m",
        "data_prep.from_images",
        "--src",
        src,
        "--out",
        out,
        "--condition",
        name,
        "--workers",
        "1",
        "--resolution",
        str(args.resolution),
        "--batch-size",
        str(args.batch_size),
        "--device",
        args.device,
    ]
    if weights:
        cmd += ["--weights", weights]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    match = re.search(r"([0-9.e+-]+) samples/s per worker", done.stdout)
    if done.returncode != 0 or not match:
        raise SystemExit(f"{name}: data_prep.from_images failed:\n{done.stdout}\n{done.stderr}")
    return float(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="extractors (default: all but outline)")
    parser.add_argument("--num-images", type=int, default=16)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    names = args.names or [n for n in list_extractors() if n not in SKIP]
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "photos")
        images = write_photos(src, args.num_images, args.resolution)
        for name in names:
            weights = write_random_weights(name, tmp) if needs_weights(name) else None
            if weights:
                real_size(name, weights)
            options = {"weights": weights, "device": args.device} if weights else {}
            extractor = get_extractor(name, **options)
            if weights:
                extractor.batch_size = args.batch_size
            alone = time_extract(extractor, images, args.batch_size)
            pipeline = time_from_images(name, src, os.path.join(tmp, f"out_{name}"), args, weights)
            rows.append((name, parameters(extractor), alone, pipeline))
            print(f"{name}: {alone:.2f} img/s alone, {pipeline:.2f} samples/s per worker")
    reference = next(r[3] for r in rows if r[0] == REFERENCE)
    print(
        f"\n{args.num_images} photo-like images at {args.resolution} px, batch {args.batch_size}, "
        f"device {args.device}, {os.cpu_count()} CPU cores; random weights\n"
    )
    print("| extractor | parameters | extract img/s | from_images samples/s/worker | vs canny |")
    print("|---|---|---|---|---|")
    for name, params, alone, pipeline in rows:
        size = f"{params / 1e6:.1f} M" if params else "none"
        print(f"| {name} | {size} | {alone:.2f} | {pipeline:.2f} | {pipeline / reference:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
