"""Direct sparse convolution on the CPU: compute only over the active weights (docs/inference.md §2).

A convolution with ``nnz`` active weights costs ``nnz x output pixels`` multiply-adds here instead of
``out_channels x in_channels/groups x k_h x k_w x output pixels``. Every active weight ``w[o, c, i, j]`` adds
``w x`` (a shifted window of input plane ``c``) to output plane ``o``. Three rewrites make that one long, contiguous,
vectorisable loop per active weight, whatever the layer's geometry:

* **padding** is applied once, in one copy of the input into the layout the kernel reads (zero padding into a
  kept zero-bordered buffer; other modes through ``F.pad`` first);
* **stride** ``s`` is removed by splitting the padded input into its ``s x s`` phases (space-to-depth) in that same
  copy: the input pixel ``(y s + i d, x s + j d)`` is pixel ``(y + (i d) // s, x + (j d) // s)`` of phase
  ``((i d) % s, (j d) % s)``, so every weight becomes a stride-1 tap on one phase plane ("virtual channel");
  dilation ``d`` is folded into the tap offsets the same way; groups (depthwise) only change which input channel a
  weight reads;
* **rows are long**: with the samples innermost (``batch_inner=True``, layout ``C, H, W, N``) an output row is
  ``W_o x N`` consecutive entries, one task accumulated in place in the output; with each sample's planes apart
  (``N, C, H, W``) the rows of a plane are joined instead: the window of output row ``y`` starts exactly ``W_q``
  entries after that of row ``y - 1``, so one loop over ``(H_o - 1) W_q + W_o`` entries covers the whole plane
  (the ``W_q - W_o`` entries between rows are computed and dropped).

The layout is chosen per layer by timing (:mod:`lightning_sparse.inference`): batch-innermost wins at batch 64,
per-sample planes at batch 1. A ``Linear`` layer is the 1 x 1 case on a 1 x 1 plane (a CSR x dense product). A
batch-inner layer can hand its result on as the ``(N, C, H, W)`` view of the batch-innermost tensor
(``contiguous=False``), which the next one reads without a transposing copy, and can apply a pre-activation
BatchNorm + ReLU as it copies its input (``prologue``).

The kernels are compiled by numba (an optional dependency: ``pip install lightning-sparse[inference]``) and run on
``torch.get_num_threads()`` threads: on torch's own OpenMP team where torch uses GNU libgomp
(:mod:`lightning_sparse.functional._openmp_team`), on numba's pool elsewhere. No Lightning import.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_sparse.functional._openmp_team import OpenMPTeam, address_as_voidptr, torch_openmp_team

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


def _taps(x, rowptr, offsets, values, bias, out, outer, sample_size, in_row, out_h, out_row, block_rows, relu, begin, stop, scratch):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """Numba body: tasks ``begin`` to ``stop`` of a layer. A task is (sample block, block of output rows, output
    channel): accumulate ``value x window`` over the channel's taps, then write the output (through a ReLU if
    ``relu``).

    The output channel varies fastest over the tasks, so the tasks a thread runs in a row read the same input rows
    (they stay in cache). A block of one row is accumulated straight into the output; a block of several rows is
    accumulated over the joined rows (the ``in_row - out_row`` entries between two rows are computed and dropped)
    in ``scratch``, then copied out.
    """
    channels = rowptr.shape[0] - 1
    blocks = (out_h + block_rows - 1) // block_rows
    for task in range(begin, stop):
        o = task % channels
        sample = task // (blocks * channels)
        y = (task // channels - sample * blocks) * block_rows
        rows = min(block_rows, out_h - y)
        span = (rows - 1) * in_row + out_row
        target = ((sample * channels + o) * out_h + y) * out_row
        acc = out[target : target + out_row] if rows == 1 else scratch[:span]
        first = sample * sample_size + y * in_row
        b = bias[o]
        for p in range(span):
            acc[p] = b
        k = rowptr[o]
        end = rowptr[o + 1]
        # Up to four taps per pass over acc: fewer loads and stores of acc (measured 1.05-1.3x faster than one).
        while k + 4 <= end:
            w0 = x[first + offsets[k] : first + offsets[k] + span]
            w1 = x[first + offsets[k + 1] : first + offsets[k + 1] + span]
            w2 = x[first + offsets[k + 2] : first + offsets[k + 2] + span]
            w3 = x[first + offsets[k + 3] : first + offsets[k + 3] + span]
            v0, v1, v2, v3 = values[k], values[k + 1], values[k + 2], values[k + 3]
            for p in range(span):
                acc[p] += v0 * w0[p] + v1 * w1[p] + v2 * w2[p] + v3 * w3[p]
            k += 4
        if end - k == 3:
            w0 = x[first + offsets[k] : first + offsets[k] + span]
            w1 = x[first + offsets[k + 1] : first + offsets[k + 1] + span]
            w2 = x[first + offsets[k + 2] : first + offsets[k + 2] + span]
            v0, v1, v2 = values[k], values[k + 1], values[k + 2]
            for p in range(span):
                acc[p] += v0 * w0[p] + v1 * w1[p] + v2 * w2[p]
        elif end - k == 2:
            w0 = x[first + offsets[k] : first + offsets[k] + span]
            w1 = x[first + offsets[k + 1] : first + offsets[k + 1] + span]
            v0, v1 = values[k], values[k + 1]
            for p in range(span):
                acc[p] += v0 * w0[p] + v1 * w1[p]
        elif end - k == 1:
            # A slice (not x[start + p]) lets LLVM vectorise the loop.
            w0 = x[first + offsets[k] : first + offsets[k] + span]
            v0 = values[k]
            for p in range(span):
                acc[p] += v0 * w0[p]
        if relu:  # the ReLU after the layer, applied as the output is written (no extra pass over it)
            for p in range(span):
                if acc[p] < 0.0:
                    acc[p] = 0.0
        if rows > 1:
            for r in range(rows):
                out[target + r * out_row : target + (r + 1) * out_row] = acc[r * in_row : r * in_row + out_row]


def _prologue_copy(x, scale, shift, out, height, width, inner, plane_h, plane_w, top, left, begin, stop):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """Numba body: rows ``begin`` to ``stop`` (a row is one input channel's input row) of
    ``relu(x * scale + shift)``, per input channel, from a batch-innermost input ``(C, H, W, N)`` into the interior
    of a zero-bordered ``(C, plane_h, plane_w, N)`` buffer: a pre-activation BatchNorm and ReLU applied in the
    padding copy the layer makes anyway."""
    row_length = width * inner
    for task in range(begin, stop):
        c = task // height
        y = task - c * height
        s = scale[c]
        b = shift[c]
        source = x[task * row_length : (task + 1) * row_length]
        start = ((c * plane_h + top + y) * plane_w + left) * inner
        target = out[start : start + row_length]
        for p in range(row_length):
            value = source[p] * s + b
            target[p] = value if value > 0.0 else 0.0


def _share(x, rowptr, offsets, values, bias, out, sizes, relu, begin, stop, scratch):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """Numba body: tasks ``begin`` to ``stop`` of :func:`_taps` (``sizes[0] == 0``) or of :func:`_prologue_copy`
    (``sizes[0] == 1``; ``values`` and ``bias`` are then the scale and shift), the sizes following in ``sizes``."""
    if sizes[0] == 0:
        _jitted_taps(
            x, rowptr, offsets, values, bias, out, sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], relu,
            begin, stop, scratch,
        )  # fmt: skip
    else:
        _jitted_prologue_copy(
            x, values, bias, out, sizes[1], sizes[2], sizes[3], sizes[4], sizes[5], sizes[6], sizes[7], begin, stop
        )


def _share_on_numba_threads(x, rowptr, offsets, values, bias, out, sizes, relu, tasks, scratch):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
    """Numba body: all ``tasks`` on numba's thread pool, one contiguous share (and one scratch row) per thread."""
    shares = scratch.shape[0]
    for share in _prange(shares):
        begin, stop = tasks * share // shares, tasks * (share + 1) // shares
        _jitted_share(x, rowptr, offsets, values, bias, out, sizes, relu, begin, stop, scratch[share])


# The compiled bodies, set by _compiled(): numba resolves these globals when it compiles their callers.
_jitted_taps: Any = None
_jitted_prologue_copy: Any = None
_jitted_share: Any = None
_COMPILED: dict[str, Any] = {}


def _compiled() -> dict[str, Any]:
    """The compiled kernels (on first use; numba caches them on disk): ``"share"``, ``"numba_threads"`` and, where
    torch's own libgomp is loaded, ``"team_entry"`` (see :mod:`lightning_sparse.functional._openmp_team`)."""
    global _jitted_taps, _jitted_prologue_copy, _jitted_share
    if not _COMPILED:
        numba = _require_numba()
        if "NUMBA_THREADING_LAYER" not in os.environ:
            # Measured here (docs/inference.md §2): numba's OpenMP pool next to torch's made torch's own convolutions
            # slower in the same process; the workqueue pool leaves them alone. An explicit setting wins.
            numba.config.THREADING_LAYER = "workqueue"
        jit = numba.njit(fastmath=True, boundscheck=False, cache=True)
        _jitted_taps, _jitted_prologue_copy = jit(_taps), jit(_prologue_copy)
        _jitted_share = jit(_share)
        _COMPILED["share"] = _jitted_share
        _COMPILED["numba_threads"] = numba.njit(parallel=True, cache=True)(_share_on_numba_threads)
        team = torch_openmp_team()
        if team is not None:
            _COMPILED["team_entry"] = _team_entry(numba, team)
    return _COMPILED


def _team_entry(numba: Any, team: OpenMPTeam) -> Any:
    """A C callback for ``GOMP_parallel``: each thread of torch's team runs its share of the tasks.

    Its one argument points to the int64 block written by :func:`_run_parallel`: the six arrays' addresses and
    lengths, the sizes array's address, then ``relu``, the task count and the scratch rows' address and length.
    """
    from numba import types

    share, as_pointer = _jitted_share, address_as_voidptr()
    thread_num, num_threads = team.thread_num, team.num_threads

    @numba.cfunc(types.void(types.CPointer(types.int64)))
    def entry(block):  # type: ignore[no-untyped-def]  # noqa: ANN001, ANN202
        a = numba.carray(block, (_BLOCK_LENGTH,))
        x = numba.carray(as_pointer(a[0]), (a[1],), np.float32)
        rowptr = numba.carray(as_pointer(a[2]), (a[3],), np.int64)
        offsets = numba.carray(as_pointer(a[4]), (a[5],), np.int64)
        values = numba.carray(as_pointer(a[6]), (a[7],), np.float32)
        bias = numba.carray(as_pointer(a[8]), (a[9],), np.float32)
        out = numba.carray(as_pointer(a[10]), (a[11],), np.float32)
        sizes = numba.carray(as_pointer(a[12]), (_SIZES_LENGTH,), np.int64)
        thread, threads = thread_num(), num_threads()
        scratch = numba.carray(as_pointer(a[15] + 4 * a[16] * thread), (a[16],), np.float32)
        tasks = a[14]
        begin, stop = tasks * thread // threads, tasks * (thread + 1) // threads
        share(x, rowptr, offsets, values, bias, out, sizes, a[13] != 0, begin, stop, scratch)

    return entry


_BLOCK_LENGTH = 17
"""Entries of the int64 argument block of :func:`_team_entry`."""
_SIZES_LENGTH = 8
"""Entries of the ``sizes`` array of :func:`_share`."""

_USE_TORCH_TEAM = True
"""Run the kernels on torch's OpenMP team where it can (the tests switch it off to cover numba's pool)."""


def _run_parallel(
    arrays: tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor],
    sizes: tuple[int, ...],
    relu: bool,
    tasks: int,
    span: int = 1,
) -> None:
    """Run :func:`_share` over ``tasks`` tasks with ``torch.get_num_threads()`` threads.

    Args:
        arrays: ``x, rowptr, offsets, values, bias, out`` (1-D CPU tensors) as :func:`_share` takes them.
        sizes: ``(0, outer, sample_size, in_row, out_h, out_row, block_rows)`` for :func:`_taps`, or ``(1, height,
            width, inner, plane_h, plane_w, top, left)`` for :func:`_prologue_copy`.
        relu: :func:`_taps`' ``relu``.
        tasks: how many tasks the layer has (split into contiguous shares, one per thread).
        span: scratch entries each thread needs (:func:`_taps` with blocks of several rows).
    """
    kernels = _compiled()
    sizes_array = np.zeros(_SIZES_LENGTH, dtype=np.int64)
    sizes_array[: len(sizes)] = sizes
    threads = max(1, min(torch.get_num_threads(), tasks))
    scratch = np.empty((threads, span), dtype=np.float32)
    if threads == 1:
        kernels["share"](*(t.numpy() for t in arrays), sizes_array, relu, 0, tasks, scratch[0])
    elif _USE_TORCH_TEAM and "team_entry" in kernels:
        addresses = [value for t in arrays for value in (t.data_ptr(), t.numel())]
        block = np.array(
            [*addresses, sizes_array.ctypes.data, int(relu), tasks, scratch.ctypes.data, span], dtype=np.int64
        )
        torch_openmp_team().run(kernels["team_entry"].address, block, threads)  # type: ignore[union-attr]
    else:
        numba = _require_numba()
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        scratch = scratch[: numba.get_num_threads()]
        kernels["numba_threads"](*(t.numpy() for t in arrays), sizes_array, relu, tasks, scratch)


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
        phases: the stride phases (``p_h x s_w + p_w``) some tap reads; the others are never copied.
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
    phases: tuple[int, ...] = (0,)
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
        phases=tuple(int(p) for p in torch.unique(channel % (s_h * s_w))),
    )


_PADDED_INPUTS = threading.local()
"""Per thread: the zero-bordered input buffers of :func:`_phase_planes`, by geometry (least recently used dropped
first once they hold more than :data:`_PADDED_INPUT_BYTES`)."""
_PADDED_INPUT_BYTES = 256 * 2**20
"""Memory the kept input buffers of one thread may take. A network has a buffer per input geometry (WRN-28-2 has
nine: three plane sizes, their stride-2 phase splits, the stem); a buffer dropped and made again every forward pass
costs a zero fill and page faults (2-4 ms each at batch 64 here). 256 MiB holds all of a CIFAR ResNet's at batch
256; the buffer in use is always kept, whatever its size."""


def _phase_planes(
    x: Tensor,
    left: int,
    top: int,
    stride: tuple[int, int],
    plane: tuple[int, int],
    batch_inner: bool,
    phases: tuple[int, ...],
    prologue: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """``x`` zero-padded (``left`` / ``top`` before it) and split into its stride phases, in the kernel's layout.

    The result is ``(N, C, s_h, s_w, plane_h, plane_w)`` or, with ``batch_inner``, ``(C, s_h, s_w, plane_h,
    plane_w, N)``: padded pixel ``(q s_h + p_h, r s_w + p_w)`` is pixel ``(q, r)`` of phase ``(p_h, p_w)``. Only
    the phases in ``phases`` (those some tap reads) are written. ``x`` is written once, straight into that layout,
    into a buffer kept per thread and geometry whose border was zeroed when it was made and is never written since:
    the layers of a network share a few geometries, and a fresh multi-megabyte tensor costs page faults and a full
    fill on every call. A batch-innermost input that needs no padding (the output of a batch-inner layer before)
    is read in place. The buffer is only read by the kernel call that follows.

    With ``prologue = (scale, shift)`` (per input channel) the buffer holds ``relu(x * scale + shift)`` instead of
    ``x``, computed as it is copied: one pass over the input (:func:`_prologue_copy`) for a batch-innermost input at
    stride 1, a ``torch.addcmul`` into the buffer and a ReLU in place otherwise.
    """
    batch, channels, height, width = (int(d) for d in x.shape)
    (s_h, s_w), (plane_h, plane_w) = stride, plane
    if prologue is None and (s_h, s_w, left, top, plane_h, plane_w) == (1, 1, 0, 0, height, width):
        in_place = x.permute(1, 2, 3, 0) if batch_inner else x
        if in_place.is_contiguous() or not batch_inner:
            return in_place.contiguous()
    key = (batch, channels, height, width, left, top, s_h, s_w, plane_h, plane_w, batch_inner)
    buffers: dict[tuple[int | bool, ...], Tensor] = _PADDED_INPUTS.__dict__.setdefault("buffers", {})
    buffer = buffers.pop(key, None)
    if buffer is None:
        planes = (s_h, s_w, plane_h, plane_w)
        buffer = torch.zeros((channels, *planes, batch) if batch_inner else (batch, channels, *planes))
        kept = sum(b.numel() for b in buffers.values()) + buffer.numel()
        while buffers and 4 * kept > _PADDED_INPUT_BYTES:
            kept -= buffers.pop(next(iter(buffers))).numel()
    buffers[key] = buffer  # (re)inserted last: the dict's order is the least-recently-used order
    view = buffer.permute(5, 0, 1, 2, 3, 4) if batch_inner else buffer  # (N, C, s_h, s_w, plane_h, plane_w)
    source_inner = x.permute(1, 2, 3, 0)
    if prologue is not None and batch_inner and (s_h, s_w) == (1, 1) and source_inner.is_contiguous():
        scale, shift = prologue
        _run_parallel(
            (source_inner.view(-1), _NO_INDEX, _NO_INDEX, scale, shift, buffer.view(-1)),
            (1, height, width, batch, plane_h, plane_w, top, left),
            relu=False,
            tasks=channels * height,
        )
        return buffer
    if prologue is not None:
        scale, shift = (t.view(1, -1, 1, 1) for t in prologue)
    for phase in phases:
        p_h, p_w = divmod(phase, s_w)
        # The first phase row whose padded row q s_h + p_h holds an input row (is >= top), and that input row.
        q_h, q_w = -((p_h - top) // s_h), -((p_w - left) // s_w)
        y, x0 = q_h * s_h + p_h - top, q_w * s_w + p_w - left
        rows, cols = min(-((y - height) // s_h), plane_h - q_h), min(-((x0 - width) // s_w), plane_w - q_w)
        if rows > 0 and cols > 0:
            source = x[:, :, y : y + (rows - 1) * s_h + 1 : s_h, x0 : x0 + (cols - 1) * s_w + 1 : s_w]
            target = view[:, :, p_h, p_w, q_h : q_h + rows, q_w : q_w + cols]
            if prologue is None:
                target.copy_(source)
            else:
                torch.addcmul(shift, source, scale, out=target).relu_()
    return buffer


_NO_INDEX = torch.zeros(1, dtype=torch.int64)
"""A placeholder for the index arrays :func:`_prologue_copy` does not read."""


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
    contiguous: bool = True,
    prologue: tuple[Tensor, Tensor] | None = None,
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
        contiguous: with ``batch_inner``, return a contiguous ``(N, C, H, W)`` tensor; ``False`` returns the
            ``(N, C, H, W)`` view of the batch-innermost result (strides ``(1, H W N, W N, N)``), which saves a
            transposing copy here and another one in the next batch-inner layer (elementwise torch ops keep the
            layout in between). Without ``batch_inner`` the result is always contiguous.
        prologue: ``(scale, shift)``, float32 ``(in_channels,)``: convolve ``relu(x * scale + shift)`` (per input
            channel) instead of ``x``, computed as the input is copied into the padded layout (a pre-activation
            BatchNorm and ReLU fused into the layer). Zero padding only.

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
    _compiled()  # ImportError without numba, before any work
    left, right, top, bottom = padding
    if prologue is not None and padding_mode != "zeros" and any(padding):
        raise ValueError("a prologue (fused BatchNorm + ReLU) needs zero padding: pad after the activation instead")
    if padding_mode != "zeros" and any(padding):
        x = F.pad(x, padding, mode=padding_mode)
        left, right, top, bottom = 0, 0, 0, 0
    batch, channels, height, width = (int(d) for d in x.shape)
    padded_h, padded_w = height + top + bottom, width + left + right
    (k_h, k_w), (s_h, s_w), (d_h, d_w) = packed.kernel_size, packed.stride, packed.dilation
    out_h = (padded_h - (k_h - 1) * d_h - 1) // s_h + 1
    out_w = (padded_w - (k_w - 1) * d_w - 1) // s_w + 1
    if out_h < 1 or out_w < 1:
        raise ValueError(f"the input {tuple(x.shape)} (after padding) is smaller than the kernel")
    # Phase planes large enough for every tap's window (extra zero rows/columns are never read into kept outputs).
    plane_h = max(math.ceil(padded_h / s_h), packed.max_dy + out_h)
    plane_w = max(math.ceil(padded_w / s_w), packed.max_dx + out_w)
    planes = _phase_planes(x, left, top, (s_h, s_w), (plane_h, plane_w), batch_inner, packed.phases, prologue)
    outer, inner = (1, batch) if batch_inner else (batch, 1)
    out = torch.empty(outer, packed.out_channels, out_h, out_w, inner, dtype=torch.float32)
    bias_values = (
        torch.zeros(packed.out_channels, dtype=torch.float32)
        if bias is None
        else bias.detach().to("cpu", torch.float32).contiguous()
    )
    block_rows = 1 if batch_inner else out_h
    # Batch-inner rows are long (W_o x N entries): one row per block, accumulated in place. Per-sample rows are
    # short: a whole plane per block, its rows joined into one long loop.
    in_row, out_row = plane_w * inner, out_w * inner
    sample_size = channels * s_h * s_w * plane_h * plane_w * inner
    _run_parallel(
        (planes.view(-1), packed.rowptr, packed.offsets(plane_h, plane_w, inner), packed.values, bias_values,
         out.view(-1)),
        (0, outer, sample_size, in_row, out_h, out_row, block_rows),
        relu,
        tasks=outer * -(-out_h // block_rows) * packed.out_channels,
        span=(block_rows - 1) * in_row + out_row,
    )  # fmt: skip
    if batch_inner:
        out = out[0].permute(3, 0, 1, 2)
        out = out.contiguous() if contiguous else out
    else:
        out = out.squeeze(-1)
    return out.squeeze(0) if unbatched else out


def sparse_linear(
    x: Tensor, packed: PackedSparseWeight, bias: Tensor | None = None, batch_inner: bool = True
) -> Tensor:
    """``x @ weight.T + bias`` over the active weights only (CSR x dense); ``x`` is ``(..., in_features)``."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1], 1, 1)
    out = sparse_conv2d(flat, packed, bias, batch_inner=batch_inner)
    return out.reshape(*shape[:-1], packed.out_channels)
