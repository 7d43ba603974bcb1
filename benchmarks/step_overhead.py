"""Training-step time of MaskInit + DynamicReallocation(dsr) against the same dense training (issue 3, point 7).

Both runs train the same model on the same generated data with the same Trainer settings; the sparse run adds
``MaskInit(sparsity)`` and ``DynamicReallocation("dsr", every_n_steps=P)``. A run's step time is the wall time
between the first timed batch start and the last batch end divided by the number of timed steps, so the DSR updates
that fall in the timed window are included (with P = 100 and 100 timed steps, one update per run). Dense and sparse
runs are interleaved (dense, sparse, dense, ...) to spread machine noise evenly; the figure is the ratio of the
medians over ``--repeats`` runs. CPU only. Writes ``benchmarks/results/step_overhead.json`` and ``.md``.

Usage::

    python benchmarks/step_overhead.py           # full: torchvision resnet18, 32x32, batch 64, 110 steps/run
    python benchmarks/step_overhead.py --quick   # a tiny CNN, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.callbacks import DynamicReallocation, MaskInit

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, SGDClassifier, StepTimer  # noqa: E402


def make_net(quick: bool) -> nn.Module:
    if quick:
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
        )
    import torchvision

    return torchvision.models.resnet18(num_classes=10)


def run(sparse: bool, args: argparse.Namespace, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    steps = args.warmup + args.steps
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * args.batch_size, 3, args.size, args.size, generator=generator)
    y = torch.randint(0, 10, (steps * args.batch_size,), generator=generator)
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size)
    timer = StepTimer(args.warmup)
    callbacks: list[L.Callback] = [timer]
    if sparse:
        # The update falls at global step P inside the timed window (stop_at=1.0 keeps it on in this short run).
        callbacks += [MaskInit(sparsity=args.sparsity, seed=seed),
                      DynamicReallocation("dsr", every_n_steps=args.every_n_steps, stop_at=1.0)]
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(SGDClassifier(make_net(args.quick)), loader)
    return (timer.end - timer.start) / timer.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny CNN, few steps (smoke test)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--every-n-steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.repeats, args.steps, args.warmup, args.batch_size, args.size, args.every_n_steps = 2, 6, 2, 8, 16, 4
    warnings.filterwarnings("ignore")
    dense, sparse = [], []
    for repeat in range(args.repeats):
        dense.append(run(False, args, seed=repeat))
        sparse.append(run(True, args, seed=repeat))
    dense_median, sparse_median = statistics.median(dense), statistics.median(sparse)
    overhead = sparse_median / dense_median - 1.0
    info = {
        "model": "tiny CNN" if args.quick else "torchvision resnet18",
        "input": f"3x{args.size}x{args.size}", "batch_size": args.batch_size, "timed_steps": args.steps,
        "warmup_steps": args.warmup, "sparsity": args.sparsity, "every_n_steps": args.every_n_steps,
        "updates_per_run": (args.warmup + args.steps - 1) // args.every_n_steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__, "lightning": L.__version__,
        "dense_step_s": dense, "sparse_step_s": sparse, "dense_median_s": dense_median,
        "sparse_median_s": sparse_median, "overhead": overhead, "quick": args.quick,
    }
    name = "step_overhead_quick" if args.quick else "step_overhead"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(info, indent=2) + "\n")
    table = [
        f"# Training-step time: MaskInit + DynamicReallocation(dsr) vs dense ({info['model']}, CPU)",
        "",
        f"Input {info['input']}, batch {args.batch_size}, SGD Nesterov; sparsity {args.sparsity}, DSR every "
        f"{args.every_n_steps} steps ({info['updates_per_run']} update(s) in each run's {args.warmup + args.steps} "
        f"steps, inside the {args.steps} timed ones); {args.repeats} interleaved runs each, {info['threads']} CPU "
        f"threads, torch {torch.__version__}, lightning {L.__version__}.",
        "",
        "| training | median step time (ms) | runs (ms) |",
        "|---|---|---|",
        f"| dense | {dense_median * 1e3:.2f} | {', '.join(f'{t * 1e3:.1f}' for t in dense)} |",
        f"| MaskInit + DynamicReallocation(dsr) | {sparse_median * 1e3:.2f} | "
        f"{', '.join(f'{t * 1e3:.1f}' for t in sparse)} |",
        "",
        f"Overhead: {overhead:+.2%} (target <= +3%).",
        "",
    ]
    (args.out / f"{name}.md").write_text("\n".join(table))
    print("\n".join(table))


if __name__ == "__main__":
    main()
