"""Helpers shared by the issue-6 benchmarks: machine description, result writers (JSON, Markdown, PNG), timing.

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
