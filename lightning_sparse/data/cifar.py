"""CIFAR-10 and CIFAR-100 datamodules (torchvision) with the standard DSR/EAST training augmentation."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, get_args

import torch
from torch.utils.data import Dataset
from torchvision import datasets
from torchvision.transforms import v2

from lightning_sparse._validation import check_choice
from lightning_sparse.data._base import ImageDataModule
from lightning_sparse.data.errors import DatasetNotFoundError

PaddingMode = Literal["constant", "edge", "reflect", "symmetric"]
_PADDING_MODES = get_args(PaddingMode)


class _TransformedSubset(Dataset):
    """The samples ``indices`` of ``base`` (which yields untransformed PIL images), with ``transform`` applied.

    Lets the augmented training split and the clean validation split share one in-memory copy of the data.
    """

    def __init__(self, base: Dataset, indices: Sequence[int], transform: Callable[[Any], Any]) -> None:
        self.base = base
        self.indices = list(indices)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[self.indices[index]]
        return self.transform(image), label


class _CIFARDataModule(ImageDataModule):
    """Shared CIFAR logic; subclasses set the torchvision dataset class, the name and the statistics."""

    dataset_class: ClassVar[type[datasets.CIFAR10]]
    dataset_name: ClassVar[str]
    num_classes: ClassVar[int]
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]
    input_shape: ClassVar[tuple[int, int, int]] = (3, 32, 32)

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = True,
        batch_size: int = 128,
        num_workers: int = 4,
        val_split: float = 0.0,
        seed: int = 0,
        augment: bool = True,
        padding_mode: PaddingMode = "reflect",
    ) -> None:
        super().__init__(batch_size, num_workers)
        if not 0.0 <= val_split < 1.0:
            raise ValueError(
                f"val_split must be in [0, 1) (e.g. 0.1 as in EAST, or 0 to validate on test), got {val_split}."
            )
        check_choice(padding_mode, "padding_mode", PaddingMode)
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.download = download
        self.val_split = val_split
        self.seed = seed
        self.augment = augment
        self.padding_mode = padding_mode

    def train_transform(self) -> v2.Compose:
        """Pad 4 + random crop 32 + horizontal flip (if ``augment``), then normalise (docs/algorithms.md §2b, §3f)."""
        augmentation = []
        if self.augment:
            augmentation = [v2.RandomCrop(32, padding=4, padding_mode=self.padding_mode), v2.RandomHorizontalFlip()]
        return v2.Compose([*augmentation, *self.eval_transform().transforms])

    def eval_transform(self) -> v2.Compose:
        """To a float tensor in [0, 1], normalised with the dataset's channel mean and std."""
        return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)])

    def prepare_data(self) -> None:
        """Download both splits if missing and ``download`` is set (runs on one process only)."""
        self._open_split(train=True, download=self.download)
        self._open_split(train=False, download=self.download)

    def setup(self, stage: str | None = None) -> None:
        """Build the splits: train (minus a seeded ``val_split`` fraction), val (held out, or test), test."""
        if stage == "validate" and self.val_split == 0 and self.val_set is None:
            self.val_set = self._test_split()  # validating on the test set needs no training data
        if stage in (None, "fit", "validate") and self.val_set is None:
            if self.val_split > 0:
                full_train = self._open_split(train=True, download=False)
                total = len(full_train)
                num_val = round(total * self.val_split)
                order = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed)).tolist()
                self.train_set = _TransformedSubset(full_train, order[num_val:], self.train_transform())
                self.val_set = _TransformedSubset(full_train, order[:num_val], self.eval_transform())
            else:
                self.train_set = self._open_split(train=True, download=False, transform=self.train_transform())
                self.val_set = self._test_split()
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._test_split()

    def _test_split(self) -> Dataset:
        if self.test_set is None:
            self.test_set = self._open_split(train=False, download=False, transform=self.eval_transform())
        return self.test_set

    def _open_split(
        self, train: bool, download: bool, transform: Callable[[Any], Any] | None = None
    ) -> datasets.CIFAR10:
        """Open one split with torchvision, turning "missing" and "download failed" into one clear error."""
        try:
            return self.dataset_class(self.data_dir, train=train, transform=transform, download=download)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError if missing
            raise DatasetNotFoundError(self._not_found_message(download, err)) from None

    def _not_found_message(self, download: bool, err: Exception) -> str:
        root = os.path.abspath(self.data_dir)
        folder = os.path.join(root, self.dataset_class.base_folder)
        if download:
            what_happened = f"was not found in {folder} and the download failed ({type(err).__name__}: {err})"
        else:
            what_happened = f"was not found (or is corrupted) in {folder} and download=False"
        return (
            f"{self.dataset_name} {what_happened}. To get it, either run once with download=True on a machine "
            f"with internet access, or download {self.dataset_class.url} yourself and extract it into {root} "
            f"(so that {folder} exists), or set data_dir to the folder that contains "
            f"'{self.dataset_class.base_folder}'."
        )


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10 (50,000 train / 10,000 test 32x32 RGB images, 10 classes) via torchvision.

    Training images get reflect-pad 4 + random 32x32 crop + horizontal flip; all images are normalised with
    mean (0.4914, 0.4822, 0.4465) and std (0.2023, 0.1994, 0.2010), the values of the DSR/EAST code
    (docs/algorithms.md §3f; the std is the widely copied one, smaller than the true per-pixel std).

    Args:
        data_dir: folder that holds (or will hold) ``cifar-10-batches-py``.
        download: download the data into ``data_dir`` if it is missing.
        batch_size: samples per batch in every dataloader.
        num_workers: dataloader worker processes.
        val_split: fraction of the training set held out (seeded) for validation; EAST uses 0.1. With 0 the
            test set is used for validation, as in the DSR experiments.
        seed: seed of the train/val split.
        augment: apply the crop + flip training augmentation.
        padding_mode: padding of the random crop: "reflect" (DSR/EAST CIFAR-10) or "constant" (zeros).

    Raises:
        ValueError: for a non-positive batch size, ``val_split`` outside [0, 1) or an unknown padding mode.
        DatasetNotFoundError: from ``prepare_data``/``setup`` when the data is missing and cannot be
            downloaded; the message says where it looked and how to get the data.

    Example:
        >>> datamodule = CIFAR10DataModule(data_dir="data", val_split=0.1)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=datamodule)  # doctest: +SKIP
    """

    dataset_class = datasets.CIFAR10
    dataset_name = "CIFAR-10"
    num_classes = 10
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2023, 0.1994, 0.2010)


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (50,000 train / 10,000 test 32x32 RGB images, 100 fine classes) via torchvision.

    Same augmentation as :class:`CIFAR10DataModule` (the EAST code zero-pads for CIFAR-100: pass
    ``padding_mode="constant"`` to match it, docs/algorithms.md §3f); normalised with the CIFAR-100 training-set
    channel mean (0.5071, 0.4865, 0.4409) and std (0.2673, 0.2564, 0.2762).

    Args:
        data_dir: folder that holds (or will hold) ``cifar-100-python``.
        download: download the data into ``data_dir`` if it is missing.
        batch_size: samples per batch in every dataloader.
        num_workers: dataloader worker processes.
        val_split: fraction of the training set held out (seeded) for validation; EAST uses 0.1. With 0 the
            test set is used for validation.
        seed: seed of the train/val split.
        augment: apply the crop + flip training augmentation.
        padding_mode: padding of the random crop: "reflect" or "constant" (zeros, as in the EAST code).

    Raises:
        ValueError: for a non-positive batch size, ``val_split`` outside [0, 1) or an unknown padding mode.
        DatasetNotFoundError: from ``prepare_data``/``setup`` when the data is missing and cannot be
            downloaded; the message says where it looked and how to get the data.
    """

    dataset_class = datasets.CIFAR100
    dataset_name = "CIFAR-100"
    num_classes = 100
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)
