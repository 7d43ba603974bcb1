"""The EAST stack together: WeightSharing, DyReLUPhaseOut, MaskInit, CyclicSparsitySchedule (+ DynamicReallocation).

Order independence, exact resume mid-cycle and mid-phase-out, and a short 99.9% run without NaN. The tests that
include DynamicReallocation are skipped while it is not in this checkout.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn

from lightning_sparse.callbacks.cyclic_sparsity import CyclicSparsitySchedule
from lightning_sparse.callbacks.dyrelu_phase_out import DyReLUPhaseOut
from lightning_sparse.callbacks.mask_init import MaskInit
from lightning_sparse.callbacks.weight_sharing import WeightSharing
from lightning_sparse.models.resnet import BasicBlock
from lightning_sparse.nn import DyReLU, SharedConv2d, dyrelu_modules
from tests.helpers import Classifier, random_loader, trainer_kwargs


class TinyResNet(nn.Module):
    """A CIFAR-style ResNet with two narrow stages of three BasicBlocks (weight sharing applies), for 16x16 input."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.act1 = nn.ReLU()
        self.layer1 = nn.Sequential(*(BasicBlock(widths[0], widths[0], 1, nn.ReLU) for _ in range(3)))
        self.layer2 = nn.Sequential(
            BasicBlock(widths[0], widths[1], 2, nn.ReLU), *(BasicBlock(widths[1], widths[1], 1, nn.ReLU) for _ in range(2))
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[1], num_classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(self.avgpool(x).flatten(1))


def east_callbacks(
    sparsity: float = 0.9, with_reallocation: bool = False, every_n_steps: int = 2, cycle_length: float = 0.25
) -> list[Callback]:
    """The EAST stack on a 16-step run: two cycles of 4 steps, phase-out from step 4 to step 12."""
    callbacks: list[Callback] = [
        WeightSharing(),
        DyReLUPhaseOut(start=0.25, end=0.75),
        MaskInit(sparsity=sparsity, distribution="erk", seed=7),
        CyclicSparsitySchedule(max_multiplier=3.0, cycles=2, cycle_length=cycle_length, every_n_steps=every_n_steps),
    ]
    if with_reallocation:
        from lightning_sparse.callbacks.dynamic_reallocation import DynamicReallocation

        callbacks.append(DynamicReallocation(method="rigl", every_n_steps=3, stop_at=1.0, drop_fraction=0.5))
    return callbacks


class CountProbe(Callback):
    """Active-weight count before every optimizer step's updates and after the run."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        owner = next(c for c in trainer.callbacks if isinstance(c, MaskInit))
        self.counts.append(owner.masks.nnz())


def _mask_init(trainer: L.Trainer) -> MaskInit:
    return next(c for c in trainer.callbacks if isinstance(c, MaskInit))


def _run(
    callbacks: list[Callback], tmp_path: Any, ckpt_path: str | None = None, seed: int = 0, **overrides: Any
) -> tuple[L.Trainer, Classifier]:
    L.seed_everything(seed)
    model = Classifier(TinyResNet(), optimizer="sgd_nesterov")
    kwargs = trainer_kwargs(tmp_path, max_epochs=2, gradient_clip_val=1.0)
    kwargs.update(overrides)
    trainer = L.Trainer(callbacks=callbacks, **kwargs)
    trainer.fit(model, random_loader(n=64, batch_size=8), ckpt_path=ckpt_path)
    return trainer, model


def _same_run(a: tuple[L.Trainer, Classifier], b: tuple[L.Trainer, Classifier]) -> None:
    assert _mask_init(a[0]).masks.fingerprint() == _mask_init(b[0]).masks.fingerprint()
    state_a, state_b = a[1].state_dict(), b[1].state_dict()
    assert list(state_a) == list(state_b)
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), name


@pytest.mark.parametrize("with_reallocation", [False, True])
def test_callbacks_order_does_not_change_the_result(tmp_path, with_reallocation) -> None:
    forward = east_callbacks(with_reallocation=with_reallocation)
    backward = east_callbacks(with_reallocation=with_reallocation)[::-1]
    first, second = _run(forward, tmp_path), _run(backward, tmp_path)
    _same_run(first, second)
    model = first[1]
    assert any(isinstance(m, SharedConv2d) for m in model.modules())
    assert dyrelu_modules(model) and all(m.beta == 0.0 for m in dyrelu_modules(model).values())


@pytest.mark.parametrize("with_reallocation", [False, True])
def test_resume_mid_cycle_and_mid_phase_out_continues_exactly(tmp_path, with_reallocation) -> None:
    # 16 steps: two cycles of 6 steps (0-5, 6-11) with updates every 2 steps, phase-out from step 4 to step 12.
    def callbacks(directory: str) -> list[Callback]:
        return [
            *east_callbacks(with_reallocation=with_reallocation, cycle_length=0.375),
            ModelCheckpoint(dirpath=tmp_path / directory, save_top_k=-1, every_n_epochs=1),
        ]

    full = _run(callbacks("full"), tmp_path, enable_checkpointing=True)
    middle = tmp_path / "full" / "epoch=0-step=8.ckpt"
    state = torch.load(middle, weights_only=False)["callbacks"]
    # At step 8: inside the second cycle (steps 6-11) and inside the phase-out (steps 4-12).
    cyclic = state["CyclicSparsitySchedule"]
    assert cyclic["cycle_steps"] == [6, 6] and not cyclic["finished"] and cyclic["last_update_step"] == 6
    assert 0.0 < state["DyReLUPhaseOut"]["beta"] < 1.0
    resumed = _run(callbacks("resumed"), tmp_path, ckpt_path=str(middle), enable_checkpointing=True)
    _same_run(full, resumed)


def test_short_run_at_999_sparsity_has_no_nan_and_ends_at_the_budget(tmp_path) -> None:
    probe = CountProbe()
    callbacks = [*east_callbacks(sparsity=0.999, with_reallocation=True), probe]
    trainer, model = _run(callbacks, tmp_path)
    cyclic = next(c for c in callbacks if isinstance(c, CyclicSparsitySchedule))
    masks = _mask_init(trainer).masks
    assert cyclic.finished and masks.nnz() == cyclic.budget
    assert max(probe.counts) > cyclic.budget  # the cycles did grow
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert torch.isfinite(torch.as_tensor(float(trainer.callback_metrics["train_loss"])))
    assert all(isinstance(m, DyReLU) and m.beta == 0.0 for m in dyrelu_modules(model).values())


def test_reallocation_stands_aside_during_the_cycles_and_runs_after(tmp_path) -> None:
    callbacks = east_callbacks(sparsity=0.99, with_reallocation=True)
    _run(callbacks, tmp_path)
    realloc = callbacks[-1]
    # Cycles cover steps 0-7 (budget restored at step 8); reallocation is due at steps 3, 6, 9, 12 and 15.
    assert realloc.num_skipped_held == 2 and realloc.num_updates == 3 and realloc.last_update_step == 15
