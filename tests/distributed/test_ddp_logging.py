"""Logging under 2-process CPU DDP (gloo, ``ddp_spawn``): no Lightning warning about any metric the library logs,
and ``ImageClassifier``'s validation loss is the mean over both ranks' batches, not rank 0's alone."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_sparse import ImageClassifier
from lightning_sparse.callbacks import CyclicSparsitySchedule, DynamicReallocation, MaskInit
from tests.helpers import random_loader, trainer_kwargs


class WarningRecorder(Callback):
    """Records, in each worker, every warning raised from ``setup`` to ``teardown`` and the metric names logged."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._catcher: Any = None
        self._caught: list[warnings.WarningMessage] = []

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._catcher = warnings.catch_warnings(record=True)
        self._caught = self._catcher.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._catcher.__exit__(None, None, None)
        record = {
            "warnings": [str(caught.message) for caught in self._caught],
            "metrics": sorted(set(trainer.callback_metrics) | set(trainer.logged_metrics)),
        }
        (Path(self.directory) / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def small_network() -> nn.Module:
    # No BatchNorm: the evaluation in the main process must see exactly the model the ranks validated.
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )


def test_ddp_fit_logs_without_warnings_and_reduces_the_losses(tmp_path: Path) -> None:
    directory = tmp_path / "ranks"
    directory.mkdir()
    callbacks = [
        MaskInit(sparsity=0.8, seed=0),
        CyclicSparsitySchedule(max_multiplier=2.0, cycles=1, cycle_length=0.5, every_n_steps=2),
        DynamicReallocation("set", every_n_steps=2, stop_at=1.0),
        WarningRecorder(str(directory)),
    ]
    val_loader = random_loader(n=32, batch_size=8, seed=1)
    trainer = L.Trainer(
        callbacks=callbacks,
        **trainer_kwargs(
            tmp_path,
            strategy="ddp_spawn",
            devices=2,
            max_epochs=2,
            log_every_n_steps=1,
            logger=TensorBoardLogger(tmp_path, name="ddp"),
        ),
    )
    L.seed_everything(0)
    model = ImageClassifier(small_network(), num_classes=10, lr=0.05, lr_schedule="none")
    trainer.fit(model, random_loader(n=64, batch_size=8), val_loader)

    records = [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(2)]
    metrics = records[0]["metrics"]
    for expected in (
        "sparsity/global",
        "sparsity/requested",
        "sparsity/density/network.0.weight",
        "reallocation/updates",
    ):
        assert expected in metrics
    assert any(name.startswith("cyclic/") for name in metrics) and "val/loss" in metrics
    for rank, record in enumerate(records):
        naming = [text for text in record["warnings"] if any(name in text for name in metrics)]
        assert naming == [], f"rank {rank} warned about library metrics: {naming}"

    # ddp_spawn brings rank 0's weights and metrics back. The logged val/loss must be the mean over all 32 images
    # (16 per rank), which is not the mean over rank 0's own 16 (even-indexed, by the DistributedSampler).
    images, labels = val_loader.dataset.tensors
    model.eval()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(model(images), labels, reduction="none")
    logged = float(trainer.callback_metrics["val/loss"])
    assert logged == pytest.approx(float(losses.mean()), rel=1e-5)
    assert abs(float(losses[0::2].mean()) - float(losses.mean())) > 1e-3  # the test would see rank 0's own mean
