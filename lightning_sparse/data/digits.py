"""Offline default datamodule: scikit-learn's 8x8 handwritten digits, upsampled to CIFAR-like images."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lightning_sparse.data._base import ImageDataModule, check_positive

_INSTALL_HINT = 'pip install "lightning-sparse[offline]"'


def _import_load_digits() -> Callable[..., Any]:
    """Return ``sklearn.datasets.load_digits``, or raise an ImportError that says how to install it."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(
            f"DigitsDataModule needs scikit-learn, which ships the digits data ({err}). "
            f"Install it with: {_INSTALL_HINT}"
        ) from None
    return load_digits


def _load_sklearn_digits() -> tuple[Tensor, Tensor]:
    """Return the 1,797 digit images as float ``(N, 1, 8, 8)`` in ``[0, 1]`` and int64 labels ``(N,)``."""
    digits = _import_load_digits()()
    # Pixel values are ink counts 0..16.
    images = torch.as_tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return images, labels


class _ImageTensorDataset(Dataset):
    """Images and labels held in memory; ``transform`` runs per sample on a ``(C, H, W)`` float tensor."""

    def __init__(self, images: Tensor, labels: Tensor, transform: v2.Transform) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class DigitsDataModule(ImageDataModule):
    """Real handwritten digits that need no download, shaped like CIFAR for quick offline runs.

    The data is scikit-learn's copy of the UCI "Optical Recognition of Handwritten Digits" test set
    (``sklearn.datasets.load_digits``): 1,797 real 8x8 grey-scale images of the digits 0-9 written by
    13 people (each pixel counts the ink in a 4x4 block of a 32x32 scan), bundled inside scikit-learn, so
    nothing is downloaded. The same writers appear in every split. Each image is upsampled to
    ``image_size`` x ``image_size`` (bilinear), copied to ``channels`` channels, and normalised with the
    training split's pixel mean and standard deviation. The split into train/val/test is a seeded random
    permutation, identical on every run with the same ``seed``. Training images are optionally augmented by a
    random crop with zero (background) padding of ``image_size // 8`` pixels; no flips, since mirrored digits
    change meaning.

    Small enough to train a ResNet to high accuracy on a CPU in minutes; it is a smoke test for sparse
    training, not a benchmark.

    Args:
        image_size: side length of the produced square images.
        channels: number of identical channels per image (3 to feed RGB models unchanged).
        batch_size: samples per batch in every dataloader.
        num_workers: dataloader worker processes.
        val_fraction: fraction of the 1,797 images held out for validation.
        test_fraction: fraction of the 1,797 images held out for testing.
        seed: seed of the train/val/test permutation.
        augment: random-crop augmentation of training images.

    Raises:
        ImportError: if scikit-learn is not installed (install ``lightning-sparse[offline]``).
        ValueError: if a size is not positive or the fractions leave no training data.

    Example:
        >>> datamodule = DigitsDataModule(batch_size=16)
        >>> datamodule.setup("fit")
        >>> images, labels = next(iter(datamodule.train_dataloader()))
        >>> images.shape, labels.shape
        (torch.Size([16, 3, 32, 32]), torch.Size([16]))
    """

    num_classes: int = 10

    def __init__(
        self,
        image_size: int = 32,
        channels: int = 3,
        batch_size: int = 64,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers)
        check_positive(image_size=image_size, channels=channels)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}.")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction must be < 1 to leave training data, got {val_fraction + test_fraction}."
            )
        self.save_hyperparameters()
        self.image_size = image_size
        self.channels = channels
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.augment = augment
        self.mean: float | None = None
        self.std: float | None = None
        # Fail at construction, not after the Trainer has started, when scikit-learn is missing.
        _import_load_digits()

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return (self.channels, self.image_size, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        """Load, resize and split the digits (all splits at once; it takes well under a second)."""
        if self.train_set is not None:
            return
        images, labels = _load_sklearn_digits()
        images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        images = images.expand(-1, self.channels, -1, -1).contiguous()

        total = len(labels)
        num_val = round(total * self.val_fraction)
        num_test = round(total * self.test_fraction)
        order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed))
        train_index = order[: total - num_val - num_test]
        val_index = order[total - num_val - num_test : total - num_test]
        test_index = order[total - num_test :]

        self.mean = images[train_index].mean().item()
        self.std = images[train_index].std().item()
        normalize = v2.Normalize([self.mean] * self.channels, [self.std] * self.channels)
        eval_transform = v2.Compose([normalize])
        train_transform = eval_transform
        if self.augment:
            train_transform = v2.Compose([v2.RandomCrop(self.image_size, padding=self.image_size // 8), normalize])
        self.train_set = _ImageTensorDataset(images[train_index], labels[train_index], train_transform)
        self.val_set = _ImageTensorDataset(images[val_index], labels[val_index], eval_transform)
        self.test_set = _ImageTensorDataset(images[test_index], labels[test_index], eval_transform)
