"""``RunCheckpoint``: periodic checkpoints plus a ``last.ckpt`` that always holds the final step."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is the run's true end.

    Lightning saves ``last`` only together with a periodic checkpoint, so a run that stops
    between two of them (``max_steps``, ``max_epochs``, a stop requested by a callback, a
    SIGTERM) leaves a ``last.ckpt`` from earlier, and relaunching it retrains steps. Here the
    final optimizer step is also saved as ``last``, right after its batch - the same moment the
    periodic checkpoints are taken, so resuming from it continues the data stream exactly.
    A SIGTERM arriving between optimizer steps saves ``last`` too.
    """

    _last_saved_step = 0  # optimizer step of the newest last.ckpt written by this run

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._at_step_boundary(trainer, batch_idx) and self._is_final_step(trainer):
            self._save_final(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        max_epochs = trainer.max_epochs
        if max_epochs is not None and max_epochs > 0 and trainer.current_epoch + 1 >= max_epochs:
            self._save_final(trainer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        # Lightning raises SIGTERMException between batches; mid-accumulation the partial
        # gradients cannot be saved, so the previous last.ckpt stays the resume point.
        if isinstance(exception, SIGTERMException) and self._accumulation_complete(trainer):
            self._save_final(trainer)

    def _save_final(self, trainer) -> None:
        if self.save_last and trainer.global_step > self._last_saved_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_step = trainer.global_step

    @staticmethod
    def _is_final_step(trainer) -> bool:
        return bool(trainer.should_stop) or 0 < trainer.max_steps <= trainer.global_step

    @staticmethod
    def _at_step_boundary(trainer, batch_idx: int) -> bool:
        accumulate = trainer.accumulate_grad_batches
        last_of_epoch = batch_idx + 1 == trainer.num_training_batches
        return (batch_idx + 1) % accumulate == 0 or last_of_epoch

    @staticmethod
    def _accumulation_complete(trainer) -> bool:
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return done % trainer.accumulate_grad_batches == 0
