"""Channel collapse at extreme sparsity and the channel-safe rules that prevent it (issue 10.1).

The model and data of the accuracy benchmark's reproduction (``benchmarks/accuracy.py`` before issue 10):
``CifarResNet(BasicBlock, (3, 3, 3, 3), width=8)`` on the offline digits at 16x16 (``DigitsDataModule``), sparsity
0.99 with ERK masks, SGD Nesterov lr 0.1 with a per-epoch cosine, batch 64, and its schedule at half the length to
keep the measurement small: 10 epochs of 20 batches (200 optimizer steps; the benchmark ran 400) with a topology
update every twentieth of the run, 10 steps (the same 20 update points as the benchmark; RigL: drop fraction 0.3 cosine-annealed to 0 at 75% of the run; the EAST
stack: ``WeightSharing``, ``DyReLUPhaseOut(0.25, 0.5)``, ``CyclicSparsitySchedule(3.0, cycles=2,
cycle_length=0.2)`` then RigL). Each candidate is a ``(min_active_per_channel, growth_rule)`` pair of
``DynamicReallocation`` and ``CyclicSparsitySchedule``; ``(0, "global")`` is the behaviour before channel safety.

Reported per candidate (mean over the seeds, and every seed in the JSON): the mean training loss over the last epoch,
test accuracy, and the number of empty output channels (dim 0 of a sparse tensor with no active weight) at the start,
at the end and at most during training, plus how many topology updates raised the count.

Usage::

    python benchmarks/channel_safety.py            # 3 seeds, every candidate (about 10 min on one free core)
    python benchmarks/channel_safety.py --quick    # 1 seed, 4 epochs of 5 batches (smoke test)
    # in parallel parts, then reported together (how the committed results were made):
    python benchmarks/channel_safety.py --only "rigl: today" normalized --jsonl /tmp/a.jsonl --out /tmp/a &
    python benchmarks/channel_safety.py --only static "floor 1, global" "east: today" --jsonl /tmp/b.jsonl --out /tmp/b
    python benchmarks/channel_safety.py --merge /tmp/a.jsonl /tmp/b.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, markdown_table, result_name, write_results  # noqa: E402

from lightning_sparse.callbacks import (  # noqa: E402
    CyclicSparsitySchedule,
    DynamicReallocation,
    DyReLUPhaseOut,
    MaskInit,
    WeightSharing,
)
from lightning_sparse.data import DigitsDataModule  # noqa: E402
from lightning_sparse.functional.channels import empty_channels  # noqa: E402
from lightning_sparse.models import BasicBlock, CifarResNet  # noqa: E402

# (name, stack, min_active_per_channel, growth_rule); stack "static" has no topology update.
CANDIDATES: tuple[tuple[str, str, int, str], ...] = (
    ("static", "static", 0, "global"),
    ("rigl: today (floor 0, global growth)", "rigl", 0, "global"),
    ("rigl: floor 1, global growth", "rigl", 1, "global"),
    ("rigl: floor 1, channel-normalized growth", "rigl", 1, "channel_normalized"),
    ("east: today (floor 0, global growth)", "east", 0, "global"),
    ("east: floor 1, channel-normalized growth", "east", 1, "channel_normalized"),
)


class Classifier(L.LightningModule):
    """Cross-entropy classifier, SGD Nesterov with a per-epoch cosine LR; records the last epoch's training losses."""

    def __init__(self, net: nn.Module, lr: float, epochs: int) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.epochs = epochs
        self.epoch_losses: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def on_train_epoch_start(self) -> None:
        self.epoch_losses = []

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.epoch_losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)]


class EmptyChannelTracker(L.Callback):
    """Empty output channels of MaskInit's masks whenever they change: start, end, maximum, updates that raised it."""

    def __init__(self, mask_init: MaskInit) -> None:
        self.mask_init = mask_init
        self.version = -1
        self.history: list[tuple[int, int]] = []

    def _record(self, step: int) -> None:
        masks = self.mask_init.masks
        if masks.version == self.version:
            return
        self.version = masks.version
        count = int(sum(int(empty_channels(mask)) for mask in masks.values()))
        self.history.append((step, count))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record(0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._record(trainer.global_step)


def stack(
    kind: str, sparsity: float, seed: int, period: int, floor: int, rule: str
) -> tuple[list[L.Callback], MaskInit]:
    mask_init = MaskInit(
        sparsity=sparsity, distribution="erk", seed=seed, log_layer_densities=False, layer_report=False
    )
    if kind == "static":
        return [mask_init], mask_init
    rigl = DynamicReallocation("rigl", every_n_steps=period, seed=seed, min_active_per_channel=floor, growth_rule=rule)
    if kind == "rigl":
        return [mask_init, rigl], mask_init
    cyclic = CyclicSparsitySchedule(
        max_multiplier=3.0,
        cycles=2,
        cycle_length=0.2,
        every_n_steps=period,
        min_active_per_channel=floor,
        growth_rule=rule,
    )
    return [WeightSharing(), DyReLUPhaseOut(start=0.25, end=0.5), mask_init, cyclic, rigl], mask_init


def test_accuracy(model: nn.Module, loader: Any) -> float:
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += (model(x).argmax(1) == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def train_once(candidate: tuple[str, str, int, str], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    name, kind, floor, rule = candidate
    L.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(image_size=16, batch_size=64, seed=0)
    datamodule.setup("fit")
    per_epoch = min(math.ceil(len(datamodule.train_set) / 64), args.batches)
    period = max(2, args.epochs * per_epoch // 20)
    model = Classifier(CifarResNet(BasicBlock, (3, 3, 3, 3), width=8), lr=0.1, epochs=args.epochs)
    callbacks, mask_init = stack(kind, args.sparsity, seed, period, floor, rule)
    tracker = EmptyChannelTracker(mask_init)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, tracker],
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=per_epoch,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=datamodule.train_dataloader())
    seconds = time.perf_counter() - start
    datamodule.setup("test")
    counts = [count for _, count in tracker.history]
    rises = sum(later > earlier for earlier, later in zip(counts, counts[1:]))
    return {
        "candidate": name,
        "stack": kind,
        "min_active_per_channel": floor,
        "growth_rule": rule,
        "seed": seed,
        "final_train_loss": statistics.fmean(model.epoch_losses),
        "test_accuracy": test_accuracy(model, datamodule.test_dataloader()),
        "empty_channels_start": counts[0],
        "empty_channels_end": counts[-1],
        "empty_channels_max": max(counts),
        "updates_raising_empty_channels": rises,
        "empty_channel_history": tracker.history,
        "channels": sum(mask.shape[0] if mask.dim() >= 2 else 1 for mask in mask_init.masks.values()),
        "active_weights": mask_init.masks.nnz(),
        "update_period_steps": period,
        "steps": args.epochs * per_epoch,
        "train_seconds": seconds,
    }


def report(runs: list[dict[str, Any]], args: argparse.Namespace, total_seconds: float) -> None:
    """Summarise ``runs`` per candidate and write ``channel_safety[_quick].{json,md}``."""
    names = [c[0] for c in CANDIDATES if any(run["candidate"] == c[0] for run in runs)]
    summary = {}
    for name in names:
        group = [run for run in runs if run["candidate"] == name]
        summary[name] = {
            key: statistics.fmean(run[key] for run in group)
            for key in (
                "final_train_loss",
                "test_accuracy",
                "empty_channels_start",
                "empty_channels_end",
                "empty_channels_max",
                "updates_raising_empty_channels",
            )
        }
        summary[name]["seeds"] = len(group)
        summary[name]["test_accuracy_std"] = (
            statistics.stdev(run["test_accuracy"] for run in group) if len(group) > 1 else 0.0
        )
        summary[name]["per_seed_accuracy"] = [run["test_accuracy"] for run in group]
        summary[name]["per_seed_loss"] = [run["final_train_loss"] for run in group]
    first = runs[0]
    seeds = sorted({run["seed"] for run in runs})
    lines = [
        f"# Channel collapse at sparsity {args.sparsity}{' (QUICK: smoke setting, not a result)' if args.quick else ''}",
        "",
        f"CifarResNet(BasicBlock, (3, 3, 3, 3), width=8) on the offline digits (16x16), ERK masks, "
        f"{first['steps']} optimizer steps ({args.epochs} epochs of {args.batches} batches of 64), topology updates "
        f"every {first['update_period_steps']} steps (RigL: drop fraction 0.3 cosine to 0 at 75% of the run); "
        f"{first['channels']} output channels in the sparse tensors, {first['active_weights']:,} active weights "
        f"({first['active_weights'] / first['channels']:.1f} per channel). Seeds {seeds}; means (accuracy ± std over "
        f"seeds). Total {total_seconds / 60:.1f} min of wall time on one torch thread per process, measured while other "
        "jobs shared the machine's 2 cores.",
        "",
        "`floor` = `min_active_per_channel`, `growth` = `growth_rule`; `today` is the behaviour before channel safety "
        "(`min_active_per_channel=0`). Final train loss: mean over the last epoch's batches.",
        "",
    ]
    rows = [
        [
            name,
            f"{s['final_train_loss']:.3f}",
            f"{s['test_accuracy']:.1f} ± {s['test_accuracy_std']:.1f}",
            f"{s['empty_channels_start']:.0f} -> {s['empty_channels_end']:.0f}",
            f"{s['empty_channels_max']:.0f}",
            f"{s['updates_raising_empty_channels']:.1f}",
            " / ".join(f"{a:.1f}" for a in s["per_seed_accuracy"]),
        ]
        for name, s in summary.items()
    ]
    lines += markdown_table(
        [
            "candidate",
            "final train loss",
            "test accuracy (%)",
            "empty channels start -> end",
            "max",
            "updates raising it",
            "accuracy per seed",
        ],
        rows,
    )
    name = result_name("channel_safety", args.quick)
    settings = {
        key: [str(v) for v in value]
        if isinstance(value, list) and value and isinstance(value[0], Path)
        else str(value)
        if isinstance(value, Path)
        else value
        for key, value in vars(args).items()
    }
    write_results(
        args.out,
        name,
        {"quick": args.quick, "settings": settings, "runs": runs, "summary": summary, "total_seconds": total_seconds},
        lines,
    )
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 4 epochs of 5 batches (smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="the seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--epochs", type=int, default=None, help="default 10 (--quick: 4)")
    parser.add_argument("--batches", type=int, default=None, help="train batches per epoch (default 20; --quick: 5)")
    parser.add_argument("--sparsity", type=float, default=0.99)
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only the candidates whose name contains one of these"
    )
    parser.add_argument("--jsonl", type=Path, default=None, help="also append every finished run to this file")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        default=None,
        help="instead of training, report the runs of these --jsonl files (parallel partial runs)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.epochs = args.epochs or (4 if args.quick else 10)
    args.batches = args.batches or (5 if args.quick else 20)
    if args.merge:
        runs = [json.loads(line) for path in args.merge for line in path.read_text().splitlines() if line.strip()]
        args.seeds = sorted({run["seed"] for run in runs})
        report(
            runs,
            args,
            max(
                sum(run["train_seconds"] for run in runs if run.get("part") == part)
                for part in {run.get("part") for run in runs}
            ),
        )
        return
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    candidates = [c for c in CANDIDATES if args.only is None or any(word in c[0] for word in args.only)]
    started = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for candidate in candidates:
            run = train_once(candidate, seed, args)
            runs.append(run)
            if args.jsonl is not None:
                with args.jsonl.open("a") as stream:
                    stream.write(json.dumps({**run, "part": str(args.jsonl)}) + "\n")
            print(
                f"{run['candidate']:45s} seed={seed}: loss {run['final_train_loss']:.3f}, acc {run['test_accuracy']:.1f}%, "
                f"empty channels {run['empty_channels_start']} -> {run['empty_channels_end']} "
                f"(max {run['empty_channels_max']}), {run['train_seconds']:.0f} s",
                flush=True,
            )
    report(runs, args, time.perf_counter() - started)


if __name__ == "__main__":
    main()
