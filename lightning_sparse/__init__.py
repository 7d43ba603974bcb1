"""lightning-sparse: dynamic sparse training for any PyTorch Lightning CNN, as Trainer callbacks.

The public names, re-exported from their subpackages:

* callbacks: :class:`MaskInit`, :class:`DynamicReallocation`, :class:`CyclicSparsitySchedule`,
  :class:`DyReLUPhaseOut`, :class:`WeightSharing`;
* the mask registry: :class:`SparseMasks`, :func:`find_mask_owner`;
* building blocks (no Lightning import): :class:`DyReLU`, :func:`share_stage_weights` and friends in
  :mod:`lightning_sparse.nn`; pure tensor functions in :mod:`lightning_sparse.functional`;
* models and data: :mod:`lightning_sparse.models`, :mod:`lightning_sparse.data`;
* the LightningModule of the CLI and examples: :class:`ImageClassifier`;
* export: :func:`save_sparse`, :func:`load_sparse`;
* CPU inference with sparse kernels: :func:`sparse_inference` (docs/inference.md).
"""

from lightning_sparse.callbacks import (
    CyclicSparsitySchedule,
    DynamicReallocation,
    DyReLUPhaseOut,
    MaskInit,
    WeightSharing,
)
from lightning_sparse.classification import ImageClassifier
from lightning_sparse.export import load_sparse, save_sparse
from lightning_sparse.inference import sparse_inference
from lightning_sparse.masks import SparseMasks, find_mask_owner
from lightning_sparse.nn import DyReLU, SharedConv2d, share_stage_weights

__version__ = "0.1.0"

__all__ = [
    "CyclicSparsitySchedule",
    "DyReLUPhaseOut",
    "DynamicReallocation",
    "ImageClassifier",
    "WeightSharing",
    "DyReLU",
    "MaskInit",
    "SharedConv2d",
    "SparseMasks",
    "__version__",
    "find_mask_owner",
    "load_sparse",
    "save_sparse",
    "share_stage_weights",
    "sparse_inference",
]
