"""Pure tensor functions behind the callbacks (no Lightning import)."""

from lightning_sparse.functional.distributions import (
    DISTRIBUTIONS,
    active_counts,
    erdos_renyi_score,
    layer_densities,
)

__all__ = ["DISTRIBUTIONS", "active_counts", "erdos_renyi_score", "layer_densities"]
