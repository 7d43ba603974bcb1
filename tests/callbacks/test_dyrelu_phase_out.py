"""DyReLUPhaseOut: the ReLU -> DyReLU swap in setup, the beta schedule, ReLU equivalence after the end, state."""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_sparse.callbacks.dyrelu_phase_out import DyReLUPhaseOut, phase_out_blend
from lightning_sparse.callbacks.mask_init import MaskInit
from lightning_sparse.nn import DyReLU, dyrelu_modules
from tests.helpers import Classifier, TinyCNN, random_loader, trainer_kwargs


class BetaProbe(Callback):
    """Records the beta of every DyReLU module at each training batch start (after DyReLUPhaseOut set it)."""

    def __init__(self) -> None:
        self.betas: list[float] = []

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        values = {module.beta for module in dyrelu_modules(pl_module).values()}
        assert len(values) == 1
        self.betas.append(values.pop())


def _fit(callbacks: list[Callback], tmp_path: Any, model: L.LightningModule | None = None, **overrides: Any):
    model = model if model is not None else Classifier()
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(model, random_loader(n=64, batch_size=8))
    return trainer, model


def test_phase_out_blend_by_hand() -> None:
    assert [phase_out_blend(s, 4, 8) for s in range(10)] == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0]
    assert [phase_out_blend(s, 3, 3) for s in (2, 3, 4)] == [1.0, 0.0, 0.0]


def test_setup_swaps_every_relu_for_dyrelu_of_the_right_width(tmp_path) -> None:
    trainer, model = _fit([DyReLUPhaseOut()], tmp_path, max_steps=1)
    assert not any(type(m) is nn.ReLU for m in model.modules())
    assert {name: m.channels for name, m in dyrelu_modules(model).items()} == {"net.act1": 8, "net.act2": 16}
    # The hyper-networks were created before the optimizer, so they are trained.
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert all(id(p) in optimized for m in dyrelu_modules(model).values() for p in m.parameters())


def test_beta_follows_the_fractional_schedule_per_optimizer_step(tmp_path) -> None:
    probe = BetaProbe()
    # 8 batches per epoch, 2 epochs = 16 steps: start = 0.25 -> step 4, end = 0.5 -> step 8.
    phase_out = DyReLUPhaseOut(start=0.25, end=0.5)
    _fit([phase_out, probe], tmp_path, max_epochs=2)
    assert phase_out.window == (4, 8)
    assert probe.betas == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25] + [0.0] * 8
    assert phase_out.beta == 0.0


def test_int_positions_are_epochs_and_accumulation_counts_optimizer_steps(tmp_path) -> None:
    probe = BetaProbe()
    # 8 batches per epoch, accumulate 2 -> 4 optimizer steps per epoch: start epoch 1 -> step 4, end epoch 2 -> step 8.
    phase_out = DyReLUPhaseOut(start=1, end=2)
    _fit([phase_out, probe], tmp_path, max_epochs=3, accumulate_grad_batches=2)
    assert phase_out.window == (4, 8)
    per_step = probe.betas[::2]  # two micro-batches per optimizer step see the same beta
    assert probe.betas[1::2] == per_step
    assert per_step == [1, 1, 1, 1, 1, 0.75, 0.5, 0.25, 0, 0, 0, 0]


def test_after_the_end_outputs_equal_plain_relu_with_the_same_weights(tmp_path) -> None:
    _, model = _fit([DyReLUPhaseOut(start=0.0, end=0.5)], tmp_path, max_epochs=1)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    # The same conv/BN/fc weights in the plain-ReLU network (the DyReLU hyper-network keys are the only extra ones).
    plain = TinyCNN()
    state = {k: v for k, v in model.net.state_dict().items() if ".fc1." not in k and ".fc2." not in k}
    plain.load_state_dict(state, strict=True)
    plain.eval()
    with torch.no_grad():
        expected = plain(x)
        assert torch.equal(model(x), expected)
        exported = DyReLUPhaseOut.export_relu(copy.deepcopy(model))
        assert not dyrelu_modules(exported) and torch.equal(exported(x), expected)


def test_hypernetwork_stays_frozen_once_beta_is_zero(tmp_path) -> None:
    class Snapshot(Callback):
        def __init__(self) -> None:
            self.at_end_step: dict[str, torch.Tensor] = {}

        def on_train_batch_start(self, trainer, pl_module, batch, idx) -> None:
            if trainer.global_step == 8:
                self.at_end_step = {n: p.detach().clone() for n, p in pl_module.named_parameters() if ".fc" in n}

    snapshot = Snapshot()
    _, model = _fit([DyReLUPhaseOut(start=0.25, end=0.5), snapshot], tmp_path, max_epochs=2)
    after = {n: p.detach() for n, p in model.named_parameters() if ".fc" in n and n.startswith("net.act")}
    assert after and all(torch.equal(after[n], snapshot.at_end_step[n]) for n in after)
    # The rest of the network still trains.
    assert model.net.conv1.weight.grad is not None


def test_state_dict_holds_beta_and_position_and_restoring_sets_the_modules(tmp_path) -> None:
    phase_out = DyReLUPhaseOut(start=0.25, end=0.5)
    _fit([phase_out], tmp_path, max_steps=6, max_epochs=2)
    state = phase_out.state_dict()
    # max_steps=6 -> total 6 steps: start step 2 (round 1.5), end step 3; beta at the last batch (step 5) is 0.
    assert state == {"beta": 0.0, "step": 5, "start_step": 2, "end_step": 3}

    fresh = DyReLUPhaseOut(start=0.25, end=0.5)
    model = Classifier()
    fresh.setup(None, model, "fit")  # type: ignore[arg-type]
    fresh.load_state_dict({"beta": 0.4, "step": 3, "start_step": 2, "end_step": 7})
    assert fresh.beta == 0.4 and {m.beta for m in dyrelu_modules(model).values()} == {0.4}


def test_resume_from_a_checkpoint_mid_phase_out_continues_exactly(tmp_path) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path: str | None = None):
        L.seed_everything(3)
        model = Classifier()
        probe = BetaProbe()
        saver = ModelCheckpoint(dirpath=tmp_path / ("ckpt" if ckpt_path is None else "ckpt_resumed"), save_top_k=-1, every_n_epochs=1, save_last=False)
        trainer = L.Trainer(
            callbacks=[DyReLUPhaseOut(start=0.25, end=0.75), probe, saver],
            **trainer_kwargs(tmp_path, max_epochs=2, enable_checkpointing=True),
        )
        trainer.fit(model, random_loader(n=64, batch_size=8), ckpt_path=ckpt_path)
        return model, probe

    full, full_probe = run()
    # The checkpoint after epoch 0 is at step 8, inside the phase-out window (steps 4 to 12 of 16).
    middle = tmp_path / "ckpt" / "epoch=0-step=8.ckpt"
    assert torch.load(middle, weights_only=False)["callbacks"]["DyReLUPhaseOut"]["beta"] == 0.625  # set for step 7
    resumed, resumed_probe = run(str(middle))
    assert resumed_probe.betas == full_probe.betas[8:]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_second_fit_keeps_the_same_dyrelu_modules(tmp_path) -> None:
    phase_out = DyReLUPhaseOut()
    trainer, model = _fit([phase_out], tmp_path, max_steps=1)
    before = dict(dyrelu_modules(model))
    trainer = L.Trainer(callbacks=[phase_out], **trainer_kwargs(tmp_path, max_steps=1))
    trainer.fit(model, random_loader(n=16, batch_size=8))
    assert dyrelu_modules(model) == before


def test_export_relu_at_end_returns_plain_relu_modules(tmp_path) -> None:
    _, model = _fit([DyReLUPhaseOut(start=0.0, end=0.25, export_relu_at_end=True)], tmp_path, max_steps=4)
    assert not dyrelu_modules(model)
    assert sum(type(m) is nn.ReLU for m in model.modules()) == 2


class _Opaque(nn.Module):
    """A layer with no width attribute, so the width of the ReLU after it cannot be read statically."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Conv2d(3, 6, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


def _opaque_net() -> nn.Module:
    return nn.Sequential(_Opaque(), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))


def test_unknown_width_is_a_clear_error_naming_the_module(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"ReLU 'net\.1'.*DyReLUPhaseOut\(channels="):
        _fit([DyReLUPhaseOut()], tmp_path, model=Classifier(_opaque_net()), max_steps=1)


@pytest.mark.parametrize("how", ["channels", "example_input", "example_input_array"])
def test_width_from_channels_example_input_or_example_input_array(tmp_path, how) -> None:
    model = Classifier(_opaque_net())
    kwargs: dict[str, Any] = {}
    if how == "channels":
        kwargs["channels"] = {"net.1": 6}
    elif how == "example_input":
        kwargs["example_input"] = torch.randn(2, 3, 16, 16)
    else:
        model.example_input_array = torch.randn(2, 3, 16, 16)
    _fit([DyReLUPhaseOut(**kwargs)], tmp_path, model=model, max_steps=1)
    assert dyrelu_modules(model)["net.1"].channels == 6


def test_model_without_relu_modules_is_an_error(tmp_path) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    with pytest.raises(ValueError, match="no nn.ReLU module"):
        _fit([DyReLUPhaseOut()], tmp_path, model=Classifier(net), max_steps=1)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"start": 0.6, "end": 0.5}, ValueError),
        ({"start": 3, "end": 2}, ValueError),
        ({"start": 1.5}, ValueError),
        ({"end": -1}, ValueError),
        ({"start": True}, TypeError),
        ({"start": "0.25"}, TypeError),
        ({"reduction": 0}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error) -> None:
    with pytest.raises(error):
        DyReLUPhaseOut(**kwargs)


def test_end_before_start_in_steps_is_caught_at_train_start(tmp_path) -> None:
    # start = epoch 2 (16 steps), end = 0.5 of 24 steps = step 12.
    with pytest.raises(ValueError, match="before start"):
        _fit([DyReLUPhaseOut(start=2, end=0.5)], tmp_path, max_epochs=3)


def test_works_with_mask_init_and_hypernetworks_stay_dense(tmp_path) -> None:
    mask_init = MaskInit(sparsity=0.9, seed=0)
    _, model = _fit([mask_init, DyReLUPhaseOut()], tmp_path, max_steps=2)
    assert not any(name.startswith("net.act") for name in mask_init.masks)
    assert isinstance(model.net.act1, DyReLU)
