"""What the sparsity callbacks show: scalar curves under ``sparsity/``, a per-layer density heatmap, a layer table.

The curves go through ``pl_module.log`` to any logger (without a reduction across DDP ranks: every rank holds the
same masks). TensorBoard loggers also get a ``custom_scalars`` layout (requested, real and effective sparsity in
one chart; every layer's density in another) and the heatmap (layers x epochs; labelled with matplotlib, plain
torch without it) as an image. The console gets the sparsity summary at the start of fit and the table of the
sparse layers at the end (rank 0).
"""

from __future__ import annotations

import importlib.util
import math
import re
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor

from lightning_sparse.callbacks._rank_logging import log_replicated
from lightning_sparse.functional.channels import empty_channels
from lightning_sparse.masks import SparseMasks


def sparsity_metrics(
    pl_module: pl.LightningModule,
    masks: SparseMasks,
    per_layer: bool = True,
    requested: float | None = None,
) -> dict[str, float]:
    """The sparsity figures of a model: global (two definitions, docs/algorithms.md §2d.7), effective, per layer.

    * ``sparsity/requested``: the sparsity the user asked for (``requested``; left out when ``None``). Under weight
      sharing with EAST's budget rule it differs from the two below (docs/algorithms.md §3d);
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
    metrics = {} if requested is None else {"sparsity/requested": float(requested)}
    metrics |= {
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


def log_sparsity(
    pl_module: pl.LightningModule,
    masks: SparseMasks,
    per_layer: bool,
    on_step: bool,
    requested: float | None = None,
) -> None:
    """Log :func:`sparsity_metrics` through ``pl_module.log``; the global sparsity also goes to the progress bar.

    The figures are identical on every DDP rank, so they are logged without a reduction and without Lightning's
    ``sync_dist`` warning (:func:`~lightning_sparse.callbacks._rank_logging.log_replicated`).
    """
    metrics = sparsity_metrics(pl_module, masks, per_layer=per_layer, requested=requested)
    log_replicated(pl_module, metrics, on_step=on_step, prog_bar=["sparsity/global"])


def sparsity_summary(masks: SparseMasks, requested: float | None, shared_budget: bool = True) -> list[str]:
    """The console lines that put the requested sparsity next to the real and effective ones.

    The first line gives the figures; under weight sharing a second line states the budget rule in force, which
    is why the real sparsity differs from the requested one (docs/algorithms.md §3d).

    Args:
        masks: the masks just built.
        requested: the sparsity the user asked for; ``None`` when the masks come from the model's zeros.
        shared_budget: whether EAST's budget rule was applied (MaskInit's ``shared_budget``).
    """
    nnz, numel = masks.nnz(), masks.numel()
    asked = "taken from the model's zeros" if requested is None else f"requested {requested:.4%}"
    first = (
        f"{len(masks)} sparse tensors; sparsity {asked}, real {masks.sparsity():.4%} "
        f"({nnz:,} of {numel:,} weights active)"
    )
    if not any(count > 1 for count in masks.uses.values()):
        return [first]
    first += f", effective {1.0 - masks.effective_density():.4%} (a shared tensor counted once per use)"
    unshared = sum(masks.numel(name) * masks.uses[name] for name in masks)
    if requested is not None and shared_budget:
        rule = (
            f"weight sharing, EAST's budget rule (docs/algorithms.md §3d): active weights = (1 - {requested:g}) x "
            f"the unshared model's {unshared:,} weights = {nnz:,}, held by {numel:,} real weights, so the real "
            "sparsity is lower than requested"
        )
    else:
        rule = (
            f"weight sharing without the budget rule: the sparsity applies to the {numel:,} real weights; the "
            f"unshared model would have {unshared:,} (MaskInit(shared_budget=True) budgets against those)"
        )
    return [first, rule]


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


def _has_matplotlib() -> bool:
    return importlib.util.find_spec("matplotlib") is not None


def labelled_density_heatmap(
    names: list[str], epochs: list[int], densities: Tensor, log_scale: bool = True, dpi: int = 100
) -> Tensor:
    """Draw per-layer densities over epochs with matplotlib: layer names on the rows, epochs on the horizontal axis
    and a labelled colour bar.

    The colours are those of :func:`density_heatmap` (viridis over :func:`color_range`; on the log scale a zero
    density takes the bottom colour). The figure grows with the number of layers (a quarter inch per row) and
    epochs, so that every row label stays readable.

    Args:
        names: the sparse tensors, one per row, top to bottom.
        epochs: the epoch of each column.
        densities: float tensor ``(len(names), len(epochs))`` of densities in [0, 1].
        log_scale: colour by log density instead of density.
        dpi: pixels per inch of the rendered image.

    Returns:
        uint8 RGB tensor ``(3, height, width)`` (CHW, as TensorBoard's ``add_image`` expects).

    Raises:
        ValueError: if the shapes of ``names``, ``epochs`` and ``densities`` disagree or are empty.
        ModuleNotFoundError: if matplotlib is not installed (``pip install matplotlib``).
    """
    if densities.dim() != 2 or densities.shape != (len(names), len(epochs)) or not names or not epochs:
        raise ValueError(
            f"densities must have shape (len(names), len(epochs)) = ({len(names)}, {len(epochs)}), both >= 1; "
            f"got {tuple(densities.shape)}"
        )
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    layers, records = densities.shape
    low, high = color_range(densities, log_scale)
    values = densities.double().numpy()
    if log_scale and 0 < low < high:
        norm: Normalize = LogNorm(vmin=low, vmax=high)
        values = np.clip(values, low, None)
        scale_label = "density (fraction of weights active), log scale"
    else:
        norm = Normalize(vmin=low if log_scale else 0.0, vmax=max(high, low + 1e-12))
        scale_label = "density (fraction of weights active)"
    # Fixed margins in inches (no automatic layout: it costs as much as the drawing): the row labels at 8 pt take
    # about 0.06 in per character; the colour bar and its label sit on the right.
    left = 0.35 + 0.06 * max(len(name) for name in names)
    right, top, bottom, row = 1.3, 0.4, 0.6, 0.25
    width = left + right + min(max(4.0, 0.12 * records), 14.0)
    height = top + bottom + row * layers
    figure = Figure(figsize=(width, height), dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((left / width, bottom / height, 1 - (left + right) / width, 1 - (top + bottom) / height))
    bar = figure.add_axes((1 - (right - 0.15) / width, bottom / height, 0.18 / width, 1 - (top + bottom) / height))
    image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", norm=norm)
    axes.set_yticks(range(layers), labels=names, fontsize=8)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=min(records, 12), integer=True))
    axes.xaxis.set_major_formatter(
        FuncFormatter(lambda x, _: str(epochs[int(round(x))]) if 0 <= round(x) < records else "")
    )
    axes.set_xlabel("epoch")
    axes.set_title(f"Density of each sparse tensor, epochs {epochs[0]} to {epochs[-1]}", fontsize=10)
    colorbar = figure.colorbar(image, cax=bar, label=scale_label)
    if isinstance(norm, LogNorm):
        # Plain numbers at 1-2-5 steps instead of matplotlib's powers of ten (often only one of which is in range).
        ticks = [
            step * 10.0**exponent
            for exponent in range(math.floor(math.log10(low)), 1)
            for step in (1, 2, 5)
            if low <= step * 10.0**exponent <= high
        ]
        colorbar.set_ticks(ticks, labels=[f"{tick:g}" for tick in ticks])
        colorbar.ax.minorticks_off()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).contiguous()


def render_density_heatmap(history: DensityHistory, dpi: int = 100) -> Tensor:
    """The heatmap image of ``history``: :func:`labelled_density_heatmap` where matplotlib is installed, else the
    plain :func:`density_heatmap` (no text; :func:`log_density_heatmap` then names the rows in a text entry)."""
    if _has_matplotlib():
        return labelled_density_heatmap(history.names, history.epochs, history.densities(), dpi=dpi)
    return density_heatmap(history.densities())


def heatmap_due(records: int) -> bool:
    """Whether the epoch end that brings the history to ``records`` epochs redraws the heatmap during training.

    Drawing with matplotlib costs a few tenths of a second, as much as a whole epoch of a small run, so the
    picture is redrawn after epochs 1, 2, 4, 8, 16, ... and every tenth epoch, and always at the end of fit.
    """
    return records >= 1 and (records & (records - 1) == 0 or records % 10 == 0)


def log_density_heatmap(trainer: pl.Trainer, history: DensityHistory) -> None:
    """Write the heatmap of ``history`` to every TensorBoard logger of the Trainer (rank 0 only).

    The image is tagged :data:`DENSITY_HEATMAP_TAG` at ``trainer.global_step``: layer names on the rows, epochs
    on the horizontal axis and a labelled colour bar (matplotlib). Without matplotlib the plain picture is written
    and a text entry under the same tag plus ``/legend`` names the rows top to bottom and gives the colour scale.
    Nothing is written without a TensorBoardLogger.
    """
    loggers = _tensorboard_loggers(trainer)
    if not loggers or not trainer.is_global_zero or len(history) == 0:
        return
    image = render_density_heatmap(history)
    legend = None
    if not _has_matplotlib():
        low, high = color_range(history.densities())
        legend = (
            f"Rows, top to bottom: {', '.join(f'{index}: `{name}`' for index, name in enumerate(history.names))}. "
            f"Columns: epochs {history.epochs[0]} to {history.epochs[-1]}. Colour: density on a log scale from "
            f"{low:.4f} (dark purple) to {high:.4f} (yellow); the strip on the right is the scale. Install "
            "matplotlib for a picture with the names and the scale drawn in."
        )
    for logger in loggers:
        logger.experiment.add_image(DENSITY_HEATMAP_TAG, image, global_step=trainer.global_step, dataformats="CHW")
        if legend is not None:
            logger.experiment.add_text(DENSITY_HEATMAP_TAG + "/legend", legend, global_step=trainer.global_step)


def custom_scalars_layout(prefix: str = "", per_layer: bool = True) -> dict[str, dict[str, list[Any]]]:
    """TensorBoard ``custom_scalars`` layout: the sparsity figures in one chart, per-layer densities in another.

    Args:
        prefix: the TensorBoardLogger's ``prefix`` (its tags are ``<prefix>-<name>``), ``""`` for none.
        per_layer: add the chart of ``sparsity/density/*`` (one line per sparse tensor).

    Returns:
        ``{category: {chart title: ["Multiline", [tag regexes]]}}`` for ``SummaryWriter.add_custom_scalars``.
    """
    start = re.escape(f"{prefix}-") if prefix else ""
    charts: dict[str, list[Any]] = {
        "sparsity: requested, real (global), effective": [
            "Multiline",
            [f"^{start}sparsity/(requested|global|effective)$"],
        ]
    }
    if per_layer:
        charts["density of each sparse tensor"] = ["Multiline", [f"^{start}sparsity/density/"]]
    return {"sparsity": charts}


def write_custom_scalars_layout(trainer: pl.Trainer, per_layer: bool) -> None:
    """Add :func:`custom_scalars_layout` to every TensorBoard logger of the Trainer (rank 0 only; once per fit)."""
    if not trainer.is_global_zero:
        return
    for logger in _tensorboard_loggers(trainer):
        prefix = getattr(logger, "_prefix", "") or ""
        logger.experiment.add_custom_scalars(custom_scalars_layout(prefix, per_layer))


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
        (
            "total",
            "",
            f"{total:,}",
            f"{masks.numel():,}",
            f"{total / masks.numel():.4f}",
            f"{sum(empty.values()):,}/{channels:,}",
        )
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


def report_layer_table(trainer: pl.Trainer, masks: SparseMasks, console: bool = True, tensorboard: bool = True) -> None:
    """Print :func:`layer_table` on rank 0 (``console``) and add it to every TensorBoard logger as text
    (:data:`LAYER_TABLE_TAG`, ``tensorboard``)."""
    if not trainer.is_global_zero or not (console or tensorboard):
        return
    table = layer_table(masks)
    if console:
        rank_zero_info("Sparse layers at the end of fit:\n" + table)
    if not tensorboard:
        return
    for logger in _tensorboard_loggers(trainer):
        # Indented by four spaces: TensorBoard renders text as Markdown, and this keeps the columns aligned.
        logger.experiment.add_text(
            LAYER_TABLE_TAG, "\n".join("    " + row for row in table.splitlines()), global_step=trainer.global_step
        )
