"""Size of the compressed sparse export against the dense ``state_dict`` at 90%, 99% and 99.9% sparsity (issue 5.7).

The model is the CIFAR-style ResNet-18 (11.2M parameters). Its conv and linear weights (MaskInit's default
selection) get ERK masks exactly as MaskInit draws them: per-tensor densities from
:func:`~lightning_sparse.functional.layer_densities` (docs/algorithms.md §3b), exact active counts from
:func:`~lightning_sparse.functional.active_counts`, positions drawn at random from a seeded generator; masked weights
are set to 0. The model is then written with :func:`~lightning_sparse.export.save_sparse`, whose
:class:`~lightning_sparse.export.ExportReport` compares the file with ``torch.save(model.state_dict())``.
The target at 99% sparsity is an export of at most 3% of the dense file.

Writes ``benchmarks/results/export_size.json`` and ``.md`` (``export_size_quick.*`` with ``--quick``).

Usage::

    python benchmarks/export_size.py            # CIFAR ResNet-18, seconds
    python benchmarks/export_size.py --quick    # a WRN-10-1 instead, for a smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
from pathlib import Path

import torch
from torch import nn

from lightning_sparse.export import save_sparse
from lightning_sparse.functional import active_counts, layer_densities
from lightning_sparse.models import WideResNet, cifar_resnet18
from lightning_sparse.selection import select_sparse_parameters

RESULTS = Path(__file__).resolve().parent / "results"
SPARSITIES = (0.9, 0.99, 0.999)
TARGET_SPARSITY = 0.99
TARGET_RATIO = 0.03


@torch.no_grad()
def make_sparse_(model: nn.Module, sparsity: float, seed: int = 0) -> int:
    """Zero all but an ERK share of the model's conv and linear weights, as MaskInit does; return the active count."""
    parameters = select_sparse_parameters(model)
    shapes = {name: tuple(param.shape) for name, param in parameters.items()}
    counts = active_counts(shapes, layer_densities(shapes, sparsity, "erk"))
    generator = torch.Generator().manual_seed(seed)
    for name, param in parameters.items():
        numel = math.prod(shapes[name])
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[torch.randperm(numel, generator=generator)[: counts[name]]] = True
        param.mul_(keep.view(shapes[name]).to(param.dtype))
    return sum(counts.values())


def measure(model_name: str, sparsities: tuple[float, ...] = SPARSITIES) -> list[dict[str, float | int | str]]:
    """Export a freshly initialised model at each sparsity and return one row per sparsity."""
    rows: list[dict[str, float | int | str]] = []
    with tempfile.TemporaryDirectory() as folder:
        for sparsity in sparsities:
            torch.manual_seed(0)
            model = cifar_resnet18() if model_name == "cifar_resnet18" else WideResNet(depth=10, width=1)
            active = make_sparse_(model, sparsity)
            report = save_sparse(model, Path(folder) / f"model_{sparsity}.sparse.pt")
            rows.append(
                {
                    "model": model_name,
                    "sparsity": sparsity,
                    "parameters": sum(param.numel() for param in model.parameters()),
                    "active_sparse_weights": active,
                    "export_bytes": report.file_bytes,
                    "dense_bytes": report.dense_bytes,
                    "ratio": report.ratio,
                }
            )
    return rows


def to_markdown(rows: list[dict[str, float | int | str]]) -> str:
    """A Markdown table of the rows, with the 99% target stated."""
    lines = [
        f"# Compressed export size ({rows[0]['model']}, {rows[0]['parameters']:,} parameters, ERK masks)",
        "",
        f"Target: at {TARGET_SPARSITY:.0%} sparsity the export is at most {TARGET_RATIO:.0%} of the dense state_dict.",
        "",
        "| sparsity | active conv/linear weights | export (bytes) | dense state_dict (bytes) | export / dense |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['sparsity']:.1%} | {row['active_sparse_weights']:,} | {row['export_bytes']:,} | "
            f"{row['dense_bytes']:,} | {row['ratio']:.2%} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict[str, float | int | str]]:
    """Run the benchmark, write JSON + Markdown, print the table and return the rows."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a WRN-10-1 instead of the ResNet-18 (smoke test)")
    parser.add_argument("--output_dir", type=Path, default=RESULTS, help="where the JSON and Markdown go")
    args = parser.parse_args(argv)
    model_name = "wrn10_1" if args.quick else "cifar_resnet18"
    rows = measure(model_name)
    stem = "export_size_quick" if args.quick else "export_size"
    args.output_dir.mkdir(parents=True, exist_ok=True)
    target_row = next(row for row in rows if row["sparsity"] == TARGET_SPARSITY)
    payload = {
        "benchmark": "export_size",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "target": {"sparsity": TARGET_SPARSITY, "max_ratio": TARGET_RATIO, "met": target_row["ratio"] <= TARGET_RATIO},
        "rows": rows,
    }
    (args.output_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    markdown = to_markdown(rows)
    (args.output_dir / f"{stem}.md").write_text(markdown)
    print(markdown)
    return rows


if __name__ == "__main__":
    main()
