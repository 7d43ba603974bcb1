"""Cost of one DSR reallocation against a sort-based global top-k update on ResNet-50-sized tensors (issue 3, point 7).

Both updates prune the same number of weights (Np) over the same masked tensors and regrow as many at random with
the same growth code (:func:`~lightning_sparse.functional.dsr.allocate_growth` and
:func:`~lightning_sparse.functional.dsr.grow_random`); they differ only in how the pruned weights are chosen:

* **DSR** (Mostafa & Wang 2019, docs/algorithms.md §2a): :func:`~lightning_sparse.functional.dsr.dsr_reallocate`,
  i.e. compare every active |w| with one global threshold H (O(N), no sort), then adapt H;
* **top-k by sort**: concatenate every active |w|, ``torch.sort`` them, prune the Np smallest (the global magnitude
  pruning that DSR's threshold replaces; docs/architecture.md §5). ``torch.topk`` (partial selection) is timed too, as
  the strongest sort-free baseline.

Tensors: the shapes of torchvision's ResNet-50 conv and linear weights (54 tensors, 25.5M weights), random
He-normal values, uniform random masks at the given density; Np = ``--prune-fraction`` x the active weights, with H
set once (untimed) to the Np-th smallest active magnitude so that DSR prunes about Np. Medians of ``--repeats``
runs, one process, this machine's CPU. Writes ``benchmarks/results/reallocation_cost.json`` and ``.md``.

Usage::

    python benchmarks/reallocation_cost.py             # full: ResNet-50 shapes
    python benchmarks/reallocation_cost.py --quick     # a few small tensors, seconds
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lightning_sparse.functional.dsr import allocate_growth, dsr_reallocate, grow_random

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, median_time  # noqa: E402


def resnet50_weight_shapes() -> list[tuple[int, ...]]:
    """Shapes of every conv and linear weight of torchvision's ResNet-50 (built on the meta device, no weights)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet50()
    return [tuple(p.shape) for p in model.parameters() if p.dim() > 1]


def make_tensors(
    shapes: list[tuple[int, ...]], density: float, seed: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """He-normal weights and uniform random masks of the given density; inactive weights are 0."""
    generator = torch.Generator().manual_seed(seed)
    weights, masks = [], []
    for shape in shapes:
        fan_in = math.prod(shape[1:])
        weight = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
        mask = torch.rand(shape, generator=generator) < density
        weights.append(weight * mask)
        masks.append(mask)
    return weights, masks


def add_problem_arguments(parser: argparse.ArgumentParser, *, quick: str, prune_fraction: str) -> None:
    """The flags of the update-cost benchmarks (this one and ``topology_cost.py``), with their help texts."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--prune-fraction", type=float, default=0.1, help=prune_fraction)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: robust on a shared machine)")
    parser.add_argument("--out", type=Path, default=RESULTS)


@dataclass
class UpdateProblem:
    """The masked tensors an update-cost benchmark times, and what it prunes."""

    shapes: list[tuple[int, ...]]
    repeats: int
    weights: list[torch.Tensor]
    masks: list[torch.Tensor]
    active: int
    num_prune: int
    threshold: float
    """DSR's H that prunes about ``num_prune`` (what its adaptation converges to), found once and not timed."""


def update_problem(args: argparse.Namespace) -> UpdateProblem:
    """Set ``--threads`` and build the tensors: three small ones with ``--quick`` (2 repeats), else ResNet-50's
    shapes (``--repeats``), at ``--density``; Np = ``--prune-fraction`` x the active weights."""
    torch.set_num_threads(args.threads)
    shapes = [(64, 32, 3, 3), (128, 64, 3, 3), (10, 128)] if args.quick else resnet50_weight_shapes()
    weights, masks = make_tensors(shapes, args.density, seed=0)
    active = int(sum(int(m.sum()) for m in masks))
    num_prune = max(1, round(args.prune_fraction * active))
    active_magnitudes = torch.cat([w[m].abs() for w, m in zip(weights, masks)])
    threshold = float(torch.kthvalue(active_magnitudes, num_prune).values) * (1 + 1e-6)
    repeats = 2 if args.quick else args.repeats
    return UpdateProblem(shapes, repeats, weights, masks, active, num_prune, threshold)


def topk_update(
    weights: list[torch.Tensor], masks: list[torch.Tensor], num_prune: int, generator: torch.Generator, use_sort: bool
) -> list[torch.Tensor]:
    """Global magnitude pruning of the ``num_prune`` smallest active weights, then the same random regrowth as DSR."""
    magnitudes = torch.cat([torch.where(m, w.abs(), torch.full_like(w, math.inf)).reshape(-1) for w, m in zip(weights, masks)])
    if use_sort:
        order = torch.sort(magnitudes).indices[:num_prune]
    else:
        order = torch.topk(magnitudes, num_prune, largest=False, sorted=False).indices
    pruned_flat = torch.zeros_like(magnitudes, dtype=torch.bool)
    pruned_flat[order] = True
    pruned = [chunk.view(m.shape) for chunk, m in zip(pruned_flat.split([m.numel() for m in masks]), masks)]
    kept = [m & ~p for m, p in zip(masks, pruned)]
    survivors = torch.stack([k.sum() for k in kept])
    free = torch.tensor([m.numel() for m in masks]) - survivors - torch.stack([p.sum() for p in pruned])
    counts = allocate_growth(num_prune, survivors, free, generator)
    return grow_random(kept, pruned, counts, generator)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_problem_arguments(
        parser, quick="a few small tensors (smoke test)", prune_fraction="Np as a fraction of the active weights"
    )
    args = parser.parse_args()
    problem = update_problem(args)
    shapes, repeats, weights, masks = problem.shapes, problem.repeats, problem.weights, problem.masks
    active, num_prune, threshold = problem.active, problem.num_prune, problem.threshold

    def dsr() -> object:
        return dsr_reallocate(weights, masks, threshold, num_prune, 0.1, torch.Generator().manual_seed(0))

    timings = {
        "dsr_update_s": median_time(dsr, repeats)[0],
        "sort_topk_update_s": median_time(
            lambda: topk_update(weights, masks, num_prune, torch.Generator().manual_seed(0), use_sort=True), repeats
        )[0],
        "partial_topk_update_s": median_time(
            lambda: topk_update(weights, masks, num_prune, torch.Generator().manual_seed(0), use_sort=False), repeats
        )[0],
    }
    result = dsr()
    result_info = {
        "tensors": len(shapes),
        "weights": sum(math.prod(s) for s in shapes),
        "active": active,
        "density": args.density,
        "np": num_prune,
        "dsr_pruned": result.num_pruned,
        "repeats": repeats,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "quick": args.quick,
        **timings,
        "dsr_over_sort_topk": timings["dsr_update_s"] / timings["sort_topk_update_s"],
        "dsr_over_partial_topk": timings["dsr_update_s"] / timings["partial_topk_update_s"],
    }
    name = "reallocation_cost_quick" if args.quick else "reallocation_cost"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result_info, indent=2) + "\n")
    table = [
        f"# One reallocation update: DSR vs global top-k ({'quick' if args.quick else 'ResNet-50 shapes'})",
        "",
        f"{result_info['tensors']} tensors, {result_info['weights']:,} weights, density {args.density}, "
        f"{active:,} active, Np = {num_prune:,} (DSR pruned {result.num_pruned:,}); median of {repeats}, "
        f"{result_info['threads']} CPU threads, torch {torch.__version__}.",
        "",
        "| update | median time (s) | DSR / this |",
        "|---|---|---|",
        f"| DSR (threshold, `dsr_reallocate`) | {timings['dsr_update_s']:.4f} | 1 |",
        f"| global top-k by `torch.sort` + same regrowth | {timings['sort_topk_update_s']:.4f} | "
        f"{result_info['dsr_over_sort_topk']:.3f} |",
        f"| global top-k by `torch.topk` + same regrowth | {timings['partial_topk_update_s']:.4f} | "
        f"{result_info['dsr_over_partial_topk']:.3f} |",
        "",
    ]
    (args.out / f"{name}.md").write_text("\n".join(table))
    print("\n".join(table))
    print(f"DSR / sort-based top-k = {result_info['dsr_over_sort_topk']:.3f} (target <= 0.1)")


if __name__ == "__main__":
    main()
