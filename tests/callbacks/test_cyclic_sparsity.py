"""CyclicSparsitySchedule: target counts per update, exact per-layer ERK counts, grow/prune criteria, hand-over."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from lightning_sparse.callbacks.cyclic_sparsity import CyclicSparsitySchedule
from lightning_sparse.callbacks.mask_init import MaskInit
from lightning_sparse.functional.distributions import layer_densities
from lightning_sparse.masks import MaskOwner, SparseMasks
from tests.helpers import Classifier, random_loader, tensorboard_events, trainer_kwargs


class LayerCountProbe(Callback):
    """After every optimizer step: (the step whose update just ran, per-tensor active counts)."""

    def __init__(self) -> None:
        self.records: list[tuple[int, dict[str, int]]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        owner = next(c for c in trainer.callbacks if isinstance(c, MaskInit))
        self.records.append((trainer.global_step - 1, owner.masks.layer_nnz()))


def _fit(callbacks: list[Callback], tmp_path: Any, **overrides: Any) -> L.Trainer:
    trainer = L.Trainer(callbacks=callbacks, **trainer_kwargs(tmp_path, **overrides))
    trainer.fit(Classifier(), random_loader(n=64, batch_size=8))
    return trainer


@pytest.mark.parametrize("shape", ["cosine", "triangular"])
def test_realised_count_matches_the_target_at_every_update_and_ends_at_the_budget(tmp_path, shape) -> None:
    mask_init = MaskInit(sparsity=0.8, distribution="erk", seed=0)
    # 16 steps; two cycles of 4 steps; an update at every step.
    cyclic = CyclicSparsitySchedule(max_multiplier=3.0, cycles=2, cycle_length=0.25, shape=shape, every_n_steps=1)
    probe = LayerCountProbe()
    _fit([mask_init, cyclic, probe], tmp_path, max_epochs=2)

    budget = cyclic.budget
    numel = mask_init.masks.numel()
    shapes = {name: tuple(mask.shape) for name, mask in mask_init.masks.items()}
    # By hand: position p = (t mod 4) / 4; cosine m(p) = 1 + 2 (1 - cos 2 pi p) / 2, triangular 1 + 2 (1 - |2p - 1|).
    multipliers = [1, 2, 3, 2]  # at p = 0, 1/4, 1/2, 3/4, for both shapes
    assert cyclic.cycle_steps == [4, 4]
    for step, layer_counts in probe.records:
        target = budget * multipliers[step % 4] if step < 8 else budget
        assert sum(layer_counts.values()) == target, step
        # Each tensor holds its ERK share of the target, to within one weight.
        densities = layer_densities(shapes, 1 - target / numel, "erk")
        for name, count in layer_counts.items():
            assert abs(count - densities[name] * mask_init.masks.numel(name)) <= 1, (step, name)
    assert cyclic.finished and mask_init.masks.nnz() == budget
    # Updates at steps 1-7 and the return to the budget at step 8.
    assert cyclic.num_updates == 8 and cyclic.last_update_step == 8


class _Owner(MaskOwner):
    """Stands in for MaskInit in unit tests: holds the masks and MaskInit's distribution settings."""

    def __init__(self, masks: SparseMasks) -> None:
        self._masks = masks
        self.distribution = "uniform"
        self.power_scale = 1.0
        self.layer_sparsity: dict[str, float] = {}

    @property
    def masks(self) -> SparseMasks:
        return self._masks

    def register_topology_updater(self, updater: Any, order: int) -> None:
        pass


def _one_layer_setup(
    every_n_steps: int = 1, min_active_per_channel: int = 0
) -> tuple[CyclicSparsitySchedule, Any, nn.Linear, SparseMasks]:
    """One 2x4 Linear layer, 2 of 8 weights active; 10 steps, one cycle of 4 steps with peak 2x the budget.

    Without channel safety by default: the by-hand tests check EAST's own rules."""
    layer = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0.0, 0.0, -0.2], [0.0, 0.0, 0.0, 0.0]]))
    masks = SparseMasks({"weight": layer.weight}, {"weight": layer.weight != 0})
    trainer = SimpleNamespace(
        callbacks=[_Owner(masks)],
        estimated_stepping_batches=10,
        num_training_batches=10,
        accumulate_grad_batches=1,
        global_step=0,
    )
    cyclic = CyclicSparsitySchedule(
        max_multiplier=2.0,
        cycles=1,
        cycle_length=0.4,
        every_n_steps=every_n_steps,
        min_active_per_channel=min_active_per_channel,
    )
    cyclic.setup(trainer, layer, "fit")  # type: ignore[arg-type]
    cyclic.on_train_start(trainer, layer)  # type: ignore[arg-type]
    return cyclic, trainer, layer, masks


def _step(cyclic: CyclicSparsitySchedule, trainer: Any, layer: nn.Linear, step: int, grad: list[float]) -> None:
    trainer.global_step = step
    layer.weight.grad = torch.tensor(grad).view(2, 4)
    cyclic._update(trainer, layer)  # what MaskInit calls before masking the gradients


_CYCLE_GRADIENTS = {
    1: [9.0, 0.1, 0.3, 9.0, 0.2, -0.4, -0.9, 0.5],
    2: [0.0, 0.1, -0.7, 0.0, 0.2, 0.3, 5.0, 0.8],
    3: [0.0] * 8,
    4: [0.0] * 8,
}


def _active(masks: SparseMasks) -> list[int]:
    return masks["weight"].flatten().nonzero().flatten().tolist()


def _run_cycle(cyclic: CyclicSparsitySchedule, trainer: Any, layer: nn.Linear) -> tuple[list[list[int]], list[Tensor]]:
    """Steps 1 to 4 of the one-layer cycle (targets 3, 4, 3, then the budget 2) with :data:`_CYCLE_GRADIENTS`;
    weight 7 is set to 0.05 before step 3. Returns the active positions and the weights after each step."""
    masks = cyclic._masks()
    active, weights = [], []
    for step, grad in _CYCLE_GRADIENTS.items():
        if step == 3:
            with torch.no_grad():
                layer.weight.view(-1)[7] = 0.05
        _step(cyclic, trainer, layer, step, grad)
        active.append(_active(masks))
        weights.append(layer.weight.detach().flatten().clone())
    return active, weights


def test_grows_by_gradient_magnitude_and_prunes_by_weight_magnitude_by_hand() -> None:
    cyclic, trainer, layer, masks = _one_layer_setup()
    assert cyclic.budget == 2 and cyclic.cycle_steps == [4] and cyclic.holds_budget
    active, weights = _run_cycle(cyclic, trainer, layer)
    # Step 1: p = 1/4, target 2 x 1.5 = 3: grow the inactive position with the largest |grad| (index 6).
    assert active[0] == [0, 3, 6] and weights[0][6] == 0.0
    # Step 2: p = 1/2, target 4: grow index 7 (|0.8| beats |-0.7|).
    assert active[1] == [0, 3, 6, 7]
    # Step 3: p = 3/4, target 3: prune the smallest |w| among the active (the grown weights are still 0: index 6).
    assert active[2] == [0, 3, 7]
    # Step 4: the cycle is over: back to exactly the budget (prune |0.05|), and the hold ends.
    assert active[3] == [0, 3] and cyclic.finished and not cyclic.holds_budget
    # Afterwards the schedule never changes the masks.
    _step(cyclic, trainer, layer, 5, [1.0] * 8)
    assert _active(masks) == [0, 3] and cyclic.num_updates == 4


def test_channel_floor_keeps_a_channels_last_weight_when_pruning_back_to_the_budget() -> None:
    """The same cycle with min_active_per_channel=1 (and the default channel-normalised growth), by hand.

    Output channel 0 is positions 0-3, channel 1 is 4-7."""
    cyclic, trainer, layer, masks = _one_layer_setup(min_active_per_channel=1)
    assert cyclic.growth_rule == "channel_normalized"
    active, _ = _run_cycle(cyclic, trainer, layer)
    # Step 1: scores |g| / channel mean over candidates: channel 0 (1, 2): 0.5, 1.5; channel 1 (4-7, mean 0.5):
    # 0.4, 0.8, 1.8, 1.0 -> grow 6.
    assert active[0] == [0, 3, 6]
    # Step 2: channel 0 (1, 2; mean 0.4): 0.25, 1.75; channel 1 (4, 5, 7; mean 0.433): 0.46, 0.69, 1.85 -> grow 7.
    assert active[1] == [0, 3, 6, 7]
    # Step 3 (weight 7 now 0.05): target 3: each channel's largest weight (0 and 7) is protected; drop the smallest
    # other, 6 (|0|).
    assert active[2] == [0, 3, 7]
    # Step 4: back to the budget, 2: without the floor 7 (|0.05|) would go and empty channel 1; 3 (|-0.2|) goes.
    assert active[3] == [0, 7] and cyclic.finished


def test_update_with_non_finite_gradients_is_skipped_and_counted() -> None:
    cyclic, trainer, layer, masks = _one_layer_setup()
    before = masks["weight"].clone()
    _step(cyclic, trainer, layer, 1, [math.nan] + [0.0] * 7)
    assert torch.equal(masks["weight"], before) and cyclic.num_skipped_nonfinite == 1
    # The return to the budget waits for finite gradients.
    _step(cyclic, trainer, layer, 4, [math.inf] * 8)
    assert not cyclic.finished and cyclic.holds_budget
    _step(cyclic, trainer, layer, 5, [0.0] * 8)
    assert cyclic.finished and masks.nnz() == 2


def test_updates_only_every_n_steps_inside_the_cycles() -> None:
    cyclic, trainer, layer, masks = _one_layer_setup(every_n_steps=2)
    _step(cyclic, trainer, layer, 1, [1.0] * 8)
    assert masks.nnz() == 2 and cyclic.num_updates == 0
    _step(cyclic, trainer, layer, 2, [1.0] * 8)
    assert masks.nnz() == 4 and cyclic.num_updates == 1


def test_holds_the_mask_budget_during_the_cycles_and_releases_it_after() -> None:
    cyclic, trainer, layer, masks = _one_layer_setup()
    _step(cyclic, trainer, layer, 1, [1.0] * 8)
    assert masks.budget_holder == "CyclicSparsitySchedule"
    _step(cyclic, trainer, layer, 4, [1.0] * 8)
    assert masks.budget_holder is None


def test_int_cycle_length_is_epochs_and_curves_go_to_tensorboard(tmp_path) -> None:
    cyclic = CyclicSparsitySchedule(cycles=2, cycle_length=1, length_multiplier=0.5, every_n_steps=2)
    logger = TensorBoardLogger(str(tmp_path), name="tb")
    _fit([MaskInit(sparsity=0.8, seed=0), cyclic], tmp_path, max_epochs=2, logger=logger, log_every_n_steps=1)
    assert cyclic.cycle_steps == [8, 4]  # 8 steps per epoch; the second cycle is half as long
    events = tensorboard_events(logger.log_dir)
    tags = set(events.Tags()["scalars"])
    assert {"cyclic/target_density", "cyclic/realised_density", "cyclic/multiplier"} <= tags
    targets = [event.value for event in events.Scalars("cyclic/target_density")]
    realised = [event.value for event in events.Scalars("cyclic/realised_density")]
    assert targets == pytest.approx(realised) and max(targets) > min(targets)


def test_state_dict_round_trip() -> None:
    cyclic, trainer, layer, _ = _one_layer_setup()
    _step(cyclic, trainer, layer, 1, [1.0] * 8)
    state = cyclic.state_dict()
    assert state["budget"] == 2 and state["cycle_steps"] == [4] and state["last_target_nnz"] == 3
    restored = CyclicSparsitySchedule(max_multiplier=2.0, cycles=1, cycle_length=0.4)
    restored.load_state_dict(state)
    assert restored.budget == 2 and restored.num_updates == 1 and not restored.finished


def test_without_mask_init_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="no MaskInit"):
        _fit([CyclicSparsitySchedule()], tmp_path, max_steps=1)


def test_peak_above_the_tensor_size_is_an_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="lower max_multiplier"):
        _fit([MaskInit(sparsity=0.5, seed=0), CyclicSparsitySchedule(max_multiplier=3.0)], tmp_path, max_steps=2)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_multiplier": 0.5}, ValueError),
        ({"cycles": 0}, ValueError),
        ({"cycles": 2.0}, TypeError),
        ({"cycle_length": 0.0}, ValueError),
        ({"cycle_length": 1.5}, ValueError),
        ({"length_multiplier": 0.0}, ValueError),
        ({"shape": "sine"}, ValueError),
        ({"every_n_steps": 0}, ValueError),
        ({"distribution": "gaussian"}, ValueError),
    ],
)
def test_bad_arguments(kwargs, error) -> None:
    with pytest.raises(error):
        CyclicSparsitySchedule(**kwargs)
