"""Add dynamic sparsity to a Lightning script you already have: two callbacks in the Trainer.

Everything below except the marked lines is a plain Lightning script with its own LightningModule. It trains
offline on scikit-learn's handwritten digits (bundled, no download) in about a minute on a laptop CPU:

    python examples/add_to_existing_trainer.py              # 5 epochs
    python examples/add_to_existing_trainer.py --tiny       # a few steps, to check the setup
    tensorboard --logdir lightning_logs                     # sparsity curves and the per-layer density heatmap

The callbacks need nothing from the model but its Conv/Linear layers; the model's ``state_dict()`` keeps its own
keys, so the trained checkpoint loads into the plain model.
"""

from __future__ import annotations

import argparse
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightning_sparse.callbacks import DynamicReallocation, MaskInit
from lightning_sparse.data import DigitsDataModule
from lightning_sparse.export import save_sparse


class SmallCNN(L.LightningModule):
    """An ordinary LightningModule: three conv blocks and a linear classifier for 16x16 images."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.Conv2d(64, 128, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(128),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        loss = nn.functional.cross_entropy(self(images), labels)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, labels = batch
        accuracy = (self(images).argmax(dim=1) == labels).float().mean()
        self.log("val/acc", accuracy, prog_bar=True)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)


def main(argv: list[str] | None = None) -> float:
    """Train the small CNN at 90% sparsity and return the last validation accuracy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one epoch of 3 training batches (a smoke test)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--root_dir", default=".", help="where lightning_logs/ and the export are written")
    args = parser.parse_args(argv)
    L.seed_everything(0)

    # --- the lightning-sparse part: two callbacks ---------------------------------------------------------
    mask_init = MaskInit(sparsity=0.9, distribution="erk", exclude=["classifier.weight"])  # 90% zeros from step 0
    dsr = DynamicReallocation(method="dsr", every_n_steps=20)  # move the active weights every 20 steps
    # -------------------------------------------------------------------------------------------------------

    trainer = L.Trainer(
        max_epochs=1 if args.tiny else args.epochs,
        limit_train_batches=3 if args.tiny else None,
        limit_val_batches=1 if args.tiny else None,
        callbacks=[mask_init, dsr],
        default_root_dir=args.root_dir,
        enable_checkpointing=not args.tiny,
        enable_progress_bar=not args.tiny,
        log_every_n_steps=1 if args.tiny else 10,
    )
    model = SmallCNN()
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=64))
    print(f"sparsity within the masked layers: {mask_init.masks.sparsity():.2%}")
    print(save_sparse(model, f"{args.root_dir}/small_cnn.sparse.pt"))
    return float(trainer.callback_metrics["val/acc"])


if __name__ == "__main__":
    main()
