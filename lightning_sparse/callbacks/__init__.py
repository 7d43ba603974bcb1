"""Lightning callbacks that make a model sparse and move its weights during training."""

from lightning_sparse.callbacks.dynamic_reallocation import DynamicReallocation
from lightning_sparse.callbacks.mask_init import MaskInit

__all__ = ["DynamicReallocation", "MaskInit"]
