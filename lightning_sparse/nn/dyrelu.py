"""Channel-wise dynamic ReLU (DyReLU-B) with a blend factor toward plain ReLU.

Implements Chen et al. 2020, "Dynamic ReLU", variant B (coefficients shared over space, one set per channel), as
used by EAST (Li et al. 2024) and specified in docs/algorithms.md §3c. The blend factor ``beta`` implements EAST's
phase-out (docs/algorithms.md §3c "Phasing", §3h item 1: paper semantics, DyReLU from the start, blended to ReLU).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DyReLU", "two_piece_max", "validate_blend"]


def validate_blend(beta: float) -> float:
    """Check a DyReLU blend factor and return it as a Python float.

    Args:
        beta: Blend factor; 1 = pure DyReLU, 0 = exactly ReLU (docs/algorithms.md §3c).

    Returns:
        ``beta`` as a ``float``.

    Raises:
        TypeError: If ``beta`` is not a real number (e.g. a tensor or a bool).
        ValueError: If ``beta`` is not finite or lies outside [0, 1].
    """
    if isinstance(beta, bool) or not isinstance(beta, Real):
        raise TypeError(f"DyReLU blend factor beta must be a real number in [0, 1], got {type(beta).__name__}.")
    value = float(beta)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"DyReLU blend factor beta must lie in [0, 1] (1 = DyReLU, 0 = ReLU), got {value}.")
    return value


def _spatial_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over the dims after (N, C), keeping them as size 1, into a new tensor (a 2-D tensor is copied)."""
    if tensor.dim() == 2:
        return tensor.clone()
    return tensor.sum(dim=tuple(range(2, tensor.dim())), keepdim=True)


class _TwoPieceMax(torch.autograd.Function):
    """``max(a1 x + b1, a2 x + b2)`` that saves only ``x`` and the coefficients for backward.

    The stacked formula ``(x[..., None] * slopes + offsets).amax(-1)`` keeps a K-times-larger pre-activation tensor
    and the output alive until backward (issue 10 point 7: the EAST stack ran at 1.79x a dense step and 1.92x its
    peak memory). The forward here computes the two pieces with the same floating-point operations, so its value
    is bitwise that of the stacked formula. The backward gives amax's gradient (all of it to the larger piece,
    split evenly on a tie) with two full-size buffers, in place wherever it can (on the CPU a fresh full-size
    tensor costs more than a pass over one), using that the two pieces' gradients add up to the incoming one:

    * which piece wins is the sign of ``d = (a1 - a2) x + (b1 - b2)``;
    * ``g1 = g * (sign(d) + 1) / 2`` (1/2 on a tie), ``g2 = g - g1``;
    * ``dL/dx = g1 (a1 - a2) + g a2``; ``dL/da1 = sum(g1 x)``, ``dL/da2 = sum(g x) - dL/da1``;
      ``dL/db1 = sum(g1)``, ``dL/db2 = sum(g) - dL/db1`` (sums over the spatial dims).

    ``d`` is rounded once where the stacked formula rounds each piece and then compares them, so when the two
    pieces are within a rounding error of each other the side that takes the gradient can differ (both are valid
    subgradients at the kink; exact ties, such as ReLU's at ``x = 0``, are still split evenly).
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, a1: torch.Tensor, a2: torch.Tensor, b1: torch.Tensor, b2: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(x, a1, a2, b1, b2)
        first = x * a1
        first.add_(b1)
        second = x * a2
        second.add_(b2)
        return torch.maximum(first, second, out=first)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, a1, a2, b1, b2 = ctx.saved_tensors
        slope_difference = a1 - a2
        # twice_first = 2 g1, built in place from d: sign(d) + 1 is 2, 1 or 0, so every step is exact.
        twice_first = x * slope_difference
        twice_first.add_(b1 - b2).sign_().add_(1.0).mul_(grad)
        scratch = torch.mul(grad, x)
        grad_a1 = grad_a2 = grad_b1 = grad_b2 = None
        if any(ctx.needs_input_grad[1:]):
            grad_a_total = _spatial_sum(scratch)
            grad_a1 = _spatial_sum(torch.mul(twice_first, x, out=scratch)).mul_(0.5)
            grad_a2 = (grad_a_total - grad_a1).to(a2.dtype)
            grad_a1 = grad_a1.to(a1.dtype)
            grad_b1 = _spatial_sum(twice_first).mul_(0.5)
            grad_b2 = (_spatial_sum(grad) - grad_b1).to(b2.dtype)
            grad_b1 = grad_b1.to(b1.dtype)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = twice_first.mul_(slope_difference * 0.5).add_(torch.mul(grad, a2, out=scratch)).to(x.dtype)
        return grad_x, grad_a1, grad_a2, grad_b1, grad_b2


def two_piece_max(x: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """``y = max(a^1 x + b^1, a^2 x + b^2)`` per sample and channel: DyReLU's output for K = 2 (docs/algorithms.md §3c).

    Computes the same values as ``(x[..., None] * slopes + offsets).amax(-1)`` and the same gradients (amax's, an
    even split on a tie), but keeps only ``x`` and the coefficients for backward instead of the two pieces and
    the output, and never builds a stacked ``(*x.shape, 2)`` tensor.

    Args:
        x: Input of shape ``(N, C, *spatial)``.
        coefficients: ``[a^1, a^2, b^1, b^2]`` per sample and channel, of shape ``(N, C, 1, ..., 1, 4)`` (one 1 per
            spatial dim of ``x``) or ``(N, C, 4)``.

    Returns:
        Tensor of ``x``'s shape (dtype promoted with the coefficients').

    Example:
        >>> x = torch.tensor([[-1.0, 2.0]])
        >>> two_piece_max(x, torch.tensor([[[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]]))  # ReLU's coefficients
        tensor([[0., 2.]])
    """
    if coefficients.shape[-1] != 4:
        raise ValueError(
            f"two_piece_max needs 4 coefficients (a1, a2, b1, b2) per channel, got shape {tuple(coefficients.shape)}."
        )
    coefficients = coefficients.reshape(x.shape[0], x.shape[1], *([1] * (x.dim() - 2)), 4)
    a1, a2, b1, b2 = coefficients.unbind(-1)
    return _TwoPieceMax.apply(x, a1, a2, b1, b2)


class DyReLU(nn.Module):
    """Dynamic ReLU, variant B: per-channel piecewise-linear activation predicted from the input.

    For an input ``x`` of shape ``(N, C, *spatial)`` (Chen et al. 2020 DyReLU-B; docs/algorithms.md §3c):

    1. ``z = mean(x, spatial dims)`` (shape ``(N, C)``; for a 2-D input ``z = x``);
    2. ``theta = 2 * sigmoid(fc2(relu(fc1(z)))) - 1`` with ``fc1: C -> max(1, C // reduction)`` and
       ``fc2: hidden -> 2K * C``, viewed as ``(N, C, 2K) = [a^1..a^K, b^1..b^K]`` per channel;
    3. ``a^k = a^k_init + lambda_a * theta_a^k`` and ``b^k = b^k_init + lambda_b * theta_b^k``;
    4. EAST blend (coefficients, not outputs): ``coeff = beta * coeff + (1 - beta) * (1, 0, ..., 0)``;
    5. ``y = max_k (a^k * x + b^k)``.

    With ``beta == 0`` the module returns ``torch.relu(x)`` and does not run its hyper-network, so a phased-out
    model has no dense per-input offset computations at inference (docs/algorithms.md §3c "Inference").

    The hyper-network layers ``fc1``/``fc2`` are ordinary dense ``nn.Linear`` layers; sparsity tooling should exclude
    every parameter under a DyReLU module (EAST never masks them, docs/algorithms.md §3c).

    Args:
        channels: Number of input channels C (size of dim 1 of the input).
        reduction: Hyper-network reduction ratio R; the hidden width is ``max(1, channels // reduction)``.
        num_pieces: Number of linear pieces K (>= 2, so that ReLU is representable).
        lambdas: ``(lambda_a, lambda_b)``, ranges of the slope and offset residuals.
        init_coefficients: ``(a^1_init, ..., a^K_init, b^1_init, ..., b^K_init)``, 2K values. ``None`` gives
            ReLU's coefficients ``(1, 0, ..., 0)``, which for K = 2 is the paper's ``(1.0, 0.0, 0.0, 0.0)``.

    Raises:
        ValueError: If an argument is out of range or ``init_coefficients`` does not hold 2K values.

    Example:
        >>> act = DyReLU(16)
        >>> act(torch.randn(4, 16, 8, 8)).shape
        torch.Size([4, 16, 8, 8])
        >>> act.beta = 0.0  # now exactly torch.relu
    """

    sparsity_exempt = True
    """Its hyper-network is trained densely and never masked (docs/algorithms.md §3c); MaskInit skips it by default."""

    def __init__(
        self,
        channels: int,
        reduction: int = 4,
        num_pieces: int = 2,
        lambdas: tuple[float, float] = (1.0, 0.5),
        init_coefficients: tuple[float, ...] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"DyReLU channels must be a positive int, got {channels!r}.")
        if isinstance(reduction, bool) or not isinstance(reduction, int) or reduction < 1:
            raise ValueError(f"DyReLU reduction must be a positive int, got {reduction!r}.")
        if isinstance(num_pieces, bool) or not isinstance(num_pieces, int) or num_pieces < 2:
            raise ValueError(f"DyReLU num_pieces must be an int >= 2 (ReLU needs two pieces), got {num_pieces!r}.")
        if len(lambdas) != 2:
            raise ValueError(f"DyReLU lambdas must be (lambda_a, lambda_b), got {lambdas!r}.")
        relu_coefficients = [1.0] + [0.0] * (2 * num_pieces - 1)
        if init_coefficients is None:
            init_coefficients = tuple(relu_coefficients)
        if len(init_coefficients) != 2 * num_pieces:
            raise ValueError(
                f"DyReLU init_coefficients must hold 2 * num_pieces = {2 * num_pieces} values "
                f"(a^1..a^K then b^1..b^K), got {len(init_coefficients)}: {tuple(init_coefficients)!r}."
            )

        self.channels = channels
        self.reduction = reduction
        self.num_pieces = num_pieces
        self.lambdas = (float(lambdas[0]), float(lambdas[1]))
        self.init_coefficients = tuple(float(v) for v in init_coefficients)
        self.hidden_channels = max(1, channels // reduction)
        self.site_name: str | None = None
        self._beta = 1.0

        self.fc1 = nn.Linear(channels, self.hidden_channels)
        self.fc2 = nn.Linear(self.hidden_channels, 2 * num_pieces * channels)
        # Constants, not state: non-persistent so they follow .to(device) but stay out of the state_dict.
        lambda_per_coefficient = [self.lambdas[0]] * num_pieces + [self.lambdas[1]] * num_pieces
        self.register_buffer("coefficient_lambdas", torch.tensor(lambda_per_coefficient), persistent=False)
        self.register_buffer("coefficient_init", torch.tensor(self.init_coefficients), persistent=False)
        self.register_buffer("relu_coefficients", torch.tensor(relu_coefficients), persistent=False)

    @property
    def beta(self) -> float:
        """Blend factor in [0, 1]: 1 = DyReLU, 0 = exactly ReLU (a plain float, not saved in the state_dict)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = validate_blend(value)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """Blended per-sample, per-channel coefficients ``[a^1..a^K, b^1..b^K]``.

        Args:
            x: Input of shape ``(N, C, *spatial)``.

        Returns:
            Tensor of shape ``(N, C, 2K)`` (docs/algorithms.md §3c steps 1-5).
        """
        self._check_input(x)
        # sum / n is what mean computes, but its backward is an expand (a view) instead of a full-size division.
        pooled = x.sum(dim=tuple(range(2, x.dim()))) / math.prod(x.shape[2:]) if x.dim() > 2 else x
        theta = 2.0 * torch.sigmoid(self.fc2(F.relu(self.fc1(pooled)))) - 1.0
        theta = theta.view(x.shape[0], self.channels, 2 * self.num_pieces)
        coefficients = self.coefficient_init.to(theta.dtype) + self.coefficient_lambdas.to(theta.dtype) * theta
        if self._beta != 1.0:
            relu = self.relu_coefficients.to(theta.dtype)
            coefficients = self._beta * coefficients + (1.0 - self._beta) * relu
        return coefficients

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply ``y = max_k (a^k x + b^k)`` per channel, or ``relu(x)`` when ``beta == 0``."""
        self._check_input(x)
        if self._beta == 0.0:
            return torch.relu(x)
        coefficients = self.coefficients(x)
        # (N, C, 2K) -> (N, C, 1, ..., 1, 2K) so they broadcast against x[..., None] of shape (N, C, *spatial, 1).
        coefficients = coefficients.view(x.shape[0], self.channels, *([1] * (x.dim() - 2)), 2 * self.num_pieces)
        if self.num_pieces == 2:
            return two_piece_max(x, coefficients)
        slopes = coefficients[..., : self.num_pieces]
        offsets = coefficients[..., self.num_pieces :]
        return (x.unsqueeze(-1) * slopes + offsets).amax(dim=-1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"DyReLU expects an input of shape (N, C, *spatial), got shape {tuple(x.shape)}.")
        if x.shape[1] != self.channels:
            where = f" at '{self.site_name}'" if self.site_name else ""
            raise ValueError(
                f"DyReLU{where} was built for {self.channels} channels but got an input with {x.shape[1]} channels "
                f"(shape {tuple(x.shape)}). One activation module may be used at several sites with different "
                "widths; give each activation site its own module, or build DyReLU with the right channel count."
            )

    def extra_repr(self) -> str:
        site = f", site_name={self.site_name!r}" if self.site_name else ""
        return (
            f"channels={self.channels}, reduction={self.reduction}, num_pieces={self.num_pieces}, "
            f"lambdas={self.lambdas}, beta={self._beta}{site}"
        )
