"""Metrics: condition fidelity (does a sample follow its condition?) and image quality."""

from cn_lightning.metrics.fidelity import (
    ConditionFidelity,
    condition_fidelity,
    fidelity_metric_for,
)

__all__ = ["ConditionFidelity", "condition_fidelity", "fidelity_metric_for"]
