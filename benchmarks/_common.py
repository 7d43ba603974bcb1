"""Helpers shared by the benchmarks: machine description, result writers (JSON, Markdown, PNG), timing, and the
callbacks, model wrapper and step timer of the training benchmarks.

Every benchmark writes ``<out>/<name>.json`` (raw figures, settings and :func:`machine_description`),
``<out>/<name>.md`` (a Markdown table) and ``<out>/<name>.png`` (a matplotlib plot); ``--quick`` runs write
``<name>_quick.*`` so that they never overwrite a full run's results.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from lightning_sparse.callbacks import (
    CyclicSparsitySchedule,
    DynamicReallocation,
    DyReLUPhaseOut,
    MaskInit,
    WeightSharing,
)

METHODS = ("dense", "static", "set", "rigl", "dsr", "east")
"""The training methods compared by the benchmarks."""
DYNAMIC = ("set", "rigl", "dsr")
"""The methods that move weights at a fixed budget (DynamicReallocation)."""

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor`."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description() -> dict[str, Any]:
    """CPU model, cores, torch threads, library versions, CUDA device (if any) and the date, for the JSON results."""
    import lightning
    import torch

    description: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return description


def result_name(name: str, quick: bool) -> str:
    """``name`` for a full run, ``name_quick`` for a ``--quick`` one."""
    return f"{name}_quick" if quick else name


def write_results(out: Path, name: str, data: dict[str, Any], markdown: list[str]) -> None:
    """Write ``<out>/<name>.json`` (``data`` plus the machine description) and ``<out>/<name>.md``."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine_description(), **data}
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / f"{name}.md").write_text("\n".join(markdown).rstrip("\n") + "\n")


def new_figure(width: float = 7.0, height: float = 4.5, columns: int = 1) -> tuple[Any, Any]:
    """A matplotlib figure and its axes (one, or a tuple of ``columns``) on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, columns, figsize=(width, height))


def save_figure(figure: Any, out: Path, name: str) -> None:
    """Save ``figure`` as ``<out>/<name>.png`` and close it."""
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(out / f"{name}.png", dpi=120)
    plt.close(figure)


def median_time(function: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``function()`` over ``repeats`` calls after ``warmup`` untimed ones, and every time."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as a list of lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def method_callbacks(
    method: str, sparsity: float, seed: int, period: int, stop_at: float | None = None
) -> list[L.Callback]:
    """The callbacks of one method: nothing (dense), MaskInit (static ERK), + DynamicReallocation (set / rigl /
    dsr), or the EAST stack; topology updates every ``period`` steps, stopping at ``stop_at`` (None: each
    method's default)."""
    if method == "dense":
        return []
    mask_init = MaskInit(sparsity=sparsity, distribution="erk", seed=seed, log_layer_densities=False)
    if method == "static":
        return [mask_init]
    if method in DYNAMIC:
        return [mask_init, DynamicReallocation(method, every_n_steps=period, stop_at=stop_at, seed=seed)]
    if method == "east":
        return [
            WeightSharing(),
            DyReLUPhaseOut(start=0.25, end=0.5),
            mask_init,
            CyclicSparsitySchedule(max_multiplier=3.0, cycles=2, cycle_length=0.2, every_n_steps=period),
            DynamicReallocation("rigl", every_n_steps=period, stop_at=stop_at, seed=seed),
        ]
    raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")


class SGDClassifier(L.LightningModule):
    """Cross-entropy classifier with SGD Nesterov (lr 0.05, momentum 0.9, weight decay 5e-4): the step-time model."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


class StepTimer(L.Callback):
    """Wall time from the start of batch ``warmup`` to the end of the last batch (topology updates included)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx >= self.warmup:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.end = time.perf_counter()
            self.steps = batch_idx - self.warmup + 1
