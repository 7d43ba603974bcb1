"""Which parameters of a model are sparse: by module type, then glob patterns over parameter names.

No Lightning import.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn

__all__ = ["EXEMPT_ATTRIBUTE", "PRUNABLE_MODULE_TYPES", "frozen_left_out", "select_sparse_parameters"]

PRUNABLE_MODULE_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
"""Module types whose ``weight`` is sparse by default (biases and normalisation layers never are)."""

EXEMPT_ATTRIBUTE = "sparsity_exempt"
"""A module with ``sparsity_exempt = True`` keeps its whole subtree dense by default (e.g. DyReLU's hyper-network,
which EAST trains densely, docs/algorithms.md §3c)."""


def _default_sparse_names(module: nn.Module) -> list[str]:
    canonical = {id(param): name for name, param in module.named_parameters()}
    exempt_prefixes = [
        name + "." for name, sub in module.named_modules() if name and getattr(sub, EXEMPT_ATTRIBUTE, False)
    ]
    names: list[str] = []
    for module_name, sub in module.named_modules():
        if not isinstance(sub, PRUNABLE_MODULE_TYPES) or getattr(sub, EXEMPT_ATTRIBUTE, False):
            continue
        if any((module_name + ".").startswith(prefix) for prefix in exempt_prefixes):
            continue
        weight = getattr(sub, "weight", None)
        if isinstance(weight, nn.Parameter) and canonical[id(weight)] not in names:
            names.append(canonical[id(weight)])
    return names


def frozen_left_out(module: nn.Module, include: Sequence[str] | None = None) -> list[str]:
    """Names of the frozen weights (``requires_grad=False``) the default selection leaves dense.

    Empty when ``include`` patterns replace the default selection (they choose frozen weights explicitly).
    """
    if include:
        return []
    named = dict(module.named_parameters())
    return [name for name in _default_sparse_names(module) if not named[name].requires_grad]


def select_sparse_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters that get a mask, by canonical name.

    Args:
        module: the model (a LightningModule or any ``nn.Module``).
        include: glob patterns (``fnmatch``, e.g. ``"layer*.conv*.weight"``) over parameter names. When given,
            they replace the default selection (the weights of Conv1d/2d/3d and Linear layers that require a
            gradient: frozen weights are left dense unless an include pattern names them). One string is one
            pattern.
        exclude: glob patterns removed from the selection (e.g. ``["fc.weight"]`` keeps the classifier dense).

    Returns:
        Name -> parameter, in the model's registration order.

    Raises:
        ValueError: if a pattern matches no parameter of the model, or nothing is left to make sparse.
    """
    named = dict(module.named_parameters())
    include = [include] if isinstance(include, str) else include
    exclude = [exclude] if isinstance(exclude, str) else exclude
    for kind, patterns in (("include", include), ("exclude", exclude)):
        for pattern in patterns or ():
            if not any(fnmatchcase(name, pattern) for name in named):
                raise ValueError(
                    f"{kind} pattern {pattern!r} matches no parameter of {type(module).__name__}; "
                    f"parameter names look like: {list(named)[:8]}"
                )
    if include:
        names = [name for name in named if any(fnmatchcase(name, pattern) for pattern in include)]
    else:
        names = [name for name in _default_sparse_names(module) if named[name].requires_grad]
    if exclude:
        names = [name for name in names if not any(fnmatchcase(name, pattern) for pattern in exclude)]
    uninitialized = [name for name in names if isinstance(named[name], nn.parameter.UninitializedParameter)]
    if uninitialized:
        raise ValueError(f"parameters {uninitialized} are lazy and not yet initialised; run a forward pass first")
    if not names:
        raise ValueError(
            f"{type(module).__name__} has no parameter to make sparse: the default selects the weights of "
            f"{', '.join(t.__name__ for t in PRUNABLE_MODULE_TYPES)} layers; pass include=[...] glob patterns "
            "over parameter names to choose others, or check exclude"
        )
    return {name: named[name] for name in names}
