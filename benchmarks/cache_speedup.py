"""Step time with cached latents + text embeddings against encoding both on the fly.

One ``ControlNetModule`` built from the shipped configs (``cn_lightning/models/configs/<model>``)
with random weights runs the real training step, ``compute_loss`` (its generator, prompt drop,
noise, timesteps, UNet + ControlNet) + ``backward`` + the module's own optimizer (fused AdamW,
``configure_optimizers``), with the UNet, branch and VAE in channels-last as ``configure_model``
sets them when fit starts, on two kinds of batch of the same images and prompts:

* ``on the fly``: ``image`` + ``prompt``, as without caches: the VAE encodes the image and the
  text encoder(s) the prompt at every step (prompts differ from step to step, as in training;
  only the empty prompt is kept);
* ``cached``: ``latent`` + ``text_embeds`` (+ SDXL's ``pooled_text_embeds``), as the
  DataModule gives them with ``use_cached_latents`` and ``use_cached_text``, with the text
  cache's empty-prompt embedding attached (``check_caches``).

The two alternate in blocks of ``--steps`` steps for ``--rounds`` rounds after one warm-up step
each, so that the machine's drift (this project's 2-core VM runs the same loop 30% faster or
slower from one minute to the next, and other jobs share it) slows both alike. Reported: the
median over rounds of each round's ratio (its two blocks ran in the same minute), the median
step times and every step's time. Each round also times the work the caches remove
(``encode_image`` + ``encode_text`` of its batches) alone.

The data side is not timed: the DataModule reads a few kB of ``.npy`` per sample in its
workers either way.

    python benchmarks/cache_speedup.py --model sd15 --size 256 --batch 2
    python benchmarks/cache_speedup.py --model sdxl --size 512 --batch 1 --dtype bf16 \\
        --no-optimizer --gradient-checkpointing

``--dtype bf16`` builds every weight in bfloat16, the trainable branch too (as DeepSpeed's bf16
engine runs forward and backward), so that SDXL fits a 23 GB CPU machine; ``--no-optimizer``
leaves out the optimizer step (its states are another 2x the branch's size).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import cn_lightning.models.module as module_mod  # noqa: E402
from cn_lightning.data.format import TextCache  # noqa: E402
from cn_lightning.models.backbone import Backbone  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "cn_lightning" / "models" / "configs"


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def random_backbone(name: str, dtype: torch.dtype) -> Backbone:
    """The model ``name``'s architecture from the shipped configs, random weights in ``dtype``
    (built in it: no float32 copy of SDXL's 2.6 B UNet parameters on the way)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from cn_lightning.models.single_file import load_clip_tokenizer

    folder = CONFIGS / name
    torch.manual_seed(0)
    with default_dtype(dtype):
        parts = {
            "unet": UNet2DConditionModel.from_config(
                UNet2DConditionModel.load_config(str(folder / "unet"))
            ),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae"))),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder")),
            "tokenizer": load_clip_tokenizer(folder / "tokenizer"),
            "noise_scheduler": DDPMScheduler.from_pretrained(folder / "scheduler"),
        }
        if (folder / "text_encoder_2").is_dir():
            config = CLIPTextConfig.from_pretrained(folder / "text_encoder_2")
            parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
            parts["tokenizer_2"] = load_clip_tokenizer(folder / "tokenizer_2")
    return Backbone(**parts)


def build_module(args, meta: bool = False) -> module_mod.ControlNetModule:
    """The module with random weights (``meta``: shapes only, on the meta device)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with torch.device("meta") if meta else contextlib.nullcontext():
        backbone = random_backbone(args.model, dtype)
    patched = {"load_backbone": lambda *a, **k: backbone}  # the random weights, not a folder
    if meta:  # no values to hash
        patched.update(text_fingerprint=lambda *a: "meta", vae_fingerprint=lambda *a: "meta")
    real = {name: getattr(module_mod, name) for name in patched}
    for name, value in patched.items():
        setattr(module_mod, name, value)
    try:
        with default_dtype(dtype), torch.device("meta") if meta else contextlib.nullcontext():
            module = module_mod.ControlNetModule(
                str(CONFIGS / args.model),
                frozen_dtype=args.dtype,
                gradient_checkpointing=args.gradient_checkpointing,
                learning_rate=1e-5,
            )
    finally:
        for name, value in real.items():
            setattr(module_mod, name, value)
    return module.to("meta") if meta else module


def count_flops(args) -> None:
    """FLOPs (torch.utils.flop_counter) of one step of each kind and of the encoders alone,
    on the meta device: no memory, no time, any size."""
    from torch.utils.flop_counter import FlopCounterMode

    module = build_module(args, meta=True)
    module.train()
    b, size, f = args.batch, args.size, module.vae_scale_factor
    prompts = [f"a photo of a red circle on a blue background, {j}" for j in range(b)]
    condition = torch.rand(b, 3, size, size, device="meta")
    fly = {"image": torch.rand(b, 3, size, size, device="meta"), "condition": condition}
    fly["prompt"] = prompts
    hidden, pooled = module.encode_text(prompts)
    module._prompt_cache.clear()
    module._cached_empty = (hidden[0].float(), None if pooled is None else pooled[0].float())
    latent = torch.rand(b, module.vae.config.latent_channels, size // f, size // f, device="meta")
    cached = {"latent": latent, "condition": condition, "prompt": prompts, "text_embeds": hidden}
    if pooled is not None:
        cached["pooled_text_embeds"] = pooled.float()

    def flops(fn) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / 1e12

    def step(batch: dict) -> None:
        module.compute_loss(batch, generator=None).backward()

    def encoders() -> None:
        module.encode_image(fly["image"])
        module._prompt_cache.clear()
        module.encode_text(prompts)

    fly_t, cached_t, enc_t = flops(lambda: step(fly)), flops(lambda: step(cached)), flops(encoders)
    print(
        f"[cache_speedup] counted TFLOP per step, {args.model} at {size} px, batch {b} "
        f"(forward + backward; the optimizer's elementwise work not counted): on the fly "
        f"{fly_t:.2f}, cached {cached_t:.2f}, encoders alone {enc_t:.2f}; cached/on the fly = "
        f"{cached_t / fly_t:.3f}"
    )


def make_batches(module, n: int, batch: int, size: int) -> tuple[list[dict], list[dict]]:
    """``n`` on-the-fly batches and their cached twins (latents and embeddings of the same
    images and prompts, stored as float16 like the cache)."""
    g = torch.Generator().manual_seed(0)
    fly, cached = [], []
    for i in range(n):
        image = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
        condition = torch.rand(batch, 3, size, size, generator=g)
        prompts = [f"a photo of a red circle on a blue background, {i}-{j}" for j in range(batch)]
        with torch.no_grad():
            posterior = module.vae.encode(image.to(next(module.vae.parameters()).dtype))
            latent = posterior.latent_dist.mean.float()
            hidden, pooled = module.encode_text(prompts)
        fly.append({"image": image, "condition": condition, "prompt": prompts})
        twin = {
            "latent": latent.half().float(),
            "condition": condition,
            "prompt": prompts,
            "text_embeds": hidden.float().half().float(),
        }
        if pooled is not None:
            twin["pooled_text_embeds"] = pooled.float().half().float()
        cached.append(twin)
    module._prompt_cache.clear()
    return fly, cached


def attach_text_cache(module) -> None:
    hidden, pooled = module.encode_text([""])
    module.check_caches(
        [
            TextCache(
                path="(in memory)",
                fingerprint=module.text_fingerprint,
                kind="sdxl" if module.is_sdxl else "sd",
                model="(random)",
                empty_hidden=hidden[0].float().numpy(),
                empty_pooled=None if pooled is None else pooled[0].float().numpy(),
            )
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd15", help="configs folder: sd15, sd21, sdxl")
    parser.add_argument("--size", type=int, default=256, help="image size in pixels")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="steps per block")
    parser.add_argument("--rounds", type=int, default=3, help="blocks of each mode")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--no-optimizer", action="store_true", help="forward + backward only")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: torch's, one per core); 1 is steadier on a shared machine",
    )
    parser.add_argument(
        "--count-flops", action="store_true", help="count FLOPs on the meta device, time nothing"
    )
    args = parser.parse_args(argv)
    if args.count_flops:
        count_flops(args)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    module = build_module(args)
    module.train()
    # What ControlNetModule.configure_model does when fit starts (memory_format: auto, no
    # DeepSpeed): NHWC weights for the UNet, the branch and the VAE.
    for part in (module.unet, module.controlnet, module.vae):
        part.to(memory_format=torch.channels_last)
    attach_text_cache(module)
    optimizer = None if args.no_optimizer else module.configure_optimizers()
    if isinstance(optimizer, dict):
        optimizer = optimizer["optimizer"]
    params = [p for p in module.parameters() if p.requires_grad]
    fly, cached = make_batches(module, args.steps, args.batch, args.size)
    print(
        f"[cache_speedup] {args.model} at {args.size} px, batch {args.batch}, {args.dtype}, "
        f"{'fwd+bwd' if optimizer is None else 'fwd+bwd+' + type(optimizer).__name__}, "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
        f"{torch.get_num_threads()} threads; trainable "
        f"{sum(p.numel() for p in params) / 1e6:.0f} M parameters; built in "
        f"{time.perf_counter() - start:.0f} s",
        flush=True,
    )

    def step(batch: dict, seed: int) -> None:
        loss = module.compute_loss(batch, generator=torch.Generator().manual_seed(seed))
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            for p in params:
                p.grad = None

    def block(batches: list[dict]) -> list[float]:
        times = []
        for i, batch in enumerate(batches):
            t = time.perf_counter()
            step(batch, i)
            times.append(time.perf_counter() - t)
        return times

    def encoders(batches: list[dict]) -> list[float]:
        """The work the caches remove, on its own: VAE encode + prompt encode."""
        times = []
        for batch in batches:
            t = time.perf_counter()
            module.encode_image(batch["image"], generator=torch.Generator().manual_seed(0))
            module.encode_text(batch["prompt"])
            times.append(time.perf_counter() - t)
        return times

    block(fly[:1]), block(cached[:1])  # warm-up (oneDNN primitives, allocator)
    results: dict[str, list[float]] = {"on the fly": [], "cached": [], "encoders": []}
    ratios = []  # cached / on the fly, per round: both blocks ran in the same minute
    for r in range(args.rounds):
        order = [("on the fly", fly), ("cached", cached)]
        means = {}
        for name, batches in order if r % 2 == 0 else order[::-1]:
            times = block(batches)
            results[name] += times
            means[name] = statistics.fmean(times)
            gc.collect()
        results["encoders"] += encoders(fly)
        ratios.append(means["cached"] / means["on the fly"])
        print(
            f"  round {r + 1}/{args.rounds}: "
            + ", ".join(f"{k} {statistics.fmean(v[-len(fly) :]):.2f} s" for k, v in results.items())
            + f"; cached/on the fly {ratios[-1]:.3f}",
            flush=True,
        )
    fly_s, cached_s = statistics.median(results["on the fly"]), statistics.median(results["cached"])
    enc_s = statistics.median(results["encoders"])
    print(
        f"[cache_speedup] cached/on the fly: median of the rounds' ratios "
        f"{statistics.median(ratios):.3f} (x{1 / statistics.median(ratios):.2f} faster); median "
        f"s/step: on the fly {fly_s:.3f}, cached {cached_s:.3f}, encoders alone {enc_s:.3f} "
        f"({enc_s / fly_s:.1%} of an on-the-fly step)"
    )
    for name, times in results.items():
        print(f"  {name}: " + " ".join(f"{t:.2f}" for t in times))


if __name__ == "__main__":
    main()
