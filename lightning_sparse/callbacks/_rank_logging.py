"""Logging values that every DDP rank holds identically: the masks' sparsity, densities, update counters, DyReLU's beta.

Under DDP every rank holds the same masks (MaskInit broadcasts them from rank 0 after every change), so these values
need no reduction across ranks. ``self.log(..., sync_dist=False)`` at epoch level makes Lightning warn once per
metric ("It is recommended to use `self.log(..., sync_dist=True)` when logging on epoch level in distributed
setting"); ``sync_dist=True`` alone silences it with an all-reduce per metric per epoch that changes nothing.
:func:`log_replicated` passes ``sync_dist=True`` together with ``rank_zero_only=True``: Lightning then treats the
value as already final (its sync function becomes a no-op), so there is no warning and no collective call, hence
no deadlock either, even if one rank logged a key another did not. Every rank still calls ``self.log``, so the
value is in every rank's ``trainer.callback_metrics`` and can be monitored (docs/distributed.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import lightning.pytorch as pl

__all__ = ["log_replicated"]


def log_replicated(
    pl_module: pl.LightningModule,
    metrics: Mapping[str, float],
    *,
    on_step: bool,
    prog_bar: Iterable[str] = (),
) -> None:
    """Log values that are identical on every rank, at step level (``on_step=True``) or at epoch level.

    Args:
        pl_module: the LightningModule being trained or evaluated.
        metrics: metric name -> value (host numbers: nothing here synchronises with the device).
        on_step: ``True``: log at this step only; ``False``: log once for the epoch.
        prog_bar: the names among ``metrics`` that also go to the progress bar.
    """
    shown = set(prog_bar)
    for name, value in metrics.items():
        pl_module.log(
            name,
            value,
            prog_bar=name in shown,
            on_step=on_step,
            on_epoch=not on_step,
            sync_dist=True,
            rank_zero_only=True,
        )
