"""The optimizers whose update keeps masked weights at exactly 0 without MaskInit's post-step pass (issue 14)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparse import MaskInit
from lightning_sparse.masks import SparseMasks
from lightning_sparse.optimizer_support import OPTIMIZER_SUPPORT, keeps_masked_weights_zero
from tests.helpers import Classifier, TinyCNN, masked_positions_are_zero, random_loader, trainer_kwargs

# Every listed optimizer with the options that touch masked positions: momentum, Nesterov, dampening, L2 or
# decoupled weight decay, AMSGrad, centered, maximize, and the single-tensor and foreach implementations.
CASES: dict[str, Callable[[Any], torch.optim.Optimizer]] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum_wd_dampening": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=5e-3),
    "sgd_nesterov_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3,
                                                      foreach=True),
    "sgd_nesterov_single": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-3,
                                                     foreach=False),
    "sgd_maximize": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, maximize=True),
    "adam_wd_amsgrad": lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-3, amsgrad=True),
    "adam_single": lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
    "adamw": lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=1e-1),
    "nadam_decoupled": lambda p: torch.optim.NAdam(p, lr=1e-2, weight_decay=1e-2, decoupled_weight_decay=True),
    "radam_wd": lambda p: torch.optim.RAdam(p, lr=1e-2, weight_decay=1e-2),
    "adamax_wd": lambda p: torch.optim.Adamax(p, lr=1e-2, weight_decay=1e-2),
    "adadelta_wd": lambda p: torch.optim.Adadelta(p, lr=1.0, weight_decay=1e-2),
    "rmsprop_centered_momentum": lambda p: torch.optim.RMSprop(p, lr=1e-3, momentum=0.9, centered=True,
                                                               weight_decay=1e-2),
    "asgd_wd": lambda p: torch.optim.ASGD(p, lr=1e-2, weight_decay=1e-2, t0=5),
    "adagrad_wd": lambda p: torch.optim.Adagrad(p, lr=1e-2, weight_decay=1e-2, initial_accumulator_value=0.1),
    "rprop": lambda p: torch.optim.Rprop(p, lr=1e-2),
}


def test_every_listed_optimizer_has_a_case_here() -> None:
    listed = {cls for cls, support in OPTIMIZER_SUPPORT.items() if support.keeps_masked_weights_zero}
    covered = {type(make(nn.Linear(2, 2).parameters())) for make in CASES.values()}
    assert listed == covered


@pytest.mark.parametrize("name", list(CASES))
def test_listed_optimizer_keeps_masked_weights_exactly_zero_without_the_post_step_pass(name: str) -> None:
    torch.manual_seed(0)
    net = TinyCNN()
    optimizer = CASES[name](net.parameters())
    assert keeps_masked_weights_zero(optimizer)
    sparse = {n: p for n, p in net.named_parameters() if p.dim() > 1}
    generator = torch.Generator().manual_seed(1)
    masks = SparseMasks(sparse, {n: torch.rand(p.shape, generator=generator) < 0.3 for n, p in sparse.items()})
    masks.attach_optimizers([optimizer])
    masks.apply_()
    initial = {n: p.detach().clone() for n, p in sparse.items()}
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    for _ in range(60):  # the masking of MaskInit's ordinary step, without the re-zeroing pass after it
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        masks.mask_grads_()
        optimizer.step()
    moved = sum(int((p.detach() != initial[n]).sum()) for n, p in sparse.items())
    assert moved > masks.nnz() // 2  # the optimizer really trained the active weights
    for name_, param in sparse.items():
        masked = ~masks[name_]
        assert torch.equal(param.detach()[masked], torch.zeros_like(param.detach()[masked])), name_


class NoisySGD(torch.optim.SGD):
    """SGD that adds noise to every weight: a subclass of a listed optimizer, so it must count as unknown."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(torch.randn_like(param), alpha=1e-3)
        return loss


class _CountingMaskInit(MaskInit):
    """MaskInit that records the optimizer steps at which its optimizer hook made a re-zeroing pass."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.steps_with_pass: set[int] = set()
        self._step = -1

    def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
        self._step = trainer.global_step
        super().on_before_optimizer_step(trainer, pl_module, optimizer)

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        apply = self.masks.apply_
        calls = []

        def counted() -> None:
            calls.append(1)
            apply()

        self.masks.apply_ = counted  # type: ignore[method-assign]
        try:
            super()._after_optimizer_step(optimizer, args, kwargs)
        finally:
            del self.masks.apply_
        if calls:
            self.steps_with_pass.add(self._step)


class _Module(Classifier):
    def __init__(self, make: Callable[[Any], torch.optim.Optimizer]) -> None:
        super().__init__()
        self.make = make

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.make(self.parameters())


def _fit(tmp_path: Any, make: Callable[[Any], torch.optim.Optimizer], **callbacks_kwargs: Any) -> tuple[Any, ...]:
    from lightning_sparse import DynamicReallocation

    mask_init = _CountingMaskInit(sparsity=0.8, seed=0)
    callbacks: list[L.Callback] = [mask_init]
    if callbacks_kwargs.get("dsr_every"):
        callbacks.append(DynamicReallocation("dsr", every_n_steps=callbacks_kwargs["dsr_every"], stop_at=1.0))
    module = _Module(make)
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_epochs=3))
    trainer.fit(module, random_loader())
    return trainer, module, mask_init


def test_mask_init_skips_the_pass_on_ordinary_steps_and_keeps_it_at_update_steps(tmp_path: Any) -> None:
    trainer, module, mask_init = _fit(
        tmp_path, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4), dsr_every=5
    )
    assert trainer.global_step == 24
    assert trainer.callbacks[1].num_updates >= 3
    # The first step, and every step at which the masks changed (DSR updates that pruned something).
    update_steps = set(range(5, trainer.global_step, 5))
    assert 0 in mask_init.steps_with_pass
    assert 1 < len(mask_init.steps_with_pass) and mask_init.steps_with_pass <= {0} | update_steps
    assert masked_positions_are_zero(module, mask_init.masks, trainer.optimizers) == []


def test_the_pass_still_runs_and_catches_drift_for_an_optimizer_not_on_the_list(tmp_path: Any) -> None:
    optimizer = NoisySGD(nn.Linear(2, 2).parameters(), lr=0.1)
    assert not keeps_masked_weights_zero(optimizer)
    trainer, module, mask_init = _fit(tmp_path, lambda p: NoisySGD(p, lr=0.05))
    assert mask_init.steps_with_pass == set(range(trainer.global_step))  # every step
    assert masked_positions_are_zero(module, mask_init.masks, trainer.optimizers) == []

    # And the pass is what keeps them at 0: the same noise without it leaves masked weights non-zero.
    net = TinyCNN()
    sparse = {n: p for n, p in net.named_parameters() if p.dim() > 1}
    masks = SparseMasks(sparse, {n: torch.rand(p.shape) < 0.3 for n, p in sparse.items()})
    masks.apply_()
    noisy = NoisySGD(net.parameters(), lr=0.05)
    nn.functional.cross_entropy(net(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,))).backward()
    masks.mask_grads_()
    noisy.step()
    assert any((p.detach()[~masks[n]] != 0).any() for n, p in sparse.items())
