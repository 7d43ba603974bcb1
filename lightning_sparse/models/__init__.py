"""CIFAR-style models with one activation module per site: ResNet-18/34/50 and WRN-28-k (no Lightning import)."""

from __future__ import annotations

from lightning_sparse.models.resnet import (
    BasicBlock,
    Bottleneck,
    CifarResNet,
    cifar_resnet18,
    cifar_resnet34,
    cifar_resnet50,
)
from lightning_sparse.models.wide_resnet import WideBasicBlock, WideResNet, wide_resnet28

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "CifarResNet",
    "WideBasicBlock",
    "WideResNet",
    "cifar_resnet18",
    "cifar_resnet34",
    "cifar_resnet50",
    "wide_resnet28",
]
