"""Lightning callbacks that make a model sparse and move its weights during training."""

from lightning_sparse.callbacks.cyclic_sparsity import CyclicSparsitySchedule
from lightning_sparse.callbacks.dynamic_reallocation import DynamicReallocation
from lightning_sparse.callbacks.dyrelu_phase_out import DyReLUPhaseOut
from lightning_sparse.callbacks.mask_init import MaskInit
from lightning_sparse.callbacks.weight_sharing import WeightSharing

__all__ = ["CyclicSparsitySchedule", "DyReLUPhaseOut", "DynamicReallocation", "MaskInit", "WeightSharing"]
