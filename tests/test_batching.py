"""BatchPlan: the global batch arithmetic train.py logs and records."""

import pytest

from cn_lightning.batching import BatchPlan
from cn_lightning.errors import ConfigError


def test_logical_batch_sets_accumulation_over_nodes():
    plan = BatchPlan.resolve(4, world_size=16, num_nodes=2, logical_batch_size=256)
    assert (plan.devices_per_node, plan.num_nodes, plan.accumulate_grad_batches) == (8, 2, 4)
    assert plan.global_batch_size == 256
    assert plan.as_dict() == {
        "per_device_batch_size": 4,
        "devices_per_node": 8,
        "num_nodes": 2,
        "accumulate_grad_batches": 4,
        "global_batch_size": 256,
    }
    assert plan.describe(256) == (
        "4 per device x 16 devices x 4 accumulation = 256 (logical_batch_size 256) "
        "(8 devices per node x 2 nodes)"
    )


def test_explicit_accumulation_without_logical_batch():
    plan = BatchPlan.resolve(8, world_size=1, accumulate_grad_batches=3)
    assert plan.accumulate_grad_batches == 3 and plan.global_batch_size == 24
    assert "(logical_batch_size" not in plan.describe()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logical_batch_size": 100}, "not divisible by data.batch_size=8 x 3 devices"),
        ({"logical_batch_size": 96, "accumulate_grad_batches": 2}, "not both"),
    ],
)
def test_contradictions_are_one_line_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as info:
        BatchPlan.resolve(8, world_size=3, **kwargs)
    assert "\n" not in str(info.value)
