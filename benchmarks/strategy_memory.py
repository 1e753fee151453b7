"""Per-rank memory of parameters + gradients + optimizer state: DDP vs DeepSpeed ZeRO-2 / ZeRO-3.

Two CPU processes (gloo) train a ControlNet (``ControlNetModel.from_unet``) built from a UNet
config shipped in the package: SD1.5 (``--model sd15``, the default) or the SDXL base 1.0 UNet
(``--model sdxl``), scaled in width by ``--scale`` (1.0 = the real 361M-parameter SD1.5 ControlNet
or the real 1.25B-parameter SDXL one; the default 0.5 keeps an SD1.5 run within a few GB of host
memory). After a first optimizer step (Adam state exists) and the second backward (gradients
exist), every tensor reachable from the engine - module parameters (and ZeRO-3 partitions),
gradients, the optimizer's state and master copies, ZeRO's flat buffers and buckets - is counted
once per storage. The measured bytes are printed next to the theoretical ones with Adam (Psi
trainable parameters, N ranks):

    --precision fp32 (and DDP under bf16-mixed autocast: it stores fp32 weights and gradients)
    DDP     params 4 Psi    grads 4 Psi     optimizer 8 Psi            = 16 Psi
    ZeRO-2  params 4 Psi    grads 4 Psi/N   optimizer (4 + 8) Psi/N    (fp32 master + Adam)
    ZeRO-3  params 4 Psi/N  grads 4 Psi/N   optimizer (4 + 8) Psi/N
    --precision bf16 (DeepSpeed bf16: bf16 weights and gradients, fp32 master + Adam)
    ZeRO-2  params 2 Psi    grads 2 Psi/N   optimizer (4 + 8) Psi/N
    ZeRO-3  params 2 Psi/N  grads 2 Psi/N   optimizer (4 + 8) Psi/N

``--steps 1`` measures after the first backward, before any optimizer step: everything but the
Adam moments (8 Psi/N; 8 Psi for DDP), for sizes whose full state does not fit in host memory
(the theory column then leaves the moments out too). ZeRO-3 builds the model inside
``deepspeed.zero.Init``, so no rank ever holds all of it. Before starting, the run estimates the
host memory all ranks need and refuses (exit 2) when it exceeds what /proc/meminfo says is
available (``--no-memory-check`` skips this).

Run: ``python benchmarks/strategy_memory.py [--model sd15|sdxl] [--scale 0.5] [--precision
fp32|bf16] [--ranks 2] [--steps 2] [--strategies ddp zero2 zero3]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import math
import os
import resource
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

CONFIGS = Path(__file__).resolve().parents[1] / "cn_lightning/models/configs"
UNET_CONFIGS = {name: CONFIGS / name / "unet/config.json" for name in ("sd15", "sdxl")}
# Kept for callers of the SD1.5-only version.
UNET_CONFIG = UNET_CONFIGS["sd15"]
STRATEGIES = ("ddp", "zero2", "zero3")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
GIB = 2**30
# Per process: interpreter, torch, DeepSpeed and gloo (measured ~0.6 GiB RSS before the model).
PROCESS_OVERHEAD = 0.8 * GIB


def unet_config(model: str, scale: float) -> dict:
    """The shipped UNet config of ``model`` with block widths times ``scale``.

    SD1.5 widths are rounded to multiples of 32 (its GroupNorm groups). SDXL's heads per block are
    fixed (5, 10, 20: ``attention_head_dim`` counts heads there), so its widths are rounded to
    multiples of 160, divisible by 32 groups and by every block's head count.
    """
    config = json.loads(UNET_CONFIGS[model].read_text())
    step = 160 if model == "sdxl" else 32
    config["block_out_channels"] = [
        max(step, round(c * scale / step) * step) for c in config["block_out_channels"]
    ]
    return config


def build_controlnet(
    scale: float,
    model: str = "sd15",
    dtype: torch.dtype = torch.float32,
    context=contextlib.nullcontext,
):
    """The ControlNet of ``model``'s UNet config (``ControlNetModel.from_unet``) at ``scale``
    width, with random weights in ``dtype``, built inside ``context()`` (``deepspeed.zero.Init``
    for ZeRO-3). The UNet is built on the meta device: only the ControlNet's own weights are ever
    allocated."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(model, scale))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with context():
            controlnet = ControlNetModel.from_unet(unet, load_weights_from_unet=False)
    finally:
        torch.set_default_dtype(previous)
    del unet
    return controlnet


def count_params(scale: float, model: str) -> int:
    """Trainable parameters of the ControlNet, counted on the meta device."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(model, scale))
        return sum(p.numel() for p in ControlNetModel.from_unet(unet).parameters())


def batch(controlnet, seed: int, dtype: torch.dtype = torch.float32) -> dict:
    """One 64 px sample (8x8 latents): memory here is about weights and optimizer state, not
    activations. SDXL ControlNets also take the pooled text embedding and the six size ids."""
    g = torch.Generator().manual_seed(seed)
    config = controlnet.config
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=g),
        "controlnet_cond": torch.rand(1, 3, 64, 64, generator=g),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]),
        }
    return _cast(inputs, dtype)


def _cast(obj, dtype: torch.dtype):
    if isinstance(obj, dict):
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if torch.is_floating_point(obj):
        return obj.to(dtype)
    return obj


def loss_of(model, inputs: dict) -> torch.Tensor:
    down, mid = model(**inputs, return_dict=False)
    return sum(r.float().pow(2).mean() for r in down) + mid.float().pow(2).mean()


class StorageCounter:
    """Bytes per category, each tensor storage counted once (first category wins)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = defaultdict(int)

    def add(self, tensor, category: str) -> None:
        if not torch.is_tensor(tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()

    def walk(self, obj, category, depth: int = 0, name: str = "") -> None:
        """Tensors inside attributes, lists, dicts of ``obj``; names with 'grad' count as grads."""
        if depth > 4 or obj is None:
            return
        cat = "grads" if "grad" in name.lower() else category
        if torch.is_tensor(obj):
            self.add(obj, cat)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                self.walk(v, category, depth + 1, f"{name}.{k}")
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                self.walk(v, category, depth + 1, name)
        elif hasattr(obj, "__dict__") and type(obj).__module__.startswith("deepspeed"):
            for k, v in vars(obj).items():
                self.walk(v, category, depth + 1, k)


def measure(module, optimizer, inner_optimizer) -> dict[str, int]:
    """Categories: params, grads, optimizer (Adam moments + fp32 master copies), other."""
    c = StorageCounter()
    for p in module.parameters():
        c.add(getattr(p, "ds_tensor", None), "params")
        c.add(p.data, "params")
    for p in module.parameters():
        c.add(p.grad, "grads")
    for state in inner_optimizer.state.values():
        for t in state.values():
            c.add(t, "optimizer")
    for group in inner_optimizer.param_groups:
        for p in group["params"]:
            c.add(p.data, "optimizer")  # ZeRO's fp32 master partitions
            c.add(p.grad, "grads")
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups"):
        for t in getattr(optimizer, name, []):  # ZeRO-3 / ZeRO-1,2 fp32 master partitions
            c.add(t, "optimizer")
    if optimizer is not inner_optimizer:
        c.walk(optimizer, "other")
    return dict(c.bytes)


def run_ddp(model, rank: int, steps: int = 2, dtype: torch.dtype = torch.float32) -> dict:
    """DDP as Lightning runs it: fp32 weights, gradients and AdamW state; with bf16 the forward
    runs under CPU autocast (``bf16-mixed``), which changes no stored tensor."""
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        with autocast:
            loss = loss_of(ddp, batch(model, seed=rank * 100 + step))
        loss.backward()
        if step == steps - 1:
            return measure(model, opt, opt)
        opt.step()
    raise AssertionError("unreachable")


def zero_config(stage: int, bucket: int, dtype: torch.dtype) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "zero_optimization": {
            "stage": stage,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
    }


def run_zero(
    model, rank: int, config: dict, steps: int = 2, dtype: torch.dtype = torch.float32
) -> dict:
    import deepspeed

    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, ds_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=config, dist_init_required=False
    )
    for step in range(steps):
        engine.backward(loss_of(engine, batch(model, seed=rank * 100 + step, dtype=dtype)))
        if step == steps - 1:
            return measure(engine.module, ds_opt, ds_opt.optimizer)
        engine.step()
    raise AssertionError("unreachable")


def worker(rank: int, world: int, port: int, strategy: str, args: argparse.Namespace) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dtype = DTYPES[args.precision]
    start = time.perf_counter()
    if strategy == "ddp":
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        model = build_controlnet(args.scale, args.model)  # fp32 weights under autocast too
        result = run_ddp(model, rank, args.steps, dtype)
    else:
        import deepspeed

        deepspeed.init_distributed("gloo", distributed_port=port)
        config = zero_config(int(strategy[-1]), args.bucket_size, dtype)
        context = contextlib.nullcontext
        if strategy == "zero3":  # partitioned as it is built: no rank holds the whole model
            importlib.import_module("torch._dynamo")  # lazily imported, it fails inside zero.Init
            context = functools.partial(
                deepspeed.zero.Init, config_dict_or_path=config, dtype=dtype
            )
        model = build_controlnet(args.scale, args.model, dtype, context)
        result = run_zero(model, rank, config, args.steps, dtype)
    result["seconds"] = time.perf_counter() - start
    result["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.out, f"{strategy}_rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def theory(
    strategy: str, psi: int, n: int, precision: str = "fp32", adam: bool = True
) -> dict[str, float]:
    """Bytes per rank of params, grads and optimizer (fp32 master + Adam moments; moments only
    with ``adam``, i.e. after an optimizer step)."""
    moments = 8 * psi if adam else 0
    if strategy == "ddp":  # fp32 storage, also under bf16-mixed autocast
        return {"params": 4 * psi, "grads": 4 * psi, "optimizer": moments}
    width = 2 if precision == "bf16" else 4
    params = width * psi if strategy == "zero2" else width * psi / n
    return {"params": params, "grads": width * psi / n, "optimizer": (4 * psi + moments) / n}


def host_memory_needed(strategy: str, psi: int, args: argparse.Namespace) -> float:
    """Bytes all ranks together need at the peak, roughly: twice each rank's params, grads and
    optimizer state (the peak RSS measured on CPU is about that: all-gathered parameters, the
    fp32 gradient copy and Adam's temporaries of a step, allocator slack), its ZeRO buckets and
    the process itself."""
    per_rank = 2 * sum(theory(strategy, psi, args.ranks, args.precision, args.steps > 1).values())
    if strategy != "ddp":
        per_rank += 2 * args.bucket_size * (2 if args.precision == "bf16" else 4)
    return args.ranks * (per_rank + PROCESS_OVERHEAD)


def available_memory() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return math.inf


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gib(x: float) -> str:
    return f"{x / GIB:7.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", choices=sorted(UNET_CONFIGS), default="sd15", help="UNet config (shipped)"
    )
    parser.add_argument(
        "--scale", type=float, default=0.5, help="width scale of the UNet (1.0 = real)"
    )
    parser.add_argument(
        "--precision",
        choices=sorted(DTYPES),
        default="fp32",
        help="bf16: DeepSpeed bf16 (ZeRO), bf16-mixed autocast (DDP)",
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--steps",
        type=int,
        default=2,
        help="2: measure after a step and a second backward; 1: before any step (no Adam moments)",
    )
    parser.add_argument(
        "--bucket-size",
        type=int,
        default=200_000_000,
        help="ZeRO reduce/allgather bucket (elements), as conf/strategy/deepspeed_*",
    )
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--out", default="/tmp/cn_strategy_memory")
    parser.add_argument(
        "--no-memory-check", action="store_true", help="start even if RAM looks too small"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    psi = count_params(args.scale, args.model)
    seconds = {}
    for strategy in args.strategies:
        needed, available = host_memory_needed(strategy, psi, args), available_memory()
        if needed > available and not args.no_memory_check:
            print(
                f"{strategy}: needs about {needed / GIB:.1f} GiB of host memory for "
                f"{args.ranks} ranks, {available / GIB:.1f} GiB available: not started "
                "(a smaller --scale, --steps 1, or --no-memory-check)",
                file=sys.stderr,
            )
            return 2
        start = time.perf_counter()
        mp.spawn(worker, nprocs=args.ranks, args=(args.ranks, free_port(), strategy, args))
        seconds[strategy] = time.perf_counter() - start
    report(args, psi, seconds)
    return 0


def report(args: argparse.Namespace, psi: int, seconds: dict[str, float]) -> None:
    adam = args.steps > 1
    state = "after a step and a backward" if adam else "after the first backward, no Adam moments"
    print(
        f"ControlNet from the {args.model.upper()} UNet config x{args.scale}: {psi / 1e6:.1f}M "
        f"trainable params, {args.ranks} ranks, {args.precision} + AdamW, {state}; per rank, GiB "
        "(measured / theoretical)"
    )
    print(
        f"{'strategy':8} {'rank':>4} | {'params':>17} | {'grads':>17} | {'optimizer':>17} | "
        f"{'sum p+g+o':>17} | {'other':>7} | {'peak RSS':>8} | {'wall s':>6}"
    )
    for strategy in args.strategies:
        t = theory(strategy, psi, args.ranks, args.precision, adam)
        for rank in range(args.ranks):
            m = json.loads(Path(args.out, f"{strategy}_rank{rank}.json").read_text())
            cells = [f"{gib(m.get(k, 0))} /{gib(t[k])}" for k in ("params", "grads", "optimizer")]
            total = sum(m.get(k, 0) for k in ("params", "grads", "optimizer"))
            cells.append(f"{gib(total)} /{gib(sum(t.values()))}")
            print(
                f"{strategy:8} {rank:>4} | "
                + " | ".join(cells)
                + f" | {gib(m.get('other', 0))} | {gib(m['peak_rss'])}  | {seconds[strategy]:6.0f}"
            )
    print(
        "other = ZeRO flat buffers and reduce/all-gather buckets (set by --bucket-size); "
        "peak RSS = the rank process's maximum resident memory (everything, framework included); "
        "wall s = the strategy's whole run (spawn, build, steps)"
    )


if __name__ == "__main__":
    sys.exit(main())
