"""What the sparsity callbacks know about each optimizer: one small :class:`OptimizerSupport` per optimizer class.

This table holds, per optimizer class, whether its update is provably 0 at a weight whose value, gradient and
per-weight state are 0 (``keeps_masked_weights_zero``). For those optimizers the masked weights stay exactly 0
through ``optimizer.step()`` once the gradient is masked, so MaskInit skips its post-step re-zeroing pass on
ordinary steps (docs/architecture.md §4; issue 14). Optimizers that are not in the table, including subclasses of
listed ones (a subclass may change ``step``), keep the pass. No Lightning import.

Why each listed optimizer keeps a masked weight at 0, with ``p = 0``, ``g = 0`` and its state at the position
0 (or, for Rprop's ``step_size`` and Adagrad's ``sum``, at its initial value); every one of their options
(momentum, Nesterov, dampening, weight decay L2 or decoupled, AMSGrad, ``maximize``, ``centered``,
foreach/fused) keeps these zeros:

* SGD: ``d = g + wd p = 0``; the momentum buffer ``mu b + (1 - dampening) d`` stays 0; the step is ``lr d = 0``.
* Adam, AdamW, NAdam, RAdam: both moments stay 0, the step is ``m / (sqrt(v) + eps) = 0`` (RAdam's
  un-rectified step is a multiple of ``m``); decoupled decay multiplies ``p = 0``.
* Adamax: ``exp_avg`` stays 0 and ``exp_inf = max(beta2 exp_inf, |g| + eps) >= eps``, so the step is 0.
* Adagrad: ``sum`` does not change (``+ g^2 = 0``), the step is ``g / (sqrt(sum) + eps) = 0``.
* Adadelta: ``square_avg`` stays 0, the step is ``sqrt(acc_delta + eps) / sqrt(square_avg + eps) g = 0``.
* RMSprop: ``square_avg`` (and ``grad_avg``) stay 0, the denominator is at least ``eps``, the step and the momentum
  buffer stay 0.
* Rprop: the step is ``sign(g) step_size = 0`` whatever ``step_size`` is.
* ASGD: ``p`` is multiplied by ``1 - lambd eta`` and moved by ``eta g = 0``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["OPTIMIZER_SUPPORT", "OptimizerSupport", "keeps_masked_weights_zero"]


@dataclass(frozen=True)
class OptimizerSupport:
    """How the sparsity callbacks treat one optimizer class.

    Attributes:
        keeps_masked_weights_zero: the optimizer's update is provably 0 where the weight, its gradient and its
            per-weight state are 0 (see the module docstring for each optimizer's argument), so masked weights stay
            exactly 0 through ``optimizer.step()`` without a re-zeroing pass.
    """

    keeps_masked_weights_zero: bool = False


OPTIMIZER_SUPPORT: dict[type[torch.optim.Optimizer], OptimizerSupport] = {
    torch.optim.SGD: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.Adam: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.AdamW: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.NAdam: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.RAdam: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.Adamax: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.Adadelta: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.RMSprop: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.ASGD: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.Adagrad: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.Rprop: OptimizerSupport(keeps_masked_weights_zero=True),
}


def keeps_masked_weights_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step provably leaves masked weights at 0 once their gradients are masked.

    Only the exact classes of :data:`OPTIMIZER_SUPPORT` count: a subclass may override ``step`` (add noise, a
    decay toward a non-zero value...), so it is treated as unknown.
    """
    support = OPTIMIZER_SUPPORT.get(type(optimizer))
    return support is not None and support.keeps_masked_weights_zero
