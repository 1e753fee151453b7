"""Test-only helpers for multi-process runs on CPU (never imported by the product).

``CPUDeepSpeedStrategy`` lets Lightning's ``DeepSpeedStrategy`` run ZeRO-2/3 on CPU with gloo:
DeepSpeed itself works there, only Lightning's CUDA checks refuse it. The training command
selects it through config, e.g.
``strategy=deepspeed_stage_2 trainer.strategy._target_=distributed_helpers.CPUDeepSpeedStrategy
trainer.accelerator=cpu`` with ``tests/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies.ddp import DDPStrategy

from cn_lightning.strategies import AtomicDeepSpeedStrategy, TrainableFSDPStrategy

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


class CPUDeepSpeedStrategy(AtomicDeepSpeedStrategy):
    """The project's ``DeepSpeedStrategy`` on CPU processes (gloo): tests only."""

    @property
    def root_device(self) -> torch.device:
        return torch.device("cpu", self.local_rank)

    def setup_environment(self) -> None:
        # Skip DeepSpeedStrategy's CUDA check; keep the rest of the DDP setup.
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # As DeepSpeedStrategy.setup_distributed, minus the CUDA device-index validation.
        from lightning.fabric.utilities.seed import reset_seed

        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()


class BatchKeyRecorder(L.Callback):
    """Writes the sample keys each rank trained on to ``<out_dir>/keys_rank<R>.json``."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.keys: list[str] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.extend(str(k) for k in batch.get("key", []))

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"keys_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.keys))


def subprocess_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """Environment of a training subprocess: offline, tests/ importable, small thread pools."""
    env = dict(os.environ)
    # WANDB_SERVICE is set by any in-process wandb.init (an earlier test): a child inheriting it
    # would attach to the pytest process's W&B service instead of starting its own, and a killed
    # child's run id would stay registered there.
    for key in ("WANDB_API_KEY", "WANDB_SERVICE"):
        env.pop(key, None)
    for key in [k for k in env if k.startswith(("SLURM_", "RANK", "LOCAL_RANK", "WORLD_SIZE"))]:
        env.pop(key)
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        HYDRA_FULL_ERROR="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        CN_LIGHTNING_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=os.pathsep.join([str(TESTS), str(REPO), env.get("PYTHONPATH", "")]),
    )
    env.update(extra)
    return env


def tiny_run_overrides(tiny_sd_path: str, shards: str, run_dir: Path, steps: int) -> list[str]:
    """Overrides for a few-step 32 px run of the tiny backbone on circle shards."""
    return [
        f"hydra.run.dir={run_dir}",
        f"model.pretrained_model_path={tiny_sd_path}",
        f"data.train_shards={shards}",
        "data.resolution=32",
        "data.batch_size=2",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        "data.condition_key=outline",
        "trainer.accelerator=cpu",
        f"trainer.max_steps={steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        "+trainer.enable_model_summary=false",
        "callbacks=minimal",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "logger=csv",
    ]


def run_train(
    args: list[str], env: dict[str, str], cwd: Path, timeout: int = 600, check: bool = True
) -> subprocess.CompletedProcess:
    """``python -m cn_lightning.train ARGS``; asserts success unless ``check`` is False."""
    result = subprocess.run(
        [sys.executable, "-m", "cn_lightning.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )
    if check:
        assert result.returncode == 0, result.stdout[-4000:] + "\n" + result.stderr[-6000:]
    return result


CONDITION_KEYS = ("canny", "depth", "normal", "mlsd", "hed", "seg", "openpose", "scribble")


def write_condition_shards(
    out: Path, num_samples: int = 16, size: int = 32, per_shard: int = 4, conditions=CONDITION_KEYS
) -> str:
    """Tiny shards whose samples carry every paper condition (``<key>.<cond>.png``);
    returns the directory, which ``data.train_shards`` accepts."""
    import numpy as np

    from cn_lightning.data.format import encode_image, write_shard_atomic

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for i in range(num_samples):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        sample = {
            "__key__": f"{i:06d}",
            "png": encode_image(image, "png"),
            "txt": f"a test image {i}",
            "json": json.dumps({"i": i}),
        }
        for cond in conditions:
            sample[f"{cond}.png"] = encode_image(255 - image, "png")
        samples.append(sample)
    for s in range(0, num_samples, per_shard):
        write_shard_atomic(str(out / f"cond-{s // per_shard:06d}.tar"), samples[s : s + per_shard])
    return str(out)


class DrawRecorder(L.Callback):
    """Records, per optimizer step, the timesteps and the first noise values each rank drew;
    writes ``<out_dir>/draws_rank<R>.json`` ({step: [timesteps, noise]}) at the end."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.draws: dict[int, list] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        scheduler = pl_module.noise_scheduler
        add_noise = scheduler.add_noise

        def recording(latents, noise, timesteps):
            self.draws[trainer.global_step] = [timesteps.tolist(), noise.flatten()[:8].tolist()]
            return add_noise(latents, noise, timesteps)

        scheduler.add_noise = recording

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"draws_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.draws))


class DtypeRecorder(L.Callback):
    """Writes ``<out_dir>/dtypes_rank<R>.json`` after the first training batch: the dtypes of
    the branch's weights, of the optimizer's (master) weights, of the frozen parts and of the
    loss."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done:
            return
        self.done = True
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        if engine is None:
            optimizer = trainer.optimizers[0]
            master = {str(p.dtype) for g in optimizer.param_groups for p in g["params"]}
        else:  # the fp32 partitions DeepSpeed's ZeRO-3 / ZeRO-1,2 optimizer steps
            zero = engine.optimizer
            flat = getattr(zero, "fp32_partitioned_groups_flat", None) or getattr(
                zero, "single_partition_of_fp32_groups", []
            )
            master = {str(t.dtype) for t in flat}
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        dtypes = {
            "branch": str(pl_module.controlnet.conv_in.weight.dtype),
            "master": sorted(master),
            "vae": str(pl_module.vae.dtype),
            "text_encoder": str(pl_module.text_encoder.dtype),
            "loss": str(loss.dtype),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"dtypes_rank{trainer.global_rank}.json").write_text(json.dumps(dtypes))


class CPUFSDPStrategy(TrainableFSDPStrategy):
    """The project's FSDP strategy on CPU processes (gloo): tests only. PyTorch's FSDP runs
    there when given the CPU as its device; Lightning gives it no ``device_id`` on a CPU (and the
    project's strategy refuses the CPU), so both are skipped here."""

    def check_device(self) -> None:
        pass

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # As FSDPStrategy._setup_model for a model not wrapped yet, with device_id=cpu.
        from lightning.pytorch.strategies.fsdp import (
            _move_torchmetrics_to_device,
            _setup_activation_checkpointing,
        )
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _move_torchmetrics_to_device(model, self.root_device)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def optimizer_state(self, optimizer) -> dict:
        # PyTorch's FSDP gathers each optimizer state of a block into one reused buffer and
        # "offloads" it with .cpu(), which copies on a GPU but is a no-op on a CPU: every state
        # would come back as the last one gathered (exp_avg as exp_avg_sq). Gather without the
        # offload here (FSDP then copies), otherwise as FSDPStrategy.optimizer_state does.
        from lightning.pytorch.core.optimizer import LightningOptimizer
        from torch.distributed.fsdp import (
            FullOptimStateDictConfig,
            FullStateDictConfig,
            FullyShardedDataParallel,
            OptimStateKeyType,
            StateDictType,
        )

        if self._state_dict_type != "full":
            return super().optimizer_state(optimizer)
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer._optimizer
        with FullyShardedDataParallel.state_dict_type(
            module=self.model,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=True),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True),
        ):
            state = FullyShardedDataParallel.optim_state_dict(self.model, optimizer)
            if self.global_rank == 0:
                state = FullyShardedDataParallel.rekey_optim_state_dict(
                    state, OptimStateKeyType.PARAM_ID, self.model
                )
        return state


def cpu_fsdp_strategy(**kwargs) -> CPUFSDPStrategy:
    """``cn_lightning.strategies.fsdp_strategy`` (the blocks it wraps, the options of
    ``conf/strategy/fsdp.yaml``) as a :class:`CPUFSDPStrategy`: tests only."""
    from cn_lightning.strategies import fsdp_wrap_classes

    kwargs.setdefault("auto_wrap_policy", fsdp_wrap_classes())
    return CPUFSDPStrategy(**kwargs)


class AddedCondRecorder(L.Callback):
    """Writes ``<out_dir>/added_cond_rank<R>.json`` at the end of training: the dtypes of what
    reached the ControlNet's first forward (latents, text embeddings and SDXL's pooled
    ``text_embeds`` and ``time_ids``)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.seen: dict[str, str] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        def record(module, args, kwargs) -> None:
            if self.seen:
                return
            added = kwargs.get("added_cond_kwargs") or {}
            inputs = {"sample": args[0], "encoder_hidden_states": kwargs["encoder_hidden_states"]}
            inputs.update(added)
            self.seen = {k: str(v.dtype) for k, v in inputs.items()}

        pl_module.controlnet.register_forward_pre_hook(record, with_kwargs=True)

    def on_train_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"added_cond_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.seen))
