"""The global batch and its factors: per device x devices per node x nodes x accumulation.

:class:`BatchPlan` owns this arithmetic (litgpt's ``args.py`` style): the gradient accumulation
that reaches a stated ``logical_batch_size`` on the world size the Trainer found, the global
batch a run trains with, and the one line that says how it is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cn_lightning.errors import ConfigError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's batch is made."""

    per_device_batch_size: int
    devices_per_node: int
    num_nodes: int
    accumulate_grad_batches: int

    @classmethod
    def resolve(
        cls,
        per_device_batch_size: int,
        world_size: int,
        num_nodes: int = 1,
        logical_batch_size: int | None = None,
        accumulate_grad_batches: int | None = None,
    ) -> BatchPlan:
        """The plan for ``world_size`` processes over ``num_nodes`` nodes.

        With ``logical_batch_size`` the accumulation is ``logical / (per device x world size)``
        (which must divide exactly); else it is ``accumulate_grad_batches`` (default 1). Setting
        both is refused: one of them would be silently ignored.
        """
        per_device, world = int(per_device_batch_size), int(world_size)
        explicit = int(accumulate_grad_batches or 1)
        nodes = max(int(num_nodes), 1)
        if not logical_batch_size:
            return cls(per_device, world // nodes, nodes, explicit)
        logical = int(logical_batch_size)
        if explicit != 1:
            raise ConfigError(
                f"set either logical_batch_size ({logical}) or trainer.accumulate_grad_batches "
                f"({explicit}), not both (logical_batch_size=null keeps the explicit accumulation)"
            )
        per_step = per_device * world
        if logical % per_step:
            raise ConfigError(
                f"logical_batch_size={logical} is not divisible by data.batch_size={per_device} x "
                f"{world} devices (x nodes) = {per_step}; change one of them"
            )
        return cls(per_device, world // nodes, nodes, logical // per_step)

    @property
    def world_size(self) -> int:
        return self.devices_per_node * self.num_nodes

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step, over all ranks and micro-batches."""
        return self.per_device_batch_size * self.world_size * self.accumulate_grad_batches

    def as_dict(self) -> dict[str, int]:
        """The factors and the product, as logged with the run's hyperparameters (``scale``)."""
        return {**asdict(self), "global_batch_size": self.global_batch_size}

    def describe(self, logical_batch_size: int | None = None) -> str:
        """``8 per device x 16 devices x 2 accumulation = 256 (...)``: how the batch is made."""
        aim = f" (logical_batch_size {logical_batch_size})" if logical_batch_size else ""
        return (
            f"{self.per_device_batch_size} per device x {self.world_size} devices x "
            f"{self.accumulate_grad_batches} accumulation = {self.global_batch_size}{aim} "
            f"({self.devices_per_node} devices per node x {self.num_nodes} nodes)"
        )
