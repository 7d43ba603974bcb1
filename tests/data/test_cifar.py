"""Tests for the CIFAR datamodules: clear missing-data errors (no network) and splits on generated files."""

from __future__ import annotations

import os
import pickle
import urllib.error

import numpy as np
import pytest
import torch
import torchvision.datasets.cifar

from lightning_sparse.data import CIFAR10DataModule, CIFAR100DataModule, DatasetNotFoundError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


@pytest.fixture
def no_network(monkeypatch):
    """Make torchvision's CIFAR download fail as it does offline, and record that it was attempted."""
    attempts = []

    def failing_download(url, *args, **kwargs):
        attempts.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", failing_download)
    return attempts


def test_missing_data_without_download_says_where_it_looked_and_how_to_get_it(tmp_path):
    datamodule = CIFAR10DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetNotFoundError) as caught:
        datamodule.prepare_data()
    message = str(caught.value)
    assert os.path.join(str(tmp_path), "cifar-10-batches-py") in message
    assert "download=False" in message and "download=True" in message and CIFAR10_URL in message
    # Raised `from None`: the user sees this message, not torchvision's traceback.
    assert caught.value.__cause__ is None and caught.value.__suppress_context__


def test_failed_download_is_reported_without_an_url_error_traceback(tmp_path, no_network):
    datamodule = CIFAR10DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DatasetNotFoundError, match="download failed") as caught:
        datamodule.prepare_data()
    assert no_network == [CIFAR10_URL]
    assert "URLError" in str(caught.value) and "name resolution" in str(caught.value)
    assert str(tmp_path) in str(caught.value) and CIFAR10_URL in str(caught.value)
    assert caught.value.__suppress_context__


def test_cifar100_failed_download_names_its_own_folder(tmp_path, no_network):
    with pytest.raises(DatasetNotFoundError, match="CIFAR-100") as caught:
        CIFAR100DataModule(data_dir=str(tmp_path)).prepare_data()
    assert os.path.join(str(tmp_path), "cifar-100-python") in str(caught.value)
    assert no_network == ["https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"]


def test_setup_without_prepare_data_gives_the_same_error(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="not found"):
        CIFAR10DataModule(data_dir=str(tmp_path), download=False).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_split": 1.0}, r"val_split must be in \[0, 1\)"),
        ({"val_split": -0.1}, r"val_split must be in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"padding_mode": "zeros"}, "padding_mode must be one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CIFAR10DataModule(**kwargs)


def test_dataset_constants():
    assert (CIFAR10DataModule.num_classes, CIFAR100DataModule.num_classes) == (10, 100)
    # docs/algorithms.md §3f (the DSR/EAST CIFAR-10 normalisation).
    assert CIFAR10DataModule.mean == (0.4914, 0.4822, 0.4465)
    assert CIFAR10DataModule.std == (0.2023, 0.1994, 0.2010)


# --- generated CIFAR-10 files in torchvision's on-disk format (pickled batches) ------------------------------
TRAIN_PER_BATCH, NUM_TEST, TEST_PIXEL = 8, 6, 128


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """A tiny CIFAR-10 folder: 5 train batches of 8 images (pixel value = image index), 6 grey test images."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for batch in range(5):
        first = batch * TRAIN_PER_BATCH
        data = np.repeat(np.arange(first, first + TRAIN_PER_BATCH, dtype=np.uint8), 3 * 32 * 32)
        labels = [index % 10 for index in range(first, first + TRAIN_PER_BATCH)]
        entry = {"data": data.reshape(TRAIN_PER_BATCH, 3 * 32 * 32), "labels": labels}
        (folder / f"data_batch_{batch + 1}").write_bytes(pickle.dumps(entry))
    test_entry = {"data": np.full((NUM_TEST, 3 * 32 * 32), TEST_PIXEL, dtype=np.uint8), "labels": [3] * NUM_TEST}
    (folder / "test_batch").write_bytes(pickle.dumps(test_entry))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))
    # The generated files cannot match the real archive's MD5 sums.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    return tmp_path


def _image_ids(dataset) -> set[int]:
    """Recover each training image's index from its (constant) normalised red channel."""
    mean, std = CIFAR10DataModule.mean[0], CIFAR10DataModule.std[0]
    return {round((dataset[i][0][0, 0, 0].item() * std + mean) * 255) for i in range(len(dataset))}


def test_validation_uses_the_test_set_when_val_split_is_zero(fake_cifar10):
    datamodule = CIFAR10DataModule(data_dir=str(fake_cifar10), download=False, batch_size=4, num_workers=0)
    datamodule.prepare_data()
    datamodule.setup("fit")
    assert len(datamodule.train_set) == 5 * TRAIN_PER_BATCH
    assert datamodule.val_set is datamodule.test_set and len(datamodule.val_set) == NUM_TEST
    images, labels = next(iter(datamodule.val_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32 and labels.tolist() == [3] * 4
    # Normalised per channel: (128 / 255 - mean_c) / std_c, e.g. red (0.50196 - 0.4914) / 0.2023 = 0.0522.
    expected = [(TEST_PIXEL / 255 - m) / s for m, s in zip(CIFAR10DataModule.mean, CIFAR10DataModule.std)]
    assert torch.allclose(images[0].mean(dim=(1, 2)), torch.tensor(expected), atol=1e-5)
    assert expected[0] == pytest.approx(0.0522, abs=1e-4)


def test_val_split_holds_out_a_seeded_fraction_of_train(fake_cifar10):
    def split(seed: int) -> tuple[set[int], set[int]]:
        datamodule = CIFAR10DataModule(data_dir=str(fake_cifar10), download=False, val_split=0.25, seed=seed)
        datamodule.setup("fit")
        assert datamodule.val_set is not datamodule.test_set
        return _image_ids(datamodule.train_set), _image_ids(datamodule.val_set)

    train_ids, val_ids = split(seed=0)
    # round(40 * 0.25) = 10 held out; train and val are disjoint and together are the 40 training images.
    assert (len(train_ids), len(val_ids)) == (30, 10)
    assert train_ids | val_ids == set(range(40))
    assert split(seed=0) == (train_ids, val_ids)
    assert split(seed=1)[1] != val_ids


def test_training_images_are_augmented_and_validation_images_are_not(fake_cifar10):
    torch.manual_seed(0)
    datamodule = CIFAR10DataModule(data_dir=str(fake_cifar10), download=False, val_split=0.25)
    datamodule.setup("fit")
    # A constant image is unchanged by a reflect-padded crop or a flip, so a pattern is needed.
    gradient = np.tile(np.arange(32, dtype=np.uint8) * 8, (32, 1))
    datamodule.train_set.base.data[:] = gradient[None, :, :, None]
    draws = [datamodule.train_set[0][0] for _ in range(8)]
    assert any(not torch.equal(draws[0], draw) for draw in draws[1:])
    assert torch.equal(datamodule.val_set[0][0], datamodule.val_set[0][0])
    red_row = datamodule.val_set[0][0][0, 0]
    expected_row = (torch.arange(32) * 8 / 255 - CIFAR10DataModule.mean[0]) / CIFAR10DataModule.std[0]
    assert torch.allclose(red_row, expected_row, atol=1e-5)


def test_validate_only_needs_the_test_split_when_val_split_is_zero(fake_cifar10):
    datamodule = CIFAR10DataModule(data_dir=str(fake_cifar10), download=False)
    datamodule.setup("validate")
    assert datamodule.train_set is None
    assert datamodule.val_set is datamodule.test_set and len(datamodule.val_set) == NUM_TEST
