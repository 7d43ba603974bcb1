"""Inference-only Conv2d / Linear layers that run the direct sparse kernel (docs/inference.md §2).

Built from a trained ``nn.Conv2d`` / ``nn.Linear`` whose masked weights are exact zeros (how the callbacks keep
them); only the active weights are stored. They compute the same function as the layer they replace (to float32
rounding) but no gradient: :func:`lightning_sparse.sparse_inference` puts them in place. No Lightning import.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_sparse.functional.sparse_conv import (
    PackedSparseWeight,
    pack_conv2d_weight,
    pack_linear_weight,
    sparse_conv2d,
    sparse_linear,
)
from lightning_sparse.nn._conv_geometry import copy_conv_geometry

__all__ = ["SparseConv2d", "SparseLinear"]


def _refuse_autograd(x: Tensor, name: str) -> None:
    if x.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            f"{name} is inference-only (its kernel has no backward); call it under torch.no_grad(), or use the "
            "dense layer for training (docs/inference.md §5)"
        )


class _PackedLayer(nn.Module):
    """What SparseConv2d and SparseLinear share: the packed active weights, a float32 bias buffer, the density."""

    packed: PackedSparseWeight

    def _keep(self, weight: Tensor, packed: PackedSparseWeight, bias: Tensor | None) -> None:
        self.weight_numel = weight.numel()
        self.packed = packed
        self.register_buffer("bias", None if bias is None else bias.detach().to("cpu", torch.float32).clone())

    @property
    def density(self) -> float:
        """Fraction of the weight that is active."""
        return self.packed.nnz / self.weight_numel


class SparseConv2d(_PackedLayer):
    """A Conv2d that multiplies only its active (non-zero) weights.

    Args:
        conv: the trained layer; its weight's exact zeros are treated as masked.
        batch_inner: interleave the samples in memory (better for small planes at large batch; see
            :func:`lightning_sparse.functional.sparse_conv.sparse_conv2d`).
        relu: apply a ReLU to the output as it is written (the layer then stands for ``relu(conv(x))``).
        contiguous_output: with ``batch_inner``, return a contiguous tensor; ``False`` returns the ``(N, C, H, W)``
            view of the batch-innermost result, which the next batch-inner layer reads without a transposing copy
            (see :func:`~lightning_sparse.functional.sparse_conv.sparse_conv2d`). ``sparse_inference`` sets it.

    Example:
        >>> conv = nn.Conv2d(8, 8, 3, padding=1)
        >>> with torch.no_grad():
        ...     _ = conv.weight.mul_(torch.rand_like(conv.weight) < 0.1)
        >>> sparse = SparseConv2d(conv)
        >>> x = torch.randn(2, 8, 6, 6)
        >>> torch.allclose(sparse(x), conv(x).detach(), atol=1e-5)
        True
    """

    def __init__(
        self, conv: nn.Conv2d, batch_inner: bool = False, relu: bool = False, contiguous_output: bool = True
    ) -> None:
        super().__init__()
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"SparseConv2d is built from an nn.Conv2d, got {type(conv).__name__}")
        copy_conv_geometry(self, conv)
        self.padding = tuple(int(p) for p in conv._reversed_padding_repeated_twice)
        self.batch_inner = batch_inner
        self.relu = relu
        self.contiguous_output = contiguous_output
        self.register_buffer("input_scale", None)
        self.register_buffer("input_shift", None)
        self._keep(conv.weight, pack_conv2d_weight(conv.weight, conv.stride, conv.dilation, conv.groups), conv.bias)

    input_scale: Tensor | None
    input_shift: Tensor | None

    def apply_input_activation(self, scale: Tensor, shift: Tensor) -> None:
        """From now on convolve ``relu(x * scale + shift)`` (per input channel) instead of ``x``, computed as the
        kernel copies its input (a pre-activation BatchNorm and ReLU taken into the layer; zero padding only)."""
        if self.padding_mode != "zeros":
            raise ValueError(f"an input activation needs zero padding, this layer pads with {self.padding_mode!r}")
        self.register_buffer("input_scale", scale.detach().to(torch.float32).reshape(-1).contiguous().clone())
        self.register_buffer("input_shift", shift.detach().to(torch.float32).reshape(-1).contiguous().clone())

    def forward(self, x: Tensor) -> Tensor:
        """The convolution over the active weights only."""
        _refuse_autograd(x, "SparseConv2d")
        prologue = None if self.input_scale is None else (self.input_scale, self.input_shift)
        return sparse_conv2d(
            x,
            self.packed,
            self.bias,
            self.padding,
            self.padding_mode,
            self.batch_inner,
            self.relu,
            self.contiguous_output,
            prologue,  # type: ignore[arg-type]
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"density={self.density:.4f}, batch_inner={self.batch_inner}, relu={self.relu}, "
            f"contiguous_output={self.contiguous_output}, input_activation={self.input_scale is not None}"
        )


class SparseLinear(_PackedLayer):
    """A Linear layer that multiplies only its active (non-zero) weights (CSR x dense).

    Args:
        linear: the trained layer; its weight's exact zeros are treated as masked.
        batch_inner: run the inner loop over the batch (the default; ``False`` is a dot product per sample).
    """

    def __init__(self, linear: nn.Linear, batch_inner: bool = True) -> None:
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear is built from an nn.Linear, got {type(linear).__name__}")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.batch_inner = batch_inner
        self._keep(linear.weight, pack_linear_weight(linear.weight), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``x @ weight.T + bias`` over the active weights only."""
        _refuse_autograd(x, "SparseLinear")
        return sparse_linear(x, self.packed, self.bias, self.batch_inner)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"density={self.density:.4f}, batch_inner={self.batch_inner}"
        )
