"""A Lightning callback that records the wall clock at the end of every optimizer step.

``end_to_end.py`` adds it to the train CLI (``+callbacks.step_clock``), so that the trainings it
compares are timed alike, from step marks on one clock (``time.time()``): the diffusers script's
marks come from its TensorBoard events, the plain loop's from itself. Only the benchmark uses
it. At the end of training it writes ``path`` as JSON: ``marks`` ``[[step, unix time, sample-grid
seconds so far], ...]`` and the unix times ``train_start`` and ``train_end``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L

from cn_lightning.callbacks.samples import SampleGridLogger


class StepClock(L.Callback):
    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.marks: list[tuple[int, float, float]] = []
        self.train_start = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.train_start = time.time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.marks or self.marks[-1][0] != step:
            grids = [c for c in trainer.callbacks if isinstance(c, SampleGridLogger)]
            self.marks.append((step, time.time(), sum(c.total_sampling_s for c in grids)))

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            clock = {"marks": self.marks, "train_start": self.train_start, "train_end": time.time()}
            self.path.write_text(json.dumps(clock))
