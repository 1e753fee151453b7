"""What makes a training step and a sample grid cheap: one batched sampling call for guided and
unguided rows, kept prompt embeddings, the fused AdamW, the one-kernel finiteness check, and the
automatic data-loader worker count. Each must give the same results as the slow way."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest
import torch

from cn_lightning.data.datamodule import ShardDataModule, auto_num_workers
from cn_lightning.errors import DataError
from cn_lightning.models.module import PROMPT_CACHE_SIZE, ControlNetModule, adamw, all_finite

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def module(tiny_sd_path) -> ControlNetModule:
    torch.manual_seed(0)
    m = ControlNetModule(tiny_sd_path, sample_steps=3, guidance_scale=3.0)
    # A branch that is not zero yet, so the condition changes the samples.
    with torch.no_grad():
        for p in m.controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m.eval()


def test_one_call_with_mixed_guidance_equals_separate_calls(module):
    condition = torch.rand(2, 3, 32, 32)
    prompts = ["a red circle", "a blue circle"]
    guided = module.sample(condition, prompts, seed=[5, 6])
    unguided = module.sample(condition, ["", ""], guidance_scale=1.0, seed=[5, 6])
    both = module.sample(
        torch.cat([condition, condition]),
        [*prompts, "", ""],
        guidance_scale=[3.0, 3.0, 1.0, 1.0],
        seed=[5, 6, 5, 6],
    )
    torch.testing.assert_close(both[:2], guided, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(both[2:], unguided, atol=1e-4, rtol=1e-4)
    assert (guided - unguided).abs().max() > 1e-3  # the two sets really differ
    with pytest.raises(Exception, match="2 scales for 4 samples"):
        module.sample(torch.cat([condition, condition]), prompts * 2, guidance_scale=[1.0, 2.0])


def test_kept_prompt_embeddings_equal_fresh_ones(module):
    module._prompt_cache.clear()
    prompts = ["a red circle", "", "a blue circle", ""]
    kept = module.encode_prompt(prompts)
    assert list(module._prompt_cache) == [""]  # only the empty prompt is kept by default
    fresh = [module.encode_prompt([p], cache=False) for p in prompts]
    module._prompt_cache.clear()
    uncached = torch.cat(fresh)  # each encoded alone, "" included (cache cleared in between)
    torch.testing.assert_close(kept, uncached, atol=1e-5, rtol=1e-5)

    module.encode_prompt(["a red circle", "a green circle"], cache=True)
    assert set(module._prompt_cache) == {"a red circle", "a green circle"}
    many = [f"prompt {i}" for i in range(PROMPT_CACHE_SIZE + 5)]
    out = module.encode_prompt(many, cache=True)
    assert out.shape[0] == len(many) and len(module._prompt_cache) <= PROMPT_CACHE_SIZE


def test_fused_adamw_steps_like_the_unfused_one():
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(7, 5)), torch.nn.Parameter(torch.randn(3))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = adamw(a, lr=1e-2, weight_decay=1e-2)
    plain = adamw(b, lr=1e-2, weight_decay=1e-2, fused=False)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in a]
        for p, q, g in zip(a, b, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5)


def test_all_finite_is_exact_even_when_the_norm_overflows():
    ok = [torch.randn(10), torch.randn(3, 3)]
    assert all_finite(ok) and all_finite([])
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = torch.randn(10)
        t[4] = bad
        assert not all_finite([ok[0], t])
    huge = [torch.full((100,), 3e38)]  # finite, but its squared norm overflows
    assert not torch.isfinite(torch.nn.utils.get_total_norm(huge))
    assert all_finite(huge)


@pytest.mark.parametrize(
    ("on_gpu", "local", "cpus", "workers"),
    [
        (False, 1, 2, 0),  # the quickstart machine: the step's threads need both cores
        (False, 2, 8, 0),
        (False, 1, 16, 2),
        (True, 1, 2, 1),  # a GPU always gets a worker
        (True, 8, 96, 8),  # 8 GPUs, 12 CPUs each: capped at 8
        (True, 8, 32, 3),
    ],
)
def test_auto_num_workers(on_gpu, local, cpus, workers):
    assert auto_num_workers(on_gpu, local, cpus) == workers


def test_num_workers_setting_is_checked():
    for bad in (-1, "many", 1.5):
        with pytest.raises(DataError, match="num_workers must be 'auto' or an integer >= 0"):
            ShardDataModule(train_shards="x.tar", num_workers=bad)
    assert ShardDataModule(train_shards="x.tar", num_workers=3).num_workers == 3
    assert ShardDataModule(train_shards="x.tar").num_workers_setting == "auto"


def test_tensorboard_event_times_are_read_without_tensorboard(tmp_path):
    """The end-to-end benchmark reads diffusers' per-step wall clock from its event file."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from end_to_end import event_times
    finally:
        sys.path.remove(str(REPO / "benchmarks"))

    def record(wall: float, step: int | None, extra: bytes = b"") -> bytes:
        event = b"\x09" + struct.pack("<d", wall) + extra
        if step is not None:
            event += b"\x10" + _varint(step)
        return struct.pack("<Q", len(event)) + b"\0" * 4 + event + b"\0" * 4

    summary = b"\x2a\x05" + b"abcde"  # a length-delimited field (the summary) is skipped
    data = record(1.0, None, b"\x1a\x03v2x") + record(10.5, 1, summary) + record(10.6, 1)
    data += record(11.25, 300, summary)
    path = tmp_path / "events.out.tfevents.1"
    path.write_bytes(data)
    assert event_times(path) == {1: 10.5, 300: 11.25}


def _varint(value: int) -> bytes:
    out = b""
    while True:
        byte, value = value & 0x7F, value >> 7
        out += bytes([byte | (0x80 if value else 0)])
        if not value:
            return out
