"""Sample grids, fidelity, convergence and throughput callbacks in real tiny training runs."""

from __future__ import annotations

import csv
import io
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from cn_lightning.callbacks.convergence import SuddenConvergenceDetector
from cn_lightning.callbacks.samples import SampleGridLogger, make_grid, sampling_schedule
from cn_lightning.callbacks.throughput import StepProgressBar, ThroughputLogger, make_progress_bar
from cn_lightning.data import ShardDataModule
from cn_lightning.loggers import make_wandb_logger, offline_wandb_dirs
from cn_lightning.models.module import ControlNetModule


@pytest.fixture(scope="module")
def circle_shards(tmp_path_factory) -> str:
    from data_helpers import make_circle_shards

    return make_circle_shards(tmp_path_factory.mktemp("circles"), num_samples=16, size=32)


def _datamodule(shards: str) -> ShardDataModule:
    return ShardDataModule(
        train_shards=shards,
        condition_key="outline",
        resolution=32,
        batch_size=2,
        num_workers=0,
        shuffle_buffer=4,
        resampled=True,
        seed=0,
    )


def _trainer(root: Path, callbacks: list, loggers: list, max_steps: int) -> L.Trainer:
    return L.Trainer(
        default_root_dir=root,
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        log_every_n_steps=1,
        callbacks=callbacks,
        logger=loggers,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )


def test_schedule_is_log_spaced_then_every_n():
    steps = [s for s in range(1, 101) if sampling_schedule(s, 25)]
    assert steps == [1, 2, 4, 8, 16, 25, 50, 75, 100]
    assert [s for s in range(1, 101) if sampling_schedule(s, 25, log_spaced=False)] == [
        25,
        50,
        75,
        100,
    ]
    assert not any(sampling_schedule(s, 0) for s in range(1, 100))


def test_small_tiles_are_enlarged_pixel_for_pixel():
    tiles = [[torch.rand(3, 32, 32), torch.rand(3, 32, 32)]]
    plain = make_grid(tiles)
    big = make_grid(tiles, min_tile_px=100)  # 100 / 32 -> factor 4
    assert plain.shape == (32, 64, 3) and big.shape == (128, 256, 3)
    assert (big[::4, ::4] == plain).all() and (big[3::4, 3::4] == plain).all()
    assert make_grid([[torch.rand(3, 256, 256)]], min_tile_px=128).shape == (256, 256, 3)


def test_tiny_run_logs_grids_fidelity_and_throughput(tiny_sd_path, circle_shards, tmp_path):
    torch.manual_seed(0)
    module = ControlNetModule(tiny_sd_path, sample_steps=2, guidance_scale=3.0, learning_rate=1e-3)
    samples = SampleGridLogger(every_n_steps=4, num_samples=2)
    detector = SuddenConvergenceDetector()
    # FLOPs counted on CPU too.
    throughput = ThroughputLogger(window=4, peak_tflops=1.0, summary_path=tmp_path / "perf.json")
    wandb_logger = make_wandb_logger(save_dir=str(tmp_path), name="callbacks-test", mode="offline")
    csv_logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = _trainer(
        tmp_path,
        [samples, detector, throughput, StepProgressBar()],
        [wandb_logger, csv_logger],
        max_steps=5,
    )
    trainer.fit(module, datamodule=_datamodule(circle_shards))
    wandb_logger.experiment.finish()

    # Baseline before training, log-spaced 1, 2, 4 (4 is also every_n), and the end.
    expected = [0, 1, 2, 4, 5]
    assert [h["step"] for h in samples.history] == expected
    pngs = sorted(p.name for p in (tmp_path / "samples").glob("*.png"))
    assert pngs == [f"step_{s:07d}.png" for s in expected]
    from PIL import Image

    grid = Image.open(tmp_path / "samples" / pngs[0])
    assert grid.size == (4 * 32, 2 * 32)  # condition | sample | no prompt | target, 2 rows
    (run,) = offline_wandb_dirs(tmp_path)
    media = list((run / "files" / "media" / "images" / "samples").glob("grid_*.png"))
    assert len(media) == len(expected)

    rows = list(csv.DictReader(open(tmp_path / "csv" / "metrics.csv")))
    fid_steps = [int(r["step"]) for r in rows if r.get("val/fidelity")]
    assert fid_steps == expected
    for r in rows:
        if r.get("val/fidelity"):
            assert 0.0 <= float(r["val/fidelity"]) <= 1.0
            assert float(r["val/circle_iou"]) == float(r["val/fidelity"])
            assert r["val/fidelity_no_prompt"] and float(r["samples/time_s"]) > 0
            assert float(r["val/fidelity_se"]) >= 0  # from 2 conditions x 2 seeds
    assert all(h["fidelity_n"] == 4 for h in samples.history)
    perf = [r for r in rows if r.get("perf/samples_per_s")]
    assert perf and all(float(r["perf/samples_per_s"]) > 0 for r in perf)
    last = perf[-1]
    assert float(last["perf/peak_memory_gb"]) > 0.1  # RSS of a process holding torch
    assert 0 <= float(last["perf/data_wait_share"]) < 1
    assert throughput.flops_per_sample and throughput.flops_per_sample > 1e6
    assert 0 < float(last["perf/mfu"]) < 1
    assert [int(r["step"]) for r in perf] == [1, 2, 3, 4, 5]  # log_every_n_steps=1

    summary = json.loads((tmp_path / "perf.json").read_text())
    assert summary["steps"] == 5 and summary["train_s"] > summary["sampling_s"] > 0
    assert summary["sampling_share"] == pytest.approx(
        summary["sampling_s"] / summary["train_s"], rel=0.01
    )
    assert [s for s, _ in summary["step_s_windows"]] == [1, 2, 3, 4, 5]
    assert summary["step_s"] > 0 and 0 <= summary["data_wait_share"] < 1

    report = json.loads((tmp_path / "convergence.json").read_text())
    assert [p["step"] for p in report["series"]] == expected
    assert report["metric"] == "fidelity" and "sudden_convergence_step" in report
    assert report["thresholds"]["persistence"] == 3


def test_no_extractor_means_no_fidelity_and_the_detector_off(
    tiny_sd_path, circle_shards, tmp_path, monkeypatch, capsys
):
    import cn_lightning.callbacks.samples as samples_module

    # resolve_fidelity returns None (after its own warning) when no extractor can be built.
    monkeypatch.setattr(samples_module, "resolve_fidelity", lambda key, options: None)
    module = ControlNetModule(tiny_sd_path, sample_steps=2)
    samples = SampleGridLogger(every_n_steps=2, num_samples=2, log_spaced=False)
    csv_logger = CSVLogger(tmp_path, name="csv", version="")
    trainer = _trainer(tmp_path, [samples, SuddenConvergenceDetector()], [csv_logger], 4)
    trainer.fit(module, datamodule=_datamodule(circle_shards))
    assert [h["step"] for h in samples.history] == [0, 2, 4]
    assert not any(k.startswith("fidelity") for h in samples.history for k in h)
    assert len(list((tmp_path / "samples").glob("*.png"))) == 3  # the grids go on
    assert "val/fidelity" not in (tmp_path / "csv" / "metrics.csv").read_text()
    report = json.loads((tmp_path / "convergence.json").read_text())
    assert report["sudden_convergence_step"] is None
    assert "no condition extractor" in report["detector_off"]
    out = capsys.readouterr()
    assert "sudden convergence" not in out.out + out.err
    assert "fidelity is measured on" not in out.out + out.err  # no warning about the set either


def test_sample_logger_state_survives_a_resume(tiny_sd_path, circle_shards, tmp_path):
    """The fixed set and the series (with its standard errors) travel in the checkpoint: the
    resumed run samples the same conditions and goes on with the same history."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def fit(max_steps: int, ckpt_path=None) -> SampleGridLogger:
        samples = SampleGridLogger(every_n_steps=2, num_samples=2, log_spaced=False)
        checkpoints = ModelCheckpoint(
            dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1
        )
        trainer = L.Trainer(
            default_root_dir=tmp_path,
            accelerator="cpu",
            max_steps=max_steps,
            callbacks=[samples, SuddenConvergenceDetector(), checkpoints],
            logger=False,
            enable_model_summary=False,
            enable_progress_bar=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
        )
        module = ControlNetModule(tiny_sd_path, sample_steps=2)
        trainer.fit(module, datamodule=_datamodule(circle_shards), ckpt_path=ckpt_path)
        return samples

    first = fit(2)
    resumed = fit(4, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    assert [h["step"] for h in resumed.history] == [0, 2, 4]
    assert resumed.history[:2] == first.history
    assert resumed.history[2]["fidelity_se"] is not None
    assert resumed.fixed_batch["prompt"] == first.fixed_batch["prompt"]
    assert torch.equal(resumed.fixed_batch["condition"], first.fixed_batch["condition"])


def test_detector_in_a_run_finds_the_jump_and_stops_training(
    tiny_sd_path, circle_shards, tmp_path, capsys
):
    module = ControlNetModule(tiny_sd_path, sample_steps=2)
    # A series with a jump at step 3 (as if sampled earlier in this run); no new sampling.
    samples = SampleGridLogger(every_n_steps=0, at_start=False, at_end=False)
    values = [0.10, 0.11, 0.10, 0.80, 0.82, 0.81]
    samples.history = [{"step": s, "fidelity": v} for s, v in enumerate(values)]
    detector = SuddenConvergenceDetector(stop_after_steps=2)
    wandb_logger = make_wandb_logger(save_dir=str(tmp_path), name="detector-test", mode="offline")
    trainer = _trainer(tmp_path, [samples, detector], [wandb_logger], max_steps=20)
    trainer.fit(module, datamodule=_datamodule(circle_shards))
    assert detector.detected_step == 3
    assert wandb_logger.experiment.summary["sudden_convergence_step"] == 3
    wandb_logger.experiment.finish()
    assert trainer.global_step == 5  # stopped 2 steps after the detected step, not at 20
    report = json.loads((tmp_path / "convergence.json").read_text())
    assert report["sudden_convergence_step"] == 3
    assert [p["fidelity"] for p in report["series"]] == values
    assert "sudden convergence at step 3" in capsys.readouterr().out + _log_text(tmp_path)


def test_progress_bar_follows_the_trainer_setting():
    assert isinstance(make_progress_bar(True), StepProgressBar)
    disabled = make_progress_bar(False)
    assert not isinstance(disabled, StepProgressBar)
    L.Trainer(callbacks=[disabled], enable_progress_bar=False, logger=False)  # no refusal
    bar = StepProgressBar()
    assert bar.eta_seconds(10, 100) is None  # not started


def _rendered(out: io.StringIO) -> str:
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # without cursor moves, colours


def test_progress_bar_counts_optimizer_steps_under_accumulation(
    tiny_sd_path, circle_shards, tmp_path
):
    """Live on a (forced) terminal: ``step N/max_steps`` counts optimizer steps, not the batches
    of the accumulation window (the old bar showed 8/4), and never passes ``max_steps``."""
    out = io.StringIO()
    bar = StepProgressBar(
        refresh_per_second=1000, console_kwargs={"file": out, "force_terminal": True, "width": 200}
    )
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        max_steps=3,
        accumulate_grad_batches=2,
        callbacks=[bar],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(
        ControlNetModule(tiny_sd_path, sample_steps=2), datamodule=_datamodule(circle_shards)
    )
    assert trainer.global_step == 3 and trainer.fit_loop.total_batch_idx == 5  # 6 batches
    text = _rendered(out)
    shown = [(int(a), int(b)) for a, b in re.findall(r"step (\d+)/(\d+)", text)]
    steps = [a for a, _ in shown]
    assert {b for _, b in shown} == {3} and steps == sorted(steps) and set(steps) == {0, 1, 2, 3}
    final = text.rsplit("step 3/3", 1)[1].splitlines()[0]
    assert "100%" in final and "ETA 0:00:00" in final and "loss " in final
    assert float(re.search(r"([\d.]+) samples/s", final).group(1)) > 0
    assert "Epoch" not in text


def test_progress_bar_eta_uses_the_rate_since_this_process_started():
    bar = StepProgressBar()
    assert bar.eta_seconds(10, 100) is None  # not started
    bar._start = (1000.0, 500)  # (clock, step) when training started here: resumed at 500
    assert bar.eta_seconds(500, 1500, now=1010.0) is None  # no step done yet in this process
    # 100 steps in 100 s in this process: 900 left take 900 s (not 1500 s, as counting from 0).
    assert bar.eta_seconds(600, 1500, now=1100.0) == pytest.approx(900.0)


def test_progress_bar_on_an_endless_stream_shows_steps_without_a_total():
    bar = StepProgressBar()
    bar.disable()
    trainer = SimpleNamespace(
        global_step=7,
        max_steps=-1,
        world_size=1,
        estimated_stepping_batches=float("inf"),
        progress_bar_metrics={"train/loss": 0.25},
    )
    bar.on_train_start(trainer, None)
    bar._read(trainer, 0.0)
    fields = bar.status()
    assert fields["step"] == "step 7" and fields["loss"] == "loss 0.25"
    assert "eta" not in fields and "percent" not in fields


def _log_text(root: Path) -> str:
    return "".join(p.read_text() for p in root.rglob("*.log"))


def test_sample_grid_without_usable_val_samples_names_the_cause(tmp_path):
    # Validation shards whose cached latents are unusable: every sample is skipped, and the
    # error says why (bad_latent, with the first case) instead of "no samples".
    import numpy as np
    from data_helpers import mirror_sample, write_shards

    from cn_lightning.callbacks.samples import _first_val_samples
    from cn_lightning.data.format import encode_npy
    from cn_lightning.errors import DataError

    def sample(i: int, latent: np.ndarray | None) -> dict:
        s = mirror_sample(f"k{i}", (32, 32), i, "outline")
        return s if latent is None else {**s, "latent.npy": encode_npy(latent)}

    flat = write_shards(
        tmp_path / "flat", [[sample(i, np.zeros((4, 4), np.float16)) for i in range(3)]]
    )
    missing = write_shards(tmp_path / "missing", [[sample(i, None) for i in range(3)]])
    for shards, cause in ((flat, "got shape (4, 4)"), (missing, "no <key>.latent.npy")):
        dm = ShardDataModule(
            train_shards=shards[0],
            val_shards=shards[0],
            condition_key="outline",
            resolution=32,
            batch_size=2,
            num_workers=0,
            use_cached_latents=True,
        )
        with pytest.raises(DataError) as info:
            _first_val_samples(dm, 4)
        message = str(info.value)
        assert message.startswith(
            "val_shards: no sample for the sample grid: every sample read was skipped"
        )
        assert "3 skipped: bad_latent x3" in message and cause in message and "k0" in message


def _bare_trainer(callbacks: list, log_every_n_steps: int):
    """What the ThroughputLogger reads of a one-rank Trainer, for driving its hooks by hand."""
    return SimpleNamespace(
        callbacks=callbacks,
        global_step=0,
        world_size=1,
        log_every_n_steps=log_every_n_steps,
        is_global_zero=True,
        loggers=[],
        callback_metrics={},
    )


@pytest.mark.parametrize("grid_in", ["batch_end", "between_batches"])
def test_throughput_leaves_sample_grids_out_of_compute_and_wait(grid_in):
    """A grid drawn in a batch's end hooks, or between two batches, is not training time."""
    samples = SampleGridLogger(every_n_steps=4, num_samples=2)
    trainer = _bare_trainer(callbacks=[samples], log_every_n_steps=1)
    module = SimpleNamespace(device=torch.device("cpu"))
    throughput = ThroughputLogger(window=4, count_flops=False)
    batch = {"prompt": ["a", "b"]}

    def draw_grid(seconds: float = 0.3) -> None:
        time.sleep(seconds)
        samples.total_sampling_s += seconds

    for _ in range(3):
        throughput.on_train_batch_start(trainer, module, batch, 0)
        time.sleep(0.05)  # the training step
        trainer.global_step += 1
        if grid_in == "batch_end":
            draw_grid()
        throughput.on_train_batch_end(trainer, module, None, batch, 0)
        if grid_in == "between_batches":
            draw_grid()
    logged = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert 0.04 < logged["perf/compute_s"] < 0.15
    assert logged["perf/data_wait_s"] < 0.1
    assert 1 / logged["perf/steps_per_s"] < 0.2


def test_throughput_summary_of_a_run_shorter_than_one_logging_interval(tmp_path):
    """Four steps with log_every_n_steps=10: no window was logged, the summary still has one."""
    trainer = _bare_trainer(callbacks=[], log_every_n_steps=10)
    module = SimpleNamespace(device=torch.device("cpu"))
    throughput = ThroughputLogger(window=20, count_flops=False, summary_path=tmp_path / "p.json")
    throughput.on_train_start(trainer, module)
    for _ in range(4):
        throughput.on_train_batch_start(trainer, module, {"prompt": ["a"]}, 0)
        time.sleep(0.02)
        trainer.global_step += 1
        throughput.on_train_batch_end(trainer, module, None, {"prompt": ["a"]}, 0)
    assert not throughput.windows and "perf/steps_per_s" not in trainer.callback_metrics
    throughput.on_train_end(trainer, module)
    summary = json.loads((tmp_path / "p.json").read_text())
    assert summary["steps"] == 4 and 0.015 < summary["step_s"] < 0.2
    assert summary["step_s_windows"][0][0] == 4 and summary["sampling_s"] == 0
