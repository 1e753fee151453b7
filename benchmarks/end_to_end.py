"""End to end: the quickstart's train CLI against a plain PyTorch loop, on the same shards.

``ours`` is ``python -m cn_lightning.train`` (the quickstart config) for ``--steps`` optimizer
steps, with its sample grids, logging and data stream, timed from process start to exit. The
``plain`` loop does what diffusers' ``examples/controlnet/train_controlnet.py`` does on the same
task: the quickstart's shards decoded once into an in-memory map-style dataset, a shuffling
``DataLoader`` without workers, the toy backbone, a ControlNet copied from its UNet (the toy's 4x
condition encoder), AdamW at the quickstart's learning rate, 50% empty prompts, fp32; no sample
grids, no logging. With ``--diffusers-script``, diffusers' script itself runs too. All are
measured in this one run:

* steady s/step: the median 20-step window after ``--warmup``, from the wall clock at the end of
  every step (ours: ``step_clock.py``; plain: itself; diffusers: its TensorBoard events), so a
  step includes its data loading in all three; and the ratios;
* ours: the share of wall time in the sample grids and the data-wait share of the training
  steps (from its ``perf.json``), and the rest (start-up, logging, checkpoints, export);
* total wall time of each, from process start to exit.

By default the trainings run one after the other. This project's 2-core VM drifts (the same loop
runs 0.08 or 0.12 s/step from one minute to the next), which can favour whichever ran in the
faster minutes; ``--interleave SECONDS`` runs them at the same time in turns (the others paused
with SIGSTOP), so the drift slows all alike: each one's wall time is then the sum of its turns,
and steps cut by a pause are left out.

    python benchmarks/end_to_end.py [--steps 300] [--warmup 50] [--seed 42] [--interleave 3]
        [--diffusers-script train_controlnet.py] [--evaluate] [-- OVERRIDE ...]

Overrides after ``--`` go to the train CLI (e.g. ``data.num_workers=0``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CN_LIGHTNING_CACHE", "~/.cache/cn_lightning")).expanduser()
HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------- running trainings
@dataclass
class Launch:
    """One training to run as its own process (output to ``log``)."""

    name: str
    cmd: list[str]
    cwd: Path
    env: dict[str, str]
    log: Path
    process: subprocess.Popen | None = None
    # Wall-clock (time.time()) intervals in which the process was allowed to run.
    running: list[tuple[float, float]] = field(default_factory=list)

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "w") as out:
            self.process = subprocess.Popen(
                self.cmd, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )

    def check(self) -> None:
        code = self.process.returncode
        if code != 0:
            tail = self.log.read_text(errors="replace")[-3000:]
            sys.exit(f"{self.name} failed ({code}); the end of {self.log}:\n{tail}")

    @property
    def active_s(self) -> float:
        return sum(end - begin for begin, end in self.running)


def run_one_after_another(launches: list[Launch]) -> None:
    for launch in launches:
        begin = time.time()
        launch.start()
        launch.process.wait()
        launch.running.append((begin, time.time()))
        launch.check()


def run_interleaved(launches: list[Launch], slice_s: float) -> None:
    """All trainings at once, but only one running at a time: each gets ``slice_s`` seconds in
    turn while the others (and their child processes: data workers, the W&B service) are
    stopped with SIGSTOP. A machine whose speed drifts from minute to minute then slows every
    training alike, and each one's active time is the sum of its slices."""
    for launch in launches:
        launch.start()
        _signal_tree(launch.process.pid, signal.SIGSTOP)
    alive = list(launches)
    while alive:
        for launch in list(alive):
            _signal_tree(launch.process.pid, signal.SIGCONT)
            begin = time.time()
            while time.time() - begin < slice_s and launch.process.poll() is None:
                time.sleep(0.01)
            if launch.process.poll() is None:
                _signal_tree(launch.process.pid, signal.SIGSTOP)
            launch.running.append((begin, time.time()))
            if launch.process.poll() is not None:
                alive.remove(launch)
                launch.check()


def _signal_tree(pid: int, sig: int) -> None:
    """``sig`` to ``pid`` and all its descendants, found through /proc (W&B starts its service
    in a session of its own, so a process group would miss it). The walk repeats until it finds
    no process it has not signalled, so none starts a child unseen."""
    signalled: set[int] = set()
    todo = {pid}
    while todo:
        for current in todo:
            try:
                os.kill(current, sig)
            except ProcessLookupError:
                pass
        signalled |= todo
        todo = _descendants(pid) - signalled


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def step_durations(marks: list, running: list[tuple[float, float]]) -> list[tuple[int, float]]:
    """(step, seconds) of each step from consecutive (step, wall time, ...) marks, keeping only
    steps that ran within one running interval (a step cut by a pause is left out, not
    shortened)."""
    out = []
    for before, after in zip(marks, marks[1:], strict=False):
        (s0, t0), (s1, t1) = before[:2], after[:2]
        if s1 == s0 + 1 and _within(t0, t1, running):
            out.append((s1, t1 - t0))
    return out


def _within(begin: float, end: float, running: list[tuple[float, float]]) -> bool:
    return any(b - 0.05 <= begin and end <= e + 0.05 for b, e in running)


def active_seconds(begin: float, end: float, running: list[tuple[float, float]]) -> float:
    """Seconds of [begin, end] in which the process was running."""
    return sum(max(0.0, min(end, e) - max(begin, b)) for b, e in running)


def time_split(clock: dict, perf: dict, running: list[tuple[float, float]]) -> dict:
    """Ours' running seconds in sample grids, in training steps, and in the rest (start-up,
    export), from the step clock: a grid's seconds are those of its step interval's growth of
    the grid clock, bounded by the interval's running time when a pause cut the interval."""
    start, end = clock["train_start"], clock["train_end"]
    points = [(start, 0.0), *((t, g) for _, t, g in clock["marks"]), (end, perf["sampling_s"])]
    grids = 0.0
    for (t0, g0), (t1, g1) in zip(points, points[1:], strict=False):
        if g1 > g0 and _within(t0, t1, running):
            grids += g1 - g0
        elif g1 > g0:
            grids += min(g1 - g0, active_seconds(t0, t1, running))
    train = active_seconds(start, end, running)
    return {"grids_s": grids, "steps_s": train - grids, "train_s": train}


def ours_command(steps: int, seed: int, out: Path, overrides: list[str]) -> Launch:
    """The train CLI for ``steps`` steps, as a user runs it (default logger, sample grids,
    checkpoints, export), plus the benchmark's step clock."""
    cmd = [
        sys.executable,
        "-m",
        "cn_lightning.train",
        f"hydra.run.dir={out}",
        f"trainer.max_steps={steps}",
        f"seed={seed}",
        "trainer.enable_progress_bar=false",
        "+callbacks.step_clock._target_=step_clock.StepClock",
        f"+callbacks.step_clock.path={out / 'step_clock.json'}",
        *overrides,
    ]
    path = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))
    return Launch("ours", cmd, REPO, {**os.environ, "PYTHONPATH": path}, out.parent / "ours.log")


def ours_result(out: Path, running: list[tuple[float, float]]) -> dict:
    """Step marks and the time split from the step clock; the data-wait share from
    ``perf.json``."""
    clock = json.loads((out / "step_clock.json").read_text())
    perf = json.loads((out / "perf.json").read_text())
    split = time_split(clock, perf, running)
    return {"marks": clock["marks"], "perf": perf, "split": split, "controlnet": out / "controlnet"}


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


def plain_worker(steps: int, seed: int, lr: float, batch_size: int, out: Path) -> None:
    """diffusers' train_controlnet.py loop on the same data (run in its own process); writes
    the wall clock at the end of every step to ``out``."""
    import torch
    from plain_loop import build_plain, plain_step
    from torch.utils.data import DataLoader

    from cn_lightning.config import asset, circle_shards

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
    marks, step = [], 0
    while step < steps:
        for images, conditions, prompts in loader:
            plain_step(parts, images, conditions, prompts)
            step += 1
            marks.append((step, time.time()))
            if step >= steps:
                break
    out.write_text(json.dumps({"marks": marks}))


def plain_command(args: argparse.Namespace, work: Path) -> Launch:
    cmd = [
        *(sys.executable, str(Path(__file__).resolve())),
        *("--plain-worker", str(work / "plain.json")),
        *("--steps", str(args.steps), "--seed", str(args.seed), "--lr", str(args.lr)),
        *("--batch-size", str(args.batch_size)),
    ]
    return Launch("plain", cmd, REPO, dict(os.environ), work / "plain.log")


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


def diffusers_command(script: Path, work: Path, args: argparse.Namespace) -> Launch:
    """``train_controlnet.py`` on the same task (fp32, no validation images), after converting
    the shards to parquet and writing its initial ControlNet."""
    from cn_lightning.config import asset, circle_shards

    shards = Path(circle_shards(str(CACHE / "circles_32px_4000"), 4000, 32))
    data = write_parquet(shards, work / "parquet")
    init = initial_controlnet(work / "controlnet_init")
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
        f"--max_train_steps={args.steps}",
        "--proportion_empty_prompts=0.5",
        f"--seed={args.seed}",
        "--mixed_precision=no",
        f"--output_dir={work / 'diffusers_out'}",
        f"--cache_dir={work / 'hf_cache'}",
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    return Launch("diffusers", cmd, work, env, work.parent / "diffusers.log")


def diffusers_result(work: Path) -> dict:
    """Step marks from the wall clock of its TensorBoard events."""
    out = work / "diffusers_out"
    times = event_times(next(out.glob("logs/**/events.out.tfevents.*")))
    return {"marks": sorted(times.items()), "controlnet": out}


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
        "--interleave",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="run the trainings at the same time, taking turns of SECONDS each (the others "
        "paused), so that a machine whose speed drifts slows them alike; 0 (default): one "
        "after the other",
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="held-out fidelity (64 conditions) of each model"
    )
    parser.add_argument("--work-dir", type=Path, help="keep the runs here (default: a temp dir)")
    parser.add_argument("--plain-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_worker:
        plain_worker(args.steps, args.seed, args.lr, args.batch_size, args.plain_worker)
        return
    if args.steps <= args.warmup + 20:
        sys.exit("--steps must exceed --warmup by more than one 20-step throughput window")
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "diffusers" in runs and args.diffusers_script is None:
        runs.remove("diffusers")
    if unknown := set(runs) - {"ours", "plain", "diffusers"}:
        sys.exit(f"--runs: unknown {sorted(unknown)} (ours, plain, diffusers)")
    if args.diffusers_script and not args.diffusers_script.is_file():
        sys.exit(f"--diffusers-script: no such file {args.diffusers_script}")
    if args.interleave < 0:
        sys.exit("--interleave must be >= 0")

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        from cn_lightning.config import circle_shards

        # The shards exist before any clock starts (the first run would build them otherwise).
        circle_shards(str(CACHE / "circles_32px_4000"), 4000, 32)
        circle_shards(str(CACHE / "circles_32px_val_64"), 64, 32, 1)
        launches = {}
        for name in runs:
            if name == "ours":
                launches[name] = ours_command(args.steps, args.seed, work / "ours", overrides)
            elif name == "plain":
                launches[name] = plain_command(args, work)
            else:
                launches[name] = diffusers_command(args.diffusers_script, work / "diffusers", args)
        if args.interleave:
            run_interleaved(list(launches.values()), args.interleave)
        else:
            run_one_after_another(list(launches.values()))
        results = {}
        for name, launch in launches.items():
            if name == "ours":
                results[name] = ours_result(work / "ours", launch.running)
            elif name == "plain":
                results[name] = json.loads((work / "plain.json").read_text())
            else:
                results[name] = diffusers_result(work / "diffusers")
            results[name]["wall_s"] = launch.active_s
            durations = step_durations(results[name]["marks"], launch.running)
            results[name]["step_s"] = [d for step, d in durations if step > args.warmup]
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
        windows[name] = step_windows(r["step_s"])
        if not windows[name]:
            sys.exit(f"{name}: no 20-step window after the warm-up; raise --steps")
    step = {name: statistics.median(w) for name, w in windows.items()}
    fast = {name: percentile(w, 0.1) for name, w in windows.items()}
    how = "one after the other"
    if args.interleave:
        how = f"interleaved in turns of {args.interleave:g} s"
    print(
        f"end to end, {args.steps} steps (warm-up {args.warmup}), seed {args.seed}, "
        f"overrides {overrides}, {os.cpu_count()} CPUs, runs {how}"
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
        split = results["ours"]["split"]
        grids, steps_s = split["grids_s"], split["steps_s"]
        other = max(wall - split["train_s"], 0.0)
        print(
            f"ours: sample grids {grids:.1f} s ({100 * grids / wall:.1f}% "
            f"of wall), training steps {steps_s:.1f} s ({100 * steps_s / wall:.1f}%; data wait "
            f"{100 * perf['data_wait_share']:.1f}% of a step), start-up/export {other:.1f} s "
            f"({100 * other / wall:.1f}%)"
        )


if __name__ == "__main__":
    main()
