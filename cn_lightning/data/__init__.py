"""WebDataset shards → ControlNet batches. See docs/data.md for the shard format.

Names are imported lazily so that data_prep tools can use the shard helpers without
importing Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ShardDataModule": "cn_lightning.data.datamodule",
    "SkippedSamplesLogger": "cn_lightning.data.datamodule",
    "EpochDataLoader": "cn_lightning.data.datamodule",
    "ShardStream": "cn_lightning.data.stream",
    "StreamConfig": "cn_lightning.data.stream",
    "TooFewShardsError": "cn_lightning.data.stream",
    "SKIP_REASONS": "cn_lightning.data.stream",
    "expand_shard_urls": "cn_lightning.data.format",
    "read_manifest": "cn_lightning.data.format",
    "FORMAT_VERSION": "cn_lightning.data.format",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cn_lightning.data' has no attribute {name!r}")
