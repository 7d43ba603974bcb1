import math
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from lightning_sparse.callbacks import DynamicReallocation, MaskInit
from lightning_sparse.functional.dsr import adapt_threshold
from lightning_sparse.masks import find_mask_owner
from lightning_sparse.schedules import SteppedPeriod
from tests.helpers import (
    Classifier,
    TinyCNN,
    masked_positions_are_zero,
    random_loader,
    tensorboard_events,
    trainer_kwargs,
)

# 64 samples in batches of 8: 8 optimizer steps per epoch.
STEPS_PER_EPOCH = 8
METHOD_KWARGS = {
    # H0 = 0.05 makes the first DSR updates of the tiny model prune weights; the paper's 1e-3 would prune none.
    "dsr": dict(initial_threshold=0.05, prune_target=0.1),
    "set": dict(),
    "rigl": dict(),
}


class Recorder(L.Callback):
    """Records, at every optimizer step, the masks as this callback sees them (place it after MaskInit)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.versions: list[int] = []
        self.layer_nnz: list[dict[str, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        masks = find_mask_owner(trainer, "Recorder").masks
        self.steps.append(trainer.global_step)
        self.versions.append(masks.version)
        self.layer_nnz.append(masks.layer_nnz())

    def change_steps(self, initial_version: int = 0) -> list[int]:
        previous, changed = initial_version, []
        for step, version in zip(self.steps, self.versions):
            if version != previous:
                changed.append(step)
            previous = version
        return changed


def _fit(tmp_path, method="dsr", callbacks_order="mask_init_first", extra=(), module=None, loader=None, **kwargs):
    trainer_overrides = {key: kwargs.pop(key) for key in list(kwargs) if key in ("max_epochs", "max_steps",
                         "accumulate_grad_batches", "logger", "log_every_n_steps", "enable_checkpointing")}
    L.seed_everything(0)
    module = module or Classifier()
    mask_init = MaskInit(sparsity=0.8, seed=0)
    realloc = DynamicReallocation(method, **{**METHOD_KWARGS[method], **kwargs})
    recorder = Recorder()
    pair = [mask_init, realloc] if callbacks_order == "mask_init_first" else [realloc, mask_init]
    trainer = L.Trainer(callbacks=[*pair, recorder, *extra], **trainer_kwargs(tmp_path, **trainer_overrides))
    trainer.fit(module, loader or random_loader())
    return trainer, module, mask_init, realloc, recorder


@pytest.mark.parametrize("method", ["dsr", "set", "rigl"])
def test_masks_change_only_at_update_steps_and_keep_the_budget(tmp_path, method):
    trainer, module, mask_init, realloc, recorder = _fit(tmp_path, method, every_n_steps=3, stop_at=1.0)
    assert recorder.steps == list(range(STEPS_PER_EPOCH))
    assert recorder.change_steps() == [3, 6]
    assert realloc.num_updates == 2 and realloc.last_update_step == 6
    totals = {sum(counts.values()) for counts in recorder.layer_nnz}
    assert totals == {mask_init.masks.nnz()}
    if method in ("set", "rigl"):  # fixed per-tensor budgets
        assert all(counts == recorder.layer_nnz[0] for counts in recorder.layer_nnz)
    assert realloc.last_pruned == realloc.last_grown > 0
    assert masked_positions_are_zero(module, mask_init.masks, trainer.optimizers) == []


def test_rigl_stops_at_75_percent_by_default_and_anneals_the_drop_fraction(tmp_path):
    # 16 steps, stop at round(0.75 * 16) = 12: updates at 4 and 8 only (12 is not < 12).
    _, _, _, realloc, recorder = _fit(tmp_path, "rigl", every_n_steps=4, max_epochs=2)
    assert recorder.change_steps() == [4, 8]
    assert realloc.last_drop_fraction == pytest.approx(0.3 / 2 * (1 + math.cos(math.pi * 8 / 12)))


def test_stepped_period(tmp_path):
    # Period 2 before 50% of the 16 steps, 4 after: updates at 2, 4, 6, then 8, 12.
    _, _, _, _, recorder = _fit(
        tmp_path, "set", every_n_steps=SteppedPeriod(2, milestones=[0.5]), stop_at=1.0, max_epochs=2
    )
    assert recorder.change_steps() == [2, 4, 6, 8, 12]


def test_dsr_moves_weights_across_layers_with_a_fixed_total_and_adapts_the_threshold(tmp_path):
    _, _, mask_init, realloc, recorder = _fit(tmp_path, "dsr", every_n_steps=2, stop_at=1.0, max_epochs=2)
    first, last = recorder.layer_nnz[0], mask_init.masks.layer_nnz()
    assert first != last, "DSR should have moved weights between layers"
    assert sum(first.values()) == sum(last.values())
    assert realloc.num_updates == 7
    # H moves by factors of two only.
    assert math.log2(realloc.threshold / 0.05) == pytest.approx(round(math.log2(realloc.threshold / 0.05)))


class BeforeUpdate(L.Callback):
    """Placed before MaskInit: snapshots the masks before the topology update of this step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        masks = find_mask_owner(trainer, "BeforeUpdate").masks
        self.masks = {name: mask.clone() for name, mask in masks.items()}


class AfterUpdate(L.Callback):
    """Placed after MaskInit: checks weights and optimizer state at the positions the update changed."""

    def __init__(self, before: BeforeUpdate) -> None:
        self.before = before
        self.checked = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        masks = find_mask_owner(trainer, "AfterUpdate").masks
        params = dict(pl_module.named_parameters())
        for name, mask in masks.items():
            changed = mask ^ self.before.masks[name]
            if not changed.any():
                continue
            self.checked += 1
            grown, pruned = changed & mask, changed & ~mask
            assert grown.sum() + pruned.sum() > 0
            assert (params[name].detach()[changed] == 0).all(), name
            for value in optimizer.state[params[name]].values():
                if isinstance(value, torch.Tensor) and value.shape == mask.shape:
                    assert (value[changed] == 0).all(), name


@pytest.mark.parametrize("method", ["dsr", "set", "rigl"])
@pytest.mark.parametrize("optimizer", ["sgd_momentum_wd", "adam"])
def test_pruned_and_grown_weights_and_their_optimizer_state_are_zero_after_an_update(tmp_path, method, optimizer):
    before = BeforeUpdate()
    after = AfterUpdate(before)
    L.seed_everything(0)
    module = Classifier(optimizer=optimizer)
    mask_init = MaskInit(sparsity=0.8, seed=0)
    realloc = DynamicReallocation(method, every_n_steps=3, stop_at=1.0, **METHOD_KWARGS[method])
    trainer = L.Trainer(callbacks=[before, mask_init, realloc, after], **trainer_kwargs(tmp_path))
    trainer.fit(module, random_loader())
    assert realloc.num_updates == 2
    assert after.checked >= 2
    assert masked_positions_are_zero(module, mask_init.masks, trainer.optimizers) == []


class InfGradAtStep(L.Callback):
    """Makes one sparse gradient infinite at ``step`` (on_after_backward) and repairs it after the updaters ran."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == self.step:
            pl_module.net.conv2.weight.grad[0, 0, 0, 0] = math.inf

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # after MaskInit in the list
        for param in pl_module.parameters():
            if param.grad is not None:
                param.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def test_non_finite_gradients_skip_the_update_and_are_counted(tmp_path):
    _, module, _, realloc, recorder = _fit(
        tmp_path, "rigl", every_n_steps=2, stop_at=1.0, extra=[InfGradAtStep(4)]
    )
    assert recorder.change_steps() == [2, 6]
    assert realloc.num_skipped_nonfinite == 1 and realloc.num_updates == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_gradient_accumulation_updates_at_optimizer_step_multiples(tmp_path):
    # 8 batches per epoch, 2 per optimizer step: 4 steps per epoch, 8 in all; every 2 steps -> 2, 4, 6.
    _, _, _, realloc, recorder = _fit(
        tmp_path, "dsr", every_n_steps=2, stop_at=1.0, max_epochs=2, accumulate_grad_batches=2
    )
    assert recorder.steps == list(range(8))
    assert recorder.change_steps() == [2, 4, 6]
    assert realloc.num_updates == 3


@pytest.mark.parametrize("method", ["dsr", "set", "rigl"])
def test_the_order_of_the_callbacks_does_not_matter(tmp_path, method):
    results = []
    for order in ("mask_init_first", "realloc_first"):
        _, module, mask_init, realloc, recorder = _fit(
            tmp_path, method, callbacks_order=order, every_n_steps=2, stop_at=1.0
        )
        assert realloc.num_updates == 3
        weights = torch.cat([p.detach().flatten() for p in module.parameters()])
        results.append((mask_init.masks.fingerprint(), weights, realloc.threshold, recorder.change_steps()))
    assert results[0][0] == results[1][0]
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][2:] == results[1][2:]


class SaveAfterFirstEpoch(L.Callback):
    def __init__(self, path) -> None:
        self.path = path

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 0:
            trainer.save_checkpoint(self.path)


@pytest.mark.parametrize("method", ["dsr", "set", "rigl"])
def test_resume_continues_exactly(tmp_path, method):
    # every_n_steps=3 puts an update (step 9) just after the resume point (step 8) and one (step 6) before it.
    settings = dict(every_n_steps=3, stop_at=1.0, max_epochs=2)
    checkpoint = tmp_path / "epoch0.ckpt"
    _, straight_module, straight_masks, straight, _ = _fit(
        tmp_path / "a", method, extra=[SaveAfterFirstEpoch(checkpoint)], **settings
    )
    assert straight.num_updates == 5

    L.seed_everything(123)  # the checkpoint, not the seeds, must decide everything
    resumed_module = Classifier()
    resumed_masks = MaskInit(sparsity=0.8, seed=99)
    resumed = DynamicReallocation(method, **{**METHOD_KWARGS[method], "seed": 7}, every_n_steps=3, stop_at=1.0)
    trainer = L.Trainer(callbacks=[resumed_masks, resumed], **trainer_kwargs(tmp_path / "b", max_epochs=2))
    trainer.fit(resumed_module, random_loader(), ckpt_path=checkpoint)

    assert resumed.num_updates == straight.num_updates
    assert resumed.threshold == straight.threshold
    assert resumed.itop_rate == straight.itop_rate
    assert resumed_masks.masks.fingerprint() == straight_masks.masks.fingerprint()
    for (name, a), (_, b) in zip(straight_module.state_dict().items(), resumed_module.state_dict().items()):
        assert torch.equal(a, b), name
    for name, ever in straight.ever_active.items():
        assert torch.equal(ever, resumed.ever_active[name])


def test_state_dict_holds_threshold_counters_generator_and_ever_active(tmp_path):
    _, _, mask_init, realloc, _ = _fit(tmp_path, "dsr", every_n_steps=2, stop_at=1.0)
    state = realloc.state_dict()
    assert state["threshold"] == realloc.threshold and state["num_updates"] == 3
    assert isinstance(state["generator_state"], torch.Tensor)
    assert "ever_active" not in state  # the masks keep it, so every mask change counts (MaskInit's state)
    assert set(mask_init.state_dict()["ever_active"]) == set(mask_init.masks)
    fresh = DynamicReallocation("dsr", seed=5)
    fresh.load_state_dict(state)
    assert fresh.threshold == realloc.threshold
    assert torch.equal(fresh._generator.get_state(), realloc._generator.get_state())
    with pytest.raises(ValueError, match="method='dsr'.*same method"):
        DynamicReallocation("set").load_state_dict(state)


def test_itop_rate_counts_every_position_that_was_ever_active(tmp_path):
    _, _, mask_init, realloc, _ = _fit(tmp_path, "set", every_n_steps=2, stop_at=1.0, max_epochs=2)
    masks = mask_init.masks
    ever = realloc.ever_active
    assert all(torch.equal(ever[name] | masks[name], ever[name]) for name in masks)
    expected = sum(int(mask.sum()) for mask in ever.values()) / masks.numel()
    assert realloc.itop_rate == pytest.approx(expected)
    assert realloc.itop_rate > masks.density()


class HoldBudgetUntil(L.Callback):
    """A stand-in for a density schedule: holds the mask budget for steps < ``until``."""

    def __init__(self, until: int) -> None:
        self.until = until

    def setup(self, trainer, pl_module, stage):
        find_mask_owner(trainer, "HoldBudgetUntil").register_topology_updater(self._update, order=0)

    def _update(self, trainer, pl_module):
        masks = find_mask_owner(trainer, "HoldBudgetUntil").masks
        if trainer.global_step < self.until:
            masks.hold_budget("HoldBudgetUntil")
        else:
            masks.release_budget("HoldBudgetUntil")


def test_updates_stand_aside_while_another_callback_holds_the_budget(tmp_path):
    _, _, _, realloc, recorder = _fit(
        tmp_path, "set", every_n_steps=2, stop_at=1.0, extra=[HoldBudgetUntil(5)]
    )
    assert recorder.change_steps() == [6]
    assert realloc.num_skipped_held == 2 and realloc.num_updates == 1


class WithUnusedLayer(TinyCNN):
    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(16, 16, bias=False)


def test_rigl_leaves_a_tensor_without_gradient_unchanged(tmp_path):
    L.seed_everything(0)
    module = Classifier(net=WithUnusedLayer())
    mask_init = MaskInit(sparsity=0.8, seed=0)
    realloc = DynamicReallocation("rigl", every_n_steps=2, stop_at=1.0)
    before = BeforeUpdate()
    trainer = L.Trainer(callbacks=[before, mask_init, realloc], **trainer_kwargs(tmp_path, max_steps=3))
    trainer.fit(module, random_loader())
    assert realloc.num_updates == 1
    assert torch.equal(mask_init.masks["net.unused.weight"], before.masks["net.unused.weight"])
    assert not torch.equal(mask_init.masks["net.conv2.weight"], before.masks["net.conv2.weight"])


def test_reallocation_curves_reach_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    logger = TensorBoardLogger(tmp_path, name="tb")
    _, _, _, realloc, _ = _fit(
        tmp_path, "dsr", every_n_steps=2, stop_at=1.0, logger=logger, log_every_n_steps=1
    )
    assert len(list(Path(logger.log_dir).glob("events.out.tfevents.*"))) == 1  # one run, one event file
    accumulator = tensorboard_events(logger.log_dir)
    tags = set(accumulator.Tags()["scalars"])
    expected = {
        "reallocation/threshold",
        "reallocation/pruned",
        "reallocation/grown",
        "reallocation/updates",
        "reallocation/skipped_nonfinite",
        "reallocation/itop_rate",
        "sparsity/density/net.conv1.weight",
        "sparsity/density/net.fc.weight",
    }
    assert expected <= tags, tags
    thresholds = [event.value for event in accumulator.Scalars("reallocation/threshold")]
    assert thresholds[0] == pytest.approx(0.05) and thresholds[-1] == pytest.approx(realloc.threshold)
    assert accumulator.Scalars("reallocation/updates")[-1].value == 3
    assert accumulator.Scalars("reallocation/pruned")[-1].value == realloc.last_pruned


def test_dsr_threshold_follows_the_prune_count(tmp_path):
    # A count target far above what H0 prunes doubles H at every update (Mostafa & Wang 2019, docs/algorithms.md §2a).
    _, _, _, realloc, _ = _fit(tmp_path, "dsr", every_n_steps=2, stop_at=1.0, prune_target=10_000)
    assert realloc.threshold == pytest.approx(0.05 * 2**3)
    assert adapt_threshold(0.05, realloc.last_pruned, 10_000) == 0.1


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(method="magnitude"), ValueError, "method must be one of 'dsr', 'set', 'rigl', got 'magnitude'"),
        (dict(every_n_steps=0), ValueError, "every_n_steps must be >= 1"),
        (dict(every_n_steps=2.5), TypeError, "every_n_steps must be an int or a PeriodSchedule"),
        (dict(stop_at=0.0), ValueError, r"stop_at must be in \(0, 1\]"),
        (dict(stop_at=1.5), ValueError, r"stop_at must be in \(0, 1\]"),
        (dict(prune_target=0), ValueError, r"in \(0, 1\) or a whole count >= 1"),
        (dict(prune_target=2.5), ValueError, r"in \(0, 1\) or a whole count >= 1"),
        (dict(initial_threshold=0.0), ValueError, "H0"),
        (dict(method="set", prune_target=100), ValueError, "does not use prune_target"),
        (dict(method="dsr", drop_fraction=0.2), ValueError, "does not use drop_fraction"),
        (dict(method="rigl", drop_fraction=1.5), ValueError, r"drop_fraction must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        DynamicReallocation(**kwargs)


def test_without_mask_init_fails_before_the_first_step(tmp_path):
    trainer = L.Trainer(callbacks=[DynamicReallocation("dsr")], **trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match="no MaskInit callback: add MaskInit"):
        trainer.fit(Classifier(), random_loader())
    assert trainer.global_step == 0


def test_pickling_keeps_the_generator_state():
    import pickle

    realloc = DynamicReallocation("set", seed=3)
    torch.randperm(10, generator=realloc._generator)
    copy = pickle.loads(pickle.dumps(realloc))
    assert torch.equal(copy._generator.get_state(), realloc._generator.get_state())
    assert torch.equal(torch.randperm(50, generator=copy._generator), torch.randperm(50, generator=realloc._generator))


def test_whole_number_prune_target_from_yaml_is_a_count():
    # YAML/LightningCLI may deliver the paper's Np = 20000 as 20000.0.
    assert DynamicReallocation("dsr", prune_target=20000.0).prune_target == 20000
    assert isinstance(DynamicReallocation("dsr", prune_target=20000.0).prune_target, int)
    assert DynamicReallocation("dsr", prune_target=0.25).prune_target == 0.25
