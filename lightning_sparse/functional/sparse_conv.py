"""Direct sparse convolution on the CPU: compute only over the active weights (docs/inference.md §2).

A convolution with ``nnz`` active weights costs ``nnz x output pixels`` multiply-adds here instead of
``out_channels x in_channels/groups x k_h x k_w x output pixels``. Every active weight ``w[o, c, i, j]`` adds
``w x`` (a shifted window of input plane ``c``) to output plane ``o``. Three rewrites make that one long, contiguous,
vectorisable loop per active weight, whatever the layer's geometry:

* **padding** is applied once to the input (``F.pad``, with the layer's padding mode);
* **stride** ``s`` is removed by splitting the padded input into its ``s x s`` phases (space-to-depth): the input
  pixel ``(y s + i d, x s + j d)`` is pixel ``(y + (i d) // s, x + (j d) // s)`` of phase
  ``((i d) % s, (j d) % s)``, so every weight becomes a stride-1 tap on one phase plane ("virtual channel");
  dilation ``d`` is folded into the tap offsets the same way; groups (depthwise) only change which input channel a
  weight reads;
* **rows are joined**: in a plane of width ``W_q`` the window of output row ``y`` starts exactly ``W_q`` entries
  after that of row ``y - 1``, so one loop over ``(H_o - 1) W_q + W_o`` consecutive entries covers the whole output
  plane (the ``W_q - W_o`` entries between rows are computed and dropped).

Two memory layouts are offered, chosen per layer by timing (:mod:`lightning_sparse.inference`): ``batch_inner=False``
keeps each sample's planes apart (``N, C, H, W``; best for large planes), ``batch_inner=True`` interleaves the
samples (``C, H, W, N``; the loop then also runs over the batch, best for small planes such as 4 x 4 at batch 64).
A ``Linear`` layer is the 1 x 1 case on a 1 x 1 plane (a CSR x dense product).

The kernel is compiled by numba (an optional dependency: ``pip install lightning-sparse[inference]``) and runs in
parallel over (sample block, output channel) with ``torch.get_num_threads()`` threads. No Lightning import.
"""

from __future__ import annotations

import math
import os
import threading
import types
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PackedSparseWeight",
    "numba_available",
    "pack_conv2d_weight",
    "pack_linear_weight",
    "sparse_conv2d",
    "sparse_linear",
]

try:  # numba is optional (the [inference] extra); without it only the dense path exists.
    from numba import prange as _prange
except ImportError:  # pragma: no cover - exercised where numba is absent
    _prange = range

_KERNELS: dict[bool, Any] = {}


def numba_available() -> bool:
    """Whether numba (the ``[inference]`` extra) can be imported, i.e. whether the sparse kernel can run."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


def _require_numba() -> Any:
    try:
        import numba
    except ImportError as error:
        raise ImportError(
            "the sparse CPU kernel needs numba: pip install 'lightning-sparse[inference]' (or pip install numba); "
            "without it sparse_inference keeps every layer dense"
        ) from error
    return numba


def _taps_parallel(x, rowptr, offsets, values, bias, out, outer, sample_size, span, rows, out_row, in_row, relu):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """Numba body: for each (sample block, output channel), accumulate ``value x window`` over its taps, then
    write the output (through a ReLU if ``relu``).

    Compiled with ``parallel=True``, and without it as :data:`_taps_serial` (``prange`` is then ``range``).
    """
    channels = rowptr.shape[0] - 1
    for task in _prange(outer * channels):
        sample = task // channels
        o = task - sample * channels
        acc = np.empty(span, dtype=np.float32)
        b = bias[o]
        for p in range(span):
            acc[p] = b
        first = sample * sample_size
        begin = rowptr[o]
        end = rowptr[o + 1]
        k = begin
        # Four taps per pass over acc: a quarter of the loads and stores of acc (measured 1.05-1.3x faster).
        while k + 4 <= end:
            w0 = x[first + offsets[k] : first + offsets[k] + span]
            w1 = x[first + offsets[k + 1] : first + offsets[k + 1] + span]
            w2 = x[first + offsets[k + 2] : first + offsets[k + 2] + span]
            w3 = x[first + offsets[k + 3] : first + offsets[k + 3] + span]
            v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
            for p in range(span):
                acc[p] += v0 * w0[p] + v1 * w1[p] + v2 * w2[p] + v3 * w3[p]
            k += 4
        while k < end:
            v = values[k]
            # A slice (not x[start + p]) lets LLVM vectorise the loop.
            window = x[first + offsets[k] : first + offsets[k] + span]
            for p in range(span):
                acc[p] += v * window[p]
            k += 1
        target = task * rows * out_row
        if relu:  # the ReLU after the layer, applied as the output is written (no extra pass over it)
            for p in range(span):
                if acc[p] < 0.0:
                    acc[p] = 0.0
        for r in range(rows):
            out[target + r * out_row : target + (r + 1) * out_row] = acc[r * in_row : r * in_row + out_row]


def _named_copy(function: Any, name: str) -> Any:
    """``function`` as a second function object called ``name``: the same code under another name.

    numba keys its on-disk cache (``cache=True``) by the function's module and name, not by the compile options
    (numba issue #6845), so one function compiled with and without ``parallel`` would load whichever compilation
    was cached first. Under ``parallel=False`` numba compiles ``prange`` as ``range``: the serial copy's machine code
    is that of a separate serial body (compared instruction by instruction with numba's ``inspect_asm``).
    """
    copy = types.FunctionType(
        function.__code__, function.__globals__, name, function.__defaults__, function.__closure__
    )
    copy.__qualname__ = name
    return copy


_taps_serial = _named_copy(_taps_parallel, "_taps_serial")
"""The kernel without the thread pool (one thread: no hand-off to a worker thread per call)."""


def _kernel(threads: int) -> Any:
    """The compiled kernel for ``threads`` threads (compiled on first use, cached on disk by numba)."""
    parallel = threads > 1
    if parallel not in _KERNELS:
        numba = _require_numba()
        if "NUMBA_THREADING_LAYER" not in os.environ:
            # Measured here (docs/inference.md §4): numba's OpenMP pool next to torch's OpenMP made torch's own
            # dense convolutions ~12x slower in the same process; the workqueue pool leaves them alone. An
            # explicit NUMBA_THREADING_LAYER setting wins.
            numba.config.THREADING_LAYER = "workqueue"
        body = _taps_parallel if parallel else _taps_serial
        _KERNELS[parallel] = numba.njit(parallel=parallel, fastmath=True, boundscheck=False, cache=True)(body)
    if parallel:
        numba = _require_numba()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return _KERNELS[parallel]


@dataclass
class PackedSparseWeight:
    """The active weights of a Conv2d / Linear weight, grouped by output channel (CSR), as stride-1 taps.

    Built by :func:`pack_conv2d_weight` or :func:`pack_linear_weight`; read by :func:`sparse_conv2d`.

    Attributes:
        out_channels: rows of the CSR structure.
        in_channels: input channels the layer expects.
        kernel_size, stride, dilation: the layer's geometry (``(1, 1)`` for a Linear).
        rowptr: ``int64 (out_channels + 1,)``; the taps of output channel ``o`` are ``rowptr[o]:rowptr[o + 1]``.
        channel: ``int64 (nnz,)`` virtual input channel of each tap (input channel x stride phases).
        dy, dx: ``int64 (nnz,)`` tap offsets inside the virtual channel's plane.
        values: ``float32 (nnz,)`` the weights.
        max_dy, max_dx: largest offsets (0 when there are no taps).
    """

    out_channels: int
    in_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    rowptr: Tensor
    channel: Tensor
    dy: Tensor
    dx: Tensor
    values: Tensor
    max_dy: int
    max_dx: int
    _offsets: dict[tuple[int, int, int], Tensor] = field(default_factory=dict, repr=False)

    @property
    def nnz(self) -> int:
        """Number of active weights."""
        return int(self.values.numel())

    def offsets(self, height: int, width: int, inner: int) -> Tensor:
        """Flat start of each tap's window in a ``(virtual channel, height, width, inner)`` input (cached)."""
        key = (height, width, inner)
        if key not in self._offsets:
            flat = (self.channel * height + self.dy) * width + self.dx
            self._offsets[key] = (flat * inner).contiguous()
        return self._offsets[key]


def _pair(value: int | tuple[int, ...], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def pack_conv2d_weight(
    weight: Tensor,
    stride: int | tuple[int, int] = 1,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
) -> PackedSparseWeight:
    """Pack the non-zero entries of a Conv2d weight ``(out, in/groups, k_h, k_w)`` for :func:`sparse_conv2d`.

    Args:
        weight: the dense weight; its exact zeros are the inactive (masked) positions.
        stride, dilation, groups: the convolution's, as in :func:`torch.nn.functional.conv2d`.

    Returns:
        The taps as a :class:`PackedSparseWeight` (values in float32).

    Raises:
        ValueError: for a weight that is not 4-D or channel counts not divisible by ``groups``.
    """
    if weight.dim() != 4:
        raise ValueError(f"a Conv2d weight is 4-D (out, in/groups, k_h, k_w), got shape {tuple(weight.shape)}")
    out_channels, group_in, k_h, k_w = (int(d) for d in weight.shape)
    if groups < 1 or out_channels % groups:
        raise ValueError(f"out_channels={out_channels} is not divisible by groups={groups}")
    s_h, s_w = _pair(stride, "stride")
    d_h, d_w = _pair(dilation, "dilation")
    weight = weight.detach().to("cpu", torch.float32)
    o, c, i, j = weight.nonzero(as_tuple=True)
    values = weight[o, c, i, j].contiguous()
    absolute = (o // (out_channels // groups)) * group_in + c
    rows_y, rows_x = i * d_h, j * d_w
    # Phase (space-to-depth) decomposition: a stride-s tap at offset r reads phase r % s at offset r // s.
    channel = (absolute * s_h + rows_y % s_h) * s_w + rows_x % s_w
    dy, dx = rows_y // s_h, rows_x // s_w
    rowptr = torch.zeros(out_channels + 1, dtype=torch.int64)
    rowptr[1:] = torch.bincount(o, minlength=out_channels).cumsum(0)
    return PackedSparseWeight(
        out_channels=out_channels,
        in_channels=group_in * groups,
        kernel_size=(k_h, k_w),
        stride=(s_h, s_w),
        dilation=(d_h, d_w),
        rowptr=rowptr,
        channel=channel.to(torch.int64).contiguous(),
        dy=dy.to(torch.int64).contiguous(),
        dx=dx.to(torch.int64).contiguous(),
        values=values,
        max_dy=int(dy.max()) if dy.numel() else 0,
        max_dx=int(dx.max()) if dx.numel() else 0,
    )


_PADDED_INPUTS = threading.local()
"""Per thread: the zero-bordered input buffers of :func:`_zero_padded_copy`, by geometry (at most
:data:`_PADDED_INPUT_SLOTS`, least recently used dropped first)."""
_PADDED_INPUT_SLOTS = 8


def _zero_padded_copy(x: Tensor, left: int, top: int, plane_h: int, plane_w: int, batch_inner: bool) -> Tensor:
    """``x`` zero-padded to ``plane_h x plane_w`` (``left`` / ``top`` before it), in the kernel's layout.

    ``F.pad`` allocates a new tensor, fills all of it with zeros and copies ``x`` in, and the batch-inner layout
    needs one more copy. Here ``x`` is written once, straight into the layout the kernel reads (``N, C, H, W`` or,
    with ``batch_inner``, ``C, H, W, N``), into a buffer kept per thread and geometry whose border was zeroed when
    it was made and is never written since: the layers of a network share a few geometries, and a fresh
    multi-megabyte tensor costs page faults on every call. The buffer is only read by the kernel call that follows.
    """
    batch, channels, height, width = (int(d) for d in x.shape)
    if not batch_inner and (left, top, plane_h, plane_w) == (0, 0, height, width):
        return x.contiguous()
    key = (batch, channels, height, width, left, top, plane_h, plane_w, batch_inner)
    buffers: dict[tuple[int | bool, ...], Tensor] = _PADDED_INPUTS.__dict__.setdefault("buffers", {})
    buffer = buffers.pop(key, None)
    if buffer is None:
        shape = (channels, plane_h, plane_w, batch) if batch_inner else (batch, channels, plane_h, plane_w)
        buffer = torch.zeros(shape, dtype=torch.float32)
        if len(buffers) >= _PADDED_INPUT_SLOTS:
            buffers.pop(next(iter(buffers)))
    buffers[key] = buffer  # (re)inserted last: the dict's order is the least-recently-used order
    view = buffer.permute(3, 0, 1, 2) if batch_inner else buffer  # indexed (N, C, H, W) whatever the layout
    view[:, :, top : top + height, left : left + width].copy_(x)
    return buffer


def pack_linear_weight(weight: Tensor) -> PackedSparseWeight:
    """Pack the non-zero entries of a Linear weight ``(out, in)`` for :func:`sparse_linear`."""
    if weight.dim() != 2:
        raise ValueError(f"a Linear weight is 2-D (out, in), got shape {tuple(weight.shape)}")
    return pack_conv2d_weight(weight[:, :, None, None])


def sparse_conv2d(
    x: Tensor,
    packed: PackedSparseWeight,
    bias: Tensor | None = None,
    padding: tuple[int, int, int, int] = (0, 0, 0, 0),
    padding_mode: str = "zeros",
    batch_inner: bool = False,
    relu: bool = False,
) -> Tensor:
    """2-D convolution over the active weights only; equals ``F.conv2d`` with the packed layer's weight.

    Args:
        x: ``(N, C, H, W)`` or ``(C, H, W)`` float32 CPU input.
        packed: the weight, from :func:`pack_conv2d_weight`.
        bias: ``(out_channels,)`` or None.
        padding: ``(left, right, top, bottom)`` as for :func:`torch.nn.functional.pad` (``nn.Conv2d`` keeps it in
            ``_reversed_padding_repeated_twice``).
        padding_mode: ``"zeros"``, ``"reflect"``, ``"replicate"`` or ``"circular"`` (as ``nn.Conv2d``).
        batch_inner: interleave the samples (``C, H, W, N`` layout) so the inner loop also runs over the batch.
        relu: apply ``torch.relu`` to the output as it is written (a ReLU fused into the layer).

    Returns:
        ``(N, out_channels, H_o, W_o)`` (no batch dimension if ``x`` had none).

    Raises:
        ValueError: for a non-float32, non-CPU input or a channel count that does not match.
        ImportError: if numba is not installed.
    """
    unbatched = x.dim() == 3
    if unbatched:
        x = x.unsqueeze(0)
    if x.dim() != 4 or x.dtype != torch.float32 or x.device.type != "cpu":
        raise ValueError(
            f"sparse_conv2d takes a float32 CPU tensor (N, C, H, W), got {x.dtype} {tuple(x.shape)} on {x.device}"
        )
    if x.shape[1] != packed.in_channels:
        raise ValueError(f"the layer expects {packed.in_channels} input channels, the input has {x.shape[1]}")
    kernel = _kernel(torch.get_num_threads())
    left, right, top, bottom = padding
    batch, channels, height, width = (int(d) for d in x.shape)
    height, width = height + top + bottom, width + left + right  # padded
    (k_h, k_w), (s_h, s_w), (d_h, d_w) = packed.kernel_size, packed.stride, packed.dilation
    out_h = (height - (k_h - 1) * d_h - 1) // s_h + 1
    out_w = (width - (k_w - 1) * d_w - 1) // s_w + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"the input {tuple(x.shape)} (after padding) is smaller than the kernel")
    # Phase planes large enough for every tap's window (extra zero rows/columns are never read into kept outputs).
    plane_h = max(math.ceil(height / s_h), packed.max_dy + out_h)
    plane_w = max(math.ceil(width / s_w), packed.max_dx + out_w)
    virtual = channels * s_h * s_w
    outer, inner = (1, batch) if batch_inner else (batch, 1)
    if padding_mode == "zeros" and s_h == s_w == 1:
        x = _zero_padded_copy(x, left, top, plane_h, plane_w, batch_inner)
    else:
        if any(padding):
            x = F.pad(x, padding, mode="constant" if padding_mode == "zeros" else padding_mode)
        if plane_h * s_h != height or plane_w * s_w != width:
            x = F.pad(x, (0, plane_w * s_w - width, 0, plane_h * s_h - height))
        if s_h > 1 or s_w > 1:
            x = x.reshape(batch, channels, plane_h, s_h, plane_w, s_w).permute(0, 1, 3, 5, 2, 4)
        if batch_inner:
            x = x.reshape(batch, virtual, plane_h, plane_w).permute(1, 2, 3, 0)
        x = x.contiguous()
    out = torch.empty(outer, packed.out_channels, out_h, out_w, inner, dtype=torch.float32)
    bias_values = (
        torch.zeros(packed.out_channels, dtype=torch.float32)
        if bias is None
        else bias.detach().to("cpu", torch.float32).contiguous()
    )
    kernel(
        x.view(-1).numpy(),
        packed.rowptr.numpy(),
        packed.offsets(plane_h, plane_w, inner).numpy(),
        packed.values.numpy(),
        bias_values.numpy(),
        out.view(-1).numpy(),
        outer,
        virtual * plane_h * plane_w * inner,
        ((out_h - 1) * plane_w + out_w) * inner,
        out_h,
        out_w * inner,
        plane_w * inner,
        relu,
    )
    out = out.squeeze(0).permute(3, 0, 1, 2).contiguous() if batch_inner else out.squeeze(-1)
    return out.squeeze(0) if unbatched else out


def sparse_linear(
    x: Tensor, packed: PackedSparseWeight, bias: Tensor | None = None, batch_inner: bool = True
) -> Tensor:
    """``x @ weight.T + bias`` over the active weights only (CSR x dense); ``x`` is ``(..., in_features)``."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1], 1, 1)
    out = sparse_conv2d(flat, packed, bias, batch_inner=batch_inner)
    return out.reshape(*shape[:-1], packed.out_channels)
