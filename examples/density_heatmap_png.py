"""Save the per-layer density heatmap of a run as a PNG, from its Lightning checkpoint.

MaskInit records every sparse tensor's density at each training epoch end and keeps the record in its checkpoint
state; this script renders it as TensorBoard shows it (``sparsity/density_heatmap``: one row per tensor, named,
top to bottom in the model's order; epochs across; colour by log density from the smallest non-zero density in the
picture, dark purple, to the largest, yellow, with a labelled colour bar), at a higher resolution. It needs
matplotlib (in the ``[dev]`` extra); without it the plain picture is written (no names, a scale strip on the right).

    python examples/density_heatmap_png.py --ckpt_path checkpoints/quickstart/quickstart.ckpt \\
        --output examples/images/density_heatmap.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torchvision.io import write_png

from lightning_sparse.callbacks._sparsity_logging import DensityHistory, color_range, render_density_heatmap


def heatmap_from_checkpoint(ckpt_path: str | Path) -> tuple[torch.Tensor, DensityHistory]:
    """The heatmap image (uint8 CHW) and the density record stored by MaskInit in a checkpoint.

    Raises:
        ValueError: if the checkpoint holds no MaskInit state with a density record.
    """
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    states = [state for key, state in checkpoint.get("callbacks", {}).items() if key.startswith("MaskInit")]
    if not states or not states[0].get("density_history", {}).get("epochs"):
        raise ValueError(
            f"{ckpt_path} has no MaskInit density record; train with MaskInit(layer_report=True) (the default) "
            "for at least one epoch"
        )
    history = DensityHistory()
    history.load_state_dict(states[0]["density_history"])
    return render_density_heatmap(history, dpi=130), history


def main(argv: list[str] | None = None) -> Path:
    """Write the PNG and print what its rows are."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt_path", required=True, help="a checkpoint of a run with MaskInit")
    parser.add_argument("--output", default="density_heatmap.png", help="the PNG to write")
    args = parser.parse_args(argv)
    image, history = heatmap_from_checkpoint(args.ckpt_path)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_png(image, str(output))
    low, high = color_range(history.densities())
    print(
        f"{output}: {len(history.names)} tensors (rows) x {len(history)} epochs (columns), {image.shape[2]}x"
        f"{image.shape[1]} px; log colour scale from "
        f"density {low:.4f} (dark purple) to {high:.4f} (yellow)"
    )
    return output


if __name__ == "__main__":
    main()
