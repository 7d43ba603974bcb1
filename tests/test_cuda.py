"""The callbacks on a CUDA GPU, in bf16 mixed precision: masks and weights are on the GPU while training and follow
the model back to the CPU at the end of fit, masked entries stay exactly 0 through topology updates, the
active-weight budget holds, DyReLU's two-piece kernel matches
the stacked formula on CUDA tensors, and ``sparse_inference`` keeps the dense kernel for a model on the GPU.

Runs only where a GPU is present (skipped, with the reason, elsewhere); the DDP case is in
``tests/distributed/test_cuda_ddp.py``.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparse import sparse_inference
from lightning_sparse.callbacks import (
    CyclicSparsitySchedule,
    DynamicReallocation,
    DyReLUPhaseOut,
    MaskInit,
    WeightSharing,
)
from lightning_sparse.models import BasicBlock, CifarResNet
from lightning_sparse.nn.dyrelu import two_piece_max
from tests.helpers import Classifier, masked_positions_are_zero, random_loader, trainer_kwargs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def _fit_on_cuda(tmp_path: Path, net: nn.Module, callbacks: list[L.Callback]) -> tuple[L.Trainer, Classifier, list]:
    recorder = LossRecorder()
    mask_init = next(c for c in callbacks if isinstance(c, MaskInit))
    trainer = L.Trainer(
        callbacks=[*callbacks, recorder, DeviceRecorder(mask_init)],
        **trainer_kwargs(tmp_path, accelerator="cuda", precision="bf16-mixed", max_epochs=3, deterministic=False),
    )
    module = Classifier(net, optimizer="sgd_momentum_wd")
    L.seed_everything(0)
    trainer.fit(module, random_loader(n=64, batch_size=8))
    return trainer, module, recorder.losses


class DeviceRecorder(L.Callback):
    """Where the masks and the sparse weights are in the last training step (Lightning's teardown then moves
    the model to the CPU, and the masks follow it in ``MaskInit.on_fit_end``)."""

    def __init__(self, mask_init: MaskInit) -> None:
        self.mask_init = mask_init
        self.devices: set[str] = set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        masks = self.mask_init.masks
        self.devices = {t.device.type for t in [*masks.values(), *masks.parameters.values()]}


def _assert_masks_hold_on_the_gpu(trainer: L.Trainer, module: Classifier, mask_init: MaskInit, losses: list) -> None:
    recorder = next(c for c in trainer.callbacks if isinstance(c, DeviceRecorder))
    assert recorder.devices == {"cuda"}
    masks = mask_init.masks
    # After fit the model is back on the CPU, and so are the masks.
    assert {t.device.type for t in [*masks.values(), *masks.parameters.values()]} == {"cpu"}
    assert masked_positions_are_zero(module, masks, trainer.optimizers) == []
    assert all(math.isfinite(loss) for loss in losses) and len(losses) == trainer.global_step == 24


@pytest.mark.parametrize("method", ["dsr", "set", "rigl"])
def test_dynamic_reallocation_on_cuda_bf16_keeps_masked_entries_zero_and_the_budget(tmp_path, method) -> None:
    mask_init = MaskInit(sparsity=0.9, seed=0)
    trainer, module, losses = _fit_on_cuda(
        tmp_path,
        CifarResNet(BasicBlock, (1, 1, 1, 1), width=4),
        [mask_init, DynamicReallocation(method, every_n_steps=4)],
    )
    _assert_masks_hold_on_the_gpu(trainer, module, mask_init, losses)
    assert mask_init.masks.density() == pytest.approx(0.1, abs=2e-3)


def test_east_stack_on_cuda_bf16_keeps_masked_entries_zero(tmp_path) -> None:
    mask_init = MaskInit(sparsity=0.9, seed=0)
    callbacks = [
        WeightSharing(),
        DyReLUPhaseOut(start=0.25, end=0.5),
        mask_init,
        CyclicSparsitySchedule(max_multiplier=3.0, cycles=2, cycle_length=0.2, every_n_steps=2),
        DynamicReallocation("rigl", every_n_steps=4, drop_fraction_floor=0.005, rounding="ceil"),
    ]
    trainer, module, losses = _fit_on_cuda(tmp_path, CifarResNet(BasicBlock, (3, 3, 3, 3), width=4), callbacks)
    _assert_masks_hold_on_the_gpu(trainer, module, mask_init, losses)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_piece_max_on_cuda_matches_the_stacked_formula(dtype) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(8, 16, 6, 6, device="cuda", generator=generator).to(dtype)
    coefficients = torch.randn(8, 16, 1, 1, 4, device="cuda", generator=generator) * 2
    grad = torch.randn(8, 16, 6, 6, device="cuda", generator=generator)
    results = []
    for fn in (two_piece_max, lambda a, c: (a.unsqueeze(-1) * c[..., :2] + c[..., 2:]).amax(-1)):
        a, c = x.clone().requires_grad_(), coefficients.clone().requires_grad_()
        out = fn(a, c)
        out.backward(grad.to(out.dtype))
        results.append((out.detach(), a.grad, c.grad))
    for new, old in zip(*results):
        assert new.device.type == "cuda" and new.dtype == old.dtype
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-4)


def test_sparse_inference_keeps_the_dense_kernel_for_a_model_on_the_gpu() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).cuda()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < 0.05)
    x = torch.randn(2, 3, 16, 16, device="cuda")
    fast = sparse_inference(model, x)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model.eval()(x))
    assert all(p.device.type == "cuda" for p in fast.parameters())
    assert fast.report.sparse_layers == []
    assert all("cuda" in layer.reason for layer in fast.report.layers)
