import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparse import MaskInit
from lightning_sparse.functional.distributions import active_counts, layer_densities
from tests.helpers import Classifier, masked_positions_are_zero, random_loader, tensorboard_events, trainer_kwargs


def _fit(tmp_path, module=None, callbacks=None, loader=None, **trainer_overrides):
    module = module or Classifier()
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=callbacks or [mask_init], **trainer_kwargs(tmp_path, **trainer_overrides))
    trainer.fit(module, loader or random_loader())
    return trainer, module


@pytest.mark.parametrize("optimizer", ["sgd_momentum_wd", "sgd_nesterov", "adam", "adamw"])
@pytest.mark.parametrize(
    "setting",
    [
        {},
        {"accumulate_grad_batches": 3},
        {"gradient_clip_val": 0.1},
        {"precision": "bf16-mixed"},
    ],
    ids=["plain", "accumulate", "clip", "bf16"],
)
def test_masked_weights_and_optimizer_state_stay_exactly_zero(tmp_path, optimizer, setting):
    module = Classifier(optimizer=optimizer)
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer, module = _fit(tmp_path, module, [mask_init], max_epochs=2, **setting)
    masks = mask_init.masks
    assert trainer.global_step > 0
    assert masked_positions_are_zero(module, masks, trainer.optimizers) == []
    assert masks.nnz() == sum(active_counts(
        {n: tuple(p.shape) for n, p in masks.parameters.items()},
        layer_densities({n: tuple(p.shape) for n, p in masks.parameters.items()}, 0.8, "erk"),
    ).values())
    # Training really happened on the active weights.
    assert any((p.detach() != 0).any() for p in masks.parameters.values())


def test_manual_optimization(tmp_path):
    mask_init = MaskInit(sparsity=0.9, seed=0)
    trainer, module = _fit(tmp_path, Classifier(optimizer="adamw", manual=True), [mask_init])
    assert trainer.global_step == 8
    assert masked_positions_are_zero(module, mask_init.masks, trainer.optimizers) == []


def test_torch_compile(tmp_path):
    module = Classifier(optimizer="sgd_momentum_wd")
    compiled = torch.compile(module, backend="aot_eager")
    mask_init = MaskInit(sparsity=0.9, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(compiled, random_loader())
    assert trainer.global_step == 8
    assert masked_positions_are_zero(module, mask_init.masks, trainer.optimizers) == []
    assert set(mask_init.masks) == {"net.conv1.weight", "net.conv2.weight", "net.fc.weight"}


def test_keys_are_the_lightning_module_parameter_names_and_default_selection(tmp_path):
    mask_init = MaskInit(sparsity=0.5, seed=0)
    _fit(tmp_path, callbacks=[mask_init])
    assert list(mask_init.masks) == ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]
    assert mask_init.masks.density() == pytest.approx(0.5, abs=3 / mask_init.masks.numel())


def test_include_and_exclude_patterns(tmp_path):
    mask_init = MaskInit(sparsity=0.5, include=["net.conv*"], exclude=["*.conv1.weight"], seed=0)
    _fit(tmp_path, callbacks=[mask_init])
    assert list(mask_init.masks) == ["net.conv2.weight"]
    assert mask_init.masks.nnz() == 16 * 8 * 9 // 2


def test_layer_sparsity_fixes_named_tensors(tmp_path):
    mask_init = MaskInit(sparsity=0.8, layer_sparsity={"net.fc.weight": 0.5}, seed=0)
    _fit(tmp_path, callbacks=[mask_init])
    assert mask_init.masks.nnz("net.fc.weight") == 80


def test_same_seed_same_masks_other_seed_other_masks(tmp_path):
    fingerprints = []
    for seed in (0, 0, 1):
        mask_init = MaskInit(sparsity=0.8, seed=seed)
        _fit(tmp_path, Classifier(), [mask_init], max_steps=1)
        fingerprints.append(mask_init.masks.fingerprint())
    assert fingerprints[0] == fingerprints[1] != fingerprints[2]


def test_from_zeros_keeps_an_already_sparse_model_sparse(tmp_path):
    module = Classifier()
    with torch.no_grad():
        for p in (module.net.conv1.weight, module.net.conv2.weight, module.net.fc.weight):
            p.mul_((torch.rand_like(p) < 0.25).float())
    zeros_before = {n: (p == 0) for n, p in module.named_parameters() if n.endswith("weight") and p.dim() > 1}
    mask_init = MaskInit(from_zeros=True)
    trainer, module = _fit(tmp_path, module, [mask_init], max_epochs=2)
    for name, zero in zeros_before.items():
        assert torch.equal(mask_init.masks[name], ~zero)
        assert (dict(module.named_parameters())[name][zero] == 0).all()
    assert masked_positions_are_zero(module, mask_init.masks, trainer.optimizers) == []


class ReplaceClassifier(L.Callback):
    """A model transform applied in setup: replaces the classifier by a wider two-layer head."""

    def setup(self, trainer, pl_module, stage):
        pl_module.net.fc = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10))


@pytest.mark.parametrize("mask_init_first", [True, False])
def test_position_in_the_callbacks_list_does_not_matter(tmp_path, mask_init_first):
    results = []
    for first in (True, False):
        L.seed_everything(0)
        module = Classifier()
        mask_init = MaskInit(sparsity=0.8, seed=3)
        callbacks = [mask_init, ReplaceClassifier()] if first else [ReplaceClassifier(), mask_init]
        _fit(tmp_path, module, callbacks, max_steps=4)
        assert "net.fc.2.weight" in mask_init.masks
        results.append((mask_init.masks.fingerprint(), torch.cat([p.detach().flatten() for p in module.parameters()])))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])


def test_state_dict_keeps_the_user_keys_and_loads_strictly_into_a_fresh_model(tmp_path):
    mask_init = MaskInit(sparsity=0.9, seed=0)
    trainer, module = _fit(tmp_path, callbacks=[mask_init])
    fresh = Classifier()
    assert set(module.state_dict()) == set(fresh.state_dict())
    trainer.save_checkpoint(tmp_path / "sparse.ckpt")
    checkpoint = torch.load(tmp_path / "sparse.ckpt", weights_only=False)
    fresh.load_state_dict(checkpoint["state_dict"], strict=True)
    reloaded = Classifier.load_from_checkpoint(tmp_path / "sparse.ckpt")
    assert (reloaded.net.conv2.weight == 0).float().mean() > 0.5
    saved_masks = checkpoint["callbacks"]["MaskInit"]["masks"]
    assert all(torch.equal(saved_masks[n], mask_init.masks[n].cpu()) for n in mask_init.masks)


def test_resume_gives_identical_masks_and_weights(tmp_path):
    L.seed_everything(0)
    straight_module = Classifier()
    initial_state = {k: v.clone() for k, v in straight_module.state_dict().items()}
    straight = MaskInit(sparsity=0.8, seed=0)
    _fit(tmp_path / "a", straight_module, [straight], max_epochs=2)

    first_module = Classifier()
    first_module.load_state_dict(initial_state)
    first = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[first], **trainer_kwargs(tmp_path / "b", max_epochs=1))
    trainer.fit(first_module, random_loader())
    trainer.save_checkpoint(tmp_path / "epoch1.ckpt")

    resumed_module = Classifier()
    resumed = MaskInit(sparsity=0.8, seed=12345)  # a different seed: the checkpoint's masks must win
    trainer = L.Trainer(callbacks=[resumed], **trainer_kwargs(tmp_path / "c", max_epochs=2))
    trainer.fit(resumed_module, random_loader(), ckpt_path=tmp_path / "epoch1.ckpt")

    assert resumed.masks.fingerprint() == straight.masks.fingerprint()
    for (name, a), (_, b) in zip(straight_module.state_dict().items(), resumed_module.state_dict().items()):
        assert torch.equal(a, b), name


def test_resume_with_masks_that_do_not_fit_fails_before_training(tmp_path):
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer, _ = _fit(tmp_path, callbacks=[mask_init])
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    other = MaskInit(sparsity=0.8, exclude=["net.fc.weight"])
    trainer = L.Trainer(callbacks=[other], **trainer_kwargs(tmp_path, max_epochs=2))
    module = Classifier()
    with pytest.raises(ValueError, match=r"do not fit the model.*net\.fc\.weight"):
        trainer.fit(module, random_loader(), ckpt_path=tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(v, saved[k]) for k, v in module.state_dict().items())  # not one step was taken


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sparsity=1.0), r"in \[0, 1\)"),
        (dict(sparsity=-0.5), r"in \[0, 1\)"),
        (dict(), "needs sparsity="),
        (dict(sparsity=0.5, distribution="normal"), "distribution must be one of 'uniform', 'er', 'erk', got 'normal'"),
        (dict(sparsity=0.5, from_zeros=True), "remove sparsity="),
        (dict(sparsity=0.5, power_scale=-1.0), "power_scale"),
        (dict(sparsity=0.5, layer_sparsity={"fc": 1.5}), r"layer_sparsity\['fc'\]"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskInit(**kwargs)


class NoWeights(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        return (self.scale * batch[0].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    ("module", "mask_init", "message"),
    [
        (Classifier, dict(include=["net.conv9*"]), "include pattern 'net.conv9\\*' matches no parameter"),
        (Classifier, dict(exclude=["head.*"]), "exclude pattern 'head.\\*' matches no parameter"),
        (Classifier, dict(layer_sparsity={"nope": 0.5}), "layer_sparsity pattern 'nope' matches no sparse"),
        (NoWeights, dict(), "no parameter to make sparse"),
    ],
)
def test_model_errors_come_before_the_first_step(tmp_path, module, mask_init, message):
    trainer = L.Trainer(callbacks=[MaskInit(sparsity=0.5, **mask_init)], **trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=message):
        trainer.fit(module(), random_loader())
    assert trainer.global_step == 0


def test_sparsity_curves_reach_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    mask_init = MaskInit(sparsity=0.9, seed=0)
    logger = TensorBoardLogger(tmp_path, name="tb")
    trainer = L.Trainer(
        callbacks=[mask_init], **trainer_kwargs(tmp_path, logger=logger, max_epochs=2, log_every_n_steps=1)
    )
    trainer.fit(Classifier(), random_loader())
    assert len(list(Path(logger.log_dir).glob("events.out.tfevents.*"))) == 1  # one run, one event file
    accumulator = tensorboard_events(logger.log_dir)
    tags = set(accumulator.Tags()["scalars"])
    expected = {
        "sparsity/global",
        "sparsity/global_all_params",
        "sparsity/nnz",
        "sparsity/density/net.conv1.weight",
        "sparsity/density/net.fc.weight",
    }
    assert expected <= tags, tags
    global_values = [event.value for event in accumulator.Scalars("sparsity/global")]
    assert len(global_values) >= 3  # the first step, then each epoch end
    assert all(math.isclose(v, mask_init.masks.sparsity(), abs_tol=1e-6) for v in global_values)
    total = sum(p.numel() for p in Classifier().parameters())
    all_params = accumulator.Scalars("sparsity/global_all_params")[-1].value
    assert math.isclose(all_params, (mask_init.masks.numel() - mask_init.masks.nnz()) / total, rel_tol=1e-5)
    assert "sparsity/global" in trainer.progress_bar_metrics


def test_resnet18_at_32x32(tmp_path):
    import torchvision

    module = Classifier(net=torchvision.models.resnet18(num_classes=10))
    mask_init = MaskInit(sparsity=0.99, seed=0)
    trainer, module = _fit(tmp_path, module, [mask_init], loader=random_loader(n=16, size=32), max_steps=2)
    assert mask_init.masks.sparsity() == pytest.approx(0.99, abs=len(mask_init.masks) / mask_init.masks.numel())
    assert masked_positions_are_zero(module, mask_init.masks, trainer.optimizers) == []
