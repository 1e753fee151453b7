"""The fidelity series reads held-out samples: ``data.holdout_shards`` and the sample logger's
choice of its fixed set (no model, no training)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cn_lightning.callbacks.samples import MIN_HELD_OUT, SampleGridLogger
from cn_lightning.data import ShardDataModule
from cn_lightning.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    from data_helpers import make_circle_shards

    # 5 shards of 8 samples; make_circle_shards returns their brace pattern.
    return make_circle_shards(tmp_path_factory.mktemp("circles"), num_samples=40, size=32)


def _data(shards: str, **kwargs) -> ShardDataModule:
    options = dict(condition_key="outline", resolution=32, batch_size=4, num_workers=0, seed=0)
    return ShardDataModule(train_shards=shards, **{**options, **kwargs})


def _keys(dataset) -> set[str]:
    return {key for batch in dataset for key in batch["key"]}


def test_held_out_shards_are_never_trained_on(shards):
    data = _data(shards, holdout_shards=1, resampled=False, shuffle_buffer=0)
    train, val = data.train_urls(), data.val_urls()
    assert len(train) == 4 and val == [data.train_shards.replace("{000000..000004}", "000004")]
    data.check_data("train")  # finite mode: the epoch length counts the 32 training samples only
    assert data._batches_per_epoch(train, world_size=1) == 32 // 4
    seen = _keys(data.build_train_dataset(rank=0, world_size=1))
    held_out = _keys(data.build_val_dataset(rank=0, world_size=1))
    assert len(seen) == 32 and len(held_out) == 8 and not seen & held_out
    # Deterministic: another seed holds out the same shard.
    assert _data(shards, holdout_shards=1, seed=7).val_urls() == val


def test_holdout_needs_a_training_shard_and_yields_to_val_shards(shards, caplog):
    # A recipe's holdout on a one-shard smoke test: nothing held out, said once.
    tiny = _data(shards.replace("{000000..000004}", "000000"), holdout_shards=1)
    assert len(tiny.train_urls()) == 1 and tiny.val_urls() is None
    (record,) = [r for r in caplog.records if "holdout_shards" in r.getMessage()]
    assert "would leave no training shard (train_shards has 1)" in record.getMessage()
    with pytest.raises(DataError, match="holdout_shards must be an integer >= 0"):
        _data(shards, holdout_shards=-1)
    given = _data(shards, val_shards=shards, holdout_shards=2)
    assert len(given.train_urls()) == 5 and len(given.val_urls()) == 5
    assert _data(shards).val_urls() is None


def _trainer(datamodule) -> SimpleNamespace:
    return SimpleNamespace(datamodule=datamodule, is_global_zero=True, world_size=1)


def _first_batch(n: int = 4) -> dict:
    return {
        "condition": torch.rand(n, 3, 32, 32),
        "image": torch.rand(n, 3, 32, 32) * 2 - 1,
        "prompt": [f"train {i}" for i in range(n)],
    }


def test_fixed_set_is_held_out_and_warns_when_too_small(shards, caplog):
    logger = SampleGridLogger()
    fixed = logger._pick_fixed_batch(_trainer(_data(shards, holdout_shards=2)), _first_batch())
    assert fixed["held_out"] and len(fixed["prompt"]) == MIN_HELD_OUT == 16
    assert fixed["condition"].dtype == torch.uint8 and fixed["target"].shape == (16, 3, 32, 32)
    caplog.clear()
    logger._check_fixed_set(fixed)
    assert not caplog.records  # 16 held-out conditions: nothing to say
    # One held-out shard of 8 samples: one warning line.
    few = logger._pick_fixed_batch(_trainer(_data(shards, holdout_shards=1)), _first_batch())
    logger._check_fixed_set(few)
    (record,) = caplog.records
    assert "only 8 held-out conditions" in record.getMessage()
    assert "\n" not in record.getMessage()


def test_fixed_set_from_training_data_says_so(shards, caplog):
    logger = SampleGridLogger()
    fixed = logger._pick_fixed_batch(_trainer(_data(shards)), _first_batch())
    assert not fixed["held_out"] and fixed["prompt"] == [f"train {i}" for i in range(4)]
    caplog.clear()
    logger._check_fixed_set(fixed)
    (record,) = caplog.records
    assert "4 training samples, not held-out ones" in record.getMessage()
    assert "data.holdout_shards" in record.getMessage()


def test_sampling_jobs_cover_every_condition_and_seed():
    logger = SampleGridLogger(num_samples=3, seeds_per_sample=2, seed=10)
    logger.fixed_batch = {"prompt": ["a", "b", "c"]}
    jobs = logger.sampling_jobs()
    assert jobs == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)]  # condition by condition
    for name in ("num_samples", "seeds_per_sample", "grid_rows"):
        with pytest.raises(ConfigError, match=f"callbacks.samples.{name} must be >= 1"):
            SampleGridLogger(**{name: 0})
