"""The numerics guard: non-finite losses and gradients skip the optimizer step (weights and
optimizer state untouched), are counted, and enough of them in a row stop the run with one line;
a non-finite model is never checkpointed or exported."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from core_helpers import RandomPairsDataModule
from distributed_helpers import run_train, subprocess_env, tiny_run_overrides
from test_precision_matrix import _cfg, circle_shards  # noqa: F401 (fixture)

from cn_lightning.errors import NumericsError
from cn_lightning.models.checkpoints import load_trainable_state_dict
from cn_lightning.models.module import ControlNetModule
from cn_lightning.train import train


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values())


def test_huge_learning_rate_stops_with_one_line_and_keeps_finite_checkpoints(
    tiny_sd_path,
    circle_shards,  # noqa: F811
    tmp_path,
    capsys,
):
    run_dir = tmp_path / "run"
    cfg = _cfg(
        tiny_sd_path,
        circle_shards,
        run_dir,
        "trainer.max_steps=30",
        "model.learning_rate=1e12",
        "model.max_consecutive_nonfinite=4",
        "trainer.precision=bf16-mixed",
    )
    with pytest.raises(
        NumericsError,
        match=r"^step \d+: 4 optimizer steps in a row .*"
        r"learning_rate.*bf16",
    ) as err:
        train(cfg)
    assert "\n" not in str(err.value)
    assert not (run_dir / "controlnet").exists(), "a run that failed must not export"
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints and all(_all_finite(load_trainable_state_dict(c)) for c in checkpoints)
    lines = [x for x in capsys.readouterr().out.splitlines() if "optimizer step skipped" in x]
    assert [x.split("(")[1] for x in lines] == [f"{i} in a row, {i} in all)" for i in (1, 2, 3, 4)]


class _InfGradOnce(L.Callback):
    """Makes one gradient infinite at optimizer step ``at`` (the loss stays finite)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.before: dict = {}
        self.after: dict = {}

    def on_train_start(self, trainer, pl_module) -> None:
        weight = pl_module.controlnet.conv_in.weight
        weight.register_hook(lambda g: g * float("inf") if trainer.global_step == self.at else g)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            opt = trainer.optimizers[0]
            self.before = _snapshot(pl_module, opt)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.at + 1:
            self.after = _snapshot(pl_module, trainer.optimizers[0])


def _snapshot(module, optimizer) -> dict:
    state = {n: p.detach().clone() for n, p in module.controlnet.named_parameters()}
    for i, s in enumerate(optimizer.state.values()):
        state.update({f"opt{i}.{k}": v.clone() for k, v in s.items() if torch.is_tensor(v)})
    return state


def test_non_finite_gradient_skips_the_step_exactly(tiny_sd_path, tmp_path):
    module = ControlNetModule(tiny_sd_path, learning_rate=1e-3)
    probe = _InfGradOnce(at=2)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=4,
        logger=False,
        callbacks=[probe],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, datamodule=RandomPairsDataModule(n=16, size=32))
    assert module.numerics.skipped == 1 and module.numerics.consecutive == 0
    assert trainer.callback_metrics["train/skipped_nonfinite"] == 1
    assert probe.before and probe.before.keys() == probe.after.keys()
    changed = [k for k in probe.before if not torch.equal(probe.before[k], probe.after[k])]
    assert not changed, f"the skipped step changed {changed[:3]}"
    assert _all_finite(module.state_dict())


def test_zero3_bf16_huge_learning_rate_on_two_ranks(tiny_sd_path, circle_shards, tmp_path):  # noqa: F811
    """DeepSpeed ZeRO-3 in bf16 does not check gradients itself; the guard still skips."""
    run_dir = tmp_path / "run"
    args = tiny_run_overrides(tiny_sd_path, circle_shards, run_dir, steps=30) + [
        "strategy=deepspeed_stage_3",
        "trainer.strategy._target_=distributed_helpers.CPUDeepSpeedStrategy",
        "trainer.devices=2",
        "trainer.precision=bf16-mixed",
        "model.learning_rate=1e12",
        "model.max_consecutive_nonfinite=3",
        "callbacks.model_checkpoint.every_n_train_steps=1",
    ]
    result = run_train(args, subprocess_env(tmp_path), tmp_path, check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cn_lightning: error")]
    assert len(errors) == 1 and "3 optimizer steps in a row" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not (run_dir / "controlnet").exists()
    last = Path(run_dir / "checkpoints" / "last.ckpt")
    assert _all_finite(load_trainable_state_dict(last))
