"""ImageNet (or any ImageNet-style class-folder dataset) from ``data_dir/train`` and ``data_dir/val``."""

from __future__ import annotations

import os

import torch
from torchvision import datasets
from torchvision.transforms import v2

from lightning_sparse.data._base import ImageDataModule, check_positive
from lightning_sparse.data.errors import DatasetNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LAYOUT_HINT = (
    "Expected layout: {root}/train/<class name>/<image files> and {root}/val/<class name>/<image files>, "
    "with the same class folders in both (ImageNet's validation images must first be sorted into class "
    "folders, e.g. with the usual valprep.sh script)."
)


class ImageNetFolderDataModule(ImageDataModule):
    """Class-folder image data read with torchvision's ``ImageFolder``, with the standard ImageNet pipeline.

    Train: ``RandomResizedCrop(image_size)`` + horizontal flip. Validation and test (both read from
    ``data_dir/val``): resize the short side to ``resize_size``, then ``CenterCrop(image_size)``. All images
    are normalised with the ImageNet channel mean and std. This is the DSR ResNet-50 protocol
    (docs/algorithms.md §2b, "augmentation"). Nothing is downloaded: ImageNet needs a manual download.

    Args:
        data_dir: folder containing ``train/`` and ``val/``, each with one sub-folder per class.
        batch_size: samples per batch in every dataloader.
        num_workers: dataloader worker processes.
        image_size: side of the square crops fed to the model.
        resize_size: short side after resizing, before the evaluation center crop.
        augment: use random-resized-crop + flip for training (otherwise the evaluation transform).

    Raises:
        ValueError: if a size is not positive or ``resize_size < image_size``.
        DatasetNotFoundError: from ``prepare_data``/``setup``/``num_classes`` when a folder is missing, holds
            no images, or train and val have different classes; the message says what is expected.

    Example:
        >>> datamodule = ImageNetFolderDataModule("/datasets/imagenet", batch_size=256)  # doctest: +SKIP
        >>> trainer.fit(model, datamodule=datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        data_dir: str,
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        resize_size: int = 256,
        augment: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers)
        check_positive(image_size=image_size, resize_size=resize_size)
        if resize_size < image_size:
            raise ValueError(
                f"resize_size ({resize_size}) must be >= image_size ({image_size}) for the evaluation center crop."
            )
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.image_size = image_size
        self.resize_size = resize_size
        self.augment = augment

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """Shape ``(C, H, W)`` of one image."""
        return (3, self.image_size, self.image_size)

    @property
    def classes(self) -> list[str]:
        """Class names (sorted folder names of ``data_dir/train``); index ``i`` is label ``i``."""
        return self._check_folders()

    @property
    def num_classes(self) -> int:
        """Number of class folders in ``data_dir/train``."""
        return len(self.classes)

    def train_transform(self) -> v2.Compose:
        """RandomResizedCrop + horizontal flip, then normalise (evaluation transform if ``augment`` is off)."""
        if not self.augment:
            return self.eval_transform()
        return v2.Compose([v2.RandomResizedCrop(self.image_size), v2.RandomHorizontalFlip(), *self._to_tensor()])

    def eval_transform(self) -> v2.Compose:
        """Resize the short side to ``resize_size``, center crop ``image_size``, then normalise."""
        return v2.Compose([v2.Resize(self.resize_size), v2.CenterCrop(self.image_size), *self._to_tensor()])

    @staticmethod
    def _to_tensor() -> list[v2.Transform]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]

    def prepare_data(self) -> None:
        """Check the folder layout early (there is nothing to download)."""
        self._check_folders()

    def setup(self, stage: str | None = None) -> None:
        """Index ``train/`` (for fit) and ``val/`` (for validation and test)."""
        self._check_folders()
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._image_folder("train", self.train_transform())
        if stage in (None, "fit", "validate", "test", "predict") and self.val_set is None:
            self.val_set = self._image_folder("val", self.eval_transform())
            self.test_set = self.val_set

    def _image_folder(self, split: str, transform: v2.Compose) -> datasets.ImageFolder:
        folder = os.path.join(self.data_dir, split)
        try:
            return datasets.ImageFolder(folder, transform=transform)
        except FileNotFoundError as err:  # raised for a class folder without any image file
            root = os.path.abspath(self.data_dir)
            raise DatasetNotFoundError(
                f"No usable images in {os.path.abspath(folder)}: {err}. " + _LAYOUT_HINT.format(root=root)
            ) from None

    def _check_folders(self) -> list[str]:
        """Return the class names after checking that train/ and val/ exist and hold the same classes."""
        root = os.path.abspath(self.data_dir)
        folders = [os.path.join(root, split) for split in ("train", "val")]
        missing = [folder for folder in folders if not os.path.isdir(folder)]
        if missing:
            raise DatasetNotFoundError(f"Missing folder(s): {', '.join(missing)}. " + _LAYOUT_HINT.format(root=root))
        train_classes = _class_folders(os.path.join(root, "train"))
        val_classes = _class_folders(os.path.join(root, "val"))
        if not train_classes:
            raise DatasetNotFoundError(f"{root}/train has no class folders. " + _LAYOUT_HINT.format(root=root))
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(train_classes))[:5]
            raise DatasetNotFoundError(
                f"train/ and val/ in {root} must contain the same class folders, or the labels would not match "
                f"(only in train: {only_train}, only in val: {only_val}; at most 5 shown). "
                + _LAYOUT_HINT.format(root=root)
            )
        return train_classes


def _class_folders(folder: str) -> list[str]:
    """Sorted sub-folder names, the class order ``ImageFolder`` uses."""
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
