"""lightning-sparse: dynamic sparse training for any PyTorch Lightning CNN, as Trainer callbacks."""

from lightning_sparse.callbacks import MaskInit
from lightning_sparse.masks import SparseMasks, find_mask_owner

__version__ = "0.1.0"

__all__ = ["MaskInit", "SparseMasks", "find_mask_owner", "__version__"]
