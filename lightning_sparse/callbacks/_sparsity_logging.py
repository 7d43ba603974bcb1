"""What the sparsity callbacks show: scalar curves under ``sparsity/``, a per-layer density heatmap, a layer table.

The curves go through ``pl_module.log`` to any logger. The heatmap (layers x epochs, rendered with plain torch)
goes to TensorBoard loggers as an image; the table of the sparse layers is printed on rank 0 at the end of fit.
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_sparse.functional.channels import empty_channels
from lightning_sparse.masks import SparseMasks


def sparsity_metrics(pl_module: pl.LightningModule, masks: SparseMasks, per_layer: bool = True) -> dict[str, float]:
    """The sparsity figures of a model: global (two definitions, ALGORITHMS.md §2d.7), effective, per layer.

    * ``sparsity/global``: zeros among the sparse tensors (DSR's definition);
    * ``sparsity/global_all_params``: masked weights over all parameters of the model (the ``dst`` package's);
    * ``sparsity/effective``: like ``global`` but counting a shared tensor once per use (only under sharing);
    * ``sparsity/nnz``: active weights in the sparse tensors;
    * ``sparsity/empty_channels``: output channels (dim 0) of the sparse tensors with no active weight, the sign
      of channel collapse at extreme sparsity (docs/troubleshooting.md);
    * ``sparsity/density/<name>``: each sparse tensor's density.
    """
    layer_nnz = masks.layer_nnz()
    nnz = sum(layer_nnz.values())
    total_params = sum(param.numel() for param in pl_module.parameters())
    masked = masks.numel() - nnz
    metrics = {
        "sparsity/global": 1.0 - nnz / masks.numel(),
        "sparsity/global_all_params": masked / total_params,
        "sparsity/nnz": float(nnz),
        "sparsity/empty_channels": float(sum(layer_empty_channels(masks).values())),
    }
    if any(count > 1 for count in masks.uses.values()):
        metrics["sparsity/effective"] = 1.0 - masks.effective_density()
    if per_layer:
        for name, count in layer_nnz.items():
            metrics[f"sparsity/density/{name}"] = count / masks[name].numel()
    return metrics


def layer_empty_channels(masks: SparseMasks) -> dict[str, int]:
    """Tensor name -> its output channels (dim 0) with no active weight (one device sync for all tensors)."""
    counts = torch.stack([empty_channels(mask).cpu() for mask in masks.values()]).tolist()
    return dict(zip(masks, (int(count) for count in counts)))


def log_sparsity(pl_module: pl.LightningModule, masks: SparseMasks, per_layer: bool, on_step: bool) -> None:
    """Log :func:`sparsity_metrics` through ``pl_module.log``; the global sparsity also goes to the progress bar."""
    metrics = sparsity_metrics(pl_module, masks, per_layer=per_layer)
    global_sparsity = metrics.pop("sparsity/global")
    pl_module.log("sparsity/global", global_sparsity, prog_bar=True, on_step=on_step, on_epoch=not on_step)
    pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step)


# ------------------------------------------------------------------------------------ per-layer pictures
DENSITY_HEATMAP_TAG = "sparsity/density_heatmap"
"""TensorBoard image tag of the per-layer density heatmap (layers x epochs)."""

LAYER_TABLE_TAG = "sparsity/layer_table"
"""TensorBoard text tag of the per-layer table written at the end of fit."""

# Five anchor colours of the viridis colormap (dark purple = low density, yellow = high); linear in between.
_VIRIDIS_ANCHORS = torch.tensor(
    [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=torch.float32
)


def colorize(values: Tensor) -> Tensor:
    """Map values in [0, 1] to RGB by linear interpolation between the viridis anchor colours.

    Args:
        values: any shape, clamped to [0, 1].

    Returns:
        uint8 tensor of shape ``(3, *values.shape)``.
    """
    scaled = values.float().clamp(0.0, 1.0) * (len(_VIRIDIS_ANCHORS) - 1)
    lower = scaled.floor().long().clamp(max=len(_VIRIDIS_ANCHORS) - 2)
    fraction = (scaled - lower).unsqueeze(-1)
    rgb = _VIRIDIS_ANCHORS[lower] * (1.0 - fraction) + _VIRIDIS_ANCHORS[lower + 1] * fraction
    return rgb.round().to(torch.uint8).movedim(-1, 0)


def color_range(densities: Tensor, log_scale: bool = True) -> tuple[float, float]:
    """The densities at the bottom (dark purple) and top (yellow) of :func:`density_heatmap`'s colour scale.

    Linear: 0 to the largest density. Log: the smallest non-zero density to the largest.
    """
    high = float(densities.max())
    if not log_scale:
        return 0.0, high
    positive = densities[densities > 0]
    return (float(positive.min()) if positive.numel() else 0.0), high


def density_heatmap(
    densities: Tensor,
    log_scale: bool = True,
    cell_height: int = 8,
    min_width: int = 256,
    max_cell_width: int = 32,
) -> Tensor:
    """Render per-layer densities over time as an image: one row per layer, one column per record.

    The colour runs from the bottom of :func:`color_range` (dark purple) to its top, the largest density in the
    picture (yellow). The default log scale keeps the changes of sparse layers (densities of a few percent) visible
    next to nearly dense ones (the stem conv, the classifier) in the same picture. A 4-pixel strip on the right,
    after a white gap, shows the scale (bottom to top).

    Args:
        densities: float tensor ``(layers, records)`` of densities in [0, 1].
        log_scale: colour by log density (zeros get the bottom colour) instead of density.
        cell_height: pixel height of a layer's row.
        min_width: the columns are widened (each at most ``max_cell_width`` pixels) until the map is at least
            this wide.
        max_cell_width: the widest a column is drawn.

    Returns:
        uint8 tensor ``(3, layers x cell_height, width)``, as TensorBoard's ``add_image`` expects (CHW).

    Raises:
        ValueError: for a tensor that is not 2-D with at least one layer and one record.
    """
    if densities.dim() != 2 or densities.shape[0] < 1 or densities.shape[1] < 1:
        raise ValueError(f"densities must have shape (layers, records) with both >= 1, got {tuple(densities.shape)}")
    layers, records = densities.shape
    low, high = color_range(densities, log_scale)
    values = densities.float()
    if high <= low:
        normalised = torch.ones_like(values) if high > 0 else torch.zeros_like(values)
    elif log_scale:
        normalised = (values.clamp(min=low).log() - math.log(low)) / (math.log(high) - math.log(low))
    else:
        normalised = (values - low) / (high - low)
    cell_width = max(1, min(max_cell_width, -(-min_width // records)))
    pixels = normalised.repeat_interleave(cell_height, dim=0).repeat_interleave(cell_width, dim=1)
    height = layers * cell_height
    scale = torch.linspace(1.0, 0.0, height).unsqueeze(1).expand(-1, 4)
    white_gap = torch.full((3, height, 2), 255, dtype=torch.uint8)
    return torch.cat([colorize(pixels), white_gap, colorize(scale)], dim=2)


class DensityHistory:
    """Per-layer densities recorded at each training epoch end; feeds the TensorBoard heatmap.

    Kept by :class:`~lightning_sparse.callbacks.MaskInit` and saved in its checkpoint state, so a resumed run
    continues the same picture. Records for an epoch already recorded (a resumed run repeating its last epoch end)
    replace the old one.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.epochs: list[int] = []
        self._rows: list[Tensor] = []

    def __len__(self) -> int:
        return len(self.epochs)

    def record(self, epoch: int, masks: SparseMasks) -> None:
        """Append the masks' per-tensor densities at ``epoch`` (a different set of tensors starts a new history)."""
        densities = masks.layer_densities()
        names = list(densities)
        if names != self.names:
            self.names, self.epochs, self._rows = names, [], []
        row = torch.tensor([densities[name] for name in names], dtype=torch.float32)
        if self.epochs and self.epochs[-1] == epoch:
            self._rows[-1] = row
            return
        self.epochs.append(int(epoch))
        self._rows.append(row)

    def densities(self) -> Tensor:
        """``(layers, records)`` float tensor of the recorded densities."""
        if not self._rows:
            return torch.zeros(len(self.names), 0)
        return torch.stack(self._rows, dim=1)

    def state_dict(self) -> dict[str, Any]:
        """Names, epochs and densities (CPU tensors), for the callback's checkpoint state."""
        return {"names": list(self.names), "epochs": list(self.epochs), "densities": self.densities()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.names = list(state_dict["names"])
        self.epochs = [int(epoch) for epoch in state_dict["epochs"]]
        densities = state_dict["densities"]
        self._rows = [densities[:, index].clone() for index in range(densities.shape[1])]


def _tensorboard_loggers(trainer: pl.Trainer) -> list[TensorBoardLogger]:
    return [logger for logger in trainer.loggers if isinstance(logger, TensorBoardLogger)]


def log_density_heatmap(trainer: pl.Trainer, history: DensityHistory) -> None:
    """Write the heatmap of ``history`` to every TensorBoard logger of the Trainer (rank 0 only).

    The image is tagged :data:`DENSITY_HEATMAP_TAG` at ``trainer.global_step``; a text entry under the same tag
    plus ``/legend`` names the rows top to bottom and gives the colour scale. Nothing is written without a
    TensorBoardLogger.
    """
    loggers = _tensorboard_loggers(trainer)
    if not loggers or not trainer.is_global_zero or len(history) == 0:
        return
    densities = history.densities()
    image = density_heatmap(densities)
    low, high = color_range(densities)
    legend = (
        f"Rows, top to bottom: {', '.join(f'{index}: `{name}`' for index, name in enumerate(history.names))}. "
        f"Columns: epochs {history.epochs[0]} to {history.epochs[-1]}. Colour: density on a log scale from "
        f"{low:.4f} (dark purple) to {high:.4f} (yellow); the strip on the right is the scale."
    )
    for logger in loggers:
        logger.experiment.add_image(DENSITY_HEATMAP_TAG, image, global_step=trainer.global_step, dataformats="CHW")
        logger.experiment.add_text(DENSITY_HEATMAP_TAG + "/legend", legend, global_step=trainer.global_step)


def _channels(mask: Tensor) -> int:
    return mask.shape[0] if mask.dim() >= 2 else 1


def layer_table(masks: SparseMasks) -> str:
    """A fixed-width table of every sparse tensor: name, shape, active weights, size, density, empty output channels
    (of its channels); then the total."""
    counts = masks.layer_nnz()
    empty = layer_empty_channels(masks)
    rows = [
        (
            name,
            "x".join(str(size) for size in masks[name].shape),
            f"{counts[name]:,}",
            f"{masks[name].numel():,}",
            f"{counts[name] / masks[name].numel():.4f}",
            f"{empty[name]:,}/{_channels(masks[name]):,}",
        )
        for name in masks
    ]
    total = sum(counts.values())
    channels = sum(_channels(mask) for mask in masks.values())
    rows.append(
        ("total", "", f"{total:,}", f"{masks.numel():,}", f"{total / masks.numel():.4f}", f"{sum(empty.values()):,}/{channels:,}")
    )
    header = ("layer", "shape", "active", "weights", "density", "empty channels")
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(
            cell.ljust(width) if column < 2 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths))
        )

    rule = "-" * len(line(header))
    return "\n".join([line(header), rule, *(line(row) for row in rows[:-1]), rule, line(rows[-1])])


def report_layer_table(trainer: pl.Trainer, masks: SparseMasks) -> None:
    """Print :func:`layer_table` on rank 0 and add it to every TensorBoard logger as text (:data:`LAYER_TABLE_TAG`)."""
    if not trainer.is_global_zero:
        return
    table = layer_table(masks)
    rank_zero_info("Sparse layers at the end of fit:\n" + table)
    for logger in _tensorboard_loggers(trainer):
        # Indented by four spaces: TensorBoard renders text as Markdown, and this keeps the columns aligned.
        logger.experiment.add_text(
            LAYER_TABLE_TAG, "\n".join("    " + row for row in table.splitlines()), global_step=trainer.global_step
        )
