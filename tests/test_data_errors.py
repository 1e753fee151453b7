"""Data errors are found at setup, before the first step, and reported in one line.

Each case runs the real training command (in parallel subprocesses, to stay fast) and asserts
exit status 2, exactly one ``cn_lightning: error:`` line on stderr and no traceback; the checks
themselves are also unit-tested on ``ShardDataModule.setup`` directly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from data_helpers import make_circle_shards, write_raw_tar

from cn_lightning.data import ShardDataModule, TooFewShardsError
from cn_lightning.errors import DataError

ERROR = "cn_lightning: error:"


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> SimpleNamespace:
    """Good circle shards (condition ``outline``) and every kind of bad input next to them."""
    root = tmp_path_factory.mktemp("data_errors")
    pattern = make_circle_shards(root / "circles", 16, 32, 8)  # 2 shards x 8 samples
    first = str(root / "circles" / "circles-000000.tar")
    (root / "empty").mkdir()
    (root / "not_a_tar.tar").write_bytes(b"this is not a tar archive\n" * 40)
    (root / "truncated.tar").write_bytes(Path(first).read_bytes()[:700])  # cut in sample 1
    write_raw_tar(str(root / "empty_tar.tar"), {})
    return SimpleNamespace(
        root=root,
        pattern=pattern,
        folder=str(root / "circles"),
        first=first,
        missing=str(root / "no_such_dir"),
        no_match=str(root / "circles" / "other-{000000..000003}.tar"),
        partial=str(root / "circles" / "circles-{000000..000003}.tar"),
        empty=str(root / "empty"),
        not_a_tar=str(root / "not_a_tar.tar"),
        truncated=str(root / "truncated.tar"),
        empty_tar=str(root / "empty_tar.tar"),
    )


def _dm(train, **kw) -> ShardDataModule:
    args = dict(condition_key="outline", resolution=32, batch_size=2, num_workers=0)
    args.update(kw)
    return ShardDataModule(train_shards=train, **args)


def _setup_error(train, **kw) -> str:
    with pytest.raises(DataError) as info:
        _dm(train, **kw).setup("fit")
    message = str(info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------ unit checks
def test_good_shards_pass_setup(shards):
    for spec in (
        shards.pattern,
        shards.folder,
        [shards.first],
        f"pipe:cat {shards.first}",
        os.path.join(shards.folder, "circles-*.tar"),
    ):
        _dm(spec, val_shards=shards.pattern).setup("fit")
    # An empty first tar is not an error: the next shard is read instead.
    _dm([shards.empty_tar, shards.first]).setup("fit")


def test_missing_paths_and_patterns(shards):
    message = _setup_error(shards.missing)
    assert message == f"train_shards: {shards.missing} does not exist"
    message = _setup_error(shards.no_match)
    assert "matches no shard" in message and shards.no_match in message
    message = _setup_error(os.path.join(shards.folder, "other-*.tar"))
    assert "matches no shard" in message
    message = _setup_error(shards.partial)
    assert "2 of the 4 shards" in message and "circles-000002.tar" in message
    assert "is empty" in _setup_error([])


def test_empty_folder(shards):
    message = _setup_error(shards.empty)
    assert shards.empty in message and "holds no shards" in message


def test_unreadable_first_shard(shards):
    for path, reason in ((shards.not_a_tar, "ReadError"), (shards.truncated, "ReadError")):
        message = _setup_error(path)
        assert f"cannot read the first shard {path}: {reason}" in message
    message = _setup_error(shards.empty_tar)
    assert "holds no samples" in message


def test_pipe_urls_are_only_read(shards):
    message = _setup_error(f"pipe:cat {shards.missing}.tar")
    assert "cannot read the first shard pipe:cat" in message
    assert "exited with status 1" in message
    message = _setup_error(f"pipe:cat {shards.first}", condition_key="depth")
    assert "condition keys it has: outline" in message


def test_condition_key_the_first_shard_lacks(shards):
    message = _setup_error(shards.pattern, condition_key="depth")
    assert message.startswith("condition_key 'depth': the first shard ")
    assert shards.first in message and "depth.png" in message
    assert "the condition keys it has: outline" in message


def test_cached_latents_the_first_shard_lacks(shards):
    message = _setup_error(shards.pattern, use_cached_latents=True)
    assert "use_cached_latents" in message and "latent.npy" in message


def test_val_shards_get_the_same_checks(shards):
    message = _setup_error(shards.pattern, val_shards=shards.missing)
    assert message == f"val_shards: {shards.missing} does not exist"
    with pytest.raises(DataError, match="val_shards: cannot read the first shard"):
        _dm(shards.pattern, val_shards=shards.not_a_tar).setup("validate")


def test_finite_mode_settings_are_checked_at_setup(shards):
    dm = _dm(f"pipe:cat {shards.first}", resampled=False)
    with pytest.raises(DataError, match="needs samples_per_epoch"):
        dm.setup("fit")
    dm = _dm(shards.pattern, resampled=False, num_workers=2)
    dm.trainer = SimpleNamespace(global_rank=0, world_size=2)
    with pytest.raises(TooFewShardsError) as info:  # still the stream's error type
        dm.setup("fit")
    assert isinstance(info.value, DataError)


def test_constructor_values_are_data_errors():
    with pytest.raises(DataError, match="crop must be"):
        ShardDataModule(train_shards="x", crop="diagonal")
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        ShardDataModule(train_shards="x", batch_size=0)
    with pytest.raises(ValueError):  # DataError is still a ValueError
        ShardDataModule(train_shards="x", use_cached_latents=True, random_flip=True)


def _rank_setup(rank: int, init_file: str, specs: list[str], out: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    dm = _dm(specs[rank])
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
    try:
        dm.setup("fit")
        result = "ok"
    except DataError as err:
        result = f"DataError: {err}"
    except SystemExit as err:
        result = f"SystemExit: {err.code}"
    finally:
        torch.distributed.destroy_process_group()
    Path(out, f"rank{rank}.txt").write_text(result)


def test_ranks_stop_together_and_rank_zero_reports(shards, tmp_path):
    """Only rank 1 sees a missing path: both ranks stop at setup, rank 0 names rank 1's error
    and rank 1 exits quietly (one line on the console, no rank left waiting)."""
    specs = [shards.pattern, shards.missing]
    torch.multiprocessing.start_processes(  # fork: no second import of the test module
        _rank_setup,
        args=(str(tmp_path / "init"), specs, str(tmp_path)),
        nprocs=2,
        start_method="fork",
    )
    assert (tmp_path / "rank0.txt").read_text() == (
        f"DataError: rank 1: train_shards: {shards.missing} does not exist"
    )
    assert (tmp_path / "rank1.txt").read_text() == "SystemExit: 2"


# --------------------------------------------------------------------- the training command
def _cli_cases(s: SimpleNamespace) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (overrides, words the error line must contain)."""
    return {
        "missing_path": (
            [f"data.train_shards={s.missing}"],
            [f"train_shards: {s.missing} does not exist"],
        ),
        "no_match": ([f"data.train_shards='{s.no_match}'"], ["matches no shard", s.no_match]),
        "empty_folder": ([f"data.train_shards={s.empty}"], [s.empty, "holds no shards"]),
        "condition_key": (
            [f"data.train_shards={s.folder}", "data.condition_key=depth"],
            ["condition_key 'depth'", s.first, "depth.png", "the condition keys it has: outline"],
        ),
        "not_a_tar": (
            [f"data.train_shards={s.not_a_tar}"],
            [f"cannot read the first shard {s.not_a_tar}", "ReadError"],
        ),
    }


@pytest.fixture(scope="module")
def cli_results(shards) -> dict[str, subprocess.CompletedProcess]:
    """Every case's training command, run in parallel (each is mostly import time). The
    val_shards checks are the same code and the same path to the command line; they are
    unit-tested above."""
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        CN_LIGHTNING_CACHE=str(shards.root / "cache"),
    )
    env.pop("WANDB_API_KEY", None)
    procs = {}
    for name, (overrides, _) in _cli_cases(shards).items():
        run_dir = shards.root / "runs" / name
        cmd = [
            sys.executable,
            "-m",
            "cn_lightning.train",
            f"hydra.run.dir={run_dir}",
            "data=shards",
            "data.resolution=32",
            "data.num_workers=0",
            "logger=csv",
            "callbacks=minimal",
            "trainer.accelerator=cpu",
            *overrides,
        ]
        procs[name] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=shards.root, env=env
        )
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


@pytest.mark.parametrize(
    "case", ["missing_path", "no_match", "empty_folder", "condition_key", "not_a_tar"]
)
def test_training_command_reports_one_line(cli_results, shards, case):
    result = cli_results[case]
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith(ERROR)]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    for words in _cli_cases(shards)[case][1]:
        assert words in lines[0], lines[0]
    assert "training starts at step" not in result.stdout  # stopped before the first step
