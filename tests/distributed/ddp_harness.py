"""A small harness for multi-process (gloo, CPU) tests: run a fit under ``ddp_spawn`` and read what each rank saw.

Spawned workers get pickled copies of the callbacks, so the callbacks here write what they observe to files under
a directory, one file per rank, which the main process reads back after ``trainer.fit``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L

from lightning_sparse.masks import find_mask_owner
from tests.helpers import Classifier, random_loader, trainer_kwargs


class MaskFingerprints(L.Callback):
    """Writes ``{"step", "version", "fingerprint"}`` per optimizer step to ``<directory>/rank<r>.jsonl``.

    Place it after MaskInit in the callbacks list, so it sees the masks after the step's topology updates.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = str(directory)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        masks = find_mask_owner(trainer, type(self).__name__).masks
        record = {"step": trainer.global_step, "version": masks.version, "fingerprint": masks.fingerprint()}
        with open(Path(self.directory) / f"rank{trainer.global_rank}.jsonl", "a") as file:
            file.write(json.dumps(record) + "\n")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        summary = {}
        for callback in trainer.callbacks:
            for attribute in ("num_updates", "num_rank_corrections", "num_skipped_nonfinite"):
                if hasattr(callback, attribute):
                    summary[attribute] = getattr(callback, attribute)
        with open(Path(self.directory) / f"rank{trainer.global_rank}.summary.json", "w") as file:
            json.dump(summary, file)


def read_rank_records(directory: str | Path, world_size: int) -> list[list[dict[str, Any]]]:
    """Per rank, the records written by :class:`MaskFingerprints`, in step order."""
    directory = Path(directory)
    return [
        [json.loads(line) for line in (directory / f"rank{rank}.jsonl").read_text().splitlines()]
        for rank in range(world_size)
    ]


def read_rank_summaries(directory: str | Path, world_size: int) -> list[dict[str, Any]]:
    """Per rank, the counters of the callbacks at the end of fit."""
    return [json.loads((Path(directory) / f"rank{rank}.summary.json").read_text()) for rank in range(world_size)]


def fit_ddp_spawn(tmp_path: Path, callbacks: list[L.Callback], world_size: int = 2, **trainer_overrides: Any) -> Path:
    """Fit the test Classifier on CPU with ``ddp_spawn`` (gloo) and a :class:`MaskFingerprints` recorder.

    Returns:
        The directory holding the per-rank records.
    """
    directory = tmp_path / "ranks"
    directory.mkdir(parents=True, exist_ok=True)
    kwargs = trainer_kwargs(tmp_path, strategy="ddp_spawn", devices=world_size, **trainer_overrides)
    trainer = L.Trainer(callbacks=[*callbacks, MaskFingerprints(directory)], **kwargs)
    L.seed_everything(0)
    trainer.fit(Classifier(), random_loader())
    return directory
