"""Accuracy vs sparsity: dense, static ERK, SET, RigL, DSR and the EAST stack on the same model, data and budget (issue 6.1).

Model: ``CifarResNet(BasicBlock, (3, 3, 3, 3), width=8)`` (273k conv/linear weights; EAST's weight sharing needs
stages of >= 3 blocks) on the offline digits (``DigitsDataModule(image_size=16)``: 1257 train / 270 test images,
scikit-learn's 8x8 digits resized). Every run: the same epochs, SGD Nesterov (lr 0.1, momentum 0.9, weight decay
5e-4), cosine LR per epoch, batch 64, ``lightning.Trainer`` on the CPU. Methods (callbacks of this library):

* ``dense``: no callback;
* ``static``: ``MaskInit(sparsity, "erk")`` only; the mask never changes;
* ``set`` / ``rigl`` / ``dsr``: ``MaskInit`` + ``DynamicReallocation(method, every_n_steps=P)`` (its default stop);
* ``east``: ``WeightSharing``, ``DyReLUPhaseOut(0.25, 0.5)``, ``MaskInit``, ``CyclicSparsitySchedule(3.0, cycles=2,
  cycle_length=0.2, every_n_steps=P)`` and ``DynamicReallocation("rigl", every_n_steps=P)`` (docs/algorithms.md §3).

P is a twentieth of the run's optimizer steps. For each (method, sparsity) the script reports the mean and standard
deviation of test accuracy over the seeds and the active weights after training (``MaskInit.masks.nnz()``; dense: all
conv/linear weights; EAST's shared weights count once). The Markdown file states, from the measured numbers, whether
(a) every dynamic method beats the static mask at 0.99 and above and (b) EAST holds accuracy at 0.999 where the
others fall (criteria in :func:`verdicts`).

Usage::

    python benchmarks/accuracy.py            # full: 3 seeds, 20 epochs, sparsities 0.9/0.99/0.999 (~25 min, 1 thread)
    python benchmarks/accuracy.py --quick    # 1 seed, 8 epochs, same sparsities (~3 min)
"""

from __future__ import annotations

import argparse
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
from _common import (  # noqa: E402
    DYNAMIC,
    METHODS,
    RESULTS,
    markdown_table,
    method_callbacks,
    new_figure,
    result_name,
    save_figure,
    write_results,
)

from lightning_sparse.callbacks import MaskInit  # noqa: E402
from lightning_sparse.data import DigitsDataModule  # noqa: E402
from lightning_sparse.models import BasicBlock, CifarResNet  # noqa: E402

HOLD_POINTS = 5.0  # accuracy points: "holds" = within this of its own 0.9 accuracy; "falls" = more than this below


class Classifier(L.LightningModule):
    """Cross-entropy classifier with SGD Nesterov and a per-epoch cosine LR."""

    def __init__(self, net: nn.Module, lr: float, epochs: int) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.epochs = epochs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        return [optimizer], [torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.epochs)]


def test_accuracy(model: nn.Module, loader: Any) -> float:
    """Top-1 accuracy in percent over ``loader``."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / total


def train_once(method: str, sparsity: float | None, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model and return its test accuracy, active and total weights and wall time."""
    L.seed_everything(seed, verbose=False)
    datamodule = DigitsDataModule(image_size=args.image_size, batch_size=args.batch_size, seed=0)
    datamodule.setup("fit")
    per_epoch = math.ceil(len(datamodule.train_set) / args.batch_size)
    per_epoch = min(per_epoch, args.batches) if args.batches else per_epoch
    steps = args.epochs * per_epoch
    period = max(2, steps // 20)
    net = CifarResNet(BasicBlock, tuple(args.blocks), width=args.width)
    model = Classifier(net, lr=args.lr, epochs=args.epochs)
    callbacks = method_callbacks(method, sparsity or 0.0, seed, period)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, num_sanity_val_steps=0,
        limit_val_batches=0, limit_train_batches=per_epoch,
    )
    start = time.perf_counter()
    trainer.fit(model, train_dataloaders=datamodule.train_dataloader())
    seconds = time.perf_counter() - start
    datamodule.setup("test")
    accuracy = test_accuracy(model, datamodule.test_dataloader())
    owner = next((c for c in callbacks if isinstance(c, MaskInit)), None)
    if owner is None:
        weights = [p for p in model.parameters() if p.dim() > 1]
        active = total = sum(p.numel() for p in weights)
    else:
        active, total = owner.masks.nnz(), owner.masks.numel()
    return {"method": method, "sparsity": sparsity, "seed": seed, "accuracy": accuracy, "active_weights": active,
            "maskable_weights": total, "train_seconds": seconds, "update_period_steps": period, "steps": steps}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean/std accuracy and mean active weights per ``method@sparsity`` key."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(f"{run['method']}@{run['sparsity']}", []).append(run)
    summary = {}
    for key, group in groups.items():
        accuracies = [r["accuracy"] for r in group]
        summary[key] = {
            "method": group[0]["method"], "sparsity": group[0]["sparsity"], "seeds": len(group),
            "mean": statistics.fmean(accuracies), "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "active_weights": round(statistics.fmean(r["active_weights"] for r in group)),
            "maskable_weights": group[0]["maskable_weights"],
        }
    return summary


def verdicts(summary: dict[str, dict[str, Any]], sparsities: list[float]) -> dict[str, Any]:
    """The two expectations, decided from the measured means.

    (a) confirmed when SET, RigL and DSR each have a higher mean accuracy than the static mask at every tested
    sparsity >= 0.99; refuted otherwise (the failing cases are listed). (b) confirmed when, at 0.999, EAST's mean is
    within ``HOLD_POINTS`` of its own mean at the lowest tested sparsity, every other sparse method's mean is more than
    ``HOLD_POINTS`` below its own, and EAST has the highest mean of the sparse methods; untested without 0.999.
    """
    def mean(method: str, sparsity: float) -> float:
        return summary[f"{method}@{sparsity}"]["mean"]

    high = [s for s in sparsities if s >= 0.99]
    failures = [f"{m} {mean(m, s):.1f} <= static {mean('static', s):.1f} at {s}"
                for s in high for m in DYNAMIC if mean(m, s) <= mean("static", s)]
    a_status = "untested (no sparsity >= 0.99)" if not high else ("refuted" if failures else "confirmed")
    result: dict[str, Any] = {"a_dynamic_beats_static": {"status": a_status, "failures": failures}}
    if 0.999 not in sparsities or len(sparsities) < 2:
        result["b_east_holds_at_0999"] = {"status": "untested (needs 0.999 and a lower sparsity)"}
        return result
    low = min(sparsities)
    others = ("static", *DYNAMIC)
    east_drop = mean("east", low) - mean("east", 0.999)
    drops = {m: mean(m, low) - mean(m, 0.999) for m in others}
    east_best = all(mean("east", 0.999) > mean(m, 0.999) for m in others)
    holds, others_fall = east_drop <= HOLD_POINTS, all(d > HOLD_POINTS for d in drops.values())
    result["b_east_holds_at_0999"] = {
        "status": "confirmed" if holds and others_fall and east_best else "refuted",
        "east_drop_points": east_drop, "other_drops_points": drops, "east_holds": holds,
        "others_fall": others_fall, "east_best_at_0999": east_best, "reference_sparsity": low,
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 epochs (about 3 minutes)")
    parser.add_argument("--seeds", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--epochs", type=int, default=None, help="default 20 (--quick: 8)")
    parser.add_argument("--batches", type=int, default=None, help="train batches per epoch (default: all; smoke test)")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.99, 0.999])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--blocks", type=int, nargs=4, default=[3, 3, 3, 3])
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (8 if args.quick else 20)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    started = time.perf_counter()
    runs = []
    for seed in range(args.seeds):
        for method in args.methods:
            for sparsity in [None] if method == "dense" else args.sparsities:
                run = train_once(method, sparsity, seed, args)
                runs.append(run)
                print(f"{method:7s} sparsity={sparsity} seed={seed}: {run['accuracy']:.2f}% "
                      f"({run['active_weights']} active, {run['train_seconds']:.1f} s)", flush=True)
    summary = summarize(runs)
    complete = set(args.methods) >= {"static", *DYNAMIC, "east"}
    decided = verdicts(summary, sorted(args.sparsities)) if complete else {"note": "needs every method"}
    total_seconds = time.perf_counter() - started

    name = result_name("accuracy", args.quick)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["model"] = f"CifarResNet(BasicBlock, {tuple(args.blocks)}, width={args.width})"
    settings["data"] = f"DigitsDataModule(image_size={args.image_size}) train/test split seed 0"
    lines = [
        f"# Accuracy vs sparsity{' (QUICK setting: 1 seed, few epochs; not the headline)' if args.quick else ''}",
        "",
        f"{settings['model']} on the offline digits ({args.image_size}x{args.image_size}), {args.epochs} epochs, "
        f"batch {args.batch_size}, SGD Nesterov lr {args.lr} cosine; {args.seeds} seed(s); test accuracy (%) mean "
        f"± std over seeds, and active weights after training. CPU, {args.threads} torch thread(s); "
        f"total {total_seconds / 60:.1f} min.",
        "",
    ]
    dense = summary.get("dense@None")
    header = ["method", *[f"sparsity {s}" for s in args.sparsities]]
    rows = []
    for method in args.methods:
        if method == "dense":
            rows.append(["dense", *[f"{dense['mean']:.1f} ± {dense['std']:.1f} ({dense['active_weights']:,} w)"]
                         * len(args.sparsities)])
            continue
        rows.append([method, *[f"{summary[f'{method}@{s}']['mean']:.1f} ± {summary[f'{method}@{s}']['std']:.1f} "
                               f"({summary[f'{method}@{s}']['active_weights']:,} w)" for s in args.sparsities]])
    lines += markdown_table(header, rows)
    lines += ["", "Dense is one model (same row repeated for reading). `w` = active weights.", ""]
    if complete:
        a, b = decided["a_dynamic_beats_static"], decided["b_east_holds_at_0999"]
        lines.append(f"**(a) Dynamic methods (SET, RigL, DSR) beat the static mask at 0.99 and above: {a['status'].upper()}.**"
                     + (f" Failing: {'; '.join(a['failures'])}." if a["failures"] else ""))
        if "east_drop_points" in b:
            drops = ", ".join(f"{m} {d:.1f}" for m, d in b["other_drops_points"].items())
            lines.append(
                f"**(b) EAST holds accuracy at 0.999 where the others fall: {b['status'].upper()}.** EAST loses "
                f"{b['east_drop_points']:.1f} points from sparsity {b['reference_sparsity']} to 0.999 (holds if <= "
                f"{HOLD_POINTS}: {b['east_holds']}); the others lose {drops} (fall if > {HOLD_POINTS}: "
                f"{b['others_fall']}); EAST best at 0.999: {b['east_best_at_0999']}.")
        else:
            lines.append(f"**(b) EAST holds accuracy at 0.999: {b['status']}.**")
        if args.seeds < 2:
            lines.append("")
            lines.append("With one seed there is no spread: these verdicts are indicative only.")
    write_results(args.out, name, {"quick": args.quick, "settings": settings, "runs": runs, "summary": summary,
                                   "verdicts": decided, "total_seconds": total_seconds}, lines)

    figure, axes = new_figure()
    positions = list(range(len(args.sparsities)))
    for method in args.methods:
        if method == "dense":
            axes.axhline(dense["mean"], color="black", linestyle="--", label="dense")
            continue
        stats = [summary[f"{method}@{s}"] for s in args.sparsities]
        axes.errorbar(positions, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o",
                      capsize=3, label=method)
    axes.set_xticks(positions, [str(s) for s in args.sparsities])
    axes.set_xlabel("sparsity")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(f"Accuracy vs sparsity{' (quick)' if args.quick else ''}: {settings['model']}, digits")
    axes.legend()
    save_figure(figure, args.out, name)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
