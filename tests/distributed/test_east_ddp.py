"""The EAST stack under 2-process CPU DDP (gloo, ``ddp_spawn``): identical masks on both ranks at every step, and a
DyReLU phase-out run to its end without DDP's unused-parameter failure (``find_unused_parameters=False``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from lightning_sparse.callbacks.cyclic_sparsity import CyclicSparsitySchedule
from lightning_sparse.callbacks.dyrelu_phase_out import DyReLUPhaseOut
from lightning_sparse.callbacks.mask_init import MaskInit
from lightning_sparse.nn import dyrelu_modules
from tests.callbacks.test_east_stack import TinyResNet, east_callbacks
from tests.helpers import Classifier, random_loader, trainer_kwargs


class RankRecorder(Callback):
    """Writes, per rank, the mask fingerprint at every optimizer step (after the topology updates) and a summary."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        owner = next(c for c in trainer.callbacks if isinstance(c, MaskInit))
        with open(Path(self.directory) / f"rank{trainer.global_rank}.steps", "a") as file:
            file.write(f"{trainer.global_step} {owner.masks.fingerprint()} {owner.masks.nnz()}\n")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cyclic = next(c for c in trainer.callbacks if isinstance(c, CyclicSparsitySchedule))
        phase_out = next(c for c in trainer.callbacks if isinstance(c, DyReLUPhaseOut))
        weights = torch.cat([p.detach().flatten() for p in pl_module.parameters()])
        summary = {
            "steps": trainer.global_step,
            "betas": sorted({m.beta for m in dyrelu_modules(pl_module).values()}),
            "phase_out_window": list(phase_out.window or ()),
            "cyclic_finished": cyclic.finished,
            "cyclic_updates": cyclic.num_updates,
            "budget": cyclic.budget,
            "weights_checksum": float(weights.double().abs().sum()),
            "finite": bool(torch.isfinite(weights).all()),
        }
        (Path(self.directory) / f"rank{trainer.global_rank}.json").write_text(json.dumps(summary))


def test_east_stack_under_ddp_has_identical_masks_and_survives_the_phase_out(tmp_path) -> None:
    directory = tmp_path / "ranks"
    directory.mkdir()
    callbacks = [*east_callbacks(with_reallocation=True), RankRecorder(str(directory))]
    # 64 samples, batch 8, 2 ranks -> 4 steps per epoch; 4 epochs = 16 steps: phase-out ends at step 12 and the
    # last 4 steps run with the hyper-networks out of the forward pass; DDP keeps find_unused_parameters=False.
    trainer = L.Trainer(
        callbacks=callbacks,
        **trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=2, max_epochs=4, gradient_clip_val=1.0),
    )
    L.seed_everything(0)
    trainer.fit(Classifier(TinyResNet(), optimizer="sgd_nesterov"), random_loader(n=64, batch_size=8, size=8))

    steps = [(directory / f"rank{rank}.steps").read_text().splitlines() for rank in range(2)]
    assert len(steps[0]) == 16 and steps[0] == steps[1]
    counts = [int(line.split()[2]) for line in steps[0]]
    summaries = [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert summaries[0] == summaries[1]
    summary = summaries[0]
    assert summary["steps"] == 16 and summary["phase_out_window"] == [4, 12] and summary["betas"] == [0.0]
    assert summary["finite"] and summary["cyclic_finished"]
    assert max(counts) > summary["budget"] and counts[-1] == summary["budget"]
