"""CPU inference latency of a sparse model: dense eager vs dense torch.compile vs sparse_inference (issue 13).

For CIFAR ResNet-18 and WRN-28-2 (``lightning_sparse.models``) with random ERK masks over every Conv2d/Linear
weight (``lightning_sparse.functional.layer_densities`` + ``active_counts``, positions drawn uniformly) at each
sparsity, batch size and thread count, the script

1. converts the model with :func:`lightning_sparse.sparse_inference` (per-layer timed choice on the same batch);
2. times, interleaved in one loop (so machine load hits all alike), the dense eager model, the dense
   ``torch.compile`` model (when it compiles here within the run; else a note says why not) and ours;
3. reports median latencies, the ratios dense / ours and compile / ours, and the FLOP limit 1 / density (the
   speedup if only the active multiply-adds cost time and nothing else did);
4. keeps the per-layer tables (dense ms, sparse ms, choice), from which docs/inference.md §3 reads the crossover
   density per layer shape.

Writes ``benchmarks/results/inference.{json,md,png}`` (``inference_quick.*`` with ``--quick``); the JSON is
rewritten after every configuration so an interrupted run keeps what it measured.

    python benchmarks/inference.py                     # full grid (tens of minutes on 2 shared cores)
    python benchmarks/inference.py --quick             # smoke test: a narrow ResNet-18, seconds
    python benchmarks/inference.py --name inference_seeds --sparsities 0.99 --batch-sizes 64 --seeds 0 1 2 3 4 \
        --no-compile                                   # the 3x target cells over five random masks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    load_average_note,
    markdown_table,
    new_figure,
    result_name,
    save_figure,
    write_results,
)

from lightning_sparse import sparse_inference  # noqa: E402
from lightning_sparse.functional import active_counts, layer_densities  # noqa: E402
from lightning_sparse.functional.sparse_conv import numba_available  # noqa: E402
from lightning_sparse.models import cifar_resnet18, wide_resnet28  # noqa: E402

MODELS = {
    "resnet18": lambda width: cifar_resnet18(width=width),
    "wrn-28-2": lambda width: wide_resnet28(2),
}


def load_note(before: float) -> str:
    """The machine's load during the run, and why the ratios hold under it."""
    return f"{load_average_note(before)}; ratios are interleaved in one loop, so load hits every implementation alike"


def erk_sparsify(model: nn.Module, sparsity: float, seed: int = 0) -> float:
    """Zero all but an ERK share of every Conv2d/Linear weight (random positions); return the global density."""
    weights = {name: m.weight for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    shapes = {name: tuple(w.shape) for name, w in weights.items()}
    counts = active_counts(shapes, layer_densities(shapes, sparsity, "erk"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in weights.items():
            keep = torch.zeros(weight.numel(), dtype=torch.bool)
            keep[torch.randperm(weight.numel(), generator=generator)[: counts[name]]] = True
            weight.mul_(keep.view_as(weight))
    return sum(counts.values()) / sum(w.numel() for w in weights.values())


def conv_flops(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Dense and active multiply-adds of the Conv2d/Linear layers for input ``x``."""
    totals = [0.0, 0.0]

    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        per_output = module.weight[0].numel()  # multiply-adds per output value (in_channels/groups x k_h x k_w)
        outputs = out.numel()
        density = float((module.weight != 0).sum()) / module.weight.numel()
        totals[0] += per_output * outputs
        totals[1] += per_output * outputs * density

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return totals[0], totals[1]


def try_compile(model: nn.Module, x: torch.Tensor, budget_s: float) -> tuple[Any, str]:
    """``torch.compile(model)`` warmed up on ``x``, or None and why not."""
    if budget_s <= 0:
        return None, "skipped (--compile-budget 0)"
    start = time.perf_counter()
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(x)
    except Exception as error:  # inductor raises many types (missing compiler, unsupported op, ...)
        return None, f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
    seconds = time.perf_counter() - start
    if seconds > budget_s:
        return None, f"compiled in {seconds:.0f} s > --compile-budget {budget_s:.0f} s; not timed"
    return compiled, f"compiled in {seconds:.0f} s"


class Subject:
    """One model, batch and thread count: the dense model, its example input and (once) its torch.compile.

    The dense model is compiled once and re-sparsified in place for each sparsity (``load_state_dict`` copies into the
    same parameters, which the compiled graph reads as inputs), so one compile serves every sparsity.
    """

    def __init__(self, args: argparse.Namespace, model_name: str, batch: int, threads: int) -> None:
        torch.manual_seed(0)
        torch.set_num_threads(threads)
        self.model_name, self.batch, self.threads = model_name, batch, threads
        self.model = MODELS[model_name](args.width).eval()
        self.initial = {key: value.clone() for key, value in self.model.state_dict().items()}
        self.x = torch.randn(batch, 3, 32, 32)
        self.compiled, self.compile_note = (
            (None, "not tried") if args.no_compile else try_compile(self.model, self.x, args.compile_budget)
        )

    def sparsify(self, sparsity: float, seed: int) -> float:
        """Restore the dense weights, then apply a random ERK mask of ``sparsity`` (positions drawn with ``seed``);
        the global density."""
        self.model.load_state_dict(self.initial)
        return erk_sparsify(self.model, sparsity, seed)


def run_config(args: argparse.Namespace, subject: Subject, sparsity: float, seed: int = 0) -> dict[str, Any]:
    model, x, batch, threads, model_name = subject.model, subject.x, subject.batch, subject.threads, subject.model_name
    torch.set_num_threads(threads)
    density = subject.sparsify(sparsity, seed)
    dense_macs, active_macs = conv_flops(model, x)
    start = time.perf_counter()
    fast = sparse_inference(model, x, repeats=args.choice_repeats, verbose=False)
    convert_s = time.perf_counter() - start
    # The dense model with the same BatchNorm folding (every layer dense): how much of the speedup is the kernel's.
    folded = sparse_inference(model, x, choose="dense", repeats=1, verbose=False)
    runners = {"dense": model, "dense-folded": folded, "ours": fast}
    if subject.compiled is not None:
        runners["compile"] = subject.compiled
    times: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        # These calls are also each implementation's warm-up call.
        expected = model(x)
        errors = {
            name: float((run(x) - expected).abs().max() / expected.abs().max())
            for name, run in runners.items()
            if name != "dense"
        }
        for _ in range(args.repeats):
            for name, run in runners.items():
                begin = time.perf_counter()
                run(x)
                times[name].append(time.perf_counter() - begin)
    error = errors["ours"]
    median = {name: statistics.median(values) * 1e3 for name, values in times.items()}
    report = fast.report
    return {
        "model": model_name,
        "sparsity": sparsity,
        "mask_seed": seed,
        "density": density,
        "batch": batch,
        "threads": threads,
        "median_ms": median,
        "times_ms": {name: [t * 1e3 for t in values] for name, values in times.items()},
        "speedup_vs_dense": median["dense"] / median["ours"],
        "speedup_vs_dense_folded": median["dense-folded"] / median["ours"],
        "folded_batchnorms": len(report.folded_batchnorms),
        "fused_relus": len(report.fused_relus),
        "speedup_vs_compile": median["compile"] / median["ours"] if "compile" in median else None,
        "flop_limit": 1.0 / density,
        "conv_macs_dense": dense_macs,
        "conv_macs_active": active_macs,
        "conv_flop_limit": dense_macs / max(active_macs, 1.0),
        "max_relative_error": error,
        "compile": subject.compile_note,
        "compile_max_relative_error": errors.get("compile"),
        "convert_s": convert_s,
        "sparse_layers": len(report.sparse_layers),
        "layers": [
            {
                "name": layer.name,
                "kind": layer.kind,
                "weight_shape": list(layer.weight_shape),
                "input_shape": None if layer.input_shape is None else list(layer.input_shape),
                "density": layer.density,
                "times_ms": layer.times_ms,
                "choice": layer.choice,
                "reason": layer.reason,
            }
            for layer in report.layers
        ],
    }


def crossovers(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Per layer shape, model, batch and threads: the measured (density, dense / sparse) points and the crossover.

    The crossover density is where dense / fastest-sparse crosses 1, interpolated linearly in log-log between the two
    measured densities that bracket it (None when every point is on one side).
    """
    points: dict[tuple[Any, ...], dict[float, list[float]]] = {}
    for row in rows:
        for layer in row["layers"]:
            times = layer["times_ms"]
            sparse = [t for c, t in times.items() if c != "dense"]
            if not sparse or "dense" not in times or layer["input_shape"] is None:
                continue
            key = (
                row["model"],
                row["batch"],
                row["threads"],
                "x".join(str(d) for d in layer["weight_shape"]),
                "x".join(str(d) for d in layer["input_shape"][1:]),
            )
            points.setdefault(key, {}).setdefault(round(layer["density"], 5), []).append(times["dense"] / min(sparse))
    table = []
    for key, by_density in sorted(points.items()):
        measured = sorted((density, statistics.median(ratios)) for density, ratios in by_density.items())
        crossover = None
        for (d0, r0), (d1, r1) in zip(measured, measured[1:]):
            if (r0 - 1) * (r1 - 1) <= 0 and r0 != r1:
                # log r is linear in log d between the two points; solve log r = 0.
                t = math.log(r0) / (math.log(r0) - math.log(r1))
                crossover = math.exp(math.log(d0) + t * (math.log(d1) - math.log(d0)))
                break
        text = ", ".join(f"{d:.4f}: {r:.2f}x" for d, r in measured)
        table.append((*key, text, "-" if crossover is None else f"{crossover:.3f}"))
    return table


def seed_spread(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown: for each configuration measured with several mask seeds, the spread of its speedup over them."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["sparsity"], row["batch"], row["threads"]), []).append(row)
    table = []
    for (model, sparsity, batch, threads), members in groups.items():
        if len(members) < 2:
            continue
        speedups = sorted(member["speedup_vs_dense"] for member in members)
        seeds = ", ".join(str(member.get("mask_seed", 0)) for member in members)
        table.append(
            (
                model, f"{sparsity:.3f}", batch, threads, seeds, f"{statistics.median(speedups):.2f}x",
                f"{speedups[0]:.2f}x", f"{speedups[-1]:.2f}x",
            )
        )  # fmt: skip
    if not table:
        return []
    header = ("model", "sparsity", "batch", "threads", "mask seeds", "median speedup", "min", "max")
    return [
        "",
        "## Spread over mask seeds",
        "",
        "Each row: one configuration with a different random ERK mask per seed (each seed a full conversion and "
        "timing, as above); speedup = dense / ours.",
        "",
        *markdown_table(header, table),
    ]


def markdown(rows: list[dict[str, Any]], settings: dict[str, Any], note: str) -> list[str]:
    lines = [
        "# Sparse CPU inference: dense eager / dense torch.compile / sparse_inference",
        "",
        f"Settings: {settings}. {note}.",
        "",
        "Speedup = dense median latency / ours (> 1: ours faster). 'folded ms' is the dense model with the "
        'BatchNorm folding that sparse_inference also does (`sparse_inference(model, x, choose="dense")`), so '
        "'vs folded' is the sparse kernel's own share of the speedup. FLOP limit = 1 / global density (conv+linear "
        "weights); conv FLOP limit = dense / active multiply-adds of the convs and the Linear for this input.",
        "",
    ]
    table = []
    for row in rows:
        med = row["median_ms"]
        table.append(
            (
                row["model"],
                f"{row['sparsity']:.3f}",
                row["batch"],
                row["threads"],
                f"{med['dense']:.1f}",
                f"{med['compile']:.1f}" if "compile" in med else "-",
                f"{med['dense-folded']:.1f}" if "dense-folded" in med else "-",
                f"{med['ours']:.1f}",
                f"{row['speedup_vs_dense']:.2f}x",
                f"{row['speedup_vs_dense_folded']:.2f}x" if "speedup_vs_dense_folded" in row else "-",
                f"{row['speedup_vs_compile']:.2f}x" if row["speedup_vs_compile"] else "-",
                f"{row['flop_limit']:.0f}x",
                f"{row['conv_flop_limit']:.0f}x",
                f"{row['sparse_layers']}/{len(row['layers'])}"
                + (
                    f" ({row['folded_batchnorms']} BN folded, {row['fused_relus']} ReLU fused)"
                    if "fused_relus" in row
                    else ""
                ),
                f"{row['max_relative_error']:.1e}",
            )
        )
    header = (
        "model",
        "sparsity",
        "batch",
        "threads",
        "dense ms",
        "compile ms",
        "folded ms",
        "ours ms",
        "speedup vs dense",
        "vs folded",
        "vs compile",
        "FLOP limit",
        "conv FLOP limit",
        "sparse layers",
        "max rel. error",
    )
    lines += markdown_table(header, table)
    lines += seed_spread(rows)
    notes = sorted({f"{row['model']} batch {row['batch']} threads {row['threads']}: {row['compile']}" for row in rows})
    lines += ["", "torch.compile:", *[f"- {note}" for note in notes]]
    lines += [
        "",
        "## Crossover density per layer shape",
        "",
        "Each point: layer density -> dense ms / fastest sparse layout ms (> 1: sparse faster; median over layers "
        "of that shape). Crossover: where the ratio crosses 1 (log-log interpolation; '-' if all points are on one "
        "side: the layer wins or loses at every density measured).",
        "",
    ]
    header = ("model", "batch", "threads", "weight", "input (C x H x W)", "density: dense/sparse", "crossover density")
    lines += markdown_table(header, crossovers(rows))
    lines += ["", "## Per-layer choice (dense ms vs fastest sparse layout ms)", ""]
    layer_rows = []
    for row in rows:
        for layer in row["layers"]:
            times = layer["times_ms"]
            sparse = [t for c, t in times.items() if c != "dense"]
            layer_rows.append(
                (
                    row["model"],
                    f"{row['sparsity']:.3f}",
                    row["batch"],
                    row["threads"],
                    layer["name"],
                    "x".join(str(d) for d in layer["weight_shape"]),
                    "x".join(str(d) for d in layer["input_shape"][1:]) if layer["input_shape"] else "-",
                    f"{layer['density']:.4f}",
                    f"{times['dense']:.2f}" if "dense" in times else "-",
                    f"{min(sparse):.2f}" if sparse else "-",
                    f"{times['dense'] / min(sparse):.2f}" if sparse and "dense" in times else "-",
                    layer["choice"] if not layer["reason"] else f"{layer['choice']} ({layer['reason']})",
                )
            )
    header = (
        "model",
        "sparsity",
        "batch",
        "thr",
        "layer",
        "weight",
        "input",
        "density",
        "dense",
        "sparse",
        "x",
        "choice",
    )
    lines += markdown_table(header, layer_rows)
    return lines


def plot(rows: list[dict[str, Any]], out: Path, name: str) -> None:
    figure, axes = new_figure(width=11, height=4.5, columns=2)
    for axis, batch in zip(axes, sorted({row["batch"] for row in rows})[:2]):
        for model in sorted({row["model"] for row in rows}):
            for threads in sorted({row["threads"] for row in rows}):
                chosen = sorted(
                    (r for r in rows if r["model"] == model and r["batch"] == batch and r["threads"] == threads),
                    key=lambda r: r["sparsity"],
                )
                if chosen:
                    axis.plot(
                        [r["sparsity"] for r in chosen],
                        [r["speedup_vs_dense"] for r in chosen],
                        marker="o",
                        label=f"{model}, {threads} thr",
                    )
        axis.axhline(1.0, color="grey", linewidth=0.8)
        axis.set_xscale("logit")
        axis.set_yscale("log")
        axis.set_xlabel("global sparsity (ERK)")
        axis.set_ylabel("dense eager / ours (latency)")
        axis.set_title(f"batch {batch}")
        axis.legend(fontsize=8)
    figure.suptitle("sparse_inference speedup over dense eager (CPU; ratios interleaved in one loop)", fontsize=9)
    save_figure(figure, out, name)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the grid of the command line ``argv`` (default ``sys.argv``); return the result rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="narrow ResNet-18, batch 1 and 8, 99%% only (smoke)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.99, 0.999])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch (and kernel) CPU threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation (median)")
    parser.add_argument("--choice-repeats", type=int, default=3, help="timed calls per layer for the choice")
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 base width")
    parser.add_argument("--no-compile", action="store_true", help="do not try torch.compile")
    parser.add_argument(
        "--compile-budget", type=float, default=300.0, help="seconds a torch.compile may take before it is dropped"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0], help="mask seeds: each configuration once per random ERK mask"
    )
    parser.add_argument("--name", default="inference", help="results file name (default: inference)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--replot", type=Path, help="rewrite the .md and .png of this JSON result (no measuring)")
    args = parser.parse_args(argv)
    if args.replot is not None:
        payload = json.loads(args.replot.read_text())
        name = args.replot.stem
        markdown_lines = markdown(payload["rows"], payload["settings"], payload["note"])
        (args.replot.parent / f"{name}.md").write_text("\n".join(markdown_lines) + "\n")
        plot(payload["rows"], args.replot.parent, name)
        return payload["rows"]
    if args.quick:
        args.models, args.sparsities, args.batch_sizes, args.threads = ["resnet18"], [0.99], [1, 8], [1]
        args.repeats, args.choice_repeats, args.width, args.no_compile = 2, 1, 16, True
    if not numba_available():
        print("numba is not installed: every layer stays dense (pip install 'lightning-sparse[inference]')")
    name = result_name(args.name, args.quick)
    settings = {key: value for key, value in vars(args).items() if key != "out"}
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    for threads in args.threads:  # one thread first: the least load-sensitive figures come out first
        for model_name in args.models:
            for batch in args.batch_sizes:
                subject = Subject(args, model_name, batch, threads)
                for sparsity, seed in ((s, seed) for s in args.sparsities for seed in args.seeds):
                    row = run_config(args, subject, sparsity, seed)
                    rows.append(row)
                    print(
                        f"{model_name} s={sparsity} seed={seed} batch={batch} threads={threads}: dense "
                        f"{row['median_ms']['dense']:.1f} ms, ours {row['median_ms']['ours']:.1f} ms "
                        f"({row['speedup_vs_dense']:.2f}x; FLOP limit {row['flop_limit']:.0f}x), compile: "
                        f"{row['compile']}, {time.perf_counter() - start:.0f} s so far",
                        flush=True,
                    )
                    note = load_note(load_before)
                    data = {"settings": settings, "note": note, "rows": rows}
                    write_results(
                        args.out, name, {**data, "seconds": time.perf_counter() - start}, markdown(rows, settings, note)
                    )
    plot(rows, args.out, name)
    print(f"wrote {args.out / name}.json/.md/.png in {time.perf_counter() - start:.0f} s")
    return rows


if __name__ == "__main__":
    main()
