"""Tests for the offline digits datamodule (scikit-learn's 8x8 digits, no download)."""

from __future__ import annotations

import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from lightning_sparse.data import DigitsDataModule

NUM_IMAGES = 1797
# round(1797 * 0.15) = round(269.55) = 270 for val and for test; train gets the rest: 1797 - 540 = 1257.
NUM_TRAIN, NUM_VAL, NUM_TEST = 1257, 270, 270


@pytest.fixture(scope="module")
def datamodule() -> DigitsDataModule:
    module = DigitsDataModule(batch_size=16, augment=False)
    module.setup("fit")
    return module


def test_batches_have_cifar_like_shape_dtype_and_labels(datamodule):
    images, labels = next(iter(datamodule.train_dataloader()))
    assert images.shape == (16, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (16,) and labels.dtype == torch.int64
    assert datamodule.num_classes == 10 and datamodule.input_shape == (3, 32, 32)
    all_labels = torch.cat([datamodule.train_set.labels, datamodule.val_set.labels, datamodule.test_set.labels])
    assert all_labels.min() == 0 and all_labels.max() == 9
    assert torch.equal(torch.bincount(all_labels), torch.bincount(torch.as_tensor(load_digits().target)))
    # The three channels are copies of one grey image.
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])


def test_split_sizes_cover_all_images_once(datamodule):
    sizes = (len(datamodule.train_set), len(datamodule.val_set), len(datamodule.test_set))
    assert sizes == (NUM_TRAIN, NUM_VAL, NUM_TEST)
    split_sum = sum(split.images.sum(0) for split in (datamodule.train_set, datamodule.val_set, datamodule.test_set))
    raw = torch.as_tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16
    all_resized = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)
    # Each image in exactly one split: the splits add up to the whole data set, pixel by pixel.
    assert torch.allclose(split_sum, all_resized.sum(0).expand(3, -1, -1), atol=1e-3)


def test_train_split_is_normalised_to_zero_mean_unit_std(datamodule):
    images = torch.stack([datamodule.train_set[i][0] for i in range(len(datamodule.train_set))])
    assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert images.std().item() == pytest.approx(1.0, abs=1e-4)


def test_a_validation_sample_is_the_resized_normalised_sklearn_image(datamodule):
    digits = load_digits()
    # The split is torch.randperm(1797) seeded with `seed`; validation takes positions 1257..1526.
    source_index = torch.randperm(NUM_IMAGES, generator=torch.Generator().manual_seed(0))[NUM_TRAIN].item()
    raw = torch.as_tensor(digits.images[source_index], dtype=torch.float32)[None, None] / 16
    resized = F.interpolate(raw, size=(32, 32), mode="bilinear", align_corners=False)[0]
    expected = (resized - datamodule.mean) / datamodule.std
    image, label = datamodule.val_set[0]
    assert label.item() == digits.target[source_index]
    assert torch.allclose(image, expected.expand(3, -1, -1), atol=1e-5)


def test_split_is_deterministic_per_seed():
    first, again, other = DigitsDataModule(seed=0), DigitsDataModule(seed=0), DigitsDataModule(seed=1)
    for module in (first, again, other):
        module.setup()
    assert torch.equal(first.test_set.images, again.test_set.images)
    assert torch.equal(first.val_set.labels, again.val_set.labels)
    assert not torch.equal(first.val_set.labels, other.val_set.labels)


def test_image_size_and_channels_are_configurable():
    module = DigitsDataModule(image_size=16, channels=1, batch_size=4)
    module.setup("fit")
    images, _ = next(iter(module.val_dataloader()))
    assert images.shape == (4, 1, 16, 16)


def _shift(image: torch.Tensor, dy: int, dx: int, fill: float) -> torch.Tensor:
    """``image`` moved by (dy, dx) pixels, uncovered pixels set to ``fill``."""
    padded = F.pad(image, (4, 4, 4, 4), value=fill)
    height, width = image.shape[-2:]
    return padded[..., 4 - dy : 4 - dy + height, 4 - dx : 4 - dx + width]


def test_augmentation_is_a_random_shift_with_background_padding():
    torch.manual_seed(0)
    module = DigitsDataModule(augment=True)
    module.setup("fit")
    clean = (module.train_set.images[0] - module.mean) / module.std
    background = -module.mean / module.std
    shifts = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)]
    draws = [module.train_set[0][0] for _ in range(10)]
    # Every draw is the clean image shifted by at most image_size // 8 = 4 pixels, padded with background.
    for draw in draws:
        assert any(torch.allclose(draw, _shift(clean, dy, dx, background), atol=1e-5) for dy, dx in shifts)
    assert any(not torch.allclose(draw, clean) for draw in draws)
    # Evaluation splits are never augmented.
    assert torch.equal(module.val_set[0][0], module.val_set[0][0])


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes `from sklearn.datasets import ...` fail
    with pytest.raises(ImportError, match=r'pip install "lightning-sparse\[offline\]"'):
        DigitsDataModule()


def test_dataloader_before_setup_is_a_clear_error():
    with pytest.raises(RuntimeError, match=r"setup\(\) must run"):
        DigitsDataModule().train_dataloader()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_fraction": 0.5, "test_fraction": 0.5}, "leave training data"),
        ({"val_fraction": -0.1}, r"val_fraction must be in \[0, 1\)"),
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"num_workers": -1}, "num_workers must be >= 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


class _TinyClassifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.Flatten(), nn.Linear(4 * 8 * 8, 10))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val_loss", F.cross_entropy(self.net(images), labels))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_works_as_a_trainer_datamodule(tmp_path):
    trainer = L.Trainer(
        fast_dev_run=2, default_root_dir=tmp_path, accelerator="cpu", logger=False, enable_progress_bar=False
    )
    trainer.fit(_TinyClassifier(), datamodule=DigitsDataModule(batch_size=8))
    assert trainer.state.finished and "val_loss" in trainer.callback_metrics
