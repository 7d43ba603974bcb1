"""Model surgery between ``nn.ReLU`` and :class:`DyReLU`, and control of the DyReLU blend factor.

EAST (docs/algorithms.md §3c) trains with DyReLU-B at every activation site and phases it out to ReLU. These functions
swap the activation modules of an existing model in place (in the style of timm's ``convert_splitbn_model``), set
the blend factor on every DyReLU, and convert the phased-out model back to plain ReLU for export.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lightning_sparse.nn.dyrelu import DyReLU, validate_blend

__all__ = ["convert_relu_to_dyrelu", "convert_dyrelu_to_relu", "dyrelu_modules", "set_dyrelu_blend"]

# Attributes that give the channel count of a layer's output, in the order they are tried (docs/algorithms.md §3c).
_WIDTH_ATTRIBUTES = ("num_features", "out_channels", "out_features")


def dyrelu_modules(module: nn.Module) -> dict[str, DyReLU]:
    """List the DyReLU modules of a model.

    Args:
        module: Any module (the root itself is included if it is a DyReLU, under the name ``""``).

    Returns:
        Qualified name -> DyReLU, in registration order; a module registered at several places appears once, under
        its first name (as in ``named_modules()``).
    """
    return {name: child for name, child in module.named_modules() if isinstance(child, DyReLU)}


def set_dyrelu_blend(module: nn.Module, beta: float) -> int:
    """Set the blend factor of every DyReLU in a model (EAST phase-out, docs/algorithms.md §3c "Phasing").

    Args:
        module: Model containing DyReLU modules.
        beta: Blend factor in [0, 1]; 1 = DyReLU, 0 = exactly ReLU.

    Returns:
        How many DyReLU modules were updated (0 if the model has none; the caller decides whether that is an error).

    Raises:
        TypeError: If ``beta`` is not a real number.
        ValueError: If ``beta`` lies outside [0, 1].
    """
    value = validate_blend(beta)
    modules = dyrelu_modules(module)
    for dyrelu in modules.values():
        dyrelu.beta = value
    return len(modules)


def convert_relu_to_dyrelu(
    module: nn.Module,
    example_input: torch.Tensor | None = None,
    channels: dict[str, int] | None = None,
    **dyrelu_kwargs: Any,
) -> nn.Module:
    """Replace every ``nn.ReLU`` submodule with a :class:`DyReLU` of the right width (docs/algorithms.md §3c).

    The channel count C of each ReLU is taken, in this order of preference:

    1. from ``channels[name]`` (qualified module name -> C);
    2. if ``example_input`` is given, from a dry forward pass (no grad, eval mode, train/eval flags restored
       afterwards) that records dim 1 of every input each ReLU receives;
    3. statically, from the nearest preceding sibling (in registration order) with ``num_features`` (BatchNorm),
       ``out_channels`` (Conv) or ``out_features`` (Linear, for ``(N, C)`` activations).

    A ReLU instance registered or called at several sites becomes one DyReLU, registered at the same places, so the
    model's module sharing is preserved. That works only if every site has the same width (e.g. torchvision's
    ``BasicBlock.relu``); EAST's own models use a separate activation module per site.

    Args:
        module: Model to convert in place. If it is itself an ``nn.ReLU``, the new DyReLU is returned instead.
        example_input: Batch to run through ``module`` to observe each ReLU's input width.
        channels: Explicit widths, keyed by the qualified name of the ReLU module.
        **dyrelu_kwargs: Passed to :class:`DyReLU` (``reduction``, ``num_pieces``, ``lambdas``,
            ``init_coefficients``).

    Returns:
        The converted module (the same object unless ``module`` itself was a ReLU).

    Raises:
        ValueError: If ``channels`` names a module that is not an ``nn.ReLU`` or gives a non-positive width; if one
            ReLU module sees several widths in the dry run (give each activation site its own module); or if a width
            cannot be inferred (pass ``channels={name: C}`` or ``example_input``).
        TypeError: If ``example_input`` is not a tensor.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
        >>> net = convert_relu_to_dyrelu(net)
        >>> net[2].channels
        8
    """
    # Every registration of each ReLU instance, grouped by instance; the first name is the canonical one.
    sites: dict[int, list[str]] = {}
    relus: dict[str, nn.Module] = {}
    for name, child in module.named_modules(remove_duplicate=False):
        if type(child) is nn.ReLU:
            if id(child) not in sites:
                relus[name] = child
            sites.setdefault(id(child), []).append(name)
    if channels is not None:
        _check_explicit_channels(channels, [name for names in sites.values() for name in names])
    observed = _observe_widths(module, example_input, relus) if example_input is not None else {}

    dtype, device = _parameter_dtype_and_device(module)
    replacements: dict[int, DyReLU] = {}
    for name, relu in relus.items():
        explicit = {channels[site] for site in sites[id(relu)] if site in channels} if channels else set()
        if len(explicit) > 1:
            raise ValueError(
                f"channels gives different widths {sorted(explicit)} for the names {sites[id(relu)]}, which are the "
                "same ReLU module; give each activation site its own module."
            )
        if explicit:
            width = explicit.pop()
        elif name in observed:
            width = observed[name]
        else:
            width = _infer_width_statically(module, name, after_dry_run=example_input is not None)
        dyrelu = DyReLU(width, **dyrelu_kwargs).to(device=device, dtype=dtype)
        dyrelu.site_name = name or None
        replacements[id(relu)] = dyrelu
    return _swap_modules(module, replacements)


def convert_dyrelu_to_relu(module: nn.Module) -> nn.Module:
    """Replace every fully phased-out DyReLU (``beta == 0``) with ``nn.ReLU``, for export (docs/algorithms.md §3c).

    A DyReLU with ``beta == 0`` computes exactly ``torch.relu``, so the model's outputs do not change.

    Args:
        module: Model to convert in place. If it is itself a DyReLU, a new ``nn.ReLU`` is returned instead.

    Returns:
        The converted module.

    Raises:
        ValueError: If any DyReLU still has ``beta > 0`` (names them; call ``set_dyrelu_blend(model, 0.0)`` first if
            the phase-out is meant to be complete).
    """
    modules = dyrelu_modules(module)
    active = [f"{name or '<root>'} (beta={dyrelu.beta})" for name, dyrelu in modules.items() if dyrelu.beta > 0.0]
    if active:
        raise ValueError(
            "Only fully phased-out DyReLU modules (beta == 0) are equivalent to ReLU; these still have beta > 0: "
            f"{', '.join(active)}. Finish the phase-out or call set_dyrelu_blend(model, 0.0) first."
        )
    return _swap_modules(module, {id(dyrelu): nn.ReLU() for dyrelu in modules.values()})


def _check_explicit_channels(channels: dict[str, int], relu_names: list[str]) -> None:
    unknown = sorted(set(channels) - set(relu_names))
    if unknown:
        raise ValueError(
            f"channels names modules that are not nn.ReLU modules of the model: {unknown}. "
            f"The ReLU modules are: {relu_names}."
        )
    for name, width in channels.items():
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"channels[{name!r}] must be a positive int, got {width!r}.")


def _observe_widths(module: nn.Module, example_input: torch.Tensor, relus: dict[str, nn.Module]) -> dict[str, int]:
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(
            f"example_input must be a torch.Tensor batch accepted by the model, got {type(example_input).__name__}."
        )
    seen: dict[str, set[int]] = {name: set() for name in relus}

    def recorder(name: str):
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            x = inputs[0]
            if x.dim() < 2:
                raise ValueError(
                    f"ReLU '{name}' received an input of shape {tuple(x.shape)}; DyReLU needs (N, C, *spatial)."
                )
            seen[name].add(int(x.shape[1]))

        return hook

    training_flags = {sub: sub.training for sub in module.modules()}
    handles = [relu.register_forward_pre_hook(recorder(name)) for name, relu in relus.items()]
    try:
        module.eval()
        with torch.no_grad():
            module(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for sub, flag in training_flags.items():
            sub.training = flag

    widths: dict[str, int] = {}
    for name, counts in seen.items():
        if len(counts) > 1:
            raise ValueError(
                f"ReLU module '{name}' is used at several sites with different channel counts {sorted(counts)}; "
                "a DyReLU has a fixed width, so give each activation site its own module."
            )
        if counts:
            widths[name] = counts.pop()
    return widths


def _infer_width_statically(root: nn.Module, name: str, after_dry_run: bool) -> int:
    parent_name, _, attribute = name.rpartition(".")
    parent = root.get_submodule(parent_name) if name else None
    if parent is not None:
        preceding: list[nn.Module] = []
        for child_name, child in parent._modules.items():
            if child_name == attribute:
                break
            preceding.append(child)
        for sibling in reversed(preceding):
            for width_attribute in _WIDTH_ATTRIBUTES:
                width = getattr(sibling, width_attribute, None)
                if isinstance(width, int) and not isinstance(width, bool) and width > 0:
                    return width
    reason = (
        "it has no preceding sibling with num_features/out_channels/out_features"
        if not after_dry_run
        else "it was not called during the example_input forward pass and has no preceding sibling with "
        "num_features/out_channels/out_features"
    )
    raise ValueError(
        f"Cannot infer the channel count of ReLU '{name or '<root>'}': {reason}. "
        f"Pass channels={{'{name}': C}} or example_input=<a batch> to convert_relu_to_dyrelu."
    )


def _parameter_dtype_and_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter.dtype, parameter.device
    return None, None


def _swap_modules(root: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    if id(root) in replacements:
        return replacements[id(root)]
    # Collect parents first: assigning children while iterating modules() would change what is iterated.
    for parent in list(root.modules()):
        # _modules, not named_children(): the latter skips a second registration of the same module.
        for child_name, child in list(parent._modules.items()):
            if id(child) in replacements:
                setattr(parent, child_name, replacements[id(child)])
    return root
