"""Small models, data and Trainer settings shared by the tests (CPU, seconds per test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class TinyCNN(nn.Module):
    """Two convs, BatchNorm and a classifier: 3x16x16 inputs, 10 classes."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.act2(self.bn2(self.conv2(x)))
        return self.fc(self.pool(x).flatten(1))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def bool_tensor(values: list) -> torch.Tensor:
    """A bool mask from a Python list (the functional tests' known-answer inputs)."""
    return torch.tensor(values, dtype=torch.bool)


def generator(seed: int = 0) -> torch.Generator:
    """A seeded CPU generator, the ``generator=`` argument of the random selections."""
    return torch.Generator().manual_seed(seed)


def count_activation_calls(model: nn.Module) -> dict[str, int]:
    """Hook every ``nn.ReLU`` of ``model``; the returned dict counts each one's calls by module name."""
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.ReLU):
            calls[name] = 0
            module.register_forward_hook(lambda m, args, out, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


def make_optimizer(name: str, params: Any, lr: float = 0.05) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "sgd_momentum_wd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    if name == "sgd_nesterov":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr / 10, weight_decay=1e-4)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr / 10, weight_decay=1e-2)
    raise ValueError(name)


class Classifier(L.LightningModule):
    """Cross-entropy classifier around any network, with a choice of optimizer and optional manual optimization."""

    def __init__(self, net: nn.Module | None = None, optimizer: str = "sgd_momentum_wd", manual: bool = False) -> None:
        super().__init__()
        self.net = net if net is not None else TinyCNN()
        self.optimizer_name = optimizer
        self.automatic_optimization = not manual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        if not self.automatic_optimization:
            optimizer = self.optimizers()
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.optimizer_name, self.parameters())


def random_loader(n: int = 64, batch_size: int = 8, size: int = 16, seed: int = 0, classes: int = 10) -> DataLoader:
    """A fixed (unshuffled) loader of generated images, so two runs see the same batches."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=generator)
    y = torch.randint(0, classes, (n,), generator=generator)
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


def trainer_kwargs(tmp_path: Any, **overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        default_root_dir=str(tmp_path),
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    kwargs.update(overrides)
    return kwargs


def masked_positions_are_zero(module: nn.Module, masks: Any, optimizers: list[torch.optim.Optimizer]) -> list[str]:
    """Names of weights or optimizer-state tensors that are not exactly 0 at a masked position."""
    failures = []
    for name, mask in masks.items():
        param = dict(module.named_parameters())[name]
        if param[~mask].abs().max().item() if (~mask).any() else 0.0:
            failures.append(f"weight {name}")
        for optimizer in optimizers:
            for key, value in optimizer.state.get(param, {}).items():
                if isinstance(value, torch.Tensor) and value.shape == param.shape and (~mask).any():
                    if value[~mask].abs().max().item() != 0.0:
                        failures.append(f"state {key} of {name}")
    return failures


def tensorboard_events(log_dir: Any) -> Any:
    """Every event (scalars, images, tensors) a TensorBoard run wrote to ``log_dir``, loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


def load_script(path: Path, name: str | None = None) -> ModuleType:
    """Import a script (a benchmark or an example) from its file, as module ``name`` (default: its stem)."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
