"""Training cost of each sparse method against dense training of the same model: step time and peak memory (issue 6.2).

Methods: ``static`` (``MaskInit`` ERK), ``set`` / ``rigl`` / ``dsr`` (``MaskInit`` + ``DynamicReallocation``) and
``east`` (``WeightSharing``, ``DyReLUPhaseOut``, ``MaskInit``, ``CyclicSparsitySchedule``,
``DynamicReallocation("rigl")``), each against ``dense``, on ``CifarResNet(BasicBlock, (3, 3, 3, 3), width=W)`` with
generated images, SGD Nesterov, ``lightning.Trainer`` on the CPU.

* **Step time**: wall time from the start of the first timed batch to the end of the last, divided by the timed
  steps. Topology updates run every ``--every-n-steps`` steps with ``stop_at=1.0``, so several updates fall inside
  every timed window (the count is in the results). Runs are interleaved in one process (dense, static, set, ...,
  then again) ``--repeats`` times; the figure is each method's median over the dense median.
* **Peak memory** (CPU): for each method a child process forked from this one (after the imports, before any
  training) trains the same number of steps; the figure is the child's ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
  at the end minus its value just before training, i.e. the growth of the resident-set high-water mark caused by
  building and training the model (weights, gradients, optimizer state, masks, activations, allocator caches). It is
  measured once per method (process memory is far less noisy than time) and reported against dense. On a CUDA
  machine with ``--cuda`` the run uses the GPU and ``torch.cuda.max_memory_allocated`` instead.

Usage::

    python benchmarks/overhead.py            # full: width 16, 32x32, batch 64, 40 timed steps, 5 repeats (~6 min)
    python benchmarks/overhead.py --quick    # width 4, 16x16, batch 8, seconds
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    METHODS,
    RESULTS,
    SGDClassifier,
    StepTimer,
    east_callbacks,
    markdown_table,
    method_callbacks,
    new_figure,
    result_name,
    save_figure,
    write_results,
)

from lightning_sparse.callbacks import DyReLUPhaseOut  # noqa: E402
from lightning_sparse.models import BasicBlock, CifarResNet  # noqa: E402

ARMS = (*METHODS, "east_dyrelu")
"""The methods, and ``east_dyrelu``: the EAST stack with DyReLU active over the whole run (its costliest phase)."""


def arm_callbacks(arm: str, args: argparse.Namespace, seed: int) -> list[L.Callback]:
    """The callbacks of one arm. In ``east`` DyReLU is phased out over 25-50% of each short run, so most timed steps
    run plain ReLU; ``east_dyrelu`` keeps DyReLU at full strength throughout, the phase the issue-10 target is about."""
    if arm != "east_dyrelu":
        return method_callbacks(arm, args.sparsity, seed, args.every_n_steps, stop_at=1.0)
    callbacks = east_callbacks(args.sparsity, seed, args.every_n_steps, dyrelu=False)
    callbacks.insert(1, DyReLUPhaseOut(start=1.0, end=1.0))  # after WeightSharing, before MaskInit, as in the stack
    return callbacks


def train(method: str, args: argparse.Namespace, seed: int) -> float:
    """Train ``warmup + steps`` steps of one method; return the median-free mean step time of the timed window."""
    L.seed_everything(seed, verbose=False)
    steps = args.warmup + args.steps
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * args.batch_size, 3, args.image_size, args.image_size, generator=generator)
    y = torch.randint(0, 10, (steps * args.batch_size,), generator=generator)
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(
        accelerator="cuda" if args.cuda else "cpu", devices=1, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer, *arm_callbacks(method, args, seed)],
    )
    net = CifarResNet(BasicBlock, (3, 3, 3, 3), width=args.width)
    trainer.fit(SGDClassifier(net), DataLoader(TensorDataset(x, y), batch_size=args.batch_size))
    return (timer.end - timer.start) / timer.steps


def _memory_child(method: str, args: argparse.Namespace, connection: Any) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    train(method, args, seed=0)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    connection.send((after - before) * 1024)  # ru_maxrss is in KiB on Linux
    connection.close()


def peak_memory_bytes(method: str, args: argparse.Namespace) -> int:
    """Peak-memory growth of one training run (see the module docstring)."""
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        train(method, args, seed=0)
        return torch.cuda.max_memory_allocated() - baseline
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_memory_child, args=(method, args, sender))
    process.start()
    value = receiver.recv()
    process.join()
    return int(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny setting (smoke test)")
    parser.add_argument("--methods", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--every-n-steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    parser.add_argument("--cuda", action="store_true", help="train on the GPU; memory from max_memory_allocated")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.steps, args.warmup, args.batch_size, args.image_size, args.width, args.every_n_steps = (
            2, 6, 2, 8, 16, 4, 3)
    if args.cuda and not torch.cuda.is_available():
        parser.error("--cuda needs a CUDA device; none is available")
    if "dense" not in args.methods:
        parser.error("--methods must include dense (the reference)")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()

    memory = {method: peak_memory_bytes(method, args) for method in args.methods}
    times: dict[str, list[float]] = {method: [] for method in args.methods}
    for repeat in range(args.repeats):
        for method in args.methods:
            times[method].append(train(method, args, seed=repeat))
    medians = {method: statistics.median(values) for method, values in times.items()}
    time_ratio = {method: medians[method] / medians["dense"] for method in args.methods}
    memory_ratio = {method: memory[method] / memory["dense"] if memory["dense"] > 0 else float("nan")
                    for method in args.methods}
    first_timed, last = args.warmup, args.warmup + args.steps - 1
    updates_in_window = sum(1 for step in range(first_timed, last + 1) if step > 0 and step % args.every_n_steps == 0)
    total_seconds = time.perf_counter() - started

    name = result_name("overhead", args.quick)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["model"] = f"CifarResNet(BasicBlock, (3, 3, 3, 3), width={args.width})"
    memory_kind = "torch.cuda.max_memory_allocated growth" if args.cuda else "ru_maxrss growth of a forked child"
    lines = [
        f"# Training cost vs dense{' (QUICK setting, not the headline)' if args.quick else ''}",
        "",
        f"{settings['model']}, 3x{args.image_size}x{args.image_size} generated images, batch {args.batch_size}, sparsity "
        f"{args.sparsity}, topology updates every {args.every_n_steps} steps ({updates_in_window} inside each run's "
        f"{args.steps} timed steps); {args.repeats} interleaved repeats, medians; "
        f"{'CUDA' if args.cuda else f'CPU, {args.threads} torch thread(s)'}; memory: {memory_kind}; "
        f"total {total_seconds / 60:.1f} min.",
        "",
    ]
    rows = [[m, f"{medians[m] * 1e3:.1f}", f"{time_ratio[m]:.3f}", f"{memory[m] / 2**20:.1f}", f"{memory_ratio[m]:.2f}",
             ", ".join(f"{t * 1e3:.1f}" for t in times[m])] for m in args.methods]
    lines += markdown_table(["method", "median step (ms)", "time / dense", "peak memory (MiB)", "memory / dense",
                             "runs (ms)"], rows)
    lines += ["", "Sparse training here keeps dense tensors with masks (no sparse kernels), so no speed-up is expected; "
              "the ratios measure the masking and topology-update overhead (and, for EAST, the DyReLU hyper-networks "
              "while they are active). `east` is the EAST stack as configured (DyReLU phased out over 25-50% of each "
              "run, so most timed steps run plain ReLU); `east_dyrelu` is the same stack with DyReLU at full strength "
              "throughout, its costliest phase. Targets (issue 10): the EAST stack at most 1.25x dense step time and "
              "1.3x dense peak memory."]
    write_results(args.out, name, {"quick": args.quick, "settings": settings, "step_seconds": times,
                                   "median_step_seconds": medians, "time_ratio": time_ratio,
                                   "peak_memory_bytes": memory, "memory_ratio": memory_ratio,
                                   "memory_measure": memory_kind, "updates_in_timed_window": updates_in_window,
                                   "total_seconds": total_seconds}, lines)
    figure, axes = new_figure()
    positions = range(len(args.methods))
    axes.bar([p - 0.2 for p in positions], [time_ratio[m] for m in args.methods], width=0.4, label="step time")
    axes.bar([p + 0.2 for p in positions], [memory_ratio[m] for m in args.methods], width=0.4, label="peak memory")
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks(list(positions), list(args.methods))
    axes.set_ylabel("ratio to dense")
    axes.set_title(f"Training cost vs dense{' (quick)' if args.quick else ''}: {settings['model']}")
    axes.legend()
    save_figure(figure, args.out, name)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
