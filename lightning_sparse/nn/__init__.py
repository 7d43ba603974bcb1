"""Building blocks and model surgery for EAST (DyReLU phase-out, intra-stage weight sharing); no Lightning import."""

from __future__ import annotations

from lightning_sparse.nn.dyrelu import DyReLU, validate_blend
from lightning_sparse.nn.dyrelu_conversion import (
    convert_dyrelu_to_relu,
    convert_relu_to_dyrelu,
    dyrelu_modules,
    set_dyrelu_blend,
)

__all__ = [
    "DyReLU",
    "convert_dyrelu_to_relu",
    "convert_relu_to_dyrelu",
    "dyrelu_modules",
    "set_dyrelu_blend",
    "validate_blend",
]
