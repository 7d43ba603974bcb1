import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sparse.classification import ImageClassifier
from tests.helpers import TinyCNN, random_loader, trainer_kwargs


class _LearningRateRecorder(L.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def _rates(tmp_path, steps: int = 10, **model_kwargs) -> list[float]:
    recorder = _LearningRateRecorder()
    model = ImageClassifier(TinyCNN(), num_classes=10, **model_kwargs)
    trainer = L.Trainer(callbacks=[recorder], **trainer_kwargs(tmp_path, max_steps=steps, max_epochs=-1))
    trainer.fit(model, random_loader(n=16, batch_size=8))
    return recorder.rates


def test_multistep_milestones_are_fractions_of_the_run(tmp_path):
    # 10 steps, milestones at 30% and 60%: the rate drops before steps 3 and 6.
    rates = _rates(tmp_path, lr=1.0, momentum=0.0, weight_decay=0.0, milestones=[0.3, 0.6], gamma=0.5)
    assert rates == pytest.approx([1.0] * 3 + [0.5] * 3 + [0.25] * 4)


def test_cosine_schedule_anneals_over_the_run(tmp_path):
    rates = _rates(tmp_path, lr=1.0, lr_schedule="cosine")
    assert rates == pytest.approx([0.5 * (1 + math.cos(math.pi * step / 10)) for step in range(10)])


def test_no_schedule_keeps_the_rate(tmp_path):
    assert _rates(tmp_path, steps=4, lr=0.3, lr_schedule="none") == pytest.approx([0.3] * 4)


def test_dsr_wrn_protocol_rates_at_epochs_60_120_160_of_200():
    # 200 epochs x 500 steps: x0.2 at epochs 60 / 120 / 160 (docs/algorithms.md §2b).
    model = ImageClassifier(TinyCNN(), num_classes=10, nesterov=True, milestones=[0.3, 0.6, 0.8], gamma=0.2)
    model.trainer = type("FakeTrainer", (), {"estimated_stepping_batches": 200 * 500})()
    config = model.configure_optimizers()
    assert config["lr_scheduler"]["scheduler"].milestones == {60 * 500: 1, 120 * 500: 1, 160 * 500: 1}
    assert config["lr_scheduler"]["interval"] == "step"


def test_optimizers_get_the_configured_settings():
    model = ImageClassifier(TinyCNN(), num_classes=10, lr=0.1, nesterov=True, weight_decay=5e-4)
    model.trainer = type("FakeTrainer", (), {"estimated_stepping_batches": 10})()
    sgd = model.configure_optimizers()["optimizer"]
    assert isinstance(sgd, torch.optim.SGD)
    group = sgd.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.1, 0.9, True, 5e-4)
    adamw = ImageClassifier(
        TinyCNN(), num_classes=10, optimizer="adamw", lr=1e-3, weight_decay=0.05, lr_schedule="none"
    ).configure_optimizers()
    assert isinstance(adamw, torch.optim.AdamW)
    assert (adamw.param_groups[0]["lr"], adamw.param_groups[0]["weight_decay"]) == (1e-3, 0.05)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"momentum": 0.0, "nesterov": True}, "nesterov needs momentum"),
        ({"optimizer": "adamw", "momentum": 0.9}, "AdamW has no momentum"),
        ({"optimizer": "adamw", "nesterov": True}, "nesterov applies to SGD"),
        ({"optimizer": "adam"}, "optimizer must be"),
        ({"lr_schedule": "cosine", "milestones": [0.5]}, "only apply to lr_schedule='multistep'"),
        ({"lr_schedule": "none", "gamma": 0.5}, "only apply"),
        ({"milestones": [60, 120]}, "fractions of the run"),
        ({"milestones": [0.6, 0.3]}, "strictly increasing"),
        ({"gamma": 0.0}, "gamma must be in"),
        ({"input_shape": [3, 0, 32]}, "input_shape"),
    ],
)
def test_bad_settings_raise_a_clear_error(kwargs, message):
    arguments = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=message):
        ImageClassifier(TinyCNN(), **arguments)


def test_network_must_be_a_module():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ImageClassifier("resnet18", num_classes=10)  # type: ignore[arg-type]


def test_input_shape_sets_example_input_array():
    model = ImageClassifier(TinyCNN(), num_classes=10, input_shape=[3, 16, 16])
    assert model.example_input_array.shape == (1, 3, 16, 16)
    assert ImageClassifier(TinyCNN(), num_classes=10).example_input_array is None


class _AlwaysClassZero(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([5.0, 0.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 3)


def test_accuracy_is_the_fraction_of_correct_predictions(tmp_path):
    # 10 images, labels 0 x 3, 1 x 6, 2 x 1; always predicting 0 is right 3 times: 0.3 (macro averaging would say 1/3).
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 2])
    loader = DataLoader(TensorDataset(torch.zeros(10, 3, 4, 4), labels), batch_size=4)
    model = ImageClassifier(_AlwaysClassZero(), num_classes=3)
    trainer = L.Trainer(**trainer_kwargs(tmp_path))
    metrics = trainer.test(model, loader, verbose=False)[0]
    assert metrics["test/acc"] == pytest.approx(0.3)
    expected_loss = nn.functional.cross_entropy(model(torch.zeros(10, 1)), labels).item()
    assert metrics["test/loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert trainer.validate(model, loader, verbose=False)[0]["val/acc"] == pytest.approx(0.3)


def test_fit_logs_train_and_val_metrics_and_learns(tmp_path):
    # Separable data: the class is the sign of the mean pixel.
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (64,), generator=generator)
    images = torch.randn(64, 3, 8, 8, generator=generator) * 0.1 + (labels.float() * 2 - 1).view(-1, 1, 1, 1)
    loader = DataLoader(TensorDataset(images, labels), batch_size=16)
    model = ImageClassifier(TinyCNN(num_classes=2), num_classes=2, lr=0.05, lr_schedule="none")
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_epochs=4))
    trainer.fit(model, loader, loader)
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    assert metrics["val/acc"] >= 0.9


def test_checkpoint_of_a_python_built_model_loads_with_the_network_given(tmp_path):
    model = ImageClassifier(TinyCNN(), num_classes=10, lr=0.05, milestones=[0.5], gamma=0.5)
    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=2))
    trainer.fit(model, random_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # nothing pickled beyond tensors and plain values
    assert "network" not in checkpoint["hyper_parameters"]
    assert checkpoint["hyper_parameters"]["milestones"] == [0.5]
    loaded = ImageClassifier.load_from_checkpoint(path, network=TinyCNN())
    assert (loaded.lr, loaded.milestones, loaded.gamma) == (0.05, [0.5], 0.5)
    x = torch.randn(2, 3, 16, 16)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
