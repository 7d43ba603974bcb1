r"""
CyclicSparsitySchedule
^^^^^^^^^^^^^^^^^^^^^^

Lets the number of active weights rise above the budget and fall back in cycles (EAST, docs/algorithms.md §3e).
"""

from __future__ import annotations

import warnings
from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_sparse._validation import CycleShape, Distribution, GrowthRule, check_choice, check_int, check_real
from lightning_sparse.callbacks._progress import check_schedule_point, run_length, schedule_point_to_step
from lightning_sparse.callbacks._topology_updater import TopologyUpdater, check_channel_safety
from lightning_sparse.functional.channels import feasible_floor
from lightning_sparse.functional.criteria import gradient_grow, magnitude_drop
from lightning_sparse.functional.cyclic import cycle_lengths, cycle_position, cyclic_density
from lightning_sparse.functional.distributions import active_counts, layer_densities
from lightning_sparse.masks import SparseMasks

__all__ = ["CyclicSparsitySchedule"]


class CyclicSparsitySchedule(TopologyUpdater):
    r"""EAST's cyclic sparsity: grow above the active-weight budget and prune back to it, ``cycles`` times.

    docs/algorithms.md §3e (Li et al. 2024). The budget B is the number of active weights when training starts (as
    MaskInit drew them; under weight sharing MaskInit has already applied EAST's budget rule). Inside cycle c, at
    position p in [0, 1), the target is ``round(B x m(p))`` active weights with
    ``m(p) = 1 + (max_multiplier - 1) x (1 - cos 2 pi p) / 2`` (``shape="cosine"``) or
    ``1 + (max_multiplier - 1) x (1 - |2p - 1|)`` (``"triangular"``): it rises from B to ``max_multiplier x B``
    at mid-cycle and returns to B, so the network grows for the first half of each cycle and is pruned in the second.

    Every ``every_n_steps`` optimizer steps inside the cycles, the target total is shared among the sparse tensors
    with MaskInit's distribution (ERK by default; ``layer_densities`` at the target density, then exact whole
    counts summing to the target), and each tensor is brought to exactly its count: a tensor below its count grows
    the inactive positions with the largest dense-gradient magnitude (new weights start at 0 with zero optimizer
    state), a tensor above it keeps its largest-magnitude weights. The realised count therefore equals the target
    at every update. At the first optimizer step at or after the end of the last cycle the masks are brought back to
    exactly B with the same rule, and the schedule stops; :class:`DynamicReallocation` then runs at the budget.

    During the cycles the schedule holds the mask budget (``SparseMasks.hold_budget``, when the masks offer it),
    so that count-preserving reallocation stands aside until the budget has been restored. :attr:`holds_budget`
    tells whether it does.

    The updates run inside MaskInit's ``on_before_optimizer_step`` before the gradients are masked (docs/architecture.md
    §4), so growth reads the dense, DDP-averaged gradient whatever the order of the callbacks list; an update whose
    gradients are not all finite is skipped and counted (a pending return to the budget is retried at the next
    step). Ties are broken by position, so every DDP rank computes the same masks; rank 0's are broadcast as a
    safety net. Logged (TensorBoard by default): ``cyclic/target_density``, ``cyclic/realised_density`` (both over
    the real sparse tensors), ``cyclic/multiplier``, ``cyclic/updates``, ``cyclic/skipped_nonfinite``.

    Channel safety (on by default; docs/troubleshooting.md): prunes keep ``min_active_per_channel`` weights in every
    output channel and growth ranks positions with ``growth_rule``, so that BatchNorm-inflated gradients of empty
    channels do not capture the growth phase. ``min_active_per_channel=0`` gives the authors' rules exactly.

    Choices where the authors' code is ambiguous (docs/algorithms.md §3h): the target is a count over the real sparse
    tensors, the same units as the ERK allocation, instead of the code's comparison of an ERK target with an
    "effective" density that counts shared weights once per use (§3h item 4); each tensor goes exactly to its ERK
    count (the code only grows, or only prunes, all tensors at once, which lets the total drift from the target);
    the per-layer floor is one active weight rather than the code's undefined ``min_density`` (§3h item 3); cycle
    lengths follow ``length_multiplier`` (the latest code's 1.0 by default; an earlier version doubled them, §3h
    item 5).

    Args:
        max_multiplier: peak target as a multiple of the budget (EAST: 3.0), ``>= 1``.
        cycles: number of cycles (EAST: 2), ``>= 1``.
        cycle_length: length of the first cycle: an int number of epochs or a float fraction of the total optimizer
            steps (EAST: 50 of 250 epochs, ``0.2``).
        length_multiplier: each later cycle is this many times longer than the one before (EAST: 1.0).
        shape: ``"cosine"`` (EAST's default) or ``"triangular"``.
        every_n_steps: optimizer steps between updates inside the cycles (the authors' code default: 100).
        distribution: ``"erk"``, ``"er"`` or ``"uniform"``; ``None`` uses MaskInit's.
        power_scale: exponent of the ER/ERK scores; ``None`` uses MaskInit's.
        min_active_per_channel: channel safety (docs/troubleshooting.md): a prune keeps the
            ``min_active_per_channel`` largest-``|w|`` weights of every output channel (dim 0 of a sparse tensor), so
            it never empties a channel; where a tensor's target count leaves too few weights above the floor, the
            floor is lowered for that tensor and update only as far as the count requires. ``0`` turns channel
            safety off and restores EAST's rules exactly, growth included. Default 1.
        growth_rule: how growth ranks positions: ``"global"`` (largest ``|grad|`` over the tensor, EAST's code),
            ``"channel_normalized"`` or ``"channel_capped"`` (see
            :data:`~lightning_sparse.functional.channels.GROWTH_RULES`). ``None``: ``"channel_normalized"`` when
            ``min_active_per_channel > 0``, ``"global"`` when it is 0.

    Raises:
        TypeError: at construction, for an argument of the wrong type.
        ValueError: at construction, for an argument out of range; at the start of training, when the run's length is
            unknown or the peak target exceeds the sparse tensors' size.
        RuntimeError: in ``setup``, if the Trainer has no MaskInit.

    Example::

        trainer = Trainer(max_epochs=250, callbacks=[
            MaskInit(sparsity=0.999, distribution="erk"),
            CyclicSparsitySchedule(max_multiplier=3.0, cycles=2, cycle_length=0.2, every_n_steps=100),
            DynamicReallocation(method="rigl", every_n_steps=4000, stop_at=1.0, drop_fraction=0.5),
        ])
    """

    _ORDER = 0  # before count-preserving reallocation (DynamicReallocation registers with order 10)
    _LOG_PREFIX = "cyclic"
    _COUNTERS = {
        **TopologyUpdater._COUNTERS,
        "num_skipped_missing_grad": int,
        "last_target_nnz": int,
        "last_realised_nnz": int,
    }

    num_updates: int
    """Updates that ran (the final return to the budget included)."""

    def __init__(
        self,
        max_multiplier: float = 3.0,
        cycles: int = 2,
        cycle_length: int | float = 0.2,
        length_multiplier: float = 1.0,
        shape: CycleShape = "cosine",
        every_n_steps: int = 100,
        distribution: Distribution | None = None,
        power_scale: float | None = None,
        min_active_per_channel: int = 1,
        growth_rule: GrowthRule | None = None,
    ) -> None:
        super().__init__()
        self.max_multiplier = check_real(
            max_multiplier, "max_multiplier", low=1.0, what=" (the peak as a multiple of the budget)"
        )
        self.cycles = check_int(cycles, "cycles", minimum=1)
        self.every_n_steps = check_int(every_n_steps, "every_n_steps", minimum=1)
        self.cycle_length = check_schedule_point(cycle_length, "cycle_length", allow_zero=False)
        self.length_multiplier = check_real(length_multiplier, "length_multiplier", low=0.0, low_open=True)
        self.shape = check_choice(shape, "shape", CycleShape)
        self.distribution = None if distribution is None else check_choice(distribution, "distribution", Distribution)
        self.power_scale = None if power_scale is None else check_real(power_scale, "power_scale", low=0.0)
        self.min_active_per_channel, self.growth_rule = check_channel_safety(min_active_per_channel, growth_rule)

        self._lengths: list[int] = []
        self._budget: int | None = None
        self._finished = False
        self.num_skipped_missing_grad = 0
        """Updates skipped because a tensor that had to grow had no gradient."""
        self.last_target_nnz = 0
        self.last_realised_nnz = 0
        self._numel = 0

    # ----------------------------------------------------------------------------------------------- public
    @property
    def budget(self) -> int | None:
        """The base active-weight count B (set at the start of training)."""
        return self._budget

    @property
    def cycle_steps(self) -> list[int]:
        """The cycles' lengths in optimizer steps (set at the start of training)."""
        return list(self._lengths)

    @property
    def finished(self) -> bool:
        """Whether the cycles are over and the budget has been restored."""
        return self._finished

    @property
    def holds_budget(self) -> bool:
        """Whether the schedule owns the active-weight count now.

        True from the start of training through the cycles until the budget has been restored after them;
        count-preserving updaters (DynamicReallocation) must not change the masks meanwhile.
        """
        return bool(self._lengths) and not self._finished

    def target_nnz(self, step: int) -> int:
        """The target active count at optimizer step ``step`` (the budget outside the cycles).

        Raises:
            RuntimeError: before the start of training.
        """
        if self._budget is None:
            raise RuntimeError(
                "CyclicSparsitySchedule sets its budget at the start of training; call trainer.fit first"
            )
        position = cycle_position(step, self._lengths)
        if position is None:
            return self._budget
        d_min = self._budget / self._numel
        density = cyclic_density(position[1], d_min, min(d_min * self.max_multiplier, 1.0), self.shape)
        return min(round(density * self._numel), self._numel)

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Place the cycles in optimizer steps and take the budget (unless restored from a checkpoint)."""
        super().on_train_start(trainer, pl_module)
        total, per_epoch = run_length(trainer, type(self).__name__)
        first = max(schedule_point_to_step(self.cycle_length, total, per_epoch), 1)
        self._lengths = cycle_lengths(first, self.cycles, self.length_multiplier)
        masks = self._masks()
        self._numel = masks.numel()
        if self._budget is None:
            self._budget = masks.nnz()
            self.last_target_nnz = self.last_realised_nnz = self._budget
        peak = round(self._budget * self.max_multiplier)
        if peak > self._numel:
            raise ValueError(
                f"CyclicSparsitySchedule: the peak target {self.max_multiplier} x {self._budget} = {peak} active weights "
                f"exceeds the {self._numel} weights of the sparse tensors; lower max_multiplier or raise the sparsity"
            )
        rank_zero_info(
            f"CyclicSparsitySchedule: budget {self._budget:,} active weights, cycles of {self._lengths} steps "
            f"(of {total}), peak x{self.max_multiplier}, updates every {self.every_n_steps} steps"
        )

    @override
    def _metrics(self) -> dict[str, float]:
        """The target and realised densities and the counters."""
        if not self._numel:
            return {}
        return {
            "cyclic/target_density": self.last_target_nnz / self._numel,
            "cyclic/realised_density": self.last_realised_nnz / self._numel,
            "cyclic/multiplier": self.last_target_nnz / self._budget if self._budget else 1.0,
            "cyclic/updates": float(self.num_updates),
            "cyclic/skipped_nonfinite": float(self.num_skipped_nonfinite),
        }

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Budget, cycle lengths, counters and whether the cycles are over."""
        return {
            "budget": self._budget,
            "cycle_steps": list(self._lengths),
            "finished": self._finished,
            **super().state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved (the cycles are placed again from the Trainer at the start)."""
        budget = state_dict.get("budget")
        self._budget = None if budget is None else int(budget)
        self._finished = bool(state_dict["finished"])
        super().load_state_dict(state_dict)

    # ------------------------------------------------------------------------------------------- the update
    @override
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Topology updater, called by MaskInit once per optimizer step with dense gradients, before masking."""
        masks = self._masks()
        if self._finished:
            masks.release_budget(type(self).__name__)
            return
        # Re-asserted at every step from this callback's own state, so the hold needs no checkpointing.
        masks.hold_budget(type(self).__name__)
        step = trainer.global_step
        in_cycles = step < sum(self._lengths)
        if in_cycles and (step == 0 or step % self.every_n_steps != 0):
            return
        if not self._gradients_finite(masks, step):
            return
        target = self.target_nnz(step)
        new_masks = self._masks_for(masks, target)
        if new_masks is None:
            self.num_skipped_missing_grad += 1
            warnings.warn(
                f"CyclicSparsitySchedule: skipped the update at step {step}: a tensor that had to grow has no gradient "
                "(is every sparse layer used in the forward pass?)",
                RuntimeWarning,
                stacklevel=2,
            )
            return
        if new_masks:
            masks.update_(new_masks, expected_nnz=target)
        masks.broadcast_(src=0)
        self.num_updates += 1
        self.last_update_step = step
        self.last_target_nnz = target
        self.last_realised_nnz = masks.nnz()
        if not in_cycles:
            self._finished = True
            masks.release_budget(type(self).__name__)

    def _masks_for(self, masks: SparseMasks, target: int) -> dict[str, Tensor] | None:
        """Each tensor brought to its share of ``target`` (``None`` if a tensor to grow has no gradient)."""
        counts = self._layer_counts(masks, target)
        current = masks.layer_nnz()
        params = masks.parameters
        new_masks: dict[str, Tensor] = {}
        for name, count in counts.items():
            difference = count - current[name]
            if difference > 0:
                grad = params[name].grad
                if grad is None:
                    return None
                new_masks[name] = gradient_grow(grad, masks[name], difference, rule=self.growth_rule)
            elif difference < 0:
                floor = feasible_floor(masks[name], -difference, self.min_active_per_channel)
                new_masks[name] = magnitude_drop(params[name].detach(), masks[name], -difference, floor)
        return new_masks

    def _layer_counts(self, masks: SparseMasks, target: int) -> dict[str, int]:
        """Whole per-tensor counts, summing exactly to ``target``, from MaskInit's distribution at that density."""
        shapes = {name: tuple(mask.shape) for name, mask in masks.items()}
        settings = _distribution_settings(self._owner)
        distribution = self.distribution or settings["distribution"]
        power_scale = settings["power_scale"] if self.power_scale is None else self.power_scale
        fixed = {
            name: 1.0 - value
            for pattern, value in settings["layer_sparsity"].items()
            for name in shapes
            if fnmatchcase(name, pattern)
        }
        # Frozen tensors (included by a pattern) keep their count: nothing grown into them could ever train.
        current = masks.layer_nnz()
        frozen = [name for name, param in masks.parameters.items() if not param.requires_grad]
        fixed.update({name: current[name] / masks.numel(name) for name in frozen})
        densities = layer_densities(
            shapes, 1.0 - target / self._numel, distribution, power_scale=power_scale, fixed_densities=fixed
        )
        counts = active_counts(shapes, densities, total=target)
        for name in frozen:  # guard the rounding: a frozen tensor's count never changes
            counts[name] = current[name]
        return counts


def _distribution_settings(owner: Any) -> dict[str, Any]:
    """MaskInit's distribution, power scale and per-layer sparsities (its public attributes)."""
    return {
        "distribution": owner.distribution,
        "power_scale": owner.power_scale,
        "layer_sparsity": dict(owner.layer_sparsity),
    }
