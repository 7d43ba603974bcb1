"""Run a compiled kernel on torch's own OpenMP thread team (docs/inference.md §2, "Threads").

torch's CPU operators run on an OpenMP thread team (GNU libgomp in the Linux wheels), whose threads keep spinning
for a few milliseconds after each operator. A second thread pool for the sparse kernel, such as numba's, then
competes with those spinning threads for the same cores between every two layers: measured here, a kernel that
took 0.96 ms on two threads took 1.42 ms right after a torch operator. ``GOMP_parallel`` is the libgomp entry point
that GCC emits for ``#pragma omp parallel``; calling it with the kernel as a C callback runs the kernel on the very
threads torch just used, so nothing competes and no thread has to be woken.

It is used only where torch's own libgomp is loaded in this process (found in ``/proc/self/maps``); elsewhere
(macOS, Windows, a torch built with another OpenMP or none) :func:`torch_openmp_team` returns None and the caller
uses numba's pool. No Lightning import.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["OpenMPTeam", "address_as_voidptr", "torch_openmp_team"]


@dataclass(frozen=True)
class OpenMPTeam:
    """The libgomp that torch's operators use, as ctypes functions.

    Attributes:
        path: the shared library's file.
        parallel: ``GOMP_parallel(fn, data, num_threads, flags)``: calls ``fn(data)`` on each of ``num_threads``
            threads of the calling thread's team (the caller is thread 0) and returns when all have returned.
        thread_num: ``omp_get_thread_num()``, the calling thread's number in the team.
        num_threads: ``omp_get_num_threads()``, the team's size.
    """

    path: str
    parallel: Any
    thread_num: Any
    num_threads: Any

    def run(self, entry_address: int, block: np.ndarray, threads: int) -> None:
        """Run the C function at ``entry_address`` on ``threads`` threads, each given a pointer to ``block``."""
        self.parallel(entry_address, block.ctypes.data, threads, 0)


@functools.cache
def torch_openmp_team() -> OpenMPTeam | None:
    """torch's libgomp in this process, or None where torch uses another (or no) OpenMP runtime."""
    if "OpenMP" not in torch.__config__.parallel_info() or not os.path.exists("/proc/self/maps"):
        return None
    torch_lib = os.path.realpath(os.path.join(os.path.dirname(torch.__file__), "lib"))
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libgomp" in line and line.rstrip().endswith(".so.1")}
    # torch's wheels bundle their libgomp in torch/lib; a torch linked to the system's has only that one loaded.
    ours = sorted(p for p in paths if os.path.realpath(p).startswith(torch_lib)) or sorted(paths)
    if len(ours) != 1:
        return None
    library = ctypes.CDLL(ours[0])
    parallel = library.GOMP_parallel
    parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    thread_num, num_threads = library.omp_get_thread_num, library.omp_get_num_threads
    for function in (thread_num, num_threads):
        function.argtypes, function.restype = [], ctypes.c_int
    return OpenMPTeam(path=ours[0], parallel=parallel, thread_num=thread_num, num_threads=num_threads)


@functools.cache
def address_as_voidptr() -> Any:
    """A numba intrinsic ``address_as_voidptr(int64) -> voidptr`` (LLVM ``inttoptr``): how a C callback turns
    the array addresses in its argument block back into pointers for ``numba.carray``."""
    from numba import types
    from numba.extending import intrinsic

    @intrinsic
    def _address_as_voidptr(typingctx: Any, address: Any) -> Any:  # noqa: ARG001
        def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:  # noqa: ARG001
            return builder.inttoptr(args[0], context.get_value_type(types.voidptr))

        return types.voidptr(types.int64), codegen

    return _address_as_voidptr
