"""ImageClassifier: the LightningModule behind the ``lightning-sparse`` CLI and the example configs.

It wraps any image network given as a ``class_path`` (any ``torch.nn.Module`` mapping images to logits), trains
it with cross-entropy, and offers the optimizers and learning-rate schedules of the papers the library
reproduces: SGD with momentum, Nesterov and weight decay plus a multi-step schedule (DSR, docs/algorithms.md §2b; EAST,
§3f), cosine annealing, or AdamW.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_sparse._validation import check_choice

__all__ = ["ImageClassifier"]

OptimizerName = Literal["sgd", "adamw"]
ScheduleName = Literal["multistep", "cosine", "none"]

_DEFAULT_MILESTONES = (0.5, 0.75)
_DEFAULT_GAMMA = 0.1
_DEFAULT_SGD_MOMENTUM = 0.9


class ImageClassifier(pl.LightningModule):
    """Cross-entropy image classification around any network, with paper-style optimizers and schedules.

    Logs ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``test/loss`` and ``test/acc`` (torchmetrics
    top-1 accuracy, the fraction of correct predictions, accumulated over the epoch); under DDP the epoch values
    are over all ranks' batches (``sync_dist=True``; the per-step ``train/loss`` is then the mean over ranks too). The learning rate changes every optimizer step: a
    milestone at fraction ``f`` takes effect at step ``round(f x trainer.estimated_stepping_batches)``, which is
    the start of epoch ``f x max_epochs`` when the epochs have equal lengths (so ``milestones=[0.3, 0.6, 0.8]``
    over 200 epochs is DSR's ``x0.2`` at epochs 60/120/160) and also works for runs bounded by ``max_steps``.

    The hyperparameters are saved in checkpoints (``save_hyperparameters``). A model built by the
    ``lightning-sparse`` CLI stores its network as ``class_path`` + ``init_args``, so
    ``ImageClassifier.load_from_checkpoint(path)`` rebuilds it without any config. A model built in Python from
    a network object cannot describe how to rebuild that object; load its checkpoints with
    ``ImageClassifier.load_from_checkpoint(path, network=<the same architecture>)``.

    Args:
        network: the image network, e.g. ``lightning_sparse.models.WideResNet`` through ``class_path``.
        num_classes: number of classes, for the accuracy metrics.
        optimizer: ``"sgd"`` or ``"adamw"``.
        lr: the initial learning rate.
        momentum: SGD momentum in [0, 1). ``None``: 0.9 for SGD. AdamW has none (setting it is an error).
        nesterov: Nesterov momentum (SGD with momentum > 0 only).
        weight_decay: L2 penalty (SGD) or decoupled weight decay (AdamW), applied to every parameter as in the
            papers' code.
        lr_schedule: ``"multistep"`` (multiply by ``gamma`` at each milestone), ``"cosine"`` (cosine annealing to
            0 over the run) or ``"none"``.
        milestones: strictly increasing fractions of the run in (0, 1) for ``"multistep"``. ``None``: ``[0.5,
            0.75]``.
        gamma: the multistep factor in (0, 1]. ``None``: 0.1.
        input_shape: ``[channels, height, width]`` of one input; sets ``example_input_array`` (a zero batch of
            one), which model summaries and the DyReLU conversion use.

    Raises:
        ValueError: for an out-of-range value, or an argument the chosen optimizer or schedule does not use.
        TypeError: if ``network`` is not a ``torch.nn.Module``.

    Example::

        from lightning_sparse.models import wide_resnet28
        model = ImageClassifier(wide_resnet28(width=2), num_classes=10, lr=0.1, nesterov=True,
                                weight_decay=5e-4, milestones=[0.3, 0.6, 0.8], gamma=0.2)
    """

    def __init__(
        self,
        network: nn.Module,
        num_classes: int,
        optimizer: OptimizerName = "sgd",
        lr: float = 0.1,
        momentum: float | None = None,
        nesterov: bool = False,
        weight_decay: float = 5e-4,
        lr_schedule: ScheduleName = "multistep",
        milestones: list[float] | None = None,
        gamma: float | None = None,
        input_shape: list[int] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(
                f"network must be a torch.nn.Module (in YAML: class_path + init_args), got {type(network).__name__}"
            )
        _check_settings(num_classes, optimizer, lr, momentum, nesterov, weight_decay, lr_schedule, milestones, gamma)
        # Under the CLI, Lightning records the network's class_path/init_args instead of the object; built in
        # Python, the network object is left out (it is in the state_dict, and pickling it breaks weights_only loads).
        self.save_hyperparameters(ignore=[] if _built_by_cli() else ["network"])
        self.network = network
        self.num_classes = num_classes
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = (_DEFAULT_SGD_MOMENTUM if momentum is None else momentum) if optimizer == "sgd" else 0.0
        self.nesterov = nesterov
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.milestones = list(_DEFAULT_MILESTONES if milestones is None else milestones)
        self.gamma = _DEFAULT_GAMMA if gamma is None else gamma
        if input_shape is not None:
            if len(input_shape) < 1 or any(int(size) < 1 for size in input_shape):
                raise ValueError(f"input_shape must list positive sizes like [3, 32, 32], got {input_shape}")
            self.example_input_array = torch.zeros(1, *(int(size) for size in input_shape))
        self.loss = nn.CrossEntropyLoss()
        # average="micro": the fraction of correct predictions, as the papers report (torchmetrics' default is macro).
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """Logits of the network."""
        return self.network(x)

    def _shared_step(self, batch: Sequence[Tensor], stage: str, accuracy: MulticlassAccuracy) -> Tensor:
        images, labels = batch[0], batch[1]
        logits = self(images)
        loss = self.loss(logits, labels)
        accuracy(logits, labels)
        on_step = stage == "train"
        # sync_dist: under DDP the epoch's loss is the mean over every rank's batches, not rank 0's alone. The
        # accuracy is a torchmetrics Metric, which reduces its own state across ranks.
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=stage != "train", sync_dist=True)
        self.log(f"{stage}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=stage != "train")
        return loss

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy loss of one batch ``(images, labels)``."""
        return self._shared_step(batch, "train", self.train_acc)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Log the validation loss and accuracy."""
        self._shared_step(batch, "val", self.val_acc)

    def test_step(self, batch: Sequence[Tensor], batch_idx: int) -> None:
        """Log the test loss and accuracy."""
        self._shared_step(batch, "test", self.test_acc)

    def predict_step(self, batch: Tensor | Sequence[Tensor], batch_idx: int) -> Tensor:
        """Logits of a batch of images, or of ``(images, labels)`` batches (the labels are not used)."""
        images = batch if isinstance(batch, Tensor) else batch[0]
        return self(images)

    def configure_optimizers(self) -> Any:
        """The optimizer and, unless ``lr_schedule="none"``, a per-step learning-rate scheduler."""
        if self.optimizer_name == "sgd":
            optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(),
                lr=self.lr,
                momentum=self.momentum,
                nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "none":
            return optimizer
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        if self.lr_schedule == "multistep":
            steps = [max(1, round(fraction * total_steps)) for fraction in self.milestones]
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=steps, gamma=self.gamma
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _built_by_cli() -> bool:
    # LightningCLI sets this context while it instantiates the model; save_hyperparameters then stores the
    # config (with the network's class_path) rather than the objects.
    try:
        from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
    except ImportError:  # a Lightning version without it: the network object is left out of the hparams
        return False
    return _given_hyperparameters.get() is not None


def _check_settings(
    num_classes: int,
    optimizer: str,
    lr: float,
    momentum: float | None,
    nesterov: bool,
    weight_decay: float,
    lr_schedule: str,
    milestones: list[float] | None,
    gamma: float | None,
) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    check_choice(optimizer, "optimizer", OptimizerName)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
    if optimizer == "adamw":
        if momentum is not None:
            raise ValueError("AdamW has no momentum argument (its betas are fixed at (0.9, 0.999)); remove momentum")
        if nesterov:
            raise ValueError("nesterov applies to SGD only; remove nesterov or use optimizer='sgd'")
    else:
        effective = _DEFAULT_SGD_MOMENTUM if momentum is None else momentum
        if not 0.0 <= effective < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if nesterov and effective == 0.0:
            raise ValueError("nesterov needs momentum > 0; set momentum (e.g. 0.9) or nesterov=False")
    check_choice(lr_schedule, "lr_schedule", ScheduleName)
    if lr_schedule != "multistep":
        unused = [name for name, value in (("milestones", milestones), ("gamma", gamma)) if value is not None]
        if unused:
            raise ValueError(
                f"{', '.join(unused)} only apply to lr_schedule='multistep' (got {lr_schedule!r}); remove them"
            )
    if milestones is not None:
        values = [float(value) for value in milestones]
        if not values or any(not 0.0 < value < 1.0 for value in values):
            raise ValueError(
                f"milestones are fractions of the run in (0, 1), e.g. [0.3, 0.6, 0.8] for epochs 60/120/160 of 200; "
                f"got {milestones}"
            )
        if any(later <= earlier for earlier, later in itertools.pairwise(values)):
            raise ValueError(f"milestones must be strictly increasing, got {milestones}")
    if gamma is not None and not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
