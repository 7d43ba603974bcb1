"""Channel safety in the Trainer: with the floor on, no topology update raises the number of empty output channels;
with ``min_active_per_channel=0`` the callbacks apply the published rules exactly."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from lightning_sparse.callbacks import CyclicSparsitySchedule, DynamicReallocation, MaskInit
from lightning_sparse.functional.channels import empty_channels
from lightning_sparse.functional.criteria import cosine_drop_fraction, rigl_update, set_update
from lightning_sparse.functional.dsr import dsr_reallocate
from tests.helpers import Classifier, random_loader, trainer_kwargs

SPARSITY = 0.97  # TinyCNN keeps about 2 weights per output channel: empty channels appear at the first updates


class EmptyChannelsAtUpdates(L.Callback):
    """(empty channels before, after) for every optimizer step at which the masks changed."""

    def __init__(self, mask_init: MaskInit) -> None:
        self.mask_init = mask_init
        self.version = -1
        self.count = -1
        self.changes: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        masks = self.mask_init.masks
        count = sum(int(empty_channels(mask)) for mask in masks.values())
        if self.version >= 0 and masks.version != self.version:
            self.changes.append((self.count, count))
        self.version, self.count = masks.version, count

    def on_train_start(self, trainer, pl_module):
        self.version = self.mask_init.masks.version
        self.count = sum(int(empty_channels(mask)) for mask in self.mask_init.masks.values())


def _run(tmp_path, updaters, epochs: int = 2) -> EmptyChannelsAtUpdates:
    L.seed_everything(0)
    mask_init = MaskInit(sparsity=SPARSITY, seed=0, log_layer_densities=False, layer_report=False)
    probe = EmptyChannelsAtUpdates(mask_init)
    trainer = L.Trainer(callbacks=[mask_init, *updaters, probe], **trainer_kwargs(tmp_path, max_epochs=epochs))
    trainer.fit(Classifier(), random_loader(n=96))
    return probe


DSR = dict(initial_threshold=0.05, prune_target=0.2)


@pytest.mark.parametrize(
    "method, kwargs", [("dsr", DSR), ("set", dict(drop_fraction=0.5)), ("rigl", dict(drop_fraction=0.5))]
)
def test_with_the_floor_no_reallocation_raises_the_empty_channel_count(tmp_path, method, kwargs):
    probe = _run(tmp_path, [DynamicReallocation(method, every_n_steps=2, stop_at=1.0, **kwargs)])
    assert len(probe.changes) >= 5
    assert all(after <= before for before, after in probe.changes), probe.changes
    # The same run without the floor empties channels: the setting does test the floor.
    plain = _run(
        tmp_path, [DynamicReallocation(method, every_n_steps=2, stop_at=1.0, min_active_per_channel=0, **kwargs)]
    )
    assert any(after > before for before, after in plain.changes), plain.changes


def test_with_the_floor_no_cyclic_update_raises_the_empty_channel_count(tmp_path):
    def stack(floor: int) -> list[L.Callback]:
        return [
            CyclicSparsitySchedule(
                max_multiplier=3.0, cycles=2, cycle_length=0.3, every_n_steps=2, min_active_per_channel=floor
            ),
            DynamicReallocation("rigl", every_n_steps=2, stop_at=1.0, drop_fraction=0.5, min_active_per_channel=floor),
        ]

    probe = _run(tmp_path, stack(1), epochs=3)
    assert len(probe.changes) >= 8
    assert all(after <= before for before, after in probe.changes), probe.changes
    plain = _run(tmp_path, stack(0), epochs=3)
    assert any(after > before for before, after in plain.changes), plain.changes


class UpdateSnapshots:
    """Registered around DynamicReallocation's updater: what it saw and what it produced at every update."""

    def __init__(self, mask_init: MaskInit, realloc: DynamicReallocation) -> None:
        self.mask_init, self.realloc = mask_init, realloc
        self.records: list[dict] = []
        self._before: dict | None = None

    def before(self, trainer, pl_module) -> None:
        masks = self.mask_init.masks
        params = masks.parameters
        self._before = {
            "step": trainer.global_step,
            "updates": self.realloc.num_updates,
            "weights": {name: params[name].detach().clone() for name in masks},
            "grads": {name: params[name].grad.clone() for name in masks},
            "masks": {name: masks[name].clone() for name in masks},
            "generator": self.realloc._generator.get_state(),
            "threshold": self.realloc.threshold,
        }

    def after(self, trainer, pl_module) -> None:
        if self.realloc.num_updates != self._before["updates"]:
            masks = self.mask_init.masks
            self.records.append({**self._before, "after": {name: masks[name].clone() for name in masks}})


class RegisterSnapshots(L.Callback):
    def __init__(self, snapshots: UpdateSnapshots) -> None:
        self.snapshots = snapshots

    def setup(self, trainer, pl_module, stage):
        self.snapshots.mask_init.register_topology_updater(self.snapshots.before, order=5)
        self.snapshots.mask_init.register_topology_updater(self.snapshots.after, order=15)


def _published_rule(method: str, record: dict, realloc: DynamicReallocation, total_steps: int) -> dict:
    """The pre-channel-safety update, from the functional primitives with their published-rule defaults."""
    names = list(record["masks"])
    weights, grads, masks = record["weights"], record["grads"], record["masks"]
    generator = torch.Generator()
    generator.set_state(record["generator"])
    if method == "dsr":
        nnz = sum(int(mask.sum()) for mask in masks.values())
        result = dsr_reallocate(
            [weights[n] for n in names],
            [masks[n] for n in names],
            record["threshold"],
            round(realloc.prune_target * nnz),
            realloc.tolerance,
            generator,
        )
        return dict(zip(names, result.masks))
    stop = max(round(realloc.stop_at * total_steps), 1)
    new = {}
    for name in names:
        nnz = int(masks[name].sum())
        if method == "rigl":
            fraction = cosine_drop_fraction(record["step"], stop, realloc.drop_fraction)
            new[name] = rigl_update(weights[name], grads[name], masks[name], fraction).mask
        else:
            count = min(math.floor(realloc.drop_fraction * nnz + 1e-9), masks[name].numel() - nnz)
            new[name] = set_update(weights[name], masks[name], count / nnz, generator).mask
    return new


@pytest.mark.parametrize("method, growth_rule", [("dsr", None), ("set", None), ("rigl", None), ("rigl", "global")])
def test_floor_zero_applies_the_published_rules_exactly(tmp_path, method, growth_rule):
    L.seed_everything(0)
    mask_init = MaskInit(sparsity=SPARSITY, seed=0, log_layer_densities=False, layer_report=False)
    extra = {} if growth_rule is None else {"growth_rule": growth_rule}
    kwargs = {"dsr": DSR, "set": dict(drop_fraction=0.5), "rigl": dict(drop_fraction=0.5)}[method]
    realloc = DynamicReallocation(method, every_n_steps=2, stop_at=1.0, min_active_per_channel=0, **kwargs, **extra)
    snapshots = UpdateSnapshots(mask_init, realloc)
    trainer = L.Trainer(
        callbacks=[mask_init, realloc, RegisterSnapshots(snapshots)], **trainer_kwargs(tmp_path, max_epochs=1)
    )
    trainer.fit(Classifier(), random_loader(n=96))
    assert len(snapshots.records) >= 4
    changed = 0
    for record in snapshots.records:
        expected = _published_rule(method, record, realloc, trainer.estimated_stepping_batches)
        for name, mask in record["after"].items():
            assert torch.equal(mask, expected.get(name, record["masks"][name])), (record["step"], name)
            changed += int(not torch.equal(mask, record["masks"][name]))
    assert changed > 0


def test_unused_channel_arguments_are_rejected():
    with pytest.raises(ValueError, match="does not use growth_rule"):
        DynamicReallocation("set", growth_rule="global")
    with pytest.raises(ValueError, match="does not use rounding"):
        DynamicReallocation("dsr", rounding="ceil")
    with pytest.raises(ValueError, match="drop_fraction_floor"):
        DynamicReallocation("rigl", drop_fraction=0.3, drop_fraction_floor=0.5)
    with pytest.raises(ValueError, match="min_active_per_channel"):
        CyclicSparsitySchedule(min_active_per_channel=-1)
    with pytest.raises(TypeError, match="min_active_per_channel"):
        DynamicReallocation("rigl", min_active_per_channel=1.5)
    with pytest.raises(ValueError, match="growth_rule must be one of 'global', 'channel_normalized', 'channel_capped'"):
        CyclicSparsitySchedule(growth_rule="biggest")
    defaults = DynamicReallocation("rigl")
    assert defaults.min_active_per_channel == 1 and defaults.growth_rule == "channel_normalized"
    assert DynamicReallocation("rigl", min_active_per_channel=0).growth_rule == "global"
    assert CyclicSparsitySchedule(min_active_per_channel=0).growth_rule == "global"


def test_east_schedule_after_the_cycles_anneals_to_the_floor_and_rounds_up(tmp_path):
    """EAST's post-cycle DST (docs/algorithms.md §3a, §3e): 0.5 cosine to 0.005 over the whole run, ceil counts."""
    L.seed_everything(0)
    mask_init = MaskInit(sparsity=SPARSITY, seed=0, log_layer_densities=False, layer_report=False)
    realloc = DynamicReallocation(
        "rigl",
        every_n_steps=3,
        stop_at=1.0,
        drop_fraction=0.5,
        drop_fraction_floor=0.005,
        rounding="ceil",
        min_active_per_channel=0,
    )
    snapshots = UpdateSnapshots(mask_init, realloc)
    trainer = L.Trainer(
        callbacks=[mask_init, realloc, RegisterSnapshots(snapshots)], **trainer_kwargs(tmp_path, max_epochs=2)
    )
    trainer.fit(Classifier(), random_loader(n=96))
    total = trainer.estimated_stepping_batches  # 24 steps: updates at 3, 6, ..., 21 (to the end of the run)
    assert [record["step"] for record in snapshots.records] == [3, 6, 9, 12, 15, 18, 21]
    assert realloc.last_drop_fraction == pytest.approx(0.005 + 0.2475 * (1 + math.cos(math.pi * 21 / total)))
    for record in snapshots.records:
        fraction = 0.005 + 0.2475 * (1 + math.cos(math.pi * record["step"] / total))
        for name, mask in record["masks"].items():
            swapped = int((record["after"][name] & ~mask).sum())
            # ceil(f x nnz) grown (fewer only where a dropped position is regrown at once, as in RigL's code).
            assert swapped <= math.ceil(fraction * int(mask.sum()))
        expected = {
            name: rigl_update(record["weights"][name], record["grads"][name], mask, fraction, rounding="ceil").mask
            for name, mask in record["masks"].items()
        }
        assert all(torch.equal(record["after"][name], expected[name]) for name in expected)
