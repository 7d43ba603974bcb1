r"""
TopologyUpdater
^^^^^^^^^^^^^^^

What the callbacks that change MaskInit's masks during training have in common (CyclicSparsitySchedule,
DynamicReallocation): each registers an update with the mask owner at ``setup``, which MaskInit calls from its
``on_before_optimizer_step`` with the dense gradients before it masks them (docs/architecture.md §4); each skips and
counts an update whose gradients are not finite; each logs its curves only when they change; and each keeps its
counters in the Lightning checkpoint. :class:`TopologyUpdater` does that once, in the manner of Lightning's
``BaseFinetuning``: a subclass names its update order, its log prefix and its extra counters, and implements
:meth:`TopologyUpdater._update` and :meth:`TopologyUpdater._metrics`.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from lightning_sparse._validation import GrowthRule, check_choice, check_int
from lightning_sparse.callbacks._log_gate import ChangeGate
from lightning_sparse.callbacks._rank_logging import log_replicated
from lightning_sparse.functional.channels import resolve_growth_rule
from lightning_sparse.masks import MaskOwner, SparseMasks, find_mask_owner

__all__ = ["TopologyUpdater", "check_channel_safety"]


def check_channel_safety(min_active_per_channel: int, growth_rule: GrowthRule | None) -> tuple[int, str]:
    """Validate the channel-safety arguments (docs/troubleshooting.md) and resolve the default growth rule.

    Returns:
        ``(min_active_per_channel, growth_rule)``; a ``None`` rule becomes ``"channel_normalized"`` with a floor and
        ``"global"`` (the published rule) without one.

    Raises:
        TypeError: for a ``min_active_per_channel`` that is not an int.
        ValueError: for a negative ``min_active_per_channel`` or an unknown growth rule.
    """
    min_active = check_int(min_active_per_channel, "min_active_per_channel", minimum=0, what=" (0 turns the floor off)")
    rule = None if growth_rule is None else check_choice(growth_rule, "growth_rule", GrowthRule)
    return min_active, resolve_growth_rule(rule, min_active)


class TopologyUpdater(Callback):
    """Base of the callbacks that change the masks from inside MaskInit's ``on_before_optimizer_step``.

    Subclasses set the class attributes and implement :meth:`_update` (one optimizer step's update, counting
    ``num_updates`` and ``last_update_step`` when it runs) and :meth:`_metrics` (the curves to log).
    """

    _ORDER: ClassVar[int]
    """Where the update runs among the registered ones: lower first (density schedules before reallocation)."""
    _LOG_PREFIX: ClassVar[str]
    """The logged curves' prefix, e.g. ``"reallocation"``."""
    _COUNTERS: ClassVar[dict[str, type]] = {"num_updates": int, "num_skipped_nonfinite": int, "last_update_step": int}
    """Public attributes kept in the checkpoint under their own names, with the type they are restored as."""

    def __init__(self) -> None:
        super().__init__()
        self._owner: MaskOwner | None = None
        self._warned_nonfinite = False
        self._log_gate = ChangeGate()
        self.num_updates = 0
        self.num_skipped_nonfinite = 0
        """Updates skipped because a sparse tensor's gradient was not finite."""
        self.last_update_step = -1
        """The optimizer step of the last update that ran (-1 before the first)."""

    # ------------------------------------------------------------------------------------------ subclasses
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Topology updater, called by MaskInit once per optimizer step with dense gradients, before masking."""
        raise NotImplementedError

    def _metrics(self) -> dict[str, float]:
        """The curves logged after every training batch (host numbers only); empty for nothing to log."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find MaskInit (a clear error if there is none) and register the update with it at this callback's order."""
        if stage != "fit":
            return
        self._owner = find_mask_owner(trainer, type(self).__name__)
        self._owner.register_topology_updater(self._update, order=self._ORDER)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the curves afresh in this fit, whatever was logged before."""
        self._log_gate.reset()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log :meth:`_metrics` when they changed (host-side numbers only: no device sync)."""
        metrics = self._metrics()
        if metrics and self._log_gate.changed(trainer, metrics):
            log_replicated(pl_module, metrics, on_step=True)

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """The counters named in ``_COUNTERS``."""
        return {name: getattr(self, name) for name in self._COUNTERS}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the counters named in ``_COUNTERS``."""
        for name, kind in self._COUNTERS.items():
            setattr(self, name, kind(state_dict[name]))

    # --------------------------------------------------------------------------------------------- helpers
    def _masks(self) -> SparseMasks:
        if self._owner is None:
            raise RuntimeError(f"{type(self).__name__} is set up by Trainer.fit; it has not been set up yet")
        return self._owner.masks

    def _gradients_finite(self, masks: SparseMasks, step: int) -> bool:
        """Whether every sparse tensor's gradient is finite; if not, count the skip and warn the first time."""
        if masks.grads_are_finite():
            return True
        self.num_skipped_nonfinite += 1
        if not self._warned_nonfinite:
            self._warned_nonfinite = True
            warnings.warn(
                f"{type(self).__name__}: skipped the update at step {step}: a sparse tensor's gradient is not finite "
                f"(nan/inf loss?). Further skips are counted in {self._LOG_PREFIX}/skipped_nonfinite without a "
                "warning.",
                RuntimeWarning,
                stacklevel=3,  # MaskInit's hook, which called _update
            )
        return False
