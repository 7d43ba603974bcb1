"""Inference-time model surgery: fold an eval-mode BatchNorm2d into the convolution before it, and find the ReLU
that follows, so the sparse kernel can apply it as it writes its output (docs/inference.md §2).

A convolution followed by a BatchNorm in eval mode is one affine map per output channel
(``gamma (conv(x) - mean) / sqrt(var + eps) + beta``), so it equals a convolution with each output channel's
weights scaled by ``gamma / sqrt(var + eps)`` and a new bias. Scaling keeps every zero weight zero: the folded
layer is as sparse as the trained one. The graph is read with ``torch.fx`` only to find which module's output
feeds which; the changes are made on the model's own modules (the BatchNorm and the ReLU become ``nn.Identity``),
so the model keeps its structure and its own ``forward``. A BatchNorm that cannot be folded (it follows a
residual addition, say) can be replaced by the same affine map as one elementwise operation
(:class:`ChannelAffine`), which keeps its input's memory layout. No Lightning import.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "ChannelAffine",
    "ConvChain",
    "find_batchnorm_relus",
    "find_conv_chains",
    "find_preactivated_convs",
    "find_relus_after_additions",
    "fold_batchnorm_",
    "is_eval_affine",
]


@dataclass
class ConvChain:
    """What follows one convolution: the BatchNorm that only it feeds, and the ReLU that only that feeds.

    Attributes:
        conv: qualified name of the ``nn.Conv2d``.
        batchnorm: name of the eval-mode ``nn.BatchNorm2d`` whose only input is the conv's output and which is the
            conv's only user, or None.
        relu: name of the ``nn.ReLU`` that is the only user of the BatchNorm's output (or of the conv's, without a
            BatchNorm), or None.
    """

    conv: str
    batchnorm: str | None = None
    relu: str | None = None


class _Graph:
    """``model`` traced with ``torch.fx``: its modules, how often each is called, and the single-user test."""

    def __init__(self, model: nn.Module) -> None:
        self.graph = torch.fx.Tracer().trace(model)
        self.modules = dict(model.named_modules())
        self.calls = Counter(node.target for node in self.graph.nodes if node.op == "call_module")

    def called_once(self, node: torch.fx.Node, kind: type[nn.Module]) -> bool:
        """``node`` calls a module of exactly type ``kind`` that is called nowhere else."""
        return (
            node.op == "call_module" and self.calls[node.target] == 1 and type(self.modules.get(node.target)) is kind
        )

    def single_module_user(self, node: torch.fx.Node, kind: type[nn.Module]) -> torch.fx.Node | None:
        """The only user of ``node``'s output, if it is a module of type ``kind`` (or a subclass) called only there
        and only on that output; else None."""
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module" or self.calls[users[0].target] != 1:
            return None
        user = users[0]
        if (
            not isinstance(self.modules.get(user.target), kind)
            or len(user.args) != 1
            or user.kwargs
            or user.args[0] is not node
        ):
            return None
        return user


def _trace(model: nn.Module) -> tuple[_Graph | None, str | None]:
    try:
        return _Graph(model), None
    except Exception as error:  # noqa: BLE001 - any tracing failure only means: no fusion
        return None, f"torch.fx could not trace the model ({type(error).__name__}: {str(error).splitlines()[0][:120]})"


def find_conv_chains(model: nn.Module) -> tuple[dict[str, ConvChain], str | None]:
    """Trace ``model`` with ``torch.fx`` and return its conv -> BatchNorm -> ReLU chains.

    Only modules called exactly once are considered (a module used at two sites cannot be folded into one of
    them), and only where each output has a single user, so removing the BatchNorm or moving the ReLU into the
    convolution changes nothing else.

    Args:
        model: the model (not modified).

    Returns:
        ``(chains, why_not)``: the chains by conv name (only convs with a BatchNorm or ReLU after them), and None;
        or ``({}, reason)`` when the model cannot be traced (data-dependent control flow, for example).
    """
    traced, why_not = _trace(model)
    if traced is None:
        return {}, why_not
    chains: dict[str, ConvChain] = {}
    for node in traced.graph.nodes:
        if not traced.called_once(node, nn.Conv2d):
            continue
        chain = ConvChain(conv=node.target)
        last = node
        batchnorm = traced.single_module_user(node, nn.BatchNorm2d)
        if batchnorm is not None and is_eval_affine(traced.modules[batchnorm.target]):
            chain.batchnorm, last = batchnorm.target, batchnorm
        relu = traced.single_module_user(last, nn.ReLU)
        if relu is not None:
            chain.relu = relu.target
        if chain.batchnorm or chain.relu:
            chains[chain.conv] = chain
    return chains, None


def find_batchnorm_relus(model: nn.Module) -> dict[str, str]:
    """The ``BatchNorm2d -> ReLU`` pairs of ``model`` where the ReLU module is the BatchNorm's only user (and both
    are called once): BatchNorm name -> ReLU name. Empty when ``torch.fx`` cannot trace the model.

    Such a pair is one :class:`ChannelAffine` with ``relu=True`` (a pre-activation block's ``relu(bn(x))``).
    """
    traced, _ = _trace(model)
    if traced is None:
        return {}
    pairs = {}
    for node in traced.graph.nodes:
        if traced.called_once(node, nn.BatchNorm2d):
            relu = traced.single_module_user(node, nn.ReLU)
            if relu is not None:
                pairs[node.target] = relu.target
    return pairs


def find_preactivated_convs(model: nn.Module) -> dict[str, str]:
    """The ``BatchNorm2d -> ReLU -> Conv2d`` chains of ``model`` (a pre-activation block's ``conv(relu(bn(x)))``)
    in which each output has that one user and each module is called once: conv name -> BatchNorm name.

    The BatchNorm and ReLU of such a chain can be applied by the conv as it reads its input (the sparse kernel's
    ``prologue``). Empty when ``torch.fx`` cannot trace the model.
    """
    traced, _ = _trace(model)
    if traced is None:
        return {}
    chains = {}
    for node in traced.graph.nodes:
        if not traced.called_once(node, nn.Conv2d) or len(node.args) != 1 or node.kwargs:
            continue
        relu = node.args[0]
        if not isinstance(relu, torch.fx.Node) or not traced.called_once(relu, nn.ReLU) or len(relu.users) != 1:
            continue
        batchnorm = relu.args[0] if len(relu.args) == 1 and not relu.kwargs else None
        if isinstance(batchnorm, torch.fx.Node) and traced.called_once(batchnorm, nn.BatchNorm2d):
            if len(batchnorm.users) == 1:
                chains[node.target] = batchnorm.target
    return chains


def find_relus_after_additions(model: nn.Module) -> list[str]:
    """The ``nn.ReLU`` modules (called once, not already in place) whose input is a tensor addition that has no
    other user: a residual block's ``relu(out + identity)``. They can run in place: the sum is a fresh tensor
    nothing else reads, and writing into it saves allocating (and page-faulting) a second one. Empty when
    ``torch.fx`` cannot trace the model."""
    traced, _ = _trace(model)
    if traced is None:
        return []
    additions = (operator.add, torch.add)
    relus = []
    for node in traced.graph.nodes:
        if not traced.called_once(node, nn.ReLU) or traced.modules[node.target].inplace or len(node.args) != 1:
            continue
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "call_function" and source.target in additions:
            if len(source.users) == 1:
                relus.append(node.target)
    return relus


def is_eval_affine(batchnorm: nn.BatchNorm2d) -> bool:
    """Eval mode with running statistics: then the BatchNorm is a fixed affine map per channel."""
    return not batchnorm.training and batchnorm.running_mean is not None and batchnorm.running_var is not None


def _batchnorm_affine(batchnorm: nn.BatchNorm2d, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` per channel with ``batchnorm(x + bias) == x * scale + shift`` in eval mode:
    ``scale = gamma / sqrt(running_var + eps)``, ``shift = (bias - running_mean) * scale + beta`` (a missing bias,
    gamma or beta counts as 0, 1, 0)."""
    scale = torch.rsqrt(batchnorm.running_var + batchnorm.eps)
    if batchnorm.weight is not None:
        scale = scale * batchnorm.weight
    bias = bias if bias is not None else torch.zeros_like(batchnorm.running_mean)
    shift = (bias - batchnorm.running_mean) * scale
    if batchnorm.bias is not None:
        shift = shift + batchnorm.bias
    return scale, shift


@torch.no_grad()
def fold_batchnorm_(conv: nn.Conv2d, batchnorm: nn.BatchNorm2d) -> None:
    """Fold ``batchnorm`` (eval mode) into ``conv`` in place: ``batchnorm(conv(x)) == conv(x)`` afterwards, to
    float rounding (Ioffe & Szegedy 2015, Algorithm 2: inference uses the population statistics).

    ``scale = gamma / sqrt(running_var + eps)``; ``weight <- weight * scale`` per output channel;
    ``bias <- (bias - running_mean) * scale + beta`` (a missing bias counts as 0 and is created).

    Raises:
        ValueError: if the BatchNorm is in training mode, has no running statistics, or its channel count is not
            the conv's output channel count.
    """
    if not is_eval_affine(batchnorm):
        raise ValueError("only an eval-mode BatchNorm2d with running statistics can be folded (call model.eval())")
    if batchnorm.num_features != conv.out_channels:
        raise ValueError(f"BatchNorm2d has {batchnorm.num_features} channels, the conv {conv.out_channels} outputs")
    scale, new_bias = _batchnorm_affine(batchnorm, conv.bias)
    conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)


class ChannelAffine(nn.Module):
    """An eval-mode ``BatchNorm2d`` as the affine map it is: ``x * scale + shift`` per channel, in one operation.

    ``nn.BatchNorm2d`` copies an input that is neither contiguous nor channels-last to a contiguous one first (15 ms
    for a 64 x 32 x 32 x 32 batch-innermost tensor on one core here, against 1.3 ms for this module). This module is
    one elementwise ``torch.addcmul``, which keeps whatever layout its input has (the batch-innermost views of
    :func:`lightning_sparse.functional.sparse_conv.sparse_conv2d`). Inference only.

    Args:
        batchnorm: an eval-mode ``BatchNorm2d`` with running statistics (Ioffe & Szegedy 2015, Algorithm 2:
            ``scale = gamma / sqrt(running_var + eps)``, ``shift = beta - running_mean * scale``).
        relu: apply a ReLU in place on the result (the module then stands for ``relu(batchnorm(x))``; no second
            tensor is allocated).

    Raises:
        ValueError: if the BatchNorm is in training mode or has no running statistics.
    """

    def __init__(self, batchnorm: nn.BatchNorm2d, relu: bool = False) -> None:
        super().__init__()
        self.relu = relu
        if not is_eval_affine(batchnorm):
            raise ValueError("only an eval-mode BatchNorm2d with running statistics is an affine map (call .eval())")
        with torch.no_grad():
            scale, shift = _batchnorm_affine(batchnorm)
        self.register_buffer("scale", scale.detach().clone().view(-1, 1, 1))
        self.register_buffer("shift", shift.detach().clone().view(-1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * scale + shift`` per channel (``x`` is ``(N, C, H, W)`` or ``(C, H, W)``), through a ReLU if set."""
        out = torch.addcmul(self.shift, x, self.scale)
        return out.relu_() if self.relu else out

    def extra_repr(self) -> str:
        return f"{self.scale.shape[0]}, relu={self.relu}"
