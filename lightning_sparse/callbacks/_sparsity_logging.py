"""Sparsity curves for the Trainer's logger (TensorBoard by default), under the ``sparsity/`` prefix."""

from __future__ import annotations

import lightning.pytorch as pl

from lightning_sparse.masks import SparseMasks


def sparsity_metrics(pl_module: pl.LightningModule, masks: SparseMasks, per_layer: bool = True) -> dict[str, float]:
    """The sparsity figures of a model: global (two definitions, ALGORITHMS.md §2d.7), effective, per layer.

    * ``sparsity/global``: zeros among the sparse tensors (DSR's definition);
    * ``sparsity/global_all_params``: masked weights over all parameters of the model (the ``dst`` package's);
    * ``sparsity/effective``: like ``global`` but counting a shared tensor once per use (only under sharing);
    * ``sparsity/nnz``: active weights in the sparse tensors;
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
    }
    if any(count > 1 for count in masks.uses.values()):
        metrics["sparsity/effective"] = 1.0 - masks.effective_density()
    if per_layer:
        for name, count in layer_nnz.items():
            metrics[f"sparsity/density/{name}"] = count / masks[name].numel()
    return metrics


def log_sparsity(pl_module: pl.LightningModule, masks: SparseMasks, per_layer: bool, on_step: bool) -> None:
    """Log :func:`sparsity_metrics` through ``pl_module.log``; the global sparsity also goes to the progress bar."""
    metrics = sparsity_metrics(pl_module, masks, per_layer=per_layer)
    global_sparsity = metrics.pop("sparsity/global")
    pl_module.log("sparsity/global", global_sparsity, prog_bar=True, on_step=on_step, on_epoch=not on_step)
    pl_module.log_dict(metrics, on_step=on_step, on_epoch=not on_step)
