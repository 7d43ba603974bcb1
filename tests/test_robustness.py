"""What a demanding user relies on: nothing lost, nothing silent.

Each test here is a case that once went wrong (issue 11; issue 12 point 3): a second fit redrew the trained masks, a
failed export overwrite destroyed the previous file, ``power_scale=nan`` hung, a raw manual-optimization step left
Adam's moments non-zero at masked positions, frozen layers were pruned and regrown into, Rprop restarted grown
weights at its 1e-6 clamp, the ITOP rate missed the cyclic schedule's changes, a string pattern was split into
characters, resuming with another sparsity said nothing, damaged exports loaded wrong weights, and a YAML typo gave an
81-line traceback. They stay fixed.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from lightning_sparse import CyclicSparsitySchedule, DynamicReallocation, MaskInit, load_sparse, save_sparse
from lightning_sparse.export import _checksum
from lightning_sparse.functional.distributions import layer_densities
from lightning_sparse.masks import SparseMasks
from lightning_sparse.optimizer_support import UnsupportedOptimizerError
from tests.helpers import Classifier, TinyCNN, masked_positions_are_zero, random_loader, trainer_kwargs


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in model.named_parameters()}


class MasksAtFitStart(L.Callback):
    """Records MaskInit's masks and the model's non-zero weights right after MaskInit's on_fit_start."""

    def __init__(self, mask_init: MaskInit) -> None:
        self.mask_init = mask_init
        self.seen: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        masks = {name: mask.clone() for name, mask in self.mask_init.masks.items()}
        self.seen.append((masks, _weights(pl_module)))


# ------------------------------------------------------------------------------------------------- 1. re-fit
def _first_fit(tmp_path: Path) -> tuple[L.Trainer, Classifier, MaskInit, MasksAtFitStart, dict[str, torch.Tensor]]:
    model = Classifier()
    mask_init = MaskInit(sparsity=0.8, seed=0)
    probe = MasksAtFitStart(mask_init)
    trainer = L.Trainer(
        callbacks=[mask_init, probe, DynamicReallocation("dsr", every_n_steps=2, stop_at=1.0)],
        **trainer_kwargs(tmp_path, max_steps=8, max_epochs=None),
    )
    trainer.fit(model, random_loader())
    return trainer, model, mask_init, probe, _weights(model)


def test_a_second_fit_on_the_same_trainer_keeps_the_trained_masks_and_weights(tmp_path):
    trainer, model, mask_init, probe, trained = _first_fit(tmp_path)
    trained_masks = {name: mask.clone() for name, mask in mask_init.masks.items()}
    trainer.fit_loop.epoch_loop.max_steps = 16
    trainer.fit(model, random_loader())
    masks_at_second_start, weights_at_second_start = probe.seen[1]
    assert all(torch.equal(masks_at_second_start[name], trained_masks[name]) for name in trained_masks)
    assert all(torch.equal(weights_at_second_start[name], trained[name]) for name in trained)
    assert trainer.global_step == 16


def test_a_new_trainer_reusing_the_mask_init_keeps_the_masks(tmp_path):
    _, model, mask_init, _, trained = _first_fit(tmp_path)
    trained_masks = {name: mask.clone() for name, mask in mask_init.masks.items()}
    probe = MasksAtFitStart(mask_init)
    trainer = L.Trainer(callbacks=[mask_init, probe], **trainer_kwargs(tmp_path, max_steps=2, max_epochs=None))
    trainer.fit(model, random_loader())
    masks, weights = probe.seen[0]
    assert all(torch.equal(masks[name], trained_masks[name]) for name in trained_masks)
    assert all(torch.equal(weights[name], trained[name]) for name in trained)
    # ... and a model the kept masks do not fit is a clear error before the first step.
    other = Classifier(net=TinyCNN(num_classes=5))
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_steps=2, max_epochs=None))
    with pytest.raises(ValueError, match="do not fit the model"):
        trainer.fit(other, random_loader(classes=5))
    assert trainer.global_step == 0
    # reset_masks() is the explicit way to draw new ones.
    mask_init.reset_masks()
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_steps=1, max_epochs=None))
    trainer.fit(other, random_loader(classes=5))
    assert mask_init.masks.density() == pytest.approx(0.2, abs=1e-3)


# ------------------------------------------------------------------------------------------ 2. atomic writes
def _fail_midway(obj: Any, path: Any, *args: Any, **kwargs: Any) -> None:
    with open(path, "wb") as handle:
        handle.write(b"PK\x03\x04 half a file")
    raise OSError(28, "No space left on device")


def test_a_failed_export_overwrite_keeps_the_previous_export(tmp_path, monkeypatch):
    path = tmp_path / "model.sparse.pt"
    model = TinyCNN()
    save_sparse(model, path)
    monkeypatch.setattr(torch, "save", _fail_midway)
    with pytest.raises(OSError, match="No space"):
        save_sparse(TinyCNN(), path)
    monkeypatch.undo()
    assert all(
        torch.equal(a, b)
        for a, b in zip(load_sparse(path, TinyCNN()).state_dict().values(), model.state_dict().values())
    )
    assert [p.name for p in tmp_path.iterdir()] == ["model.sparse.pt"]  # no temporary file left behind


def test_a_failed_checkpoint_overwrite_through_the_cli_trainer_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import lightning.fabric.plugins.io.torch_io as torch_io

    from lightning_sparse._cli_atomic import use_atomic_checkpoints

    trainer = L.Trainer(**trainer_kwargs(tmp_path, max_steps=1, max_epochs=None))
    use_atomic_checkpoints(trainer)  # what the lightning-sparse CLI does to its Trainer
    trainer.fit(Classifier(), random_loader())
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    before = path.read_bytes()
    monkeypatch.setattr(torch_io, "_atomic_save", _fail_midway)
    with pytest.raises(OSError, match="No space"):
        trainer.save_checkpoint(path)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------- 3. power_scale nan / inf
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_power_scale_is_rejected_at_construction(value):
    with pytest.raises(ValueError, match="power_scale"):
        MaskInit(sparsity=0.9, power_scale=value)
    with pytest.raises(ValueError, match="power_scale"):
        CyclicSparsitySchedule(power_scale=value)


@pytest.mark.timeout(30)
def test_the_erk_loop_is_finite_for_nan_power_scale():
    with pytest.raises(ValueError, match="power_scale"):
        layer_densities({"a": (4, 4), "b": (100, 100)}, 0.5, "erk", power_scale=math.nan)


# -------------------------------------------------------------- 4. manual optimization, raw optimizer steps
class RawManual(Classifier):
    def __init__(self) -> None:
        super().__init__(optimizer="adam", manual=True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        optimizer = self.optimizers(use_pl_optimizer=False)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(self(x), y)
        self.manual_backward(loss)
        optimizer.step()
        return loss


def test_raw_optimizer_steps_in_manual_optimization_keep_exact_sparsity(tmp_path):
    model = RawManual()
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_epochs=1))
    trainer.fit(model, random_loader())
    optimizer = trainer.optimizers[0]
    assert optimizer.state  # Adam stepped
    assert masked_positions_are_zero(model, mask_init.masks, [optimizer]) == []


def test_raw_optimizer_steps_with_topology_updates_are_a_clear_error_before_they_step(tmp_path):
    model = RawManual()
    before = _weights(model)
    trainer = L.Trainer(
        callbacks=[MaskInit(sparsity=0.8, seed=0), DynamicReallocation("set", every_n_steps=2)],
        **trainer_kwargs(tmp_path, max_epochs=1),
    )
    with pytest.raises(RuntimeError, match="use_pl_optimizer=False"):
        trainer.fit(model, random_loader())
    assert not trainer.optimizers[0].state  # the first step was refused before it moved anything
    assert torch.equal(model.net.bn1.weight, before["net.bn1.weight"])


# ------------------------------------------------------------------------------------------- 5. frozen layers
def _frozen_stem_model() -> Classifier:
    model = Classifier()
    model.net.conv1.weight.requires_grad_(False)
    return model


def test_frozen_layers_are_left_dense_by_default_and_the_summary_says_so(tmp_path, caplog):
    model = _frozen_stem_model()
    stem = model.net.conv1.weight.detach().clone()
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_steps=2, max_epochs=None))
    with caplog.at_level("INFO"):
        trainer.fit(model, random_loader())
    assert "net.conv1.weight" not in mask_init.masks
    assert torch.equal(model.net.conv1.weight, stem) and int(torch.count_nonzero(stem)) == 216
    assert "frozen parameters (requires_grad=False) left dense: ['net.conv1.weight']" in caplog.text


@pytest.mark.parametrize("method", ["dsr", "set"])
def test_frozen_layers_named_by_a_pattern_are_sparse_but_never_regrown_into(tmp_path, method):
    model = _frozen_stem_model()
    mask_init = MaskInit(sparsity=0.8, seed=0, include=["net.conv*.weight", "net.fc.weight"])
    probe = MasksAtFitStart(mask_init)
    trainer = L.Trainer(
        callbacks=[mask_init, probe, DynamicReallocation(method, every_n_steps=2, stop_at=1.0)],
        **trainer_kwargs(tmp_path, max_epochs=2),
    )
    trainer.fit(model, random_loader())
    initial = probe.seen[0][0]["net.conv1.weight"]
    assert "net.conv1.weight" in mask_init.masks
    assert torch.equal(mask_init.masks["net.conv1.weight"], initial)
    assert trainer.callbacks[2].num_updates > 0


# -------------------------------------------------------------------------------------- 6. optimizer support
def _layer_with(optimizer_cls: type[torch.optim.Optimizer], **kwargs: Any) -> tuple[nn.Linear, Any, SparseMasks]:
    torch.manual_seed(0)
    layer = nn.Linear(6, 4)
    optimizer = optimizer_cls(layer.parameters(), **kwargs)
    mask = torch.zeros(4, 6, dtype=torch.bool)
    mask[:, :3] = True
    masks = SparseMasks({"weight": layer.weight}, {"weight": mask})
    masks.attach_optimizers([optimizer])
    masks.apply_()
    for _ in range(3):
        optimizer.zero_grad()
        layer(torch.randn(5, 6)).pow(2).sum().backward()
        masks.mask_grads_()
        optimizer.step()
        masks.apply_()
    return layer, optimizer, masks


def _grow_one(masks: SparseMasks) -> tuple[int, int]:
    new = masks["weight"].clone()
    new[0, 0], new[0, 5] = False, True  # prune (0, 0), grow (0, 5)
    masks.update_({"weight": new}, expected_nnz=masks.nnz())
    return 0, 5


def test_rprop_grown_weights_restart_at_the_learning_rate_not_at_the_clamp():
    layer, optimizer, masks = _layer_with(torch.optim.Rprop, lr=0.01)
    row, col = _grow_one(masks)
    step_size = optimizer.state[layer.weight]["step_size"]
    assert step_size[row, col].item() == pytest.approx(0.01)  # Rprop's initial step size
    assert step_size[0, 0].item() == pytest.approx(0.01)
    assert optimizer.state[layer.weight]["prev"][row, col].item() == 0.0


def test_adagrad_grown_weights_restart_at_the_initial_accumulator_value():
    layer, optimizer, masks = _layer_with(torch.optim.Adagrad, lr=0.01, initial_accumulator_value=0.5)
    row, col = _grow_one(masks)
    assert optimizer.state[layer.weight]["sum"][row, col].item() == pytest.approx(0.5)


def test_adamax_grown_weights_restart_from_zero_state():
    layer, optimizer, masks = _layer_with(torch.optim.Adamax, lr=0.01)
    row, col = _grow_one(masks)
    state = optimizer.state[layer.weight]
    assert state["exp_avg"][row, col].item() == 0.0 and state["exp_inf"][row, col].item() == 0.0


def test_lbfgs_is_rejected_before_the_first_step(tmp_path):
    class LBFGSModel(Classifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.LBFGS(self.parameters())

    trainer = L.Trainer(callbacks=[MaskInit(sparsity=0.8)], **trainer_kwargs(tmp_path, max_steps=2, max_epochs=None))
    with pytest.raises(UnsupportedOptimizerError, match="LBFGS cannot be used with sparse masks"):
        trainer.fit(LBFGSModel(), random_loader())
    assert trainer.global_step == 0


class FlatStateSGD(torch.optim.SGD):
    """An optimizer unknown to the table whose state is not one entry per weight."""

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                self.state[param]["history"] = param.detach().reshape(-1)[:2].clone()
        return loss


def test_an_unknown_optimizer_with_state_not_shaped_like_its_parameters_is_rejected_after_its_first_step(tmp_path):
    class Model(Classifier):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return FlatStateSGD(self.parameters(), lr=0.01)

    trainer = L.Trainer(callbacks=[MaskInit(sparsity=0.8)], **trainer_kwargs(tmp_path, max_steps=4, max_epochs=None))
    with pytest.raises(UnsupportedOptimizerError, match="state 'history' of shape \\(2,\\)"):
        trainer.fit(Model(), random_loader())
    assert trainer.global_step <= 1


# ------------------------------------------------------------------------ 7. ITOP under a cyclic schedule
class UnionOfMasks(L.Callback):
    def __init__(self, mask_init: MaskInit) -> None:
        self.mask_init = mask_init
        self.union: dict[str, torch.Tensor] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        masks = self.mask_init.masks
        if self.union is None:
            self.union = {name: mask.clone() for name, mask in masks.items()}
        for name, mask in masks.items():
            self.union[name] |= mask


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = True


def _east(
    tmp_path: Path, extra: list[L.Callback], ckpt_path: str | None = None
) -> tuple[MaskInit, DynamicReallocation, UnionOfMasks]:
    mask_init = MaskInit(sparsity=0.8, seed=0)
    realloc = DynamicReallocation("rigl", every_n_steps=2, stop_at=1.0)
    union = UnionOfMasks(mask_init)
    trainer = L.Trainer(
        callbacks=[
            mask_init,
            CyclicSparsitySchedule(max_multiplier=3.0, cycles=1, cycle_length=0.5, every_n_steps=2),
            realloc,
            union,
            *extra,
        ],
        **trainer_kwargs(tmp_path, max_steps=16, max_epochs=None),
    )
    trainer.fit(Classifier(), random_loader(), ckpt_path=ckpt_path)
    if extra:
        trainer.save_checkpoint(tmp_path / "half.ckpt")
    return mask_init, realloc, union


def test_itop_rate_counts_the_cyclic_schedules_changes_and_survives_resume(tmp_path):
    torch.manual_seed(0)
    mask_init, realloc, union = _east(tmp_path, [])
    ever = mask_init.masks.ever_active
    assert all(torch.equal(ever[name] | union.union[name], ever[name]) for name in ever)  # every observed mask counted
    union_rate = sum(int(mask.sum()) for mask in union.union.values()) / mask_init.masks.numel()
    assert realloc.itop_rate >= union_rate > mask_init.masks.density() * 1.5
    # Stopped at step 8 and resumed: the history written at step 8 is restored, not restarted from the masks.
    torch.manual_seed(0)
    _east(tmp_path, [StopAfterFirstEpoch()])
    checkpoint = torch.load(tmp_path / "half.ckpt", weights_only=False)
    saved = next(state for key, state in checkpoint["callbacks"].items() if key.startswith("MaskInit"))["ever_active"]
    saved_rate = sum(int(mask.sum()) for mask in saved.values()) / mask_init.masks.numel()
    assert saved_rate > 0.2 * 1.5  # the cyclic phase's growth is in the saved history
    torch.manual_seed(0)
    resumed_init, resumed, _ = _east(tmp_path, [], ckpt_path=str(tmp_path / "half.ckpt"))
    ever = resumed_init.masks.ever_active
    assert all(torch.equal(ever[name] | saved[name], ever[name]) for name in ever)
    assert resumed.itop_rate == sum(int(mask.sum()) for mask in ever.values()) / resumed_init.masks.numel()


# ------------------------------------------------------------------------------------ 8. one string pattern
def test_one_string_include_or_exclude_is_one_pattern(tmp_path):
    mask_init = MaskInit(sparsity=0.8, include="net.conv*", exclude="net.conv2.weight")
    assert mask_init.include == ["net.conv*"] and mask_init.exclude == ["net.conv2.weight"]
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_steps=1, max_epochs=None))
    trainer.fit(Classifier(), random_loader())
    assert list(mask_init.masks) == ["net.conv1.weight"]
    with pytest.raises(TypeError, match="glob pattern or a list"):
        MaskInit(sparsity=0.8, include=["net.conv1.weight", 3])


# --------------------------------------------------------------------------- 9. resume with another sparsity
def _checkpoint(tmp_path: Path, callbacks: list[L.Callback]) -> tuple[Path, Classifier]:
    model = Classifier()
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, max_steps=2, max_epochs=None))
    trainer.fit(model, random_loader())
    path = tmp_path / "run.ckpt"
    trainer.save_checkpoint(path)
    return path, model


def test_resuming_with_another_sparsity_warns_which_sparsity_is_in_effect(tmp_path):
    path, _ = _checkpoint(tmp_path, [MaskInit(sparsity=0.8, seed=0)])
    mask_init = MaskInit(sparsity=0.5, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_steps=3, max_epochs=None))
    with pytest.warns(UserWarning, match=r"MaskInit\(sparsity=0.5\) resumes a checkpoint written with sparsity=0.8"):
        trainer.fit(Classifier(), random_loader(), ckpt_path=path)
    assert mask_init.masks.density() == pytest.approx(0.2, abs=1e-3)


def test_resuming_a_checkpoint_written_without_the_callbacks_says_masks_are_new(tmp_path):
    path, _ = _checkpoint(tmp_path, [])
    trainer = L.Trainer(callbacks=[MaskInit(sparsity=0.8)], **trainer_kwargs(tmp_path, max_steps=3, max_epochs=None))
    with pytest.warns(UserWarning, match="has no MaskInit state"):
        trainer.fit(Classifier(), random_loader(), ckpt_path=path)


# ------------------------------------------------------------------------------------ 10. damaged exports
def _sparse_export(tmp_path: Path) -> tuple[Path, nn.Module]:
    model = TinyCNN()
    with torch.no_grad():
        for param in (model.conv2.weight, model.fc.weight):
            param.mul_(torch.rand_like(param) < 0.1)
    path = tmp_path / "m.sparse.pt"
    save_sparse(model, path)
    return path, model


def _rewrite(path: Path, change: Any, recompute_checksum: bool = True) -> None:
    """Edit an export's payload and write it back, with a matching checksum where one can still be computed."""
    payload = torch.load(path, weights_only=True)
    change(payload)
    if recompute_checksum:
        try:
            payload["checksum"] = _checksum(payload["order"], payload["sparse"], payload["dense"])
        except (KeyError, TypeError, ValueError, AssertionError):
            pass  # a structural damage the loader must report as such, before any checksum
    torch.save(payload, path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda p: p["sparse"]["conv2.weight"]["positions"].__setitem__(0, -1),
            "'conv2.weight' .* out of \\[0, 1152\\): -1",
        ),
        (
            lambda p: p["sparse"]["conv2.weight"]["positions"].__setitem__(0, 5000),
            "'conv2.weight' .* out of \\[0, 1152\\): 5000",
        ),
        (lambda p: p["sparse"]["fc.weight"].pop("values"), "'fc.weight' lacks its shape, positions or values"),
        (lambda p: p["sparse"]["fc.weight"].__setitem__("shape", (10, "x")), "'fc.weight' has an invalid shape"),
        (
            lambda p: p["sparse"]["fc.weight"].__setitem__("values", torch.zeros(3)),
            "'fc.weight' stores \\d+ positions and 3 values",
        ),
        (lambda p: p["dense"].pop("conv1.weight"), "'conv1.weight' is missing"),
        (lambda p: p.__setitem__("order", "conv1.weight"), "list of tensor names"),
    ],
)
def test_malformed_exports_raise_a_value_error_naming_the_tensor(tmp_path, change, message):
    path, _ = _sparse_export(tmp_path)
    _rewrite(path, change)
    with pytest.raises(ValueError, match=message):
        load_sparse(path, TinyCNN())


def test_an_edited_export_fails_its_checksum(tmp_path):
    path, _ = _sparse_export(tmp_path)
    _rewrite(path, lambda p: p["dense"]["bn1.weight"].add_(1.0), recompute_checksum=False)
    with pytest.raises(ValueError, match="do not match the checksum"):
        load_sparse(path, TinyCNN())


def test_flipped_bytes_inside_a_tensor_are_caught_by_the_checksum(tmp_path):
    path, model = _sparse_export(tmp_path)
    raw = bytearray(path.read_bytes())
    values = model.conv1.weight.detach().contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
    start = raw.find(values[:64])
    assert start > 0
    for i in range(start, start + 64):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="do not match the checksum"):
        load_sparse(path, TinyCNN())


def test_a_truncated_export_is_called_truncated(tmp_path):
    path, _ = _sparse_export(tmp_path)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="is truncated"):
        load_sparse(path, TinyCNN())


def test_a_version_1_export_without_checksum_still_has_its_positions_checked(tmp_path):
    path, model = _sparse_export(tmp_path)

    def to_v1(payload: dict) -> None:
        payload["version"] = 1
        payload.pop("checksum")

    _rewrite(path, to_v1, recompute_checksum=False)
    loaded = load_sparse(path, TinyCNN())
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    _rewrite(path, lambda p: p["sparse"]["fc.weight"]["positions"].__setitem__(0, -1), recompute_checksum=False)
    with pytest.raises(ValueError, match="'fc.weight' .* out of"):
        load_sparse(path, TinyCNN())


# --------------------------------------------------------------------------------------------- 11. smaller
class NanOnce(Classifier):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 2 else loss


def test_a_nan_loss_does_not_leave_nan_at_masked_positions_and_is_warned_about(tmp_path):
    model = NanOnce(optimizer="sgd")
    mask_init = MaskInit(sparsity=0.8, seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_steps=4, max_epochs=None))
    with pytest.warns(UserWarning, match="masked weights were not finite"):
        trainer.fit(model, random_loader())
    for name, mask in mask_init.masks.items():
        weight = dict(model.named_parameters())[name]
        assert torch.equal(weight[~mask], torch.zeros_like(weight[~mask]))


def test_a_nan_gradient_that_skips_a_topology_update_is_warned_about_once(tmp_path):
    model = NanOnce(optimizer="sgd")
    realloc = DynamicReallocation("set", every_n_steps=2)
    trainer = L.Trainer(
        callbacks=[MaskInit(sparsity=0.8), realloc], **trainer_kwargs(tmp_path, max_steps=8, max_epochs=None)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, random_loader())
    skipped = [w for w in caught if "skipped the update" in str(w.message)]
    assert len(skipped) == 1 and realloc.num_skipped_nonfinite >= 1


@pytest.mark.parametrize(
    ("seed", "error"), [("a", TypeError), (0.5, TypeError), (2**70, ValueError), (-1, ValueError), (True, TypeError)]
)
def test_bad_seeds_fail_at_construction(seed, error):
    with pytest.raises(error, match="seed"):
        MaskInit(sparsity=0.9, seed=seed)
    with pytest.raises(error, match="seed"):
        DynamicReallocation(seed=seed)


def test_numpy_numbers_are_accepted():
    mask_init = MaskInit(sparsity=np.float32(0.9), seed=np.int64(3), power_scale=np.float64(1.0))
    assert mask_init.sparsity == pytest.approx(0.9) and type(mask_init.sparsity) is float
    assert mask_init.seed == 3 and type(mask_init.seed) is int
    assert DynamicReallocation("set", drop_fraction=np.float32(0.25), seed=np.int32(1)).drop_fraction == 0.25


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)
        self.b.weight = self.a.weight  # a tied weight, used by two layers (not EAST's weight sharing)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).mean(dim=(2, 3))
        return self.fc(self.b(torch.relu(self.a(x))))


def test_a_tied_weight_gets_the_requested_sparsity_outside_weight_sharing(tmp_path):
    mask_init = MaskInit(sparsity=0.9, distribution="uniform", seed=0)
    trainer = L.Trainer(callbacks=[mask_init], **trainer_kwargs(tmp_path, max_steps=1, max_epochs=None))
    trainer.fit(Classifier(net=TiedNet()), random_loader())
    assert mask_init.masks.density() == pytest.approx(0.1, abs=2e-3)


# ----------------------------------------------------------------- issue 12 point 3: choices at parse time
def _cli_error(tmp_path: Path, capsys: Any, callback: str) -> str:
    from lightning_sparse.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text(
        "trainer:\n  callbacks:\n" + callback + "model:\n  network:\n    class_path: tests.helpers.TinyCNN\n"
        "data:\n  class_path: lightning_sparse.data.DigitsDataModule\n"
    )
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(config)])
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("callback", "choices"),
    [
        (
            "    - class_path: lightning_sparse.callbacks.MaskInit\n      init_args: {sparsity: 0.9, distribution: ERK}\n",
            "erk",
        ),
        ("    - class_path: lightning_sparse.callbacks.DynamicReallocation\n      init_args: {method: DSR}\n", "dsr"),
        (
            "    - class_path: lightning_sparse.callbacks.CyclicSparsitySchedule\n      init_args: {shape: sine}\n",
            "triangular",
        ),
    ],
)
def test_a_bad_choice_in_a_config_is_a_short_parse_error_listing_the_choices(tmp_path, capsys, callback, choices):
    error = _cli_error(tmp_path, capsys, callback)
    assert "Traceback" not in error
    assert choices in error
    assert len(error.strip().splitlines()) <= 20  # was a traceback of 81 lines, then the usage's 50 lines


def test_help_lists_the_choices(capsys):
    from lightning_sparse.cli import SparseCLI

    with pytest.raises(SystemExit):
        SparseCLI(args=["--trainer.callbacks.help", "lightning_sparse.callbacks.MaskInit"], run=False)
    out = capsys.readouterr().out
    assert "uniform" in out and "erk" in out
