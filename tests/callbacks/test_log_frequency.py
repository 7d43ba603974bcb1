"""The callbacks log their curves when the values change, and the logger still sees them at every log step (issue 14)."""

from __future__ import annotations

import csv
from typing import Any

import lightning as L
import pytest
from lightning.pytorch.loggers import CSVLogger

from lightning_sparse import DynamicReallocation, MaskInit
from tests.helpers import Classifier, random_loader, trainer_kwargs


class _CountingClassifier(Classifier):
    """Counts the keys the callbacks pass to ``log``/``log_dict`` (the loss of training_step is not counted)."""

    def __init__(self) -> None:
        super().__init__()
        self.callback_logs: list[str] = []

    def log_dict(self, dictionary: Any, *args: Any, **kwargs: Any) -> None:
        self.callback_logs += list(dictionary)
        super().log_dict(dictionary, *args, **kwargs)


def test_reallocation_curves_logged_per_change_and_present_at_every_log_step(tmp_path: Any) -> None:
    module = _CountingClassifier()
    realloc = DynamicReallocation("dsr", every_n_steps=4, stop_at=1.0, prune_target=0.2)
    trainer = L.Trainer(
        callbacks=[MaskInit(sparsity=0.8, seed=0), realloc],
        **trainer_kwargs(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path), log_every_n_steps=1),
    )
    trainer.fit(module, random_loader())  # 8 steps per epoch, updates at steps 4, 8, 12
    assert trainer.global_step == 16 and realloc.num_updates == 3
    # Logged at the first batch of each epoch and after each update, not at all 16 steps.
    threshold_calls = module.callback_logs.count("reallocation/threshold")
    assert threshold_calls <= 2 + realloc.num_updates < trainer.global_step

    with open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("step") and row.get("train_loss")]
    assert len(rows) == trainer.global_step
    # Every per-step row still carries the current curves, and they follow the updates.
    assert all(row["reallocation/threshold"] and row["reallocation/updates"] for row in rows)
    updates = [float(row["reallocation/updates"]) for row in rows]
    assert updates == sorted(updates) and updates[-1] == realloc.num_updates
    assert float(rows[-1]["reallocation/threshold"]) == pytest.approx(realloc.threshold, rel=1e-6)  # logged as float32
