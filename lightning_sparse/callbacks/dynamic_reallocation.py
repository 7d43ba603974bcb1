r"""
DynamicReallocation
^^^^^^^^^^^^^^^^^^^

Moves the active weights of a sparse model during training: DSR (global adaptive threshold, reallocation across
layers), SET (per-layer magnitude drop, random regrowth) or RigL (per-layer magnitude drop, dense-gradient growth).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from numbers import Real
from typing import Any, get_args

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_sparse._validation import GrowthRule, Method, Rounding, check_choice, check_int, check_real, check_seed
from lightning_sparse.callbacks._topology_updater import TopologyUpdater, check_channel_safety
from lightning_sparse.functional.criteria import cosine_drop_fraction, rigl_update, set_update, update_count
from lightning_sparse.functional.dsr import dsr_reallocate
from lightning_sparse.masks import SparseMasks
from lightning_sparse.schedules import ConstantPeriod, PeriodSchedule, should_update

__all__ = ["DynamicReallocation", "METHODS"]

METHODS: tuple[str, ...] = get_args(Method)
"""The topology-update methods of :class:`DynamicReallocation`."""

_DEFAULT_STOP_AT = {"dsr": 0.95, "set": 0.95, "rigl": 0.75}


class DynamicReallocation(TopologyUpdater):
    r"""Prune and regrow the active weights every few optimizer steps, keeping their total fixed.

    Needs a :class:`~lightning_sparse.callbacks.MaskInit` in the same Trainer and changes its masks only through
    :meth:`SparseMasks.update_ <lightning_sparse.masks.SparseMasks.update_>`, so after every update the active count
    equals the count before it (checked), pruned weights and their optimizer state are 0, and grown weights and
    their optimizer state start at 0.

    Methods:

    * ``"dsr"`` (Mostafa & Wang 2019, docs/algorithms.md §2a): prune every active weight with ``|w| < H`` (one global
      threshold H over all sparse tensors; a layer is never emptied), regrow as many weights, shared out in
      proportion to each layer's surviving weights, at random inactive positions not pruned in this update (value
      0); then ``H <- H / 2`` if more than ``(1 + tolerance) x Np`` were pruned, ``H <- 2 H`` if fewer than
      ``(1 - tolerance) x Np``. Per-layer densities drift; the total is fixed.
    * ``"set"`` (Mocanu et al. 2018, docs/algorithms.md §4b): per tensor, drop the fraction ``drop_fraction`` of the
      active weights with the smallest ``|w|`` and regrow as many at random positions that were inactive before
      the update (value 0). A tensor with fewer inactive positions than that replaces only as many as it has (a
      fully dense tensor is left as it is). Per-tensor counts are fixed.
    * ``"rigl"`` (Evci et al. 2020, docs/algorithms.md §4a): per tensor, drop ``f(t) x nnz`` active weights with the
      smallest ``|w|`` and grow the positions with the largest dense-gradient magnitude, where
      ``f(t) = drop_fraction / 2 x (1 + cos(pi t / T_end))`` and ``T_end`` is the ``stop_at`` step. A tensor whose
      gradient is ``None`` at an update step (unused in that step) is left unchanged: there is no gradient to rank
      growth by, and a random fallback would silently turn RigL into SET for that tensor. Per-tensor counts are
      fixed.

    Channel safety (on by default; docs/troubleshooting.md): at extreme sparsity an output channel with no active
    weight feeds zero variance into train-mode BatchNorm, whose backward divides by ``sqrt(var + eps)``; the inflated
    dense gradients of such channels capture RigL's growth while magnitude drop empties more channels, and training
    collapses. With ``min_active_per_channel >= 1`` no update drops a channel's last ``min_active_per_channel``
    weights, and RigL ranks growth with ``growth_rule`` (by default each ``|grad|`` relative to its output channel's
    mean). ``min_active_per_channel=0`` gives the published rules exactly.

    When: updates run at optimizer-step counts ``t = trainer.global_step`` (so gradient accumulation is handled)
    with ``t > 0``, ``t`` a multiple of the period and ``t < stop_at x trainer.estimated_stepping_batches``. They run
    inside MaskInit's ``on_before_optimizer_step`` before the gradients are masked, so they see the dense,
    DDP-averaged, AMP-unscaled gradient whatever the order of the callbacks list (docs/architecture.md §4). An update is
    skipped, and counted, when a sparse tensor's gradient is not finite, and while another callback holds the mask
    budget (:meth:`SparseMasks.hold_budget <lightning_sparse.masks.SparseMasks.hold_budget>`; EAST's cyclic density
    schedule does so during its cycles).

    DDP: random growth draws from a CPU ``torch.Generator`` seeded with ``seed`` on every rank, and the weights and
    gradients are identical on every rank, so ranks compute identical masks on their own. After each update the
    masks are broadcast from rank 0 as a safety net; a correction is counted (``num_rank_corrections``) and warned
    about, since it means something made the ranks diverge.

    Logged through ``pl_module.log`` (TensorBoard by default) on every training batch, so any
    ``log_every_n_steps`` samples them: ``reallocation/threshold`` (DSR's H), ``reallocation/drop_fraction``
    (SET/RigL), ``reallocation/pruned`` and ``reallocation/grown`` (counts at the last update),
    ``reallocation/updates``, ``reallocation/skipped_nonfinite``, ``reallocation/skipped_held`` and
    ``reallocation/itop_rate``: the in-time over-parameterisation rate (Liu et al. 2021), the fraction of
    sparse-tensor positions that have been active at some point of training. Per-tensor densities are logged by
    MaskInit whenever the masks change.

    The threshold, the counters, the generator state and the ever-active masks are in :meth:`state_dict`, so a run
    resumed from a Lightning checkpoint continues exactly.

    Args:
        method: ``"dsr"``, ``"set"`` or ``"rigl"``.
        every_n_steps: the update period in optimizer steps (an int >= 1), or a
            :class:`~lightning_sparse.schedules.PeriodSchedule` such as DSR's stepped period
            ``SteppedPeriod(100, milestones=[0.125, 0.4, 0.7])`` (docs/algorithms.md §2b).
        stop_at: fraction of the total optimizer steps (``trainer.estimated_stepping_batches``) in (0, 1] after
            which the masks are fixed. ``None``: 0.95 for DSR and SET (DSR's runs stop at epoch 190 of 200 and 95
            of 100, docs/algorithms.md §2b), 0.75 for RigL (§4a).
        prune_target: DSR's Np, the number of weights the threshold aims to prune per update: a whole number
            >= 1 is a count, a value in (0, 1) a fraction of the active weights at that update. ``None``: 0.1. (The paper's
            WRN-28-2 runs use Np = 20,000, 0.07 to 0.14 of the active weights at 80% to 90% sparsity.) DSR only.
        initial_threshold: DSR's H0 (> 0). ``None``: 1e-3, as in the paper's code. DSR only.
        tolerance: DSR's delta (>= 0), the band ``[(1 - delta) Np, (1 + delta) Np]`` within which H is kept.
            ``None``: 0.1, as in the paper. DSR only.
        drop_fraction: SET's zeta or RigL's alpha, in (0, 1]. ``None``: 0.3 for both (SET's published default,
            docs/algorithms.md §4b, though DSR's SET baseline used 0.07 to 0.14 at DSR's period; RigL's alpha, §4a).
            SET and RigL only.
        seed: seed of the CPU generator used for random growth and allocation tie-breaks; the same on every rank.
        min_active_per_channel: channel safety (docs/troubleshooting.md): no update drops any of the
            ``min_active_per_channel`` largest-``|w|`` weights of an output channel (dim 0 of a sparse tensor), so an
            update never empties a channel (DSR's threshold prune, SET's and RigL's drop; SET and RigL then replace
            at most the weights above the floor). ``0`` turns channel safety off and restores the published rules
            exactly, RigL's growth included. Default 1.
        growth_rule: how RigL ranks growth positions: ``"global"`` (RigL's largest ``|grad|`` over the tensor),
            ``"channel_normalized"`` (``|grad|`` over its output channel's mean) or ``"channel_capped"`` (at most
            an even share per channel); see
            :data:`~lightning_sparse.functional.channels.GROWTH_RULES`. ``None``: ``"channel_normalized"`` when
            ``min_active_per_channel > 0``, ``"global"`` when it is 0. RigL only.
        drop_fraction_floor: the cosine-annealed fraction decays from ``drop_fraction`` to this value at
            ``stop_at`` instead of to 0 (EAST's code: 0.5 to 0.005 over the whole run, docs/algorithms.md §3e).
            ``None``: 0. RigL only.
        rounding: ``"floor"`` (RigL's and SET's ``floor(f x nnz)``) or ``"ceil"`` (EAST's code, docs/algorithms.md §3a)
            for the number of weights a tensor replaces. ``None``: ``"floor"``. SET and RigL only.

    Raises:
        ValueError: at construction, for an unknown method, ``every_n_steps < 1``, ``stop_at`` outside (0, 1], an
            out-of-range hyperparameter or one the method does not use; at the start of training, for a run
            whose length is unknown (no ``max_epochs``/``max_steps``).
        TypeError: at construction, for an argument of the wrong type.
        RuntimeError: at setup, before the first step, if the Trainer has no MaskInit.

    Example::

        trainer = Trainer(max_epochs=200, callbacks=[
            MaskInit(sparsity=0.9, distribution="uniform"),
            DynamicReallocation("dsr", every_n_steps=SteppedPeriod(100, milestones=[0.125, 0.4, 0.7]),
                                prune_target=20_000),
        ])
    """

    _ORDER = 10  # orders below 10 are left to density schedules (CyclicSparsitySchedule), which run first
    _LOG_PREFIX = "reallocation"
    _COUNTERS = {
        **TopologyUpdater._COUNTERS,
        "num_skipped_held": int,
        "num_rank_corrections": int,
        "last_pruned": int,
        "last_grown": int,
        "last_drop_fraction": float,
    }

    num_updates: int
    """Updates that ran (including DSR updates that pruned nothing)."""

    def __init__(
        self,
        method: Method = "dsr",
        every_n_steps: int | PeriodSchedule = 100,
        stop_at: float | None = None,
        prune_target: int | float | None = None,
        initial_threshold: float | None = None,
        tolerance: float | None = None,
        drop_fraction: float | None = None,
        seed: int = 0,
        min_active_per_channel: int = 1,
        growth_rule: GrowthRule | None = None,
        drop_fraction_floor: float | None = None,
        rounding: Rounding | None = None,
    ) -> None:
        super().__init__()
        self.method = check_choice(method, "method", Method)
        self.schedule = _as_schedule(every_n_steps)
        self.stop_at = _DEFAULT_STOP_AT[method] if stop_at is None else _check_stop_at(stop_at)

        dsr_only = {"prune_target": prune_target, "initial_threshold": initial_threshold, "tolerance": tolerance}
        unused = [name for name, value in dsr_only.items() if value is not None] if method != "dsr" else []
        if method == "dsr":
            unused += [
                name for name, value in (("drop_fraction", drop_fraction), ("rounding", rounding)) if value is not None
            ]
        if method != "rigl":
            unused += [
                name
                for name, value in (("growth_rule", growth_rule), ("drop_fraction_floor", drop_fraction_floor))
                if value is not None
            ]
        if unused:
            raise ValueError(
                f"method={method!r} does not use {', '.join(unused)}; remove it (prune_target, initial_threshold and "
                "tolerance are DSR's, drop_fraction and rounding are SET's and RigL's, growth_rule and "
                "drop_fraction_floor are RigL's)"
            )
        self.prune_target = _check_prune_target(0.1 if prune_target is None else prune_target)
        self.initial_threshold = check_real(
            1e-3 if initial_threshold is None else initial_threshold,
            "initial_threshold",
            low=0.0,
            low_open=True,
            what=" (DSR's H0)",
        )
        self.tolerance = check_real(
            0.1 if tolerance is None else tolerance, "tolerance", low=0.0, what=" (DSR's delta)"
        )
        self.drop_fraction = check_real(
            0.3 if drop_fraction is None else drop_fraction, "drop_fraction", low=0.0, high=1.0, low_open=True
        )
        self.seed = check_seed(seed)
        self.min_active_per_channel, self.growth_rule = check_channel_safety(min_active_per_channel, growth_rule)
        self.drop_fraction_floor = check_real(
            0.0 if drop_fraction_floor is None else drop_fraction_floor,
            "drop_fraction_floor",
            low=0.0,
            high=self.drop_fraction,
            what=" (at most drop_fraction)",
        )
        self.rounding = "floor" if rounding is None else check_choice(rounding, "rounding", Rounding)

        self._generator = torch.Generator().manual_seed(self.seed)
        self._threshold = self.initial_threshold
        self._total_steps = 0
        self._stop_step = 0
        self._checkpoint_ever_active: dict[str, Tensor] | None = None
        self._itop_rate = 0.0
        self.num_skipped_held = 0
        """Updates skipped because another callback held the mask budget."""
        self.num_rank_corrections = 0
        """Updates after which rank 0's broadcast changed this rank's masks (should stay 0)."""
        self.last_pruned = 0
        self.last_grown = 0
        self.last_drop_fraction = 0.0

    # ------------------------------------------------------------------------------------------- properties
    @property
    def threshold(self) -> float:
        """DSR's global threshold H for the next update."""
        return self._threshold

    @property
    def itop_rate(self) -> float:
        """Fraction of sparse-tensor positions that have been active at some point (Liu et al. 2021)."""
        return self._itop_rate

    @property
    def ever_active(self) -> Mapping[str, Tensor]:
        """Parameter name -> bool tensor of the positions that have been active at some point of training.

        Kept by the masks themselves (:attr:`SparseMasks.ever_active <lightning_sparse.masks.SparseMasks.ever_active>`),
        so changes made by any callback count.
        """
        if self._owner is None:
            raise RuntimeError("DynamicReallocation tracks active positions from the start of training on")
        return self._masks().ever_active

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Fix the stop step from the run's length and start (or restore) the ever-active masks."""
        super().on_train_start(trainer, pl_module)
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "DynamicReallocation needs the run's length to place stop_at: set Trainer(max_epochs=...) or "
                "Trainer(max_steps=...)"
            )
        self._total_steps = max(int(total), 1)
        self._stop_step = max(round(self.stop_at * self._total_steps), 1)
        masks = self._masks()
        if self._checkpoint_ever_active is not None:  # checkpoints written before the masks kept this history
            masks.merge_ever_active_(self._checkpoint_ever_active)
            self._checkpoint_ever_active = None
        self._itop_rate = masks.itop_rate()
        rank_zero_info(
            f"DynamicReallocation({self.method!r}): {self.schedule!r}, updates until step {self._stop_step} "
            f"of {self._total_steps}"
        )

    @override
    def _metrics(self) -> dict[str, float]:
        """The reallocation curves: the counters, the ITOP rate and DSR's threshold or the drop fraction."""
        metrics = {
            "reallocation/updates": float(self.num_updates),
            "reallocation/pruned": float(self.last_pruned),
            "reallocation/grown": float(self.last_grown),
            "reallocation/skipped_nonfinite": float(self.num_skipped_nonfinite),
            "reallocation/skipped_held": float(self.num_skipped_held),
            "reallocation/itop_rate": self._itop_rate,
        }
        if self.method == "dsr":
            metrics["reallocation/threshold"] = self._threshold
        else:
            metrics["reallocation/drop_fraction"] = self.last_drop_fraction
        return metrics

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Threshold, counters, the growth generator's state and the ever-active masks (bool, on the CPU)."""
        return {
            "method": self.method,
            "threshold": self._threshold,
            **super().state_dict(),
            "generator_state": self._generator.get_state(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved.

        Raises:
            ValueError: if the checkpoint was written with another method.
        """
        if state_dict.get("method", self.method) != self.method:
            raise ValueError(
                f"the checkpoint was written by DynamicReallocation(method={state_dict['method']!r}), this run uses "
                f"method={self.method!r}: resume with the same method"
            )
        self._threshold = float(state_dict["threshold"])
        super().load_state_dict(state_dict)
        self._generator.set_state(state_dict["generator_state"])
        if state_dict.get("ever_active") is not None:
            self._checkpoint_ever_active = dict(state_dict["ever_active"])

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the callbacks into the workers; a torch.Generator's own pickle goes through a shared
        # storage that torch.multiprocessing fails to rebuild, so it travels as plain bytes.
        state = self.__dict__.copy()
        state["_generator"] = bytes(self._generator.get_state().numpy())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        generator = torch.Generator()
        generator.set_state(torch.frombuffer(bytearray(state["_generator"]), dtype=torch.uint8))
        self.__dict__.update({**state, "_generator": generator})

    # ------------------------------------------------------------------------------------------- the update
    @override
    def _update(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Topology updater, called by MaskInit once per optimizer step with dense gradients, before masking."""
        step = trainer.global_step
        if step >= self._stop_step:
            return
        if not should_update(step, self.schedule, min(step / self._total_steps, 1.0)):
            return
        masks = self._masks()
        if masks.budget_holder is not None:
            self.num_skipped_held += 1
            return
        if not self._gradients_finite(masks, step):
            return

        expected_nnz = masks.nnz()
        if self.method == "dsr":
            new_masks, pruned, grown = self._dsr(masks, expected_nnz)
        elif self.method == "set":
            new_masks, pruned, grown = self._per_tensor(masks, step, use_gradient=False)
        else:
            new_masks, pruned, grown = self._per_tensor(masks, step, use_gradient=True)
        if new_masks:
            masks.update_(new_masks, expected_nnz=expected_nnz)
        version = masks.version
        masks.broadcast_(src=0)
        if masks.version != version:
            self.num_rank_corrections += 1
            warnings.warn(
                f"DynamicReallocation: this rank's masks differed from rank 0's after the update at step {step} and "
                "were replaced by rank 0's; ranks should agree by construction (same seed, same weights)",
                RuntimeWarning,
                stacklevel=2,
            )
        self._itop_rate = masks.itop_rate()
        self.num_updates += 1
        self.last_update_step = step
        self.last_pruned = pruned
        self.last_grown = grown

    def _dsr(self, masks: SparseMasks, active: int) -> tuple[dict[str, Tensor], int, int]:
        params = masks.parameters
        # Frozen tensors (included by a pattern) keep their masks: nothing grown into them could ever train.
        names = [name for name in masks if params[name].requires_grad]
        if not names:
            return {}, 0, 0
        target = self.prune_target if isinstance(self.prune_target, int) else round(self.prune_target * active)
        result = dsr_reallocate(
            [params[name].detach() for name in names],
            [masks[name] for name in names],
            threshold=self._threshold,
            target_pruned=target,
            tolerance=self.tolerance,
            generator=self._generator,
            min_active_per_channel=self.min_active_per_channel,
        )
        self._threshold = result.threshold
        if result.num_pruned == 0:
            return {}, 0, 0
        return dict(zip(names, result.masks)), result.num_pruned, result.num_grown

    def _per_tensor(self, masks: SparseMasks, step: int, use_gradient: bool) -> tuple[dict[str, Tensor], int, int]:
        params = masks.parameters
        if use_gradient:
            fraction = cosine_drop_fraction(step, self._stop_step, self.drop_fraction, self.drop_fraction_floor)
        else:
            fraction = self.drop_fraction
        self.last_drop_fraction = fraction
        new_masks: dict[str, Tensor] = {}
        dropped: list[Tensor] = []
        grown: list[Tensor] = []
        for name, nnz in masks.layer_nnz().items():
            param, mask = params[name], masks[name]
            if nnz == 0 or not param.requires_grad:
                continue  # frozen tensors keep their masks: nothing grown into them could ever train
            if use_gradient:
                if param.grad is None:
                    continue  # unused in this step: nothing to rank growth by (see the class docstring)
                update = rigl_update(
                    param.detach(),
                    param.grad,
                    mask,
                    fraction,
                    min_active_per_channel=self.min_active_per_channel,
                    growth_rule=self.growth_rule,
                    rounding=self.rounding,
                )
            else:
                # Regrowth excludes the just-dropped positions, so a nearly dense tensor replaces fewer.
                count = min(update_count(nnz, fraction, self.rounding), mask.numel() - nnz)
                update = set_update(
                    param.detach(),
                    mask,
                    count / nnz,
                    self._generator,
                    min_active_per_channel=self.min_active_per_channel,
                )
            new_masks[name] = update.mask
            dropped.append(update.dropped.sum())
            grown.append(update.grown.sum())
        if not new_masks:
            return {}, 0, 0
        counts = torch.stack([torch.stack(dropped).sum(), torch.stack(grown).sum()]).tolist()
        return new_masks, int(counts[0]), int(counts[1])


def _as_schedule(every_n_steps: int | PeriodSchedule) -> PeriodSchedule:
    if isinstance(every_n_steps, PeriodSchedule):
        return every_n_steps
    try:
        return ConstantPeriod(check_int(every_n_steps, "every_n_steps", minimum=1))
    except TypeError:
        raise TypeError(
            f"every_n_steps must be an int or a PeriodSchedule (e.g. SteppedPeriod), got {every_n_steps!r}"
        ) from None


def _check_stop_at(stop_at: float) -> float:
    return check_real(
        stop_at,
        "stop_at",
        low=0.0,
        high=1.0,
        low_open=True,
        what=" (the fraction of training after which the masks are fixed)",
    )


def _check_prune_target(prune_target: int | float) -> int | float:
    """A value in (0, 1) is a fraction of the active weights; a whole number >= 1 is a count.

    Whole-number floats count as counts because YAML configs and LightningCLI may deliver ``20000`` as ``20000.0``.
    """
    if isinstance(prune_target, bool) or not isinstance(prune_target, Real):
        raise TypeError(
            f"prune_target must be an int (a count) or a float (a fraction), got {type(prune_target).__name__}"
        )
    if 0.0 < prune_target < 1.0:
        return float(prune_target)
    if prune_target >= 1 and float(prune_target).is_integer():
        return int(prune_target)
    raise ValueError(
        f"prune_target must be a fraction of the active weights in (0, 1) or a whole count >= 1, got {prune_target}"
    )
