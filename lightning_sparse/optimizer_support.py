"""Which optimizers keep exact sparsity, and the value each per-weight state entry starts from.

When a weight is pruned or grown, its optimizer state must restart as if the weight were new
(docs/architecture.md §3). For most optimizers that is 0 (SGD's momentum, Adam's moments), but not for all:
Rprop's per-weight ``step_size`` starts at the learning rate and Adagrad's ``sum`` at
``initial_accumulator_value``; zeroing them would restart those weights at Rprop's 1e-6 clamp, or divide by
``sqrt(0 + eps)``. :data:`OPTIMIZER_SUPPORT` holds one small :class:`OptimizerSupport` per optimizer class;
an optimizer that is not in it gets the zero rule. Optimizers whose per-weight state is not shaped like the weights
(LBFGS's flat histories, Adafactor's factored second moments) cannot be masked position by position and are
rejected before the first step; an unknown optimizer is checked after its first step. No Lightning import.

The table also says whether an optimizer's update is provably 0 at a weight whose value, gradient and per-weight
state are 0 (``keeps_masked_weights_zero``). For those optimizers masked weights stay exactly 0 through
``optimizer.step()`` once the gradient is masked, so MaskInit skips its post-step re-zeroing pass on ordinary steps
(docs/architecture.md §4; issue 14). Optimizers that are not in the table, including subclasses of listed ones (a
subclass may change ``step``), keep the pass. Why each listed optimizer keeps a masked weight at 0, with ``p = 0``,
``g = 0`` and its state at the position 0 or at its initial value; all of their options (momentum, Nesterov,
dampening, L2 or decoupled weight decay, AMSGrad, ``maximize``, ``centered``, foreach/fused) keep these zeros:

* SGD: ``d = g + wd p = 0``; the momentum buffer ``mu b + (1 - dampening) d`` stays 0; the step is ``lr d = 0``.
* Adam, AdamW, NAdam, RAdam: both moments stay 0, the step is ``m / (sqrt(v) + eps) = 0`` (RAdam's un-rectified
  step is a multiple of ``m``); decoupled decay multiplies ``p = 0``.
* Adamax: ``exp_avg`` stays 0 and ``exp_inf = max(beta2 exp_inf, |g| + eps) >= eps``, so the step is 0.
* Adagrad: ``sum`` does not change (``+ g^2 = 0``), the step is ``g / (sqrt(sum) + eps) = 0``.
* Adadelta: ``square_avg`` stays 0, the step is ``sqrt(acc_delta + eps) / sqrt(square_avg + eps) g = 0``.
* RMSprop: ``square_avg`` (and ``grad_avg``) stay 0, the denominator is at least ``eps``, the step and the momentum
  buffer stay 0.
* Rprop: the step is ``sign(g) step_size = 0`` whatever ``step_size`` is.
* ASGD: ``p`` is multiplied by ``1 - lambd eta`` and moved by ``eta g = 0``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "OPTIMIZER_SUPPORT",
    "OptimizerSupport",
    "UnsupportedOptimizerError",
    "check_optimizer",
    "check_state_shapes",
    "initial_state_value",
    "keeps_masked_weights_zero",
    "support_for",
]

InitialValue = Callable[[Mapping[str, Any]], float]
"""Param group -> the value a state entry starts from."""


class UnsupportedOptimizerError(ValueError):
    """An optimizer whose state cannot be kept exact at masked positions."""


@dataclass(frozen=True)
class OptimizerSupport:
    """How the sparsity callbacks treat one optimizer class.

    Attributes:
        initial_state: state key -> the value that entry takes for a new weight, computed from the parameter's
            group (e.g. ``lambda group: group["lr"]``). Keys that are not listed start at 0.
        rejected: why the optimizer cannot be used (``None``: it can).
        keeps_masked_weights_zero: the optimizer's update is provably 0 where the weight, its gradient and its
            per-weight state are 0 (see the module docstring), so masked weights stay exactly 0 through
            ``optimizer.step()`` without a re-zeroing pass.
    """

    initial_state: Mapping[str, InitialValue] = field(default_factory=dict)
    rejected: str | None = None
    keeps_masked_weights_zero: bool = False


def _lr(group: Mapping[str, Any]) -> float:
    return float(group["lr"])


OPTIMIZER_SUPPORT: dict[type[torch.optim.Optimizer], OptimizerSupport] = {
    torch.optim.SGD: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.Adam: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.AdamW: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.NAdam: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.RAdam: OptimizerSupport(keeps_masked_weights_zero=True),
    # Adamax: exp_avg and exp_inf both start at 0 (eps enters only the max).
    torch.optim.Adamax: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.Adadelta: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.RMSprop: OptimizerSupport(keeps_masked_weights_zero=True),
    # ASGD: ax starts at 0; eta and mu are per-parameter scalars.
    torch.optim.ASGD: OptimizerSupport(keeps_masked_weights_zero=True),
    torch.optim.Adagrad: OptimizerSupport(
        initial_state={"sum": lambda group: float(group["initial_accumulator_value"])}, keeps_masked_weights_zero=True
    ),
    torch.optim.Rprop: OptimizerSupport(initial_state={"step_size": _lr}, keeps_masked_weights_zero=True),
    torch.optim.LBFGS: OptimizerSupport(
        rejected="its state is a flat history over all parameters (one vector per step), not one entry per weight, "
        "so no mask can keep it exact"
    ),
    torch.optim.SparseAdam: OptimizerSupport(
        rejected="it needs sparse gradients (nn.Embedding(sparse=True)); conv and linear weights have dense ones"
    ),
}
if hasattr(torch.optim, "Adafactor"):
    OPTIMIZER_SUPPORT[torch.optim.Adafactor] = OptimizerSupport(
        rejected="its second moments are factored into row and column statistics, not one entry per weight, so "
        "masked weights would still shape the update of active ones"
    )

_DEFAULT = OptimizerSupport()


def support_for(optimizer: torch.optim.Optimizer) -> OptimizerSupport:
    """The table entry of ``optimizer``'s class (or of its nearest listed base class; the zero rule otherwise)."""
    for cls in type(optimizer).__mro__:
        if cls in OPTIMIZER_SUPPORT:
            return OPTIMIZER_SUPPORT[cls]
    return _DEFAULT


def keeps_masked_weights_zero(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step provably leaves masked weights at 0 once their gradients are masked.

    Only the exact classes of :data:`OPTIMIZER_SUPPORT` count (unlike :func:`support_for`): a subclass may override
    ``step`` (add noise, decay toward a non-zero value...), so it is treated as unknown and keeps the pass.
    """
    support = OPTIMIZER_SUPPORT.get(type(optimizer))
    return support is not None and support.keeps_masked_weights_zero


def check_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Raise before the first step if ``optimizer`` is one the masks cannot keep exact.

    Raises:
        UnsupportedOptimizerError: for LBFGS, SparseAdam, Adafactor, and others marked ``rejected``.
    """
    reason = support_for(optimizer).rejected
    if reason is not None:
        raise UnsupportedOptimizerError(
            f"{type(optimizer).__name__} cannot be used with sparse masks: {reason}. Use an optimizer with one state "
            "entry per weight (SGD, Adam, AdamW, NAdam, RAdam, Adamax, Adagrad, Adadelta, RMSprop, Rprop, ASGD, ...); "
            "see docs/troubleshooting.md"
        )


def initial_state_value(optimizer: torch.optim.Optimizer, group: Mapping[str, Any], key: str) -> float:
    """The value state entry ``key`` takes for a new weight of a parameter in ``group``."""
    rule = support_for(optimizer).initial_state.get(key)
    return 0.0 if rule is None else rule(group)


def check_state_shapes(
    optimizer: torch.optim.Optimizer, parameters: Iterable[Tensor], names: Mapping[int, str]
) -> None:
    """Raise if a sparse parameter's optimizer state holds a tensor that is neither a scalar nor its shape.

    Such state (an unknown optimizer's factored or flattened statistics) cannot be reset at masked positions.

    Args:
        optimizer: an optimizer after at least one step.
        parameters: the sparse parameters.
        names: ``id(parameter)`` -> its name, for the message.

    Raises:
        UnsupportedOptimizerError: naming the optimizer, the parameter and the state entry.
    """
    for param in parameters:
        for key, value in optimizer.state.get(param, {}).items():
            if isinstance(value, Tensor) and value.numel() > 1 and value.shape != param.shape:
                raise UnsupportedOptimizerError(
                    f"{type(optimizer).__name__} keeps state {key!r} of shape {tuple(value.shape)} for the sparse "
                    f"parameter {names.get(id(param), '?')} of shape {tuple(param.shape)}: state that is not one "
                    "entry per weight cannot be kept exact at masked positions. Use an optimizer with per-weight "
                    "state (SGD, Adam, AdamW, ...), or add the optimizer to "
                    "lightning_sparse.optimizer_support.OPTIMIZER_SUPPORT as rejected; see docs/troubleshooting.md"
                )
