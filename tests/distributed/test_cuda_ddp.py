"""Two DDP processes on CUDA: identical masks on both ranks at every step, and masked weights and optimizer state
exactly 0 on the GPU. Runs only where a GPU is present (skipped, with the reason, elsewhere).

With two or more GPUs the ranks use one GPU each and NCCL. With one GPU both ranks share it, which NCCL refuses,
so they use gloo, which moves CUDA tensors through host memory for its collectives: the callbacks, the masks, the
weights and the optimizer state are still on the GPU, which is what this checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy

from lightning_sparse.callbacks import DynamicReallocation, MaskInit
from lightning_sparse.masks import find_mask_owner
from tests.distributed.ddp_harness import MaskFingerprints, read_rank_records
from tests.helpers import Classifier, masked_positions_are_zero, random_loader, trainer_kwargs

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: runs 2 DDP processes on it (gloo over CUDA tensors on one GPU, NCCL on two)",
)


class CudaReport(Callback):
    """At the end of training (before Lightning's teardown moves the model and the optimizer state to the CPU),
    writes per rank where the masks, weights and optimizer state live and whether every masked weight and
    optimizer-state entry is exactly 0."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        masks = find_mask_owner(trainer, type(self).__name__).masks
        state = [
            value
            for optimizer in trainer.optimizers
            for entry in optimizer.state.values()
            for value in entry.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        report = {
            "backend": torch.distributed.get_backend(),
            "world_size": torch.distributed.get_world_size(),
            "root_device": str(trainer.strategy.root_device),
            "mask_devices": sorted({mask.device.type for mask in masks.values()}),
            "weight_devices": sorted({param.device.type for param in masks.parameters.values()}),
            "state_devices": sorted({value.device.type for value in state}),
            "state_tensors": len(state),
            "not_zero": masked_positions_are_zero(pl_module, masks, trainer.optimizers),
            "density": masks.density(),
        }
        (Path(self.directory) / f"rank{trainer.global_rank}.cuda.json").write_text(json.dumps(report))


def two_process_cuda_setup() -> tuple[dict[str, Any], str]:
    """Trainer arguments for 2 processes on the GPUs at hand, and the process-group backend they use."""
    if torch.cuda.device_count() >= 2:
        return {"accelerator": "cuda", "devices": 2, "strategy": DDPStrategy(start_method="spawn")}, "nccl"
    one_gpu_twice = DDPStrategy(
        start_method="spawn", process_group_backend="gloo", parallel_devices=[torch.device("cuda", 0)] * 2
    )
    return {"accelerator": "cuda", "strategy": one_gpu_twice}, "gloo"


def run_two_processes(tmp_path: Path, setup: dict[str, Any]) -> Path:
    """Fit with MaskInit and RigL (updates at steps 2, 4, 6 of 8) in 2 processes; returns the records' directory."""
    directory = tmp_path / "ranks"
    directory.mkdir()
    callbacks = [
        MaskInit(sparsity=0.8, seed=0),
        DynamicReallocation("rigl", every_n_steps=2, stop_at=1.0),
        MaskFingerprints(directory),
        CudaReport(str(directory)),
    ]
    # Adam: two state tensors per parameter, both must stay 0 at masked positions.
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=2, deterministic=False, **setup))
    L.seed_everything(0)
    trainer.fit(Classifier(optimizer="adam"), random_loader())
    return directory


def test_two_ranks_on_cuda_agree_and_keep_masked_entries_zero(tmp_path: Path) -> None:
    setup, backend = two_process_cuda_setup()
    directory = run_two_processes(tmp_path, setup)
    rank0, rank1 = read_rank_records(directory, world_size=2)
    assert [r["step"] for r in rank0] == list(range(8))
    assert [r["fingerprint"] for r in rank0] == [r["fingerprint"] for r in rank1]
    assert len({r["fingerprint"] for r in rank0}) == 4  # RigL changed the masks at steps 2, 4 and 6
    reports = [json.loads((directory / f"rank{rank}.cuda.json").read_text()) for rank in range(2)]
    for report in reports:
        assert report["backend"] == backend and report["world_size"] == 2
        assert report["root_device"].startswith("cuda")
        assert report["mask_devices"] == report["weight_devices"] == report["state_devices"] == ["cuda"]
        assert report["state_tensors"] > 0 and report["not_zero"] == []
        assert report["density"] == pytest.approx(0.2, abs=1e-3)
