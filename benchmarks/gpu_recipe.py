"""The GPU recipe check: the real train CLI at SD1.5 size, bf16-mixed, per strategy, vs. UNet
fine-tuning.

Builds an SD1.5-size Stable Diffusion with random weights from the shipped configs (once, into
``--work-dir``), writes small synthetic-circle shards at ``--resolution``, then for each strategy
(``single_gpu``, ``ddp`` with 1 rank, ``deepspeed_stage_2``) runs ``python -m cn_lightning.train``
in a subprocess for ``--steps`` optimizer steps on one device, with the CSV logger and the
``ThroughputLogger`` only (no sample grids, no convergence detector, no checkpoints, no export).
From the CSV it reads the steady-state ``perf/samples_per_s`` (the logger's window is set to the
last ``steps - warmup`` batches), ``perf/peak_memory_gb`` (``torch.cuda.max_memory_allocated``)
and ``perf/mfu`` (FLOPs per sample counted once with ``torch.utils.flop_counter``).

The reference is fine-tuning the whole UNet at the same settings (no ControlNet): a plain loop,
run in its own subprocess, with the same frozen VAE and text encoder, autocast in the training
precision, AdamW on every UNet parameter; it measures seconds per step (after the same warm-up),
peak memory and MFU (FLOPs of one whole training step counted with ``FlopCounterMode``). The
ratios ControlNet / UNet fine-tune of time per step and peak memory are printed next to the
paper's figures (1.34x time, 1.23x memory, one A100 PCIe 40GB).

    python benchmarks/gpu_recipe.py [--strategies single_gpu ddp deepspeed_stage_2]
        [--steps 30] [--resolution 512] [--batch-size 8] [--precision bf16-mixed]
        [--size sd15|tiny] [--work-dir DIR] [--json PATH]

Without a CUDA GPU it stops with one line, unless ``--allow-cpu`` is given: then the same code
path runs on the CPU, by default at ``--size tiny`` (the project's tiny preset), 64 px, batch 2,
3 steps, ``deepspeed_stage_2`` skipped (Lightning's DeepSpeed strategy needs a GPU).
Exit status: 0 when every requested (not skipped) run succeeded, 1 otherwise, 2 on usage errors.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = ("single_gpu", "ddp", "deepspeed_stage_2")
GPU_ONLY = {"deepspeed_stage_2": "Lightning's DeepSpeedStrategy refuses a CPU accelerator"}
PAPER = {"time_ratio": 1.34, "memory_ratio": 1.23, "card": "NVIDIA A100 PCIe 40GB"}
TINY_PRESET = "small"  # the preset conf/model/tiny.yaml (the quickstart's tiny model) uses
AUTOCAST = {"bf16-mixed": "bfloat16", "16-mixed": "float16", "32-true": None}
GPU_DEFAULTS = {"size": "sd15", "resolution": 512, "batch_size": 8, "steps": 30}
ECHO = ("[cn_lightning]", "cn_lightning: error", "[unet_finetune]")
CPU_DEFAULTS = {"size": "tiny", "resolution": 64, "batch_size": 2, "steps": 3}


def log(msg: str) -> None:
    print(f"[gpu_recipe] {msg}", flush=True)


def die(msg: str, code: int = 2) -> None:
    print(f"gpu_recipe: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# ------------------------------------------------------------------------------ preparation
def write_model(size: str, out: Path) -> Path:
    """Write the backbone (diffusers layout) to ``out`` unless a complete one is there."""
    if (out / ".complete").is_file():
        log(f"reusing the {size} backbone in {out}")
        return out
    start = time.perf_counter()
    log(f"writing a random-weight {size} backbone to {out} ...")
    if size == "tiny":
        from cn_lightning.models.tiny import write_tiny_backbone

        write_tiny_backbone(out, preset=TINY_PRESET, seed=0)
    else:
        from cn_lightning.atomic import atomic_directory

        write_random_sd15 = _load_function(
            REPO / "tests" / "test_real_size.py", "write_random_sd15"
        )
        with atomic_directory(out) as tmp:
            write_random_sd15(tmp)
    (out / ".complete").write_text("ok\n")
    log(f"backbone written in {time.perf_counter() - start:.1f} s")
    return out


def _load_function(path: Path, name: str):
    """``name`` from the Python file ``path`` (tests/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_gpu_recipe_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def write_shards(out: Path, resolution: int, num_samples: int) -> Path:
    """Synthetic circle shards at ``resolution`` px (4 shards); returns their folder, which
    ``data.train_shards`` accepts (it holds ``manifest.json``; a brace pattern would need
    quoting on the Hydra command line)."""
    from cn_lightning.data.synthetic import ensure_shards

    per_shard = max(1, num_samples // 4)
    ensure_shards(
        str(out), num_samples=num_samples, size=resolution, seed=0, samples_per_shard=per_shard
    )
    return out


# ------------------------------------------------------------------------ ControlNet runs
def train_overrides(
    args, strategy: str, model_dir: Path, shards: Path, run_dir: Path, accelerator: str, warmup: int
) -> list[str]:
    """Hydra overrides of ``python -m cn_lightning.train`` for one strategy."""
    over = [
        f"hydra.run.dir={run_dir}",
        "model=tiny" if args.size == "tiny" else "model=sd15",
        f"model.pretrained_model_path={model_dir}",
        "data=shards",
        f"data.train_shards={shards}",
        "data.condition_key=outline",
        f"data.resolution={args.resolution}",
        f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.num_workers}",
        "data.shuffle_buffer=16",
        # One epoch for the whole run: the shards hold 64 samples, and every epoch restarts the
        # loader's workers, which measured as 15% data wait on an H100 (commit 536c1a2).
        "data.samples_per_epoch=1000000",
        f"strategy={strategy}",
        f"trainer.accelerator={accelerator}",
        "trainer.devices=1",
        f"trainer.precision={args.precision}",
        f"trainer.max_steps={args.steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "++trainer.enable_model_summary=false",
        "++trainer.enable_checkpointing=false",
        "logical_batch_size=null",
        "export_controlnet=false",
        "seed=0",
        "logger=csv",
        # No callbacks group at all (no sample grids, convergence detector, checkpoints, LR
        # monitor or progress bar), then only the ThroughputLogger; its window = the steady
        # state, so the last logged perf/samples_per_s averages exactly the measured steps.
        "~callbacks",
        "++callbacks.throughput._target_=cn_lightning.callbacks.throughput.ThroughputLogger",
        f"++callbacks.throughput.window={max(1, args.steps - warmup)}",
        "++callbacks.throughput.count_flops=true",
    ]
    if args.peak_tflops is not None:
        over.append(f"++callbacks.throughput.peak_tflops={args.peak_tflops}")
    return over + list(args.train_arg)


def run_logged(cmd: list[str], log_path: Path, env: dict, timeout: float) -> tuple[int, float]:
    """Run ``cmd``, its output into ``log_path``; echo ``[cn_lightning]`` lines. (rc, seconds)."""
    start = time.perf_counter()
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )

        def pump() -> None:
            for line in proc.stdout:
                logf.write(line)
                logf.flush()
                if line.startswith(ECHO):
                    print("    " + line.rstrip(), flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = 124
            proc.wait()
        reader.join(timeout=10)
        if rc == 124:
            logf.write(f"\n[gpu_recipe] killed after {timeout:.0f} s\n")
    return rc, time.perf_counter() - start


def tail(path: Path, n: int = 25) -> str:
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    return "\n".join("    | " + ln for ln in lines[-n:])


def read_throughput_csv(run_dir: Path) -> dict:
    """Steady-state figures from the CSV logger: the last logged window of ``perf/*``."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise RuntimeError(f"no CSV metrics at {path}")
    with open(path) as f:
        rows = list(csv.DictReader(f))

    def column(name: str) -> list[tuple[int, float]]:
        out = []
        for r in rows:
            value = r.get(name)
            if value not in (None, ""):
                out.append((int(float(r.get("step") or 0)), float(value)))
        return out

    sps = column("perf/samples_per_s")
    if not sps:
        raise RuntimeError(f"no perf/samples_per_s in {path}")
    result = {"samples_per_s": sps[-1][1], "logged_steps": len(sps)}
    for key in ("peak_memory_gb", "mfu", "tflops_per_device", "data_wait_share", "compute_s"):
        col = column(f"perf/{key}")
        if col:
            result[key] = max(v for _, v in col) if key == "peak_memory_gb" else col[-1][1]
    loss = column("train/loss") or column("train/loss_step")
    if loss:
        result["last_loss"] = loss[-1][1]
    return result


def run_strategy(
    args, strategy: str, model_dir: Path, shards: Path, env: dict, accelerator: str, warmup: int
) -> dict:
    run_dir = args.work_dir / "runs" / strategy
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    cmd = [
        sys.executable,
        "-m",
        "cn_lightning.train",
        *train_overrides(args, strategy, model_dir, shards, run_dir, accelerator, warmup),
    ]
    (run_dir / "command.txt").write_text(" ".join(cmd) + "\n")
    log(
        f"{strategy}: python -m cn_lightning.train ... strategy={strategy} "
        f"(log: {run_dir / 'train.log'})"
    )
    rc, wall = run_logged(cmd, run_dir / "train.log", env, args.timeout)
    out = {"status": "ok", "wall_s": round(wall, 1), "run_dir": str(run_dir)}
    if rc != 0:
        log(f"{strategy}: FAILED (exit {rc}) after {wall:.0f} s; last lines of the log:")
        print(tail(run_dir / "train.log"), flush=True)
        return {
            **out,
            "status": "failed",
            "returncode": rc,
            "error": last_error(run_dir / "train.log"),
        }
    try:
        out.update(read_throughput_csv(run_dir))
    except (RuntimeError, ValueError) as err:
        log(f"{strategy}: FAILED reading its metrics: {err}")
        return {**out, "status": "failed", "error": str(err)}
    out["s_per_step"] = args.batch_size / out["samples_per_s"]
    log(
        f"{strategy}: {out['samples_per_s']:.2f} samples/s, {out['s_per_step']:.3f} s/step, "
        f"peak {out.get('peak_memory_gb', float('nan')):.2f} GB, "
        f"MFU {fmt_pct(out.get('mfu'))} (run {wall:.0f} s)"
    )
    return out


def last_error(path: Path) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith("cn_lightning: error") or re.match(r"^[\w.]*(Error|Exception)\b", ln):
            return ln[:300]
    return lines[-1][:300] if lines else ""


# ------------------------------------------------------------------------ UNet fine-tune
def unet_finetune_worker(args) -> None:
    """Fine-tune the whole UNet (no ControlNet) in a plain loop; write the figures as JSON."""
    import resource

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from cn_lightning.data.synthetic import circle_prompt
    from cn_lightning.models.backbone import load_backbone
    from cn_lightning.models.diffusion import diffusion_target, drop_prompts, encode_prompt

    device = torch.device(args.device)
    torch.manual_seed(0)
    bb = load_backbone(args.model_dir, "fp32")
    vae, text_encoder, unet = bb.vae.to(device), bb.text_encoder.to(device), bb.unet.to(device)
    unet.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-5, weight_decay=1e-2)
    dtype = AUTOCAST[args.precision]
    autocast_dtype = getattr(torch, dtype) if dtype else None
    scaler = torch.amp.GradScaler(device.type) if args.precision == "16-mixed" else None
    g = torch.Generator().manual_seed(0)
    n, res = args.batch_size, args.resolution
    images = (torch.rand(n, 3, res, res, generator=g) * 2 - 1).to(device)
    prompts = [circle_prompt("red", "blue")] * n
    num_t = bb.noise_scheduler.config.num_train_timesteps
    params = sum(p.numel() for p in unet.parameters())
    print(f"[unet_finetune] {params / 1e6:.1f}M trainable UNet parameters on {device}", flush=True)

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            with torch.no_grad():
                latents = (
                    vae.encode(images).latent_dist.sample().float() * vae.config.scaling_factor
                )
                text = encode_prompt(bb.tokenizer, text_encoder, drop_prompts(prompts, 0.5), device)
            noise = torch.randn_like(latents)
            t = torch.randint(0, num_t, (n,), device=device)
            noisy = bb.noise_scheduler.add_noise(latents, noise, t)
            pred = unet(noisy, t, encoder_hidden_states=text, return_dict=False)[0]
        loss = F.mse_loss(
            pred.float(), diffusion_target(bb.noise_scheduler, latents, noise, t).float()
        )
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with FlopCounterMode(display=False) as counter:  # step 0 is warm-up anyway
        loss = step()
    flops_per_sample = counter.get_total_flops() / n
    for _ in range(1, args.warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps - max(1, args.warmup)):
        loss = step()
    sync()
    timed = args.steps - max(1, args.warmup)
    s_per_step = (time.perf_counter() - start) / timed
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        peak_kind = "torch.cuda.max_memory_allocated"
        name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peak_kind = "process peak RSS"
        name = f"cpu x{torch.get_num_threads()} threads"
    peak_flops = peak_flops_of(device, args.precision, args.peak_tflops)
    samples_per_s = n / s_per_step
    result = {
        "status": "ok",
        "device_name": name,
        "trainable_params": params,
        "timed_steps": timed,
        "s_per_step": s_per_step,
        "samples_per_s": samples_per_s,
        "peak_memory_gb": peak / 1e9,
        "peak_memory_kind": peak_kind,
        "flops_per_sample": flops_per_sample,
        "mfu": flops_per_sample * samples_per_s / peak_flops if peak_flops else None,
        "last_loss": float(loss),
    }
    Path(args.worker_json).write_text(json.dumps(result, indent=2))
    print(
        f"[unet_finetune] {s_per_step:.3f} s/step, peak {peak / 1e9:.2f} GB ({peak_kind})",
        flush=True,
    )


def peak_flops_of(device, precision: str, peak_tflops: float | None) -> float | None:
    """Peak FLOP/s of ``device`` for ``precision``: ``--peak-tflops``, else Lightning's table."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    import torch
    from lightning.fabric.utilities.throughput import get_available_flops

    dtype = AUTOCAST[precision]
    return get_available_flops(device, getattr(torch, dtype) if dtype else torch.float32)


def run_unet_finetune(args, model_dir: Path, env: dict, device: str, warmup: int) -> dict:
    run_dir = args.work_dir / "runs" / "unet_finetune"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    out_json = run_dir / "result.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--unet-finetune-worker",
        "--model-dir",
        str(model_dir),
        "--device",
        device,
        "--worker-json",
        str(out_json),
        "--steps",
        str(args.steps),
        "--warmup",
        str(warmup),
        "--resolution",
        str(args.resolution),
        "--batch-size",
        str(args.batch_size),
        "--precision",
        args.precision,
    ]
    if args.peak_tflops is not None:
        cmd += ["--peak-tflops", str(args.peak_tflops)]
    log(f"unet_finetune: plain loop, AdamW on the whole UNet (log: {run_dir / 'train.log'})")
    rc, wall = run_logged(cmd, run_dir / "train.log", env, args.timeout)
    if rc != 0 or not out_json.is_file():
        log(f"unet_finetune: FAILED (exit {rc}) after {wall:.0f} s; last lines of the log:")
        print(tail(run_dir / "train.log"), flush=True)
        return {
            "status": "failed",
            "returncode": rc,
            "wall_s": round(wall, 1),
            "error": last_error(run_dir / "train.log"),
        }
    result = json.loads(out_json.read_text())
    result["wall_s"] = round(wall, 1)
    log(
        f"unet_finetune: {result['samples_per_s']:.2f} samples/s, "
        f"{result['s_per_step']:.3f} s/step, peak {result['peak_memory_gb']:.2f} GB, "
        f"MFU {fmt_pct(result.get('mfu'))} (run {wall:.0f} s)"
    )
    return result


# ------------------------------------------------------------------------------- report
def fmt_pct(x) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}%"


def fmt(x, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def fmt_x(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"


def add_ratios(results: dict, base: dict) -> None:
    for r in results.values():
        if r.get("status") == "ok" and base.get("status") == "ok":
            r["time_ratio"] = r["s_per_step"] / base["s_per_step"]
            r["memory_ratio"] = (
                r["peak_memory_gb"] / base["peak_memory_gb"]
                if r.get("peak_memory_gb") and base.get("peak_memory_gb")
                else None
            )


def print_table(report: dict) -> None:
    s = report["settings"]
    print(flush=True)
    print(
        f"GPU recipe check | {s['size']} backbone (random weights), {s['resolution']} px, batch "
        f"{s['batch_size']}, {s['precision']}, {s['steps']} steps (steady state: the last "
        f"{s['steps'] - s['warmup']}) | device: {report['device_name']}"
    )
    head = (
        f"{'run':24} {'status':8} {'samples/s':>9} {'s/step':>8} {'peak GB':>8} {'MFU':>6} "
        f"{'data wait':>9} {'time x':>7} {'mem x':>6}"
    )
    print(head)
    print("-" * len(head))
    rows = [("unet_finetune (ref.)", report["unet_finetune"])]
    rows += [
        (name + (" (1 rank)" if name == "ddp" else ""), r)
        for name, r in report["strategies"].items()
    ]
    for label, r in rows:
        status = r.get("status", "?")
        if status != "ok":
            why = r.get("note") or r.get("error", "")
            print(f"{label:24} {status:8} {why}")
            continue
        print(
            f"{label:24} {status:8} {fmt(r['samples_per_s'], '9.2f')} "
            f"{fmt(r['s_per_step'], '8.3f')} "
            f"{fmt(r.get('peak_memory_gb'), '8.2f')} {fmt_pct(r.get('mfu')):>6} "
            f"{fmt_pct(r.get('data_wait_share')):>9} {fmt_x(r.get('time_ratio')):>7} "
            f"{fmt_x(r.get('memory_ratio')):>6}"
        )
    p = report["paper"]
    print(
        f"paper ({p['card']}): ControlNet / SD fine-tuning = {p['time_ratio']:.2f}x time per "
        f"step, {p['memory_ratio']:.2f}x GPU memory"
    )
    print(
        f"peak memory: {report['peak_memory_kind']}; time x / mem x = ControlNet run / UNet "
        "fine-tune; MFU from torch.utils.flop_counter FLOPs and the device's peak for the "
        "precision",
        flush=True,
    )


# --------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    p.add_argument(
        "--size",
        choices=("sd15", "tiny"),
        default=None,
        help="backbone: SD1.5 architecture or the tiny preset (default sd15 on GPU, tiny on CPU)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps per run (default 30; CPU 3)"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=5,
        help="first steps excluded from the rates (capped at steps - 2)",
    )
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; CPU 64)")
    p.add_argument("--batch-size", type=int, default=None, help="per device (default 8; CPU 2)")
    p.add_argument("--precision", default="bf16-mixed", choices=sorted(AUTOCAST))
    p.add_argument(
        "--num-workers", type=int, default=None, help="data loader workers (default 4; CPU 0)"
    )
    p.add_argument("--num-samples", type=int, default=64, help="synthetic samples in the shards")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="peak TFLOP/s of the device for MFU (default: Lightning's table on GPU)",
    )
    p.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="model, shards and run directories; kept (default: a temp folder, removed)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--timeout", type=float, default=240, help="seconds per run before it is killed")
    p.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra Hydra override for every train run (repeatable)",
    )
    p.add_argument(
        "--allow-cpu",
        action="store_true",
        help="without a CUDA GPU, run the same code path on the CPU (tiny size)",
    )
    # Internal: the UNet fine-tuning reference runs in its own process.
    p.add_argument("--unet-finetune-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    p.add_argument("--device", help=argparse.SUPPRESS)
    p.add_argument("--worker-json", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.unet_finetune_worker:
        unet_finetune_worker(args)
        return 0
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.allow_cpu:
        die(
            "no CUDA GPU available (torch.cuda.is_available() is False); this check needs one GPU "
            "(--allow-cpu runs the same code path on the CPU at --size tiny)"
        )
    accelerator, device = ("gpu", "cuda") if has_cuda else ("cpu", "cpu")
    for key, value in (GPU_DEFAULTS if has_cuda else CPU_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.num_workers is None:
        args.num_workers = 4 if has_cuda else 0
    if args.steps < 2:
        die("--steps must be at least 2 (one warm-up step and one measured)")
    warmup = max(1, min(args.warmup, args.steps - 2)) if args.steps > 2 else 1
    tmp = None
    if args.work_dir is None:
        tmp = tempfile.mkdtemp(prefix="cn_gpu_recipe.")
        args.work_dir = Path(tmp)
    args.work_dir = args.work_dir.resolve()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run(args, accelerator, device, warmup)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def run(args, accelerator: str, device: str, warmup: int) -> int:
    start = time.perf_counter()
    log(
        f"device {device} | size {args.size}, {args.resolution} px, batch {args.batch_size}, "
        f"{args.precision}, {args.steps} steps (warm-up {warmup}) | strategies "
        f"{' '.join(args.strategies)} | work dir {args.work_dir}"
    )
    if device == "cpu" and args.size == "sd15":
        log("note: SD1.5 size on the CPU is very slow; --size tiny checks the plumbing")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model_dir = write_model(args.size, args.work_dir / f"backbone_{args.size}")
    shards = write_shards(
        args.work_dir / f"circles_{args.resolution}px", args.resolution, args.num_samples
    )
    log(f"shards: {shards}")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        HYDRA_FULL_ERROR="1",
        TOKENIZERS_PARALLELISM="false",
        CN_LIGHTNING_CACHE=str(args.work_dir / "cache"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    env.pop("WANDB_API_KEY", None)

    # The reference first: its ratios need it, and a strategy that hangs cannot starve it.
    base = run_unet_finetune(args, model_dir, env, device, warmup)
    results: dict[str, dict] = {}
    for strategy in args.strategies:
        if device == "cpu" and strategy in GPU_ONLY:
            note = f"skipped on CPU: {GPU_ONLY[strategy]}"
            log(f"{strategy}: {note}")
            results[strategy] = {"status": "skipped", "note": note}
            continue
        results[strategy] = run_strategy(
            args, strategy, model_dir, shards, env, accelerator, warmup
        )
    add_ratios(results, base)
    report = {
        "settings": {
            "size": args.size,
            "resolution": args.resolution,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "steps": args.steps,
            "warmup": warmup,
            "devices": 1,
            "accelerator": accelerator,
            "num_workers": args.num_workers,
            "train_args": list(args.train_arg),
        },
        "device_name": base.get("device_name", device),
        "peak_memory_kind": base.get(
            "peak_memory_kind",
            "torch.cuda.max_memory_allocated" if device == "cuda" else "process peak RSS",
        ),
        "paper": PAPER,
        "unet_finetune": base,
        "strategies": results,
        "ratios": {
            k: {"time": r.get("time_ratio"), "memory": r.get("memory_ratio")}
            for k, r in results.items()
            if r.get("status") == "ok"
        },
        "total_s": round(time.perf_counter() - start, 1),
    }
    print_table(report)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        log(f"wrote {args.json}")
    log(f"total {report['total_s']:.0f} s")
    failed = [
        k for k, r in [("unet_finetune", base), *results.items()] if r.get("status") == "failed"
    ]
    if failed:
        log(f"failed: {' '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
