"""A peer side by side: RigL by rigl-torch (plain PyTorch loop) vs RigL by this library (Lightning callbacks) (issue 6.4).

Same model (``CifarResNet(BasicBlock, (3, 3, 3, 3), width=8)``), data (``DigitsDataModule(image_size=16)``), epochs,
optimizer (SGD Nesterov lr 0.1, cosine per epoch), sparsity 0.9 with a uniform per-layer distribution and the
classifier kept dense (rigl-torch's ``sparsity_distribution="uniform"`` and ``ignore_linear_layers=True``; ours:
``MaskInit(0.9, "uniform", exclude=["*fc.weight"])``), the same update period, drop fraction 0.3 and stop at 75% of
the steps. Four runs per seed:

* ``peer_dense``: the plain PyTorch loop with no sparsity (the peer's reference);
* ``peer_rigl``: the same loop with ``rigl_torch.RigL.RigLScheduler`` (``if scheduler(): optimizer.step()``);
* ``ours_dense``: ``lightning.Trainer`` with no callback (our reference);
* ``ours_rigl``: ``lightning.Trainer`` with ``MaskInit`` + ``DynamicReallocation("rigl")``.

Reported: test accuracy, active conv/linear weights after training (non-zeros, counted the same way for both),
mean step time over the whole run (updates included), and each sparse run's step time over its own dense loop's,
which separates the sparsity cost from Lightning's own per-step overhead (a plain loop with our ``SparseMasks``
driven by hand is not measured). rigl-torch is used as an installed package only (it has no licence; nothing of
it is copied). If it cannot be imported, the results say why and give the pip command; nothing is installed here.

Usage::

    python benchmarks/peer_rigl_torch.py           # full: 3 seeds, 20 epochs (~6 min, 1 thread)
    python benchmarks/peer_rigl_torch.py --quick   # 1 seed, 2 epochs
"""

from __future__ import annotations

import argparse
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
from _common import RESULTS, markdown_table, new_figure, result_name, save_figure, write_results  # noqa: E402

from lightning_sparse.callbacks import DynamicReallocation, MaskInit  # noqa: E402
from lightning_sparse.data import DigitsDataModule  # noqa: E402
from lightning_sparse.models import BasicBlock, CifarResNet  # noqa: E402

PIP_COMMAND = "pip install --no-deps rigl-torch==0.5.2"
RUNS = ("peer_dense", "peer_rigl", "ours_dense", "ours_rigl")


def import_peer() -> tuple[Any, str | None]:
    """``(RigLScheduler, None)``, or ``(None, why it could not be imported)``."""
    try:
        from rigl_torch.RigL import RigLScheduler
    except Exception as error:  # any import failure is a reason not to compare, recorded verbatim
        return None, f"{type(error).__name__}: {error}"
    return RigLScheduler, None


def make_optimizer(params: Any, lr: float, epochs: int) -> tuple[torch.optim.Optimizer, Any]:
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)


class Classifier(L.LightningModule):
    """Cross-entropy classifier, SGD Nesterov and per-epoch cosine LR (the same as the plain loop)."""

    def __init__(self, net: nn.Module, lr: float, epochs: int) -> None:
        super().__init__()
        self.net, self.lr, self.epochs = net, lr, epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        optimizer, scheduler = make_optimizer(self.parameters(), self.lr, self.epochs)
        return [optimizer], [scheduler]


@torch.no_grad()
def evaluate(net: nn.Module, loader: Any) -> float:
    net.eval()
    correct = total = 0
    for x, y in loader:
        correct += (net(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def weight_counts(net: nn.Module) -> tuple[int, dict[str, float]]:
    """Non-zero conv/linear weights and each layer's density."""
    layers = {name: p for name, p in net.named_parameters() if p.dim() > 1}
    return (sum(int(p.count_nonzero()) for p in layers.values()),
            {name: int(p.count_nonzero()) / p.numel() for name, p in layers.items()})


def run(kind: str, seed: int, args: argparse.Namespace, peer: Any) -> dict[str, Any]:
    """One training run of ``kind`` (see the module docstring)."""
    L.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size, seed=0)
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    per_epoch = len(loader) if not args.batches else min(len(loader), args.batches)
    steps = args.epochs * per_epoch
    period = max(2, steps // 20)
    net = CifarResNet(BasicBlock, (3, 3, 3, 3), width=args.width)
    start = time.perf_counter()
    if kind.startswith("peer"):
        net.train()
        optimizer, lr_schedule = make_optimizer(net.parameters(), args.lr, args.epochs)
        scheduler = None
        if kind == "peer_rigl":
            scheduler = peer(net, optimizer, dense_allocation=1 - args.sparsity, T_end=int(0.75 * steps),
                             sparsity_distribution="uniform", ignore_linear_layers=True, delta=period, alpha=0.3)
        for _ in range(args.epochs):
            net.train()
            for index, (x, y) in enumerate(loader):
                if index >= per_epoch:
                    break
                optimizer.zero_grad()
                nn.functional.cross_entropy(net(x), y).backward()
                if scheduler is None or scheduler():
                    optimizer.step()
            lr_schedule.step()
    else:
        callbacks: list[L.Callback] = []
        if kind == "ours_rigl":
            callbacks = [MaskInit(sparsity=args.sparsity, distribution="uniform", exclude=["*fc.weight"], seed=seed,
                                  log_layer_densities=False),
                         DynamicReallocation("rigl", every_n_steps=period, stop_at=0.75, drop_fraction=0.3, seed=seed)]
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
            limit_val_batches=0, limit_train_batches=per_epoch,
        )
        trainer.fit(Classifier(net, args.lr, args.epochs), train_dataloaders=loader)
    seconds = time.perf_counter() - start
    datamodule.setup("test")
    active, densities = weight_counts(net)
    return {"kind": kind, "seed": seed, "accuracy": evaluate(net, datamodule.test_dataloader()),
            "active_weights": active, "layer_densities": densities, "train_seconds": seconds, "steps": steps,
            "step_seconds": seconds / steps, "update_period_steps": period}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 epochs")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (--quick: 2)")
    parser.add_argument("--batches", type=int, default=None, help="train batches per epoch (default: all)")
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (2 if args.quick else 20)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    started = time.perf_counter()
    peer, why_not = import_peer()
    kinds = RUNS if peer is not None else ("ours_dense", "ours_rigl")
    runs = []
    for seed in range(args.seeds):  # interleaved: every kind once per seed
        for kind in kinds:
            runs.append(run(kind, seed, args, peer))
            print(f"{kind:10s} seed={seed}: {runs[-1]['accuracy']:.2f}% ({runs[-1]['active_weights']} active, "
                  f"{runs[-1]['step_seconds'] * 1e3:.1f} ms/step)", flush=True)
    summary: dict[str, dict[str, float]] = {}
    for kind in kinds:
        group = [r for r in runs if r["kind"] == kind]
        accuracies = [r["accuracy"] for r in group]
        summary[kind] = {"mean": statistics.fmean(accuracies),
                         "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                         "active_weights": round(statistics.fmean(r["active_weights"] for r in group)),
                         "median_step_seconds": statistics.median(r["step_seconds"] for r in group)}
    ratios = {"ours_rigl_over_ours_dense": summary["ours_rigl"]["median_step_seconds"]
              / summary["ours_dense"]["median_step_seconds"]}
    if peer is not None:
        ratios["peer_rigl_over_peer_dense"] = (summary["peer_rigl"]["median_step_seconds"]
                                               / summary["peer_dense"]["median_step_seconds"])
        ratios["ours_rigl_over_peer_rigl"] = (summary["ours_rigl"]["median_step_seconds"]
                                              / summary["peer_rigl"]["median_step_seconds"])
    total_seconds = time.perf_counter() - started

    name = result_name("peer_rigl_torch", args.quick)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["model"] = f"CifarResNet(BasicBlock, (3, 3, 3, 3), width={args.width})"
    lines = [f"# RigL side by side: rigl-torch 0.5.2 vs lightning-sparse{' (QUICK setting, not the headline)' if args.quick else ''}",
             "",
             f"{settings['model']} on the offline digits ({args.image_size}x{args.image_size}), {args.epochs} epochs, "
             f"sparsity {args.sparsity} uniform, classifier dense, {args.seeds} seed(s); CPU, {args.threads} torch "
             f"thread(s); total {total_seconds / 60:.1f} min.", ""]
    if peer is None:
        lines += [f"**rigl-torch was not compared**: importing it failed with `{why_not}`. Install it with "
                  f"`{PIP_COMMAND}` and run again.", ""]
        print(f"rigl-torch not importable ({why_not}); install it with: {PIP_COMMAND}")
    lines += markdown_table(
        ["run", "test accuracy (%)", "active weights", "median step (ms)"],
        [[k, f"{s['mean']:.1f} ± {s['std']:.1f}", f"{s['active_weights']:,}", f"{s['median_step_seconds'] * 1e3:.1f}"]
         for k, s in summary.items()])
    lines += ["", "Step-time ratios (updates included): " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()) + "."]
    write_results(args.out, name, {"quick": args.quick, "settings": settings, "peer_available": peer is not None,
                                   "peer_unavailable_reason": why_not, "pip_command": PIP_COMMAND, "runs": runs,
                                   "summary": summary, "step_time_ratios": ratios, "total_seconds": total_seconds},
                  lines)
    figure, (left, right) = new_figure(9.0, 4.0, columns=2)
    left.bar(list(summary), [s["mean"] for s in summary.values()], yerr=[s["std"] for s in summary.values()])
    left.set_ylabel("test accuracy (%)")
    right.bar(list(summary), [s["median_step_seconds"] * 1e3 for s in summary.values()])
    right.set_ylabel("median step (ms)")
    for axes in (left, right):
        axes.tick_params(axis="x", labelrotation=30)
    save_figure(figure, args.out, name)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
