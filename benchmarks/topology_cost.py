"""Cost of one topology update on ResNet-50-sized tensors: DSR's threshold, SET/RigL's per-layer top-k, a global sort (issue 6.3).

Tensors: the shapes of torchvision's ResNet-50 conv and linear weights (54 tensors, 25.5M weights), He-normal values
and uniform random masks at ``--density`` (0.1), random dense gradients for RigL (built by
``benchmarks/reallocation_cost.py``'s helpers, imported). Every update replaces the same fraction ``--prune-fraction``
(0.1) of the active weights:

* **DSR** (docs/algorithms.md §2a): :func:`~lightning_sparse.functional.dsr.dsr_reallocate`, one global threshold
  compare, growth apportioned to layers and drawn at random, threshold adapted; H set once (untimed) so that it
  prunes about the target;
* **SET** (§4b): :func:`~lightning_sparse.functional.criteria.set_update` on every layer (per-layer magnitude top-k,
  random regrowth);
* **RigL** (§4a): :func:`~lightning_sparse.functional.criteria.rigl_update` on every layer (per-layer magnitude
  top-k, gradient top-k regrowth);
* **global sort**: ``torch.sort`` of every active |w| of the network, prune the smallest, same random regrowth as
  DSR (``reallocation_cost.topk_update(use_sort=True)``); **global top-k**: the same with ``torch.topk``.

Medians of ``--repeats`` (after one warm-up), one process, this machine's CPU, reported in seconds and as ratios
to the global sort.

Usage::

    python benchmarks/topology_cost.py           # full: ResNet-50 shapes (~2 min, 1 thread)
    python benchmarks/topology_cost.py --quick   # three small tensors, seconds
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import markdown_table, median_time, new_figure, result_name, save_figure, write_results  # noqa: E402
from reallocation_cost import add_problem_arguments, topk_update, update_problem  # noqa: E402

from lightning_sparse.functional.criteria import rigl_update, set_update  # noqa: E402
from lightning_sparse.functional.dsr import dsr_reallocate  # noqa: E402

UPDATES = {
    "dsr": "DSR: one global threshold (`dsr_reallocate`)",
    "set": "SET: per-layer magnitude top-k + random regrowth (`set_update` per layer)",
    "rigl": "RigL: per-layer magnitude top-k + gradient top-k (`rigl_update` per layer)",
    "global_sort": "global `torch.sort` of all active magnitudes + random regrowth",
    "global_topk": "global `torch.topk` of all active magnitudes + random regrowth",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_problem_arguments(
        parser, quick="three small tensors (smoke test)", prune_fraction="fraction of the active weights replaced"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    problem = update_problem(args)
    shapes, repeats, weights, masks = problem.shapes, problem.repeats, problem.weights, problem.masks
    active, num_prune, threshold = problem.active, problem.num_prune, problem.threshold
    generator = torch.Generator().manual_seed(1)
    grads = [torch.randn(w.shape, generator=generator) for w in weights]

    functions = {
        "dsr": lambda: dsr_reallocate(weights, masks, threshold, num_prune, 0.1, torch.Generator().manual_seed(0)),
        "set": lambda: [set_update(w, m, args.prune_fraction, torch.Generator().manual_seed(0))
                        for w, m in zip(weights, masks)],
        "rigl": lambda: [rigl_update(w, g, m, args.prune_fraction) for w, g, m in zip(weights, grads, masks)],
        "global_sort": lambda: topk_update(weights, masks, num_prune, torch.Generator().manual_seed(0), use_sort=True),
        "global_topk": lambda: topk_update(weights, masks, num_prune, torch.Generator().manual_seed(0), use_sort=False),
    }
    # Interleave the repeats so that machine noise falls on every update alike.
    times: dict[str, list[float]] = {name: [] for name in functions}
    for function in functions.values():
        function()  # warm-up
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(median_time(function, repeats=1, warmup=0)[0])
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = {name: medians[name] / medians["global_sort"] for name in functions}
    total_seconds = time.perf_counter() - started

    name = result_name("topology_cost", args.quick)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(repeats=repeats, tensors=len(shapes), weights=sum(math.prod(s) for s in shapes),
                    active=active, replaced=num_prune, shapes="quick: 3 small tensors" if args.quick else
                    "torchvision resnet50 conv+linear weights")
    lines = [
        f"# One topology update: DSR vs per-layer top-k (SET, RigL) vs global sort"
        f"{' (QUICK setting, not the headline)' if args.quick else ''}",
        "",
        f"{settings['tensors']} tensors ({settings['shapes']}), {settings['weights']:,} weights, density "
        f"{args.density}, {active:,} active, {num_prune:,} replaced per update; median of {repeats} interleaved "
        f"repeats, CPU, {torch.get_num_threads()} torch thread(s).",
        "",
    ]
    lines += markdown_table(["update", "median time (s)", "time / global sort"],
                            [[UPDATES[n], f"{medians[n]:.4f}", f"{ratio[n]:.3f}"] for n in functions])
    write_results(args.out, name, {"quick": args.quick, "settings": settings, "seconds": times,
                                   "median_seconds": medians, "ratio_to_global_sort": ratio,
                                   "total_seconds": total_seconds}, lines)
    figure, axes = new_figure()
    axes.bar(list(functions), [medians[n] for n in functions])
    axes.set_ylabel("median seconds per update")
    axes.set_title(f"Topology update cost{' (quick)' if args.quick else ', ResNet-50 shapes, density ' + str(args.density)}")
    save_figure(figure, args.out, name)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
