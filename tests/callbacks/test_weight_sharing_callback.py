"""WeightSharing: the callback face of share_stage_weights, and EAST's budget rule with MaskInit."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
import torchvision
from torch import nn

from lightning_sparse.callbacks.mask_init import MaskInit
from lightning_sparse.callbacks.weight_sharing import WeightSharing
from lightning_sparse.models import cifar_resnet34, cifar_resnet50
from lightning_sparse.nn import SharedConv2d
from tests.callbacks.test_east_stack import TinyResNet
from tests.helpers import Classifier, random_loader, trainer_kwargs

MODELS: dict[str, Callable[[], nn.Module]] = {
    "cifar_resnet34": lambda: cifar_resnet34(num_classes=10),
    "cifar_resnet50": lambda: cifar_resnet50(num_classes=10),
    "torchvision_resnet34": lambda: torchvision.models.resnet34(num_classes=10),
    "torchvision_resnet50": lambda: torchvision.models.resnet50(num_classes=10),
}


def _prunable_weights(model: nn.Module) -> tuple[int, int]:
    """(number of Conv2d/Linear weight tensors, their total size) of an unshared model."""
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return len(weights), sum(w.numel() for w in weights)


def _fit_one_step(callbacks: list[Any], model: L.LightningModule, tmp_path: Any, **overrides: Any) -> L.Trainer:
    trainer = L.Trainer(
        callbacks=callbacks,
        **trainer_kwargs(tmp_path, max_steps=1, limit_val_batches=0, log_every_n_steps=1, **overrides),
    )
    trainer.fit(model, random_loader(n=4, batch_size=4, size=16))
    return trainer


@pytest.mark.parametrize("name", list(MODELS))
def test_budget_rule_holds_with_mask_init(name) -> None:
    net = MODELS[name]()
    layers, unshared = _prunable_weights(net)
    sparsity = 0.999
    sharing, mask_init = WeightSharing(), MaskInit(sparsity=sparsity, distribution="erk", seed=0)
    model = Classifier(net, optimizer="sgd")
    # The two hooks that matter, in the Trainer's order: every setup, then MaskInit.on_fit_start.
    trainer = SimpleNamespace(
        callbacks=[mask_init, sharing], optimizers=[], ckpt_path=None, is_global_zero=True, loggers=[], logger=None
    )
    sharing.setup(trainer, model, "fit")  # type: ignore[arg-type]
    mask_init.on_fit_start(trainer, model)  # type: ignore[arg-type]

    report = sharing.report
    assert report is not None and report.conv_weights_before == report.conv_weights_after + report.virtual_weights
    masks = mask_init.masks
    real = masks.numel()
    assert real == unshared - report.virtual_weights
    # EAST §3d: active learnable weights = (1 - s) x the unshared model's prunable weights (one weight per layer).
    assert abs(masks.nnz() - (1 - sparsity) * unshared) <= layers
    # Every tensor reused k times counts k + 1 times in the effective density.
    uses = masks.uses
    assert max(uses.values()) == 5  # layer3 of ResNet-34/50: the source block plus 4 sharing blocks


def test_real_and_effective_density_are_logged(tmp_path) -> None:
    sharing, mask_init = WeightSharing(), MaskInit(sparsity=0.999, distribution="erk", seed=0)
    model = Classifier(TinyResNet(), optimizer="sgd")
    trainer = _fit_one_step([mask_init, sharing], model, tmp_path)
    masks = mask_init.masks
    logged = trainer.logged_metrics
    assert float(logged["sparsity/global"]) == pytest.approx(1 - masks.nnz() / masks.numel(), abs=1e-6)
    assert float(logged["sparsity/effective"]) == pytest.approx(1 - masks.effective_density(), abs=1e-6)
    # Shared tensors are counted once per use in the effective figure, so the two differ.
    assert float(logged["sparsity/effective"]) != pytest.approx(float(logged["sparsity/global"]), abs=1e-6)


def test_cifar_resnet34_shares_the_paper_counts(tmp_path) -> None:
    sharing = WeightSharing()
    model = Classifier(cifar_resnet34(num_classes=10, fc_bias=False), optimizer="sgd")
    sharing.setup(None, model, "fit")  # type: ignore[arg-type]
    report = sharing.report
    # docs/algorithms.md §3d: 8 sharing blocks; 11,164,352 real and 10,100,736 reused conv weights (+5,120 in the fc).
    assert len(report.shared_blocks) == 8
    assert report.conv_weights_after + 5120 == 11_164_352
    assert report.virtual_weights == 10_100_736
    assert report.shared_blocks["net.layer3.5"] == "net.layer3.1"


def test_callbacks_order_does_not_change_the_masks_or_the_scales(tmp_path) -> None:
    results = []
    for order in ("sharing_first", "mask_first"):
        torch.manual_seed(0)
        model = Classifier(TinyResNet(), optimizer="sgd")
        sharing, mask_init = WeightSharing(), MaskInit(sparsity=0.99, seed=1)
        callbacks = [sharing, mask_init] if order == "sharing_first" else [mask_init, sharing]
        _fit_one_step(callbacks, model, tmp_path)
        scales = torch.stack([m.scale.detach() for m in model.modules() if isinstance(m, SharedConv2d)])
        results.append((mask_init.masks.fingerprint(), scales))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_scales_are_uniform_draws_or_the_given_value_and_are_trained(tmp_path) -> None:
    torch.manual_seed(0)
    model = Classifier(cifar_resnet34(num_classes=10), optimizer="sgd")
    WeightSharing().setup(None, model, "fit")  # type: ignore[arg-type]
    scales = torch.stack([m.scale.detach() for m in model.modules() if isinstance(m, SharedConv2d)])
    assert ((scales > 0) & (scales < 1)).all() and scales.unique().numel() == scales.numel()

    model = Classifier(TinyResNet(), optimizer="sgd")
    trainer = _fit_one_step([WeightSharing(scale_init=1.0)], model, tmp_path)
    shared = [m for m in model.modules() if isinstance(m, SharedConv2d)]
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(m.scale) in optimized for m in shared)
    # Every scale received a gradient (BatchNorm after each conv makes it tiny, but it is there).
    assert all(m.scale.grad is not None for m in shared)


def test_transform_leaves_the_global_generator_alone() -> None:
    model = Classifier(cifar_resnet34(num_classes=10))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    WeightSharing().setup(None, model, "fit")  # type: ignore[arg-type]
    assert torch.equal(torch.rand(3), expected)


def test_second_fit_does_not_share_again(tmp_path) -> None:
    sharing = WeightSharing()
    model = Classifier(TinyResNet(), optimizer="sgd")
    _fit_one_step([sharing], model, tmp_path)
    shared_before = [id(m) for m in model.modules() if isinstance(m, SharedConv2d)]
    parameters_before = sum(p.numel() for p in model.parameters())
    _fit_one_step([sharing], model, tmp_path)
    assert [id(m) for m in model.modules() if isinstance(m, SharedConv2d)] == shared_before
    assert sum(p.numel() for p in model.parameters()) == parameters_before


def test_model_without_deep_enough_stages_is_an_error(tmp_path) -> None:
    from lightning_sparse.models import cifar_resnet18

    with pytest.raises(ValueError, match="min_blocks=3"):
        _fit_one_step([WeightSharing()], Classifier(cifar_resnet18(num_classes=10)), tmp_path)


def test_resume_checks_the_sharing_layout() -> None:
    with pytest.raises(ValueError, match="source_block=2"):
        WeightSharing(source_block=1).load_state_dict({"source_block": 2, "min_blocks": 3})


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"source_block": -1}, ValueError),
        ({"min_blocks": 1}, ValueError),
        ({"source_block": 1.0}, TypeError),
        ({"scale_init": math.nan}, ValueError),
        ({"scale_init": "1"}, TypeError),
    ],
)
def test_bad_arguments(kwargs, error) -> None:
    with pytest.raises(error):
        WeightSharing(**kwargs)
