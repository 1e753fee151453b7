"""Strategy factories the configs under ``conf/strategy/`` point at."""

from __future__ import annotations

import contextlib
import shutil
import types
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from cn_lightning.atomic import replace_directory
from cn_lightning.errors import CheckpointFormatError, ConfigError
from cn_lightning.serialization import safe_torch_load, verify_safe_checkpoint


class AtomicDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` whose checkpoint directories appear whole or not at all.

    DeepSpeed writes a checkpoint as a directory of per-rank shards; a job killed mid-write
    (a preemption's SIGKILL) would leave ``last.ckpt/`` half-written and unloadable. Every rank
    writes into ``<name>.tmp/`` first; once all have finished, rank 0 swaps it into place
    (the previous one is kept as ``<name>.old/`` for the instant between two renames, and
    resuming falls back to it). Checkpoints must be on a file system every rank shares.
    """

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Any = None) -> None:
        path = Path(filepath)
        tmp = path.with_name(path.name + ".tmp")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier("cn_checkpoint_start")
        super().save_checkpoint(checkpoint, str(tmp), storage_options)
        self.barrier("cn_checkpoint_written")
        if self.is_global_zero:
            replace_directory(tmp, path)
        self.barrier("cn_checkpoint_done")


def fsdp_wrap_classes() -> set[type]:
    """The blocks FSDP wraps one by one: diffusers' ResNet and transformer blocks."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    return {ResnetBlock2D, BasicTransformerBlock}


class TrainableFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` whose checkpoints hold only the trainable weights.

    A block FSDP wraps holds frozen and trainable weights side by side (``use_orig_params``), and
    FSDP's state-dict hooks need every tensor of every wrapped block: the module's own
    ``state_dict`` (trainable tensors only, see ``ControlNetModule.state_dict``) cannot run under
    them. So the full state is gathered with every tensor, then cut down to the module's
    ``checkpointed_names()``; resuming loads those and leaves the frozen backbone as it was
    loaded, after checking that the checkpoint has every trainable tensor and that it unpickles
    with the allow-list (:func:`~cn_lightning.serialization.verify_safe_checkpoint`).
    """

    _checkpointed: set[str] | None = None

    def setup(self, trainer) -> None:
        # The names are read before FSDP wraps the blocks: a wrapped block's own state_dict
        # would initialise it as an FSDP root.
        self._checkpointed = _checkpointed_names(self.lightning_module)
        dtypes = {p.dtype for p in self.lightning_module.parameters()}
        if len(dtypes) > 1:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
            raise ConfigError(
                f"strategy=fsdp flattens the frozen and the trainable weights of a block together "
                f"and needs them in one dtype, got {names}: leave model.frozen_dtype at fp32 "
                "(under trainer.precision=bf16-mixed FSDP computes in bf16 all the same)"
            )
        super().setup(trainer)

    def setup_environment(self) -> None:
        self.check_device()
        super().setup_environment()

    def check_device(self) -> None:
        """PyTorch's FSDP runs on accelerators only: say so in one line on a CPU."""
        if self.root_device.type == "cpu":
            raise ConfigError(
                "strategy=fsdp needs GPUs (PyTorch's FSDP does not run on a CPU accelerator): "
                "on the CPU use strategy=ddp or a DeepSpeed strategy"
            )

    def lightning_module_state_dict(self) -> dict[str, Any]:
        keep = self._checkpointed
        with _every_tensor(self.lightning_module, keep is not None):
            state = super().lightning_module_state_dict()
        return state if keep is None else {k: v for k, v in state.items() if k in keep}

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        module = self.lightning_module
        keep = self._checkpointed
        if keep is None:
            return super().load_checkpoint(checkpoint_path, weights_only)
        path = Path(self.broadcast(checkpoint_path))
        # Lightning reads an FSDP checkpoint itself (weights_only=False): the allow-list first.
        verify_safe_checkpoint(path)
        if path.is_file():
            saved = safe_torch_load(path, mmap=True)
            missing = sorted(keep - set(saved.get("state_dict", {})))
            if missing:
                raise CheckpointFormatError(
                    f"checkpoint {str(path)!r} lacks {len(missing)} trainable tensors of this "
                    f"model (e.g. {missing[0]}): it was saved for another model"
                )
        strict = module._strict_loading
        module.strict_loading = False  # the frozen backbone is not in the checkpoint
        try:
            with _every_tensor(module, True):
                return super().load_checkpoint(path, weights_only)
        finally:
            module._strict_loading = strict


def _checkpointed_names(module: Any) -> set[str] | None:
    names = getattr(module, "checkpointed_names", None)
    return set(names()) if callable(names) else None


@contextlib.contextmanager
def _every_tensor(module: Any, active: bool):
    """``module.state_dict`` as ``torch.nn.Module``'s (every tensor) while FSDP's hooks run."""
    if not active:
        yield
        return
    module.__dict__["state_dict"] = types.MethodType(torch.nn.Module.state_dict, module)
    try:
        yield
    finally:
        del module.__dict__["state_dict"]


def fsdp_strategy(**kwargs: Any) -> TrainableFSDPStrategy:
    """:class:`TrainableFSDPStrategy` with an auto-wrap policy over the UNet/ControlNet blocks.

    Any ``FSDPStrategy`` argument can be given; ``auto_wrap_policy`` defaults to
    :func:`fsdp_wrap_classes` (a set of module classes cannot be written in YAML).
    """
    kwargs.setdefault("auto_wrap_policy", fsdp_wrap_classes())
    return TrainableFSDPStrategy(**kwargs)
