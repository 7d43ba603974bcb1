"""Which optimizers keep exact sparsity, and the value each per-weight state entry starts from.

When a weight is pruned or grown, its optimizer state must restart as if the weight were new
(docs/architecture.md §3). For most optimizers that is 0 (SGD's momentum, Adam's moments), but not for all:
Rprop's per-weight ``step_size`` starts at the learning rate and Adagrad's ``sum`` at
``initial_accumulator_value``; zeroing them would restart those weights at Rprop's 1e-6 clamp, or divide by
``sqrt(0 + eps)``. :data:`OPTIMIZER_SUPPORT` holds one small :class:`OptimizerSupport` per optimizer class;
an optimizer that is not in it gets the zero rule. Optimizers whose per-weight state is not shaped like the weights
(LBFGS's flat histories, Adafactor's factored second moments) cannot be masked position by position and are
rejected before the first step; an unknown optimizer is checked after its first step. No Lightning import.
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
    """

    initial_state: Mapping[str, InitialValue] = field(default_factory=dict)
    rejected: str | None = None


def _lr(group: Mapping[str, Any]) -> float:
    return float(group["lr"])


OPTIMIZER_SUPPORT: dict[type[torch.optim.Optimizer], OptimizerSupport] = {
    torch.optim.SGD: OptimizerSupport(),
    torch.optim.Adam: OptimizerSupport(),
    torch.optim.AdamW: OptimizerSupport(),
    torch.optim.NAdam: OptimizerSupport(),
    torch.optim.RAdam: OptimizerSupport(),
    torch.optim.Adamax: OptimizerSupport(),  # exp_avg and exp_inf both start at 0 (eps enters only the max)
    torch.optim.Adadelta: OptimizerSupport(),
    torch.optim.RMSprop: OptimizerSupport(),
    torch.optim.ASGD: OptimizerSupport(),  # ax starts at 0; eta and mu are per-parameter scalars
    torch.optim.Adagrad: OptimizerSupport(
        initial_state={"sum": lambda group: float(group["initial_accumulator_value"])}
    ),
    torch.optim.Rprop: OptimizerSupport(initial_state={"step_size": _lr}),
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
