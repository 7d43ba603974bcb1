"""Pure tensor functions behind the callbacks (no Lightning import).

* :mod:`~lightning_sparse.functional.distributions`: uniform / ER / ERK per-layer densities;
* :mod:`~lightning_sparse.functional.dsr`: DSR's global-threshold prune, growth allocation, threshold update;
* :mod:`~lightning_sparse.functional.criteria`: per-layer drop/grow selections (magnitude, gradient, random);
* :mod:`~lightning_sparse.functional.cyclic`: EAST's cyclic density;
* :mod:`~lightning_sparse.functional.channels`: output-channel views: empty channels, the per-channel floor,
  channel-balanced growth.
"""

from lightning_sparse.functional.channels import (
    GROWTH_RULES,
    channel_counts,
    droppable_count,
    empty_channels,
    feasible_floor,
    floor_protected,
    floor_rescued,
    growth_candidates,
    growth_scores,
)
from lightning_sparse.functional.criteria import (
    ROUNDINGS,
    MaskUpdate,
    cosine_drop_fraction,
    gradient_grow,
    magnitude_drop,
    random_grow,
    rigl_update,
    set_update,
    update_count,
)
from lightning_sparse.functional.cyclic import cycle_lengths, cycle_position, cyclic_density
from lightning_sparse.functional.distributions import (
    DISTRIBUTIONS,
    active_counts,
    erdos_renyi_score,
    layer_densities,
)
from lightning_sparse.functional.dsr import (
    DSRResult,
    adapt_threshold,
    allocate_growth,
    dsr_prune,
    dsr_reallocate,
    grow_random,
)

__all__ = [
    "DISTRIBUTIONS",
    "DSRResult",
    "GROWTH_RULES",
    "ROUNDINGS",
    "MaskUpdate",
    "active_counts",
    "adapt_threshold",
    "allocate_growth",
    "channel_counts",
    "droppable_count",
    "empty_channels",
    "feasible_floor",
    "floor_protected",
    "floor_rescued",
    "growth_candidates",
    "growth_scores",
    "cosine_drop_fraction",
    "cycle_lengths",
    "cycle_position",
    "cyclic_density",
    "dsr_prune",
    "dsr_reallocate",
    "erdos_renyi_score",
    "gradient_grow",
    "grow_random",
    "layer_densities",
    "magnitude_drop",
    "random_grow",
    "rigl_update",
    "set_update",
    "update_count",
]
