"""Per-rank memory of parameters + gradients + optimizer state: DDP vs DeepSpeed ZeRO-2 / ZeRO-3.

Two CPU processes (gloo) train a ControlNet built from the shipped SD1.5 UNet config, scaled in
width by ``--scale`` (1.0 = the real 361M-parameter SD1.5 ControlNet; the default 0.5 keeps the
run within a few GB of host memory). After a first optimizer step (Adam state exists) and the
second backward (gradients exist), every tensor reachable from the engine - module parameters
(and ZeRO-3 partitions), gradients, the optimizer's state and master copies, ZeRO's flat buffers
and buckets - is counted once per storage. The measured bytes are printed next to the
theoretical ones for fp32 training with Adam (Psi trainable parameters, N ranks):

    DDP     params 4 Psi    grads 4 Psi     optimizer 8 Psi            = 16 Psi
    ZeRO-2  params 4 Psi    grads 4 Psi/N   optimizer (4 + 8) Psi/N    (fp32 master + Adam)
    ZeRO-3  params 4 Psi/N  grads 4 Psi/N   optimizer (4 + 8) Psi/N

Run: ``python benchmarks/strategy_memory.py [--scale 0.5] [--ranks 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

UNET_CONFIG = (
    Path(__file__).resolve().parents[1] / "cn_lightning/models/configs/sd15/unet/config.json"
)
STRATEGIES = ("ddp", "zero2", "zero3")


def build_controlnet(scale: float):
    """The SD1.5 ControlNet (``ControlNetModel.from_unet``) with block widths times ``scale``."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    config = json.loads(UNET_CONFIG.read_text())
    config["block_out_channels"] = [int(c * scale) // 32 * 32 for c in config["block_out_channels"]]
    unet = UNet2DConditionModel.from_config(config)
    controlnet = ControlNetModel.from_unet(unet)
    del unet
    return controlnet


def batch(controlnet, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    dim = controlnet.config.cross_attention_dim
    return {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "timestep": torch.tensor([10]),
        "encoder_hidden_states": torch.randn(1, 77, dim, generator=g),
        "controlnet_cond": torch.rand(1, 3, 64, 64, generator=g),
    }


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


def run_ddp(model, rank: int, steps: int = 2) -> dict[str, int]:
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(model, gradient_as_bucket_view=True)
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-5)
    for step in range(steps):
        opt.zero_grad(set_to_none=False)
        loss_of(ddp, batch(model, seed=rank * 100 + step)).backward()
        if step == steps - 1:
            return measure(model, opt, opt)
        opt.step()
    raise AssertionError("unreachable")


def run_zero(model, rank: int, stage: int, bucket: int, steps: int = 2) -> dict[str, int]:
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": stage,
            "contiguous_gradients": True,
            "overlap_comm": False,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
    }
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    engine, ds_opt, _, _ = deepspeed.initialize(
        model=model, optimizer=opt, config=config, dist_init_required=False
    )
    for step in range(steps):
        engine.backward(loss_of(engine, batch(model, seed=rank * 100 + step)))
        if step == steps - 1:
            return measure(engine.module, ds_opt, ds_opt.optimizer)
        engine.step()
    raise AssertionError("unreachable")


def worker(
    rank: int, world: int, port: int, strategy: str, scale: float, bucket: int, out: str
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
    )
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = build_controlnet(scale)
    if strategy == "ddp":
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        result = run_ddp(model, rank)
    else:
        import deepspeed

        deepspeed.init_distributed("gloo", distributed_port=port)
        result = run_zero(model, rank, stage=int(strategy[-1]), bucket=bucket)
    result["psi"] = sum(p.numel() for p in build_controlnet(scale).parameters()) if rank == 0 else 0
    Path(out, f"{strategy}_rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def theory(strategy: str, psi: int, n: int) -> dict[str, float]:
    if strategy == "ddp":
        return {"params": 4 * psi, "grads": 4 * psi, "optimizer": 8 * psi}
    params = 4 * psi if strategy == "zero2" else 4 * psi / n
    return {"params": params, "grads": 4 * psi / n, "optimizer": 12 * psi / n}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gib(x: float) -> str:
    return f"{x / 2**30:7.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scale", type=float, default=0.5, help="width scale of SD1.5 (1.0 = real)"
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument(
        "--bucket-size",
        type=int,
        default=200_000_000,
        help="ZeRO reduce/allgather bucket (elements), as conf/strategy/deepspeed_*",
    )
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--out", default="/tmp/cn_strategy_memory")
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for strategy in args.strategies:
        mp.spawn(
            worker,
            nprocs=args.ranks,
            args=(args.ranks, free_port(), strategy, args.scale, args.bucket_size, args.out),
        )
    report(args)


def report(args) -> None:
    psi = json.loads(Path(args.out, f"{args.strategies[0]}_rank0.json").read_text())["psi"]
    print(
        f"ControlNet from SD1.5 UNet config x{args.scale}: {psi / 1e6:.1f}M trainable params, "
        f"{args.ranks} ranks, fp32 + AdamW, per rank, GiB (measured / theoretical)"
    )
    print(
        f"{'strategy':8} {'rank':>4} | {'params':>17} | {'grads':>17} | {'optimizer':>17} | "
        f"{'sum p+g+o':>17} | {'other':>7}"
    )
    for strategy in args.strategies:
        t = theory(strategy, psi, args.ranks)
        for rank in range(args.ranks):
            m = json.loads(Path(args.out, f"{strategy}_rank{rank}.json").read_text())
            cells = [f"{gib(m.get(k, 0))} /{gib(t[k])}" for k in ("params", "grads", "optimizer")]
            total = sum(m.get(k, 0) for k in ("params", "grads", "optimizer"))
            cells.append(f"{gib(total)} /{gib(sum(t.values()))}")
            print(f"{strategy:8} {rank:>4} | " + " | ".join(cells) + f" | {gib(m.get('other', 0))}")
    print("other = ZeRO flat buffers and reduce/all-gather buckets (set by --bucket-size)")


if __name__ == "__main__":
    main()
