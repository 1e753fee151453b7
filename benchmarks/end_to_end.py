"""End to end: the quickstart's train CLI against a plain PyTorch loop, on the same shards.

``ours`` is ``python -m cn_lightning.train`` (the quickstart config) for ``--steps`` optimizer
steps, with its sample grids, logging and data stream, timed from process start to exit. The
``plain`` loop does what diffusers' ``examples/controlnet/train_controlnet.py`` does on the same
task: the quickstart's shards decoded once into an in-memory map-style dataset, a shuffling
``DataLoader`` without workers, the toy backbone, a ControlNet copied from its UNet (the toy's 4x
condition encoder), AdamW at the quickstart's learning rate, 50% empty prompts, fp32; no sample
grids, no logging. Both are measured in this one run, one after the other:

* steady s/step (median over steps after ``--warmup``; ours from its ``perf/steps_per_s``
  windows, which exclude sampling) and their ratio;
* ours: the share of wall time in the sample grids (``convergence.json``), the data-wait share
  of the training steps (``perf/data_wait_share``), and the rest (start-up, logging,
  checkpoints, export), as what the steps and grids do not explain;
* total wall time of each.

    python benchmarks/end_to_end.py [--steps 300] [--warmup 50] [--seed 42] [-- OVERRIDE ...]

Overrides after ``--`` go to the train CLI (e.g. ``data.num_workers=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CN_LIGHTNING_CACHE", "~/.cache/cn_lightning")).expanduser()


def run_ours(steps: int, seed: int, out: Path, overrides: list[str]) -> dict:
    """The train CLI for ``steps`` steps, as a user runs it (default logger, checkpoints,
    export), timed from process start to exit; the rest from its ``perf.json`` summary."""
    cmd = [
        sys.executable,
        "-m",
        "cn_lightning.train",
        f"hydra.run.dir={out}",
        f"trainer.max_steps={steps}",
        f"seed={seed}",
        "trainer.enable_progress_bar=false",
        *overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"the train CLI failed ({result.returncode}):\n{result.stderr[-2000:]}")
    perf = json.loads((out / "perf.json").read_text())
    return {"wall_s": wall, "perf": perf, "controlnet": out / "controlnet"}


def load_shards(url_dir: Path, resolution: int) -> list[tuple]:
    """Every (image, condition, prompt) of the quickstart's train shards, decoded once."""
    from cn_lightning.data.format import IMAGE_EXTS, decode_image, expand_shard_urls, tar_samples
    from cn_lightning.data.transforms import (
        center_crop_resize,
        condition_to_tensor,
        image_to_tensor,
    )

    samples = []
    for url in expand_shard_urls(str(url_dir)):
        with open(url, "rb") as stream:
            for raw in tar_samples(stream, url):
                image_bytes = next(raw[ext] for ext in IMAGE_EXTS if ext in raw)
                image = center_crop_resize(decode_image(image_bytes), resolution)
                condition = center_crop_resize(decode_image(raw["outline.png"]), resolution, True)
                prompt = raw["txt"].decode() if isinstance(raw["txt"], bytes) else raw["txt"]
                samples.append((image_to_tensor(image), condition_to_tensor(condition), prompt))
    return samples


def run_plain(steps: int, warmup: int, seed: int, lr: float, batch_size: int) -> dict:
    """diffusers' train_controlnet.py loop on the same data, timed per step."""
    import torch
    from plain_loop import build_plain, plain_step
    from torch.utils.data import DataLoader

    from cn_lightning.config import asset, circle_shards

    start = time.perf_counter()
    torch.manual_seed(seed)
    shards = Path(circle_shards(str(CACHE / "circles_32px_4000"), 4000, 32))
    data = load_shards(shards, 32)
    parts = build_plain(asset("toy_sd"), lr)

    def collate(batch):
        images, conditions, prompts = zip(*batch, strict=True)
        return torch.stack(images), torch.stack(conditions), list(prompts)

    loader = DataLoader(
        data, batch_size=batch_size, shuffle=True, drop_last=True, collate_fn=collate
    )
    times, step = [], 0
    while step < steps:
        for images, conditions, prompts in loader:
            t0 = time.perf_counter()
            plain_step(parts, images, conditions, prompts)
            times.append(time.perf_counter() - t0)
            step += 1
            if step >= steps:
                break
    return {"wall_s": time.perf_counter() - start, "step_s": times[warmup:]}


# ------------------------------------------------------------------ diffusers' own script
def write_parquet(samples_dir: Path, out: Path) -> Path:
    """The quickstart's train shards as a Hugging Face ``datasets`` parquet folder (image, text,
    conditioning_image; the images' own bytes, not re-encoded), which ``train_controlnet.py``
    reads with ``--train_data_dir``."""
    from datasets import Dataset, Features, Image, Value

    from cn_lightning.data.format import IMAGE_EXTS, expand_shard_urls, tar_samples

    rows: dict[str, list] = {"image": [], "text": [], "conditioning_image": []}
    for url in expand_shard_urls(str(samples_dir)):
        with open(url, "rb") as stream:
            for raw in tar_samples(stream, url):
                ext = next(ext for ext in IMAGE_EXTS if ext in raw)
                rows["image"].append({"bytes": raw[ext], "path": None})
                text = raw["txt"]
                rows["text"].append(text.decode() if isinstance(text, bytes) else text)
                rows["conditioning_image"].append({"bytes": raw["outline.png"], "path": None})
    features = Features({"image": Image(), "text": Value("string"), "conditioning_image": Image()})
    out.mkdir(parents=True, exist_ok=True)
    Dataset.from_dict(rows, features=features).to_parquet(str(out / "train.parquet"))
    return out


def initial_controlnet(out: Path) -> Path:
    """The ControlNet ``train_controlnet.py`` starts from: ``from_unet`` of the toy UNet with the
    toy's 4x condition encoder (diffusers' default is 8x, which a 4x VAE cannot use)."""
    from diffusers import ControlNetModel

    from cn_lightning.config import asset
    from cn_lightning.models.backbone import load_backbone
    from cn_lightning.models.controlnet import hint_channels_for

    bb = load_backbone(asset("toy_sd"))
    controlnet = ControlNetModel.from_unet(
        bb.unet, conditioning_embedding_out_channels=hint_channels_for(bb.vae_scale_factor)
    )
    controlnet.save_pretrained(out)
    return out


def run_diffusers(script: Path, steps: int, seed: int, work: Path, args: argparse.Namespace):
    """``train_controlnet.py`` on the same task (fp32, no validation images), timed from process
    start to exit; per-step times from the wall clock of its TensorBoard events."""
    from cn_lightning.config import asset, circle_shards

    shards = Path(circle_shards(str(CACHE / "circles_32px_4000"), 4000, 32))
    data = write_parquet(shards, work / "parquet")
    init = initial_controlnet(work / "controlnet_init")
    out = work / "diffusers_out"
    cmd = [
        sys.executable,
        str(script),
        f"--pretrained_model_name_or_path={asset('toy_sd')}",
        f"--controlnet_model_name_or_path={init}",
        f"--train_data_dir={data}",
        "--image_column=image",
        "--caption_column=text",
        "--conditioning_image_column=conditioning_image",
        "--resolution=32",
        f"--train_batch_size={args.batch_size}",
        f"--learning_rate={args.lr}",
        f"--max_train_steps={steps}",
        "--proportion_empty_prompts=0.5",
        f"--seed={seed}",
        "--mixed_precision=no",
        f"--output_dir={out}",
        f"--cache_dir={work / 'hf_cache'}",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"train_controlnet.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    times = event_times(next(out.glob("logs/**/events.out.tfevents.*")))
    steps_done = sorted(times)
    step_s = [times[b] - times[a] for a, b in zip(steps_done, steps_done[1:], strict=False)]
    return {"wall_s": wall, "step_s": step_s[args.warmup :], "controlnet": out}


def event_times(path: Path) -> dict[int, float]:
    """Step -> wall time of its first event in a TensorBoard event file (TFRecord of ``Event``
    protos: field 1 ``wall_time`` double, field 2 ``step`` int64), read without TensorBoard."""
    data, pos, out = path.read_bytes(), 0, {}
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        event, pos = data[pos + 12 : pos + 12 + length], pos + 16 + length
        fields = _proto_fields(event)
        if 2 in fields and 1 in fields:
            out.setdefault(int(fields[2]), struct.unpack("<d", fields[1])[0])
    return out


def _proto_fields(buf: bytes) -> dict[int, object]:
    """The top-level fields of a protobuf message (varints as ints, the rest as bytes)."""
    fields, pos = {}, 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields[number], pos = _varint(buf, pos)
        elif wire == 1:
            fields[number], pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            fields[number], pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            fields[number], pos = buf[pos : pos + 4], pos + 4
        else:
            break
    return fields


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def held_out_fidelity(controlnet: Path, out: Path) -> float:
    """Fidelity over the quickstart's 64 held-out conditions: the README's evaluate command (20
    DDIM steps at the toy's guidance 3, 16 at a time)."""
    from cn_lightning.config import asset, circle_shards

    val = circle_shards(str(CACHE / "circles_32px_val_64"), 64, 32, 1)
    cmd = [
        *(sys.executable, "-m", "cn_lightning.evaluate", "--val-shards", val),
        *("--condition-key", "outline", "--resolution", "32", "--base", asset("toy_sd")),
        *("--controlnet", str(controlnet), "--steps", "20", "--guidance", "3"),
        *("--batch-size", "16", "--accelerator", "cpu", "--out", str(out)),
    ]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"evaluate failed ({result.returncode}):\n{result.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text())["metrics"]["fidelity"]


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--warmup", type=int, default=50, help="steps left out of s/step")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--lr", type=float, default=3e-4, help="the quickstart's learning rate")
    parser.add_argument("--batch-size", type=int, default=8, help="the quickstart's batch")
    parser.add_argument(
        "--diffusers-script",
        type=Path,
        help="diffusers' examples/controlnet/train_controlnet.py: also run it on the same task "
        "(needs its requirements: datasets, accelerate, torchvision, tensorboard)",
    )
    parser.add_argument(
        "--runs",
        default="ours,plain,diffusers",
        help="which trainings to run, in this order (default: all; diffusers only with "
        "--diffusers-script)",
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="held-out fidelity (64 conditions) of each model"
    )
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 20:
        sys.exit("--steps must exceed --warmup by more than one 20-step throughput window")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "diffusers" in runs and args.diffusers_script is None:
        runs.remove("diffusers")
    if unknown := set(runs) - {"ours", "plain", "diffusers"}:
        sys.exit(f"--runs: unknown {sorted(unknown)} (ours, plain, diffusers)")
    if args.diffusers_script and not args.diffusers_script.is_file():
        sys.exit(f"--diffusers-script: no such file {args.diffusers_script}")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results = {}
        for name in runs:
            if name == "ours":
                results[name] = run_ours(args.steps, args.seed, work / "ours", overrides)
            elif name == "plain":
                results[name] = run_plain(
                    args.steps, args.warmup, args.seed, args.lr, args.batch_size
                )
            else:
                results[name] = run_diffusers(
                    args.diffusers_script, args.steps, args.seed, work / "diffusers", args
                )
        if args.evaluate:
            for name in ("ours", "diffusers"):
                if name in results:
                    fid = held_out_fidelity(results[name]["controlnet"], work / f"eval_{name}")
                    results[name]["fidelity"] = fid
        report(results, args, overrides)


LABELS = {
    "plain": "plain loop",
    "diffusers": "diffusers train_controlnet.py",
    "ours": "cn_lightning train CLI",
}


def step_windows(step_s: list[float], size: int = 20, every: int = 10) -> list[float]:
    """Mean seconds per step of ``size`` consecutive steps, every ``every`` steps: the windows
    the train CLI's throughput logger reports, so the three trainings compare alike."""
    return [statistics.fmean(step_s[i : i + size]) for i in range(0, len(step_s) - size + 1, every)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(results: dict, args: argparse.Namespace, overrides: list[str]) -> None:
    """One table (steady s/step, wall time, held-out fidelity), the ratios, ours' time shares.

    Steady s/step is the median 20-step window after the warm-up; "fast phase" is the 10th
    percentile of the same windows. On a shared machine whose speed drifts (this project's
    2-core VM: the same loop runs 0.08 or 0.12 s/step from one minute to the next), runs one
    after the other can meet different speeds; the fast phase is what each loop does when it has
    the machine to itself, and the ratio of fast phases is the steadier comparison.
    """
    windows = {}
    for name, r in results.items():
        if name == "ours":
            windows[name] = [s for at, s in r["perf"]["step_s_windows"] if at >= args.warmup]
        else:
            windows[name] = step_windows(r["step_s"])
        if not windows[name]:
            sys.exit(f"{name}: no 20-step window after the warm-up; raise --steps")
    step = {name: statistics.median(w) for name, w in windows.items()}
    fast = {name: percentile(w, 0.1) for name, w in windows.items()}
    print(
        f"end to end, {args.steps} steps (warm-up {args.warmup}), seed {args.seed}, "
        f"overrides {overrides}, {os.cpu_count()} CPUs"
    )
    print("| | steady s/step | fast phase s/step | wall time (s) | held-out fidelity |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        fid = f"{r['fidelity']:.3f}" if "fidelity" in r else "-"
        print(
            f"| {LABELS[name]} | {step[name]:.4f} | {fast[name]:.4f} | {r['wall_s']:.1f} | {fid} |"
        )
    if "ours" in results:
        for ref in ("plain", "diffusers"):
            if ref in results:
                print(
                    f"ours / {LABELS[ref]}: steady s/step {step['ours'] / step[ref]:.3f}x, "
                    f"fast phase {fast['ours'] / fast[ref]:.3f}x, "
                    f"wall {results['ours']['wall_s'] / results[ref]['wall_s']:.3f}x"
                )
        perf, wall = results["ours"]["perf"], results["ours"]["wall_s"]
        grids = perf["sampling_s"]
        steps_s = perf["train_s"] - grids
        other = max(wall - perf["train_s"], 0.0)
        print(
            f"ours: sample grids {grids:.1f} s ({100 * grids / wall:.1f}% "
            f"of wall), training steps {steps_s:.1f} s ({100 * steps_s / wall:.1f}%; data wait "
            f"{100 * perf['data_wait_share']:.1f}% of a step), start-up/export {other:.1f} s "
            f"({100 * other / wall:.1f}%)"
        )


if __name__ == "__main__":
    main()
