"""Building blocks and model surgery for EAST (DyReLU phase-out, intra-stage weight sharing); no Lightning import."""

from __future__ import annotations

from lightning_sparse.nn.dyrelu import DyReLU, validate_blend
from lightning_sparse.nn.dyrelu_conversion import (
    convert_dyrelu_to_relu,
    convert_relu_to_dyrelu,
    dyrelu_modules,
    set_dyrelu_blend,
)
from lightning_sparse.nn.weight_sharing import (
    SharedConv2d,
    WeightSharingReport,
    effective_density_multiplier,
    parameter_uses,
    share_stage_weights,
)

__all__ = [
    "DyReLU",
    "SharedConv2d",
    "WeightSharingReport",
    "convert_dyrelu_to_relu",
    "convert_relu_to_dyrelu",
    "dyrelu_modules",
    "effective_density_multiplier",
    "parameter_uses",
    "set_dyrelu_blend",
    "share_stage_weights",
    "validate_blend",
]
