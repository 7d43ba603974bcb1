"""Tests for the ImageNet-style folder datamodule on a tiny generated class-folder tree."""

from __future__ import annotations

import os

import pytest
import torch
from PIL import Image

from lightning_sparse.data import DatasetNotFoundError, ImageNetFolderDataModule
from lightning_sparse.data.imagenet import IMAGENET_MEAN, IMAGENET_STD

CLASSES = {"cat": (200, 100, 50), "dog": (10, 20, 30)}  # one solid colour per class


def _write_tree(root, classes=CLASSES, splits=("train", "val"), images_per_class=3):
    for split in splits:
        for name, colour in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(images_per_class):
                Image.new("RGB", (40 + 4 * index, 30), colour).save(folder / f"{index}.png")
    return root


@pytest.fixture
def image_tree(tmp_path):
    return _write_tree(tmp_path)


def _expected_pixel(colour) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD)])


def test_batches_from_generated_folders(image_tree):
    datamodule = ImageNetFolderDataModule(str(image_tree), batch_size=4, num_workers=0, image_size=32, resize_size=36)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert datamodule.classes == ["cat", "dog"] and datamodule.num_classes == 2
    assert len(datamodule.train_set) == 6 and len(datamodule.val_set) == 6
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert set(labels.tolist()) <= {0, 1}


def test_val_and_test_read_val_folder_with_resize_and_center_crop(image_tree):
    datamodule = ImageNetFolderDataModule(str(image_tree), batch_size=6, num_workers=0)
    datamodule.setup("test")
    assert datamodule.test_set is datamodule.val_set
    images, labels = next(iter(datamodule.test_dataloader()))
    # Default evaluation: short side 30 -> 256, center crop 224; solid colours stay solid, then normalised.
    assert images.shape == (6, 3, 224, 224)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]
    cat_pixel = _expected_pixel(CLASSES["cat"])  # e.g. red (200/255 - 0.485) / 0.229 = 0.29931 / 0.229 = 1.3070
    assert cat_pixel[0].item() == pytest.approx(1.3070, abs=1e-4)
    assert torch.allclose(images[0], cat_pixel[:, None, None].expand(3, 224, 224), atol=1e-4)
    assert torch.allclose(images[5], _expected_pixel(CLASSES["dog"])[:, None, None].expand(3, 224, 224), atol=1e-4)


def test_train_transform_random_resized_crop_and_flip():
    transform = ImageNetFolderDataModule("unused", image_size=32, resize_size=36).train_transform()
    names = [type(t).__name__ for t in transform.transforms]
    assert names[:2] == ["RandomResizedCrop", "RandomHorizontalFlip"]
    assert tuple(transform.transforms[0].size) == (32, 32)
    no_augmentation = ImageNetFolderDataModule("unused", augment=False).train_transform()
    assert [type(t).__name__ for t in no_augmentation.transforms][:2] == ["Resize", "CenterCrop"]


def test_missing_folders_are_named_with_the_expected_layout(tmp_path):
    with pytest.raises(DatasetNotFoundError) as caught:
        ImageNetFolderDataModule(str(tmp_path)).prepare_data()
    message = str(caught.value)
    assert os.path.join(str(tmp_path), "train") in message and os.path.join(str(tmp_path), "val") in message
    assert "<class name>" in message


def test_missing_val_folder_only(tmp_path):
    _write_tree(tmp_path, splits=("train",))
    with pytest.raises(DatasetNotFoundError, match="Missing folder") as caught:
        ImageNetFolderDataModule(str(tmp_path)).setup("fit")
    assert os.path.join(str(tmp_path), "train") not in str(caught.value).split("Expected layout")[0]


def test_different_classes_in_train_and_val_are_rejected(tmp_path):
    _write_tree(tmp_path, splits=("train",))
    _write_tree(tmp_path, classes={"cat": (1, 2, 3), "cow": (4, 5, 6)}, splits=("val",))
    with pytest.raises(DatasetNotFoundError, match="same class folders") as caught:
        ImageNetFolderDataModule(str(tmp_path)).setup("fit")
    assert "only in train: ['dog']" in str(caught.value) and "only in val: ['cow']" in str(caught.value)


def test_class_folder_without_images_is_a_clear_error(image_tree):
    for path in (image_tree / "val" / "dog").iterdir():
        path.unlink()
    with pytest.raises(DatasetNotFoundError, match="No usable images"):
        ImageNetFolderDataModule(str(image_tree)).setup("validate")


def test_bad_sizes_raise_clear_errors():
    with pytest.raises(ValueError, match="resize_size"):
        ImageNetFolderDataModule("unused", image_size=224, resize_size=200)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        ImageNetFolderDataModule("unused", batch_size=0)
