"""Intra-stage weight sharing for residual networks, and parameter-use bookkeeping (EAST, docs/algorithms.md §3d).

EAST (Li et al. 2024, Fig. 4) lets the later blocks of a residual stage reuse the conv weights of one earlier block
of the same stage, each reuse multiplied by its own learnable scalar. The reused tensor *is* the source block's
Parameter, so it has one mask and accumulates the gradients of every user. BatchNorm, activations and shortcut
(downsample) convs are not shared.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from lightning_sparse.nn._conv_geometry import copy_conv_geometry

__all__ = [
    "SharedConv2d",
    "WeightSharingReport",
    "effective_density_multiplier",
    "parameter_uses",
    "share_stage_weights",
]

# Attribute names under which residual blocks keep their shortcut branch (torchvision: downsample; many CIFAR
# ResNets: shortcut). Convs under them are never shared, and a block with a non-empty shortcut never reuses weights.
_SHORTCUT_ATTRIBUTES = ("downsample", "shortcut")


class SharedConv2d(nn.Module):
    """A 2-D convolution that reuses another ``nn.Conv2d``'s weight, scaled by its own learnable scalar.

    ``forward(x) = scale * conv2d(x, source.weight, source.bias)`` with the source's stride, padding, dilation,
    groups and padding mode (docs/algorithms.md §3d). ``self.weight`` (and ``self.bias``) are the source's ``Parameter``
    objects, registered here too, so ``named_parameters(remove_duplicate=False)`` lists each use while
    ``named_parameters()`` lists the tensor once, under the source's name. A mask applied in place to the source
    weight therefore applies to every user, and gradients from every user accumulate into it.

    Sharing holds as long as the source's weight is modified in place; assigning a new Parameter to
    ``source.weight`` afterwards would break it.

    Args:
        source: The convolution whose weight is reused.
        scale_init: Initial value of ``scale``. ``None`` (default) draws it from U(0, 1) with the global torch RNG,
            as the EAST authors' code does (docs/algorithms.md §3d); pass e.g. ``1.0`` for a start that reproduces the
            source conv exactly.
        source_name: Qualified name of ``source`` in the model, shown in the repr.

    Raises:
        TypeError: If ``source`` is not an ``nn.Conv2d``.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        >>> reuse = SharedConv2d(conv, scale_init=1.0)
        >>> reuse.weight is conv.weight
        True
    """

    def __init__(self, source: nn.Conv2d, scale_init: float | None = None, source_name: str | None = None) -> None:
        super().__init__()
        if not isinstance(source, nn.Conv2d):
            raise TypeError(f"SharedConv2d needs an nn.Conv2d source, got {type(source).__name__}.")
        self.weight = source.weight
        self.bias = source.bias
        copy_conv_geometry(self, source)
        self.padding = source.padding
        self._reversed_padding_repeated_twice = tuple(source._reversed_padding_repeated_twice)
        self.source_name = source_name
        weight = source.weight
        if scale_init is None:
            initial = torch.rand((), dtype=weight.dtype, device=weight.device)
        else:
            initial = torch.tensor(float(scale_init), dtype=weight.dtype, device=weight.device)
        self.scale = nn.Parameter(initial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``scale * conv2d(x, weight, bias)`` with the source conv's geometry."""
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding: tuple[int, ...] | str = 0
        else:
            padding = self.padding
        out = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation, self.groups)
        return self.scale * out

    def extra_repr(self) -> str:
        source = self.source_name if self.source_name is not None else "<unnamed>"
        return (
            f"source={source}, {self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, groups={self.groups}, bias={self.bias is not None}"
        )


@dataclass(frozen=True)
class WeightSharingReport:
    """What :func:`share_stage_weights` did.

    Attributes:
        stages: Qualified names of the residual stages that had at least ``min_blocks`` blocks.
        shared_blocks: Sharing block name -> name of the source block whose convs it now reuses.
        skipped_blocks: Block after the source that was left unshared -> why (e.g. it has a downsample).
        conv_weights_before: Elements of all distinct ``nn.Conv2d`` weight tensors before sharing.
        conv_weights_after: Elements of all distinct conv weight tensors after sharing (the real prunable conv
            weights).
        virtual_weights: Sum over every reuse of the source tensor's numel (docs/algorithms.md §3d "P_virtual");
            ``conv_weights_before == conv_weights_after + virtual_weights``.
    """

    stages: tuple[str, ...]
    shared_blocks: dict[str, str] = field(default_factory=dict)
    skipped_blocks: dict[str, str] = field(default_factory=dict)
    conv_weights_before: int = 0
    conv_weights_after: int = 0
    virtual_weights: int = 0


def share_stage_weights(model: nn.Module, source_block: int = 1, min_blocks: int = 3) -> WeightSharingReport:
    """Make later blocks of each residual stage reuse one block's conv weights, in place (docs/algorithms.md §3d).

    A *stage* is an ``nn.Sequential`` whose children are all residual blocks of one class, a block being a module
    (not a container) with ``nn.Conv2d`` submodules; this covers torchvision's ``BasicBlock``/``Bottleneck`` and the
    project's CIFAR ResNets (same attribute names: ``conv1, bn1, conv2, bn2, (conv3, bn3), downsample``). In every
    stage with at least ``min_blocks`` blocks, each block after index ``source_block`` whose main-path convs have
    the same shapes and geometry as the source block's, and which has no downsample/shortcut, gets each of those
    convs replaced by a :class:`SharedConv2d` of the corresponding source conv (U(0, 1) scale). Blocks before the
    source keep their own weights; BatchNorm, activations and shortcut convs are never shared. EAST's default
    (``ratio = 2``) is ``source_block=1``: blocks 3..n reuse block 2.

    Args:
        model: Network to modify in place; call before the optimizer is built.
        source_block: 0-based index, inside each stage, of the block whose convs are reused.
        min_blocks: Stages with fewer blocks are left alone.

    Returns:
        A :class:`WeightSharingReport`.

    Raises:
        TypeError: If ``source_block`` or ``min_blocks`` is not an int.
        ValueError: If the model already has shared convs; if no stage has ``min_blocks`` blocks (names what was
            found); if ``source_block`` is not a valid block index of a qualifying stage; or if no block ends up
            sharing (names why each candidate was skipped).

    Example:
        >>> import torchvision
        >>> net = torchvision.models.resnet34(num_classes=10)
        >>> report = share_stage_weights(net)
        >>> sorted(report.shared_blocks)[:2]
        ['layer1.2', 'layer2.2']
    """
    for name, value in (("source_block", source_block), ("min_blocks", min_blocks)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}.")
    if source_block < 0:
        raise ValueError(f"source_block is a 0-based block index and must be >= 0, got {source_block}.")
    if min_blocks < 2:
        raise ValueError(
            f"min_blocks must be >= 2 (a source block and at least one block reusing it), got {min_blocks}."
        )
    already = [name for name, module in model.named_modules() if isinstance(module, SharedConv2d)]
    if already:
        raise ValueError(
            f"The model already shares weights (SharedConv2d at {already[:3]}...); apply share_stage_weights once."
        )

    stages = _find_stages(model)
    qualifying = {name: blocks for name, blocks in stages.items() if len(blocks) >= min_blocks}
    if not qualifying:
        found = ", ".join(f"'{name}' ({len(blocks)} blocks)" for name, blocks in stages.items()) or "none"
        raise ValueError(
            f"No residual stage has at least min_blocks={min_blocks} blocks. Stages found (nn.Sequential of "
            f"residual blocks): {found}. Lower min_blocks (and source_block) or use a deeper network."
        )
    too_short = {name: len(blocks) for name, blocks in qualifying.items() if source_block >= len(blocks)}
    if too_short:
        raise ValueError(
            f"source_block={source_block} is out of range for stage(s) {too_short} (name: number of blocks); "
            "choose a smaller 0-based index."
        )

    conv_weights_before = _conv_weight_count(model)
    shared: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for stage_name, blocks in qualifying.items():
        prefix = f"{stage_name}." if stage_name else ""
        source_name = f"{prefix}{blocks[source_block][0]}"
        source = blocks[source_block][1]
        source_convs = _main_path_convs(source)
        for block_name, block in blocks[source_block + 1 :]:
            qualified = f"{prefix}{block_name}"
            reason = _reason_not_to_share(block, source_convs)
            if reason is not None:
                skipped[qualified] = reason
                continue
            for conv_name, source_conv in source_convs.items():
                parent_name, _, attribute = conv_name.rpartition(".")
                parent = block.get_submodule(parent_name)
                setattr(parent, attribute, SharedConv2d(source_conv, source_name=f"{source_name}.{conv_name}"))
            shared[qualified] = source_name
    if not shared:
        raise ValueError(
            f"No block could reuse its stage's source block {source_block}: {skipped}. "
            "Check source_block (the source and the blocks after it need identical conv shapes)."
        )

    conv_weights_after = _conv_weight_count(model)
    virtual = sum(m.weight.numel() for m in model.modules() if isinstance(m, SharedConv2d))
    return WeightSharingReport(
        stages=tuple(qualifying),
        shared_blocks=shared,
        skipped_blocks=skipped,
        conv_weights_before=conv_weights_before,
        conv_weights_after=conv_weights_after,
        virtual_weights=virtual,
    )


def parameter_uses(module: nn.Module) -> dict[str, int]:
    """Count how many times each parameter is registered in the module tree (docs/algorithms.md §3d).

    A weight shared by :func:`share_stage_weights` counts 1 for its source conv plus 1 per :class:`SharedConv2d`.

    Args:
        module: Any module.

    Returns:
        Canonical parameter name (as in ``module.named_parameters()``) -> number of registrations (>= 1).
    """
    registrations = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
    return {name: registrations[id(p)] for name, p in module.named_parameters()}


def effective_density_multiplier(module: nn.Module, param_names: list[str]) -> float:
    """EAST's density correction for shared weights: ``(P_real + P_virtual) / P_real`` (docs/algorithms.md §3d).

    ``P_real`` is the number of elements of the named tensors and ``P_virtual`` the extra elements their reuses
    add (numel times registrations beyond the first). Applying density ``d * multiplier`` to the real tensors keeps
    the number of active learnable weights at ``d`` times the unshared model's prunable weights, e.g. 1.905 for the
    CIFAR ResNet-34 on CIFAR-10.

    Args:
        module: The (shared) model.
        param_names: Canonical names of the prunable parameters (from ``module.named_parameters()``).

    Returns:
        The multiplier (1.0 when nothing is shared).

    Raises:
        ValueError: If ``param_names`` is empty, repeats a name, names no parameter, uses a non-canonical alias of a
            shared parameter, or the tensors have no elements.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False))
        >>> effective_density_multiplier(net, ["0.weight"])
        1.0
    """
    if len(param_names) == 0:
        raise ValueError("param_names is empty; pass the canonical names of the prunable parameters.")
    repeated = sorted(name for name, count in Counter(param_names).items() if count > 1)
    if repeated:
        raise ValueError(f"param_names repeats {repeated}; list each parameter once.")
    parameters = dict(module.named_parameters())
    uses = parameter_uses(module)
    unknown = [name for name in param_names if name not in parameters]
    if unknown:
        canonical = {id(p): name for name, p in parameters.items()}
        aliases = dict(module.named_parameters(remove_duplicate=False))
        hints = [
            f"'{name}' is an alias of '{canonical[id(aliases[name])]}'" if name in aliases else f"'{name}' not found"
            for name in unknown
        ]
        raise ValueError(f"param_names must be canonical names from named_parameters(): {'; '.join(hints)}.")
    real = sum(parameters[name].numel() for name in param_names)
    if real == 0:
        raise ValueError(f"The parameters {param_names} have no elements.")
    virtual = sum((uses[name] - 1) * parameters[name].numel() for name in param_names)
    return (real + virtual) / real


def _find_stages(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    stages: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential) or len(module) == 0:
            continue
        if any(name.startswith(f"{stage}.") or stage == "" for stage in stages):
            continue
        blocks = list(module._modules.items())
        if all(_is_residual_block(block) for _, block in blocks) and len({type(b) for _, b in blocks}) == 1:
            stages[name] = blocks
    return stages


def _is_residual_block(module: nn.Module | None) -> bool:
    # Containers have no forward of their own that could add a skip connection.
    if module is None or isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict, nn.Conv2d)):
        return False
    return any(isinstance(sub, nn.Conv2d) for sub in module.modules())


def _has_shortcut_branch(block: nn.Module) -> bool:
    for attribute in _SHORTCUT_ATTRIBUTES:
        branch = getattr(block, attribute, None)
        if isinstance(branch, nn.Module) and any(True for _ in branch.parameters()):
            return True
    return False


def _main_path_convs(block: nn.Module) -> dict[str, nn.Conv2d]:
    convs: dict[str, nn.Conv2d] = {}
    for name, sub in block.named_modules():
        if name.split(".")[0] in _SHORTCUT_ATTRIBUTES:
            continue
        if isinstance(sub, nn.Conv2d):
            convs[name] = sub
    return convs


def _conv_signature(conv: nn.Conv2d) -> tuple[object, ...]:
    return (
        type(conv),
        tuple(conv.weight.shape),
        conv.stride,
        conv.padding,
        conv.dilation,
        conv.groups,
        conv.bias is not None,
        conv.padding_mode,
    )


def _reason_not_to_share(block: nn.Module, source_convs: dict[str, nn.Conv2d]) -> str | None:
    if _has_shortcut_branch(block):
        return "it has a downsample/shortcut branch"
    convs = _main_path_convs(block)
    if list(convs) != list(source_convs):
        return f"its convs {list(convs)} differ from the source block's {list(source_convs)}"
    for name, conv in convs.items():
        if _conv_signature(conv) != _conv_signature(source_convs[name]):
            return f"conv '{name}' differs in shape or geometry from the source block's"
        if type(conv) is not nn.Conv2d:
            return f"conv '{name}' is a {type(conv).__name__}, whose forward SharedConv2d cannot reproduce"
    return None


def _conv_weight_count(model: nn.Module) -> int:
    weights = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, SharedConv2d))}
    return sum(weights.values())
