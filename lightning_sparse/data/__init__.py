"""LightningDataModules: an offline default (scikit-learn digits), CIFAR-10/100, and ImageNet-style folders."""

from __future__ import annotations

from lightning_sparse.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_sparse.data.digits import DigitsDataModule
from lightning_sparse.data.errors import DatasetNotFoundError
from lightning_sparse.data.imagenet import ImageNetFolderDataModule

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DatasetNotFoundError",
    "DigitsDataModule",
    "ImageNetFolderDataModule",
]
