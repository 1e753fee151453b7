"""What makes a training step and a sample grid cheap: one batched sampling call for guided and
unguided rows, kept prompt embeddings, the fused AdamW, the one-kernel finiteness check, and the
automatic data-loader worker count. Each must give the same results as the slow way."""

from __future__ import annotations

import json
import os
import struct
import sys
import textwrap
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


def _benchmark(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_step_durations_leave_out_steps_cut_by_a_pause():
    e2e = _benchmark("end_to_end")
    marks = [(1, 10.0, 0.0), (2, 10.1, 0.0), (3, 10.2, 0.0), (4, 13.3, 0.0), (5, 13.4, 0.0)]
    running = [(9.0, 10.25), (13.25, 14.0)]  # paused from 10.25 to 13.25, during step 4
    durations = e2e.step_durations(marks, running)
    assert [s for s, _ in durations] == [2, 3, 5]
    assert all(abs(d - 0.1) < 1e-9 for _, d in durations)
    assert e2e.active_seconds(10.0, 13.4, running) == pytest.approx(0.25 + 0.15)
    # Grid seconds of a cut interval are bounded by its running time; uncut ones count whole.
    clock = {"train_start": 9.5, "train_end": 13.9, "marks": [(1, 10.0, 0.3), (4, 13.3, 2.0)]}
    split = e2e.time_split(clock, {"sampling_s": 2.2}, running)
    assert split["train_s"] == pytest.approx(0.75 + 0.65)
    assert split["grids_s"] == pytest.approx(0.3 + (0.25 + 0.05) + 0.2)
    assert split["steps_s"] == pytest.approx(split["train_s"] - split["grids_s"])


def test_interleaved_runs_take_turns_and_count_only_their_own_time(tmp_path):
    """Two real processes (each with a child, as the train CLI has W&B's service) share the
    machine in turns: no mark of one falls in the other's turn, and each one's active time
    covers its own work."""
    e2e = _benchmark("end_to_end")
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            """
            import json, subprocess, sys, time
            out = sys.argv[1]
            if len(sys.argv) > 2:  # the child: a wall-clock mark every 10 ms until killed
                while True:
                    with open(out, "a") as f:
                        f.write(f"{time.time()}\\n")
                    time.sleep(0.01)
            child = subprocess.Popen([sys.executable, __file__, out + ".child", "child"])
            marks, start = [], time.process_time()
            while time.process_time() - start < 0.6:  # 0.6 s of CPU work, marked every ms
                if not marks or time.time() - marks[-1] > 0.001:
                    marks.append(time.time())
            child.kill()
            json.dump(marks, open(out, "w"))
            """
        )
    )
    launches = [
        e2e.Launch(
            name,
            [sys.executable, str(worker), str(tmp_path / name)],
            tmp_path,
            dict(os.environ),
            tmp_path / f"{name}.log",
        )
        for name in ("a", "b")
    ]
    e2e.run_interleaved(launches, slice_s=0.15)
    for launch, other in (launches, launches[::-1]):
        assert launch.process.returncode == 0
        marks = json.loads((tmp_path / launch.name).read_text())
        child = [float(x) for x in (tmp_path / f"{launch.name}.child").read_text().split()]
        slack = 0.03  # a signal's delivery
        for t in marks + child[1:]:
            assert not any(b + slack < t < e - slack for b, e in other.running), t
        assert len(launch.running) >= 3  # it did take turns
        assert launch.active_s >= 0.6
