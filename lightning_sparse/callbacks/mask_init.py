r"""
MaskInit
^^^^^^^^

Makes a LightningModule sparse at the start of fit and keeps it exactly sparse through training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_sparse._validation import (
    Distribution,
    check_choice,
    check_patterns,
    check_real,
    check_seed,
    check_sparsity,
)
from lightning_sparse.callbacks._sparsity_logging import (
    DensityHistory,
    heatmap_due,
    log_density_heatmap,
    log_sparsity,
    report_layer_table,
    sparsity_summary,
    write_custom_scalars_layout,
)
from lightning_sparse.functional.distributions import active_counts, layer_densities
from lightning_sparse.masks import MaskOwner, SparseMasks, TopologyUpdater, check_masks_fit
from lightning_sparse.nn.weight_sharing import SharedConv2d, parameter_uses
from lightning_sparse.optimizer_support import check_state_shapes, keeps_masked_weights_zero
from lightning_sparse.selection import frozen_left_out, select_sparse_parameters


class MaskInit(Callback, MaskOwner):
    r"""Create the masks of a model's sparse parameters and keep every masked weight exactly zero.

    At the start of fit, MaskInit selects the sparse parameters (by default the weights of every Conv1d/2d/3d
    and Linear layer), shares the active-weight budget ``(1 - sparsity) x`` their size out among them with the
    chosen distribution (docs/algorithms.md §3b), draws exactly that many active positions per tensor from a seeded
    generator, and zeroes the rest. On every optimizer step it zeroes the gradient at masked positions
    (``on_before_optimizer_step``: after backward, DDP averaging and AMP unscaling, before gradient clipping),
    and after a step it zeroes the masked weights again, so that masked weights and the optimizer state
    at masked positions stay exactly 0 with any optimizer (docs/architecture.md §4). That re-zeroing pass runs after
    every step for optimizers it does not know; for the optimizers of
    :data:`~lightning_sparse.optimizer_support.OPTIMIZER_SUPPORT` (SGD, Adam, AdamW, ...), whose update is provably
    0 where the weight, the gradient and the state are 0, it runs only on the first step and on steps where the
    masks changed.

    Masks that exist are kept: a second ``trainer.fit`` (or this callback on a new Trainer) continues from the
    trained topology after checking that it fits the model; :meth:`reset_masks` draws new ones at the next fit. A
    resumed checkpoint's masks win over ``sparsity`` (with a warning when they differ). The optimizers are checked
    before the first step (:mod:`lightning_sparse.optimizer_support`); raw optimizer steps of manual optimization
    (``use_pl_optimizer=False``) are masked too.

    Whenever the masks change (at the first step and after every topology update of any callback) and at every
    epoch end it logs the ``sparsity/`` curves, among them ``sparsity/empty_channels``: the output channels of the
    sparse tensors with no active weight, the sign of channel collapse at extreme sparsity
    (docs/troubleshooting.md).

    The masks are :class:`~lightning_sparse.masks.SparseMasks`, public as ``mask_init.masks`` once fit has
    started. They are saved in this callback's state inside Lightning checkpoints, not in the model's
    ``state_dict()``, which keeps exactly the user's keys. The callbacks that move weights
    (:class:`DynamicReallocation`, :class:`CyclicSparsitySchedule`) change the masks only through it.

    Args:
        sparsity: fraction of the sparse tensors' weights that are zero, in [0, 1). Leave ``None`` with
            ``from_zeros=True``.
        distribution: how the budget is shared among tensors: ``"erk"`` (Erdős–Rényi-Kernel, RigL's exact
            procedure), ``"er"`` or ``"uniform"`` (the same sparsity in every tensor).
        include: glob patterns over parameter names (``pl_module.named_parameters()``) that replace the
            default selection, e.g. ``["layer*.conv*.weight"]``; one string is one pattern. The default selection
            leaves frozen weights (``requires_grad=False``) dense; a pattern that names them makes them sparse, and
            no topology update grows weights into them.
        exclude: glob patterns removed from the selection, e.g. ``["fc.weight"]`` keeps the classifier dense.
        layer_sparsity: glob pattern -> fixed sparsity for the matching sparse tensors; they are left out of
            the distribution's fit and take their share of the global budget first.
        power_scale: exponent of the ER/ERK scores (1.0 = ERK; 0.0 = uniform).
        from_zeros: take the masks from the zeros already in the model (fine-tuning a sparse checkpoint).
        seed: seed of the generator that draws the masks, an int in [0, 2**64). ``None`` draws the seed from torch's
            global generator (so ``seed_everything`` makes it reproducible). Rank 0's masks are broadcast under DDP.
        shared_budget: ``None`` (default): apply EAST's budget rule when the model holds
            :class:`~lightning_sparse.nn.SharedConv2d` modules (:class:`WeightSharing`), not for plain weight tying.
            ``True``: for any parameter used in several places, apply EAST's budget rule:
            the active learnable weights equal ``(1 - sparsity) x`` the size of the unshared model's sparse
            tensors, i.e. the real tensors get the density ``d x (P_real + P_virtual) / P_real`` (docs/algorithms.md
            §3d). ``False`` applies ``sparsity`` to the real tensors.
        log_layer_densities: also log each tensor's density (``sparsity/density/<name>``; in TensorBoard also
            drawn together in one chart of the ``custom_scalars`` layout).
        layer_report: TensorBoard pictures: at every training epoch end, record the per-tensor densities; draw
            them (after epochs 1, 2, 4, 8, ..., every tenth epoch and at the end of fit) as a heatmap image (``sparsity/density_heatmap``: layer names on the rows, epochs across, a
            labelled colour scale where matplotlib is installed; kept in the checkpoint so a resumed run continues
            the picture); at the end of fit, the table of the sparse tensors as text (``sparsity/layer_table``).
        verbose: console output on rank 0, independent of ``layer_report`` (the levels of Lightning's
            ``ModelPruning``): 0 prints nothing; 1 prints the sparsity requested, real and (under weight sharing)
            effective at the start of fit, with the budget rule in force, and the sparsity at the end of fit;
            2 also prints the table of the sparse tensors (shape, active weights, density, empty output channels) at the end of fit.

    Logged (any logger): ``sparsity/requested`` (the ``sparsity`` argument), ``sparsity/global`` (real),
    ``sparsity/effective`` (under weight sharing), ``sparsity/global_all_params``, ``sparsity/nnz`` and the
    per-tensor densities, at the first step, whenever the masks change and at every training epoch end; in
    ``validate`` and ``test`` runs (no fit), the global figures at the end of the evaluation, measured from the zeros
    of the model's sparse tensors. The values are identical on every DDP rank and logged without a reduction
    (docs/distributed.md).

    Raises:
        ValueError: at construction, for a sparsity outside [0, 1), an unknown distribution, or inconsistent
            arguments; at the start of fit (before the first step), for a pattern that matches no parameter,
            a model without parameters to make sparse, or a checkpoint whose masks do not fit the model.

    Example::

        trainer = Trainer(callbacks=[MaskInit(sparsity=0.9, distribution="erk", exclude=["fc.weight"])])
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].masks.density())   # 0.1
    """

    def __init__(
        self,
        sparsity: float | None = None,
        distribution: Distribution = "erk",
        include: list[str] | str | None = None,
        exclude: list[str] | str | None = None,
        layer_sparsity: dict[str, float] | None = None,
        power_scale: float = 1.0,
        from_zeros: bool = False,
        seed: int | None = None,
        shared_budget: bool | None = None,
        log_layer_densities: bool = True,
        layer_report: bool = True,
        verbose: Literal[0, 1, 2] = 2,
    ) -> None:
        super().__init__()
        if from_zeros and sparsity is not None:
            raise ValueError(
                "with from_zeros=True the sparsity is read from the model's zeros: remove sparsity= (or set "
                "from_zeros=False to draw new masks at that sparsity)"
            )
        if not from_zeros:
            if sparsity is None:
                raise ValueError("MaskInit needs sparsity=<fraction of zeros in [0, 1)>, e.g. MaskInit(sparsity=0.9)")
            sparsity = check_sparsity(sparsity)
        if isinstance(verbose, bool) or verbose not in (0, 1, 2):
            raise ValueError(
                f"verbose must be 0 (no console output), 1 (sparsity summaries) or 2 (also the layer table), "
                f"got {verbose!r}"
            )
        self.sparsity = sparsity
        self.distribution = check_choice(distribution, "distribution", Distribution)
        self.include = check_patterns(include, "include")
        self.exclude = check_patterns(exclude, "exclude")
        self.layer_sparsity = {
            pattern: check_sparsity(value, f"layer_sparsity[{pattern!r}]")
            for pattern, value in (layer_sparsity or {}).items()
        }
        self.power_scale = check_real(power_scale, "power_scale", low=0.0, what=" (the ER/ERK score exponent)")
        self.from_zeros = from_zeros
        self.seed = None if seed is None else check_seed(seed)
        self.shared_budget = shared_budget
        self.log_layer_densities = log_layer_densities
        self.layer_report = layer_report
        self.verbose = verbose
        self.density_history = DensityHistory()

        self._masks: SparseMasks | None = None
        self._checkpoint_masks: dict[str, Tensor] | None = None
        self._checkpoint_ever_active: dict[str, Tensor] | None = None
        self._checkpoint_sparsity: float | None = None
        self._lightning_step_pending = False
        self._checked_optimizers: set[int] = set()
        self._warned_nonfinite = False
        self._updaters: list[tuple[int, TopologyUpdater]] = []
        self._hook_handles: list[Any] = []
        self._last_updated_step = -1
        self._logged_version = -1
        self._heatmap_drawn = 0
        self._zeroed_version = -1

    # ------------------------------------------------------------------------------------------ MaskOwner
    @property
    @override
    def masks(self) -> SparseMasks:
        """The :class:`~lightning_sparse.masks.SparseMasks`; available once fit has started."""
        if self._masks is None:
            raise RuntimeError("MaskInit creates the masks at the start of fit; call trainer.fit(...) first")
        return self._masks

    @override
    def register_topology_updater(self, updater: TopologyUpdater, order: int) -> None:
        """Run ``updater(trainer, pl_module)`` once per optimizer step, before the gradients are masked."""
        if any(existing == updater for _, existing in self._updaters):
            return
        self._updaters.append((order, updater))
        self._updaters.sort(key=lambda item: item[0])

    # ------------------------------------------------------------------------------------------- hooks
    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Select the sparse parameters and build, broadcast and apply the masks.

        This runs after every callback's ``setup`` (so after model transforms, whatever the order of the
        callbacks list), after a resumed checkpoint's model weights and callback states are restored, and
        after the strategy has wrapped the model and created the optimizers.
        """
        notes: list[str] = []
        ever_active: Mapping[str, Tensor] | None = None
        if self._checkpoint_masks is not None:
            parameters = select_sparse_parameters(pl_module, self.include, self.exclude)
            check_masks_fit(self._checkpoint_masks, {name: p.shape for name, p in parameters.items()})
            masks: Mapping[str, Tensor] = self._checkpoint_masks
            ever_active = self._checkpoint_ever_active
            self._checkpoint_masks = self._checkpoint_ever_active = None
            self._warn_if_other_sparsity(masks)
            notes.append("masks restored from the checkpoint")
        elif self._masks is not None:
            # A second fit (same Trainer, or this callback on a new Trainer): the trained topology is kept and
            # checked against the model, never redrawn (docs/architecture.md §3).
            parameters = _kept_parameters(pl_module, self._masks)
            masks, ever_active = self._masks.state_dict()["masks"], self._masks.ever_active
            notes.append("masks kept from the previous fit (call reset_masks() before fit to draw new ones)")
        else:
            parameters = select_sparse_parameters(pl_module, self.include, self.exclude)
            if trainer.ckpt_path is not None:
                rank_zero_warn(
                    f"MaskInit: the checkpoint {trainer.ckpt_path} has no MaskInit state (it was written without the "
                    "sparsity callbacks), so new masks are drawn now and the trained weights at masked positions "
                    "are set to 0. Use MaskInit(from_zeros=True) to take the masks from the model's zeros instead."
                )
            if self.from_zeros:
                masks = {name: param.detach() != 0 for name, param in parameters.items()}
            else:
                weight_sharing = any(isinstance(module, SharedConv2d) for module in pl_module.modules())
                masks = self._draw_masks(parameters, self._uses(pl_module, parameters), notes, weight_sharing)
        frozen = frozen_left_out(pl_module, self.include)
        if frozen:
            notes.append(
                f"{len(frozen)} frozen parameters (requires_grad=False) left dense: {frozen[:4]}"
                f"{' ...' if len(frozen) > 4 else ''}; name them in include=[...] to make them sparse"
            )
        self._masks = SparseMasks(parameters, masks, uses=self._uses(pl_module, parameters), ever_active=ever_active)
        self._masks.broadcast_(src=0)
        self._masks.apply_()
        self._masks.attach_optimizers(trainer.optimizers)
        self._remove_hooks()
        self._checked_optimizers = set()
        self._lightning_step_pending = False
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_pre_hook(self._before_optimizer_step))
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._last_updated_step = -1
        self._logged_version = -1
        self._zeroed_version = -1
        if self.verbose >= 1:
            rule = self.shared_budget
            if rule is None:  # the default: the rule applies to WeightSharing's shared convs
                rule = any(isinstance(module, SharedConv2d) for module in pl_module.modules())
            lines = sparsity_summary(self._masks, self._requested(), rule)
            lines[0] += "".join(f"; {note}" for note in notes)
            for line in lines:
                rank_zero_info(f"MaskInit: {line}")
        write_custom_scalars_layout(trainer, per_layer=self.log_layer_densities)

    def reset_masks(self) -> None:
        """Forget the masks, so that the next fit draws new ones (by default a further fit keeps them)."""
        self._masks = None
        self._checkpoint_masks = self._checkpoint_ever_active = None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Zero the optimizer state at masked positions (it has just been restored on a resume)."""
        self.masks.reset_optimizer_state_()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Run the topology updaters on the dense gradients, then zero the gradients at masked positions."""
        self._lightning_step_pending = True
        if self._updaters and trainer.global_step != self._last_updated_step:
            self._last_updated_step = trainer.global_step
            for _, updater in self._updaters:
                updater(trainer, pl_module)
        self.masks.mask_grads_()

    def _before_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Lightning's steps pass a closure (or, under AMP's GradScaler, have run on_before_optimizer_step already).
        # A step without either is the raw optimizer of manual optimization (use_pl_optimizer=False): Lightning's
        # hooks do not run for it, so the gradients are masked here.
        self._check_optimizer_state(optimizer)
        # torch passes (optimizer, *step_args) as args: a second item is a positional closure.
        if self._lightning_step_pending or kwargs.get("closure") is not None or len(args) > 1:
            return
        if self._updaters:
            raise RuntimeError(
                "MaskInit: the optimizer was stepped directly (manual optimization with "
                "self.optimizers(use_pl_optimizer=False)), so Lightning counts no optimizer steps and the topology "
                "updates (DynamicReallocation, CyclicSparsitySchedule) cannot be scheduled. Use self.optimizers() "
                "(the default use_pl_optimizer=True) and call .step() on it; see docs/troubleshooting.md"
            )
        self.masks.mask_grads_()

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Safety net for optimizers that move weights whose gradient is zero. An optimizer of the table in
        # lightning_sparse.optimizer_support provably leaves masked weights at 0 once their gradients are masked,
        # so for it the pass (a full sweep over the sparse weights, ~2% of a ResNet step) runs only on the first
        # step and on steps where the masks changed (issue 14).
        self._lightning_step_pending = False
        masks = self.masks
        if masks.version != self._zeroed_version or not keeps_masked_weights_zero(optimizer):
            masks.apply_()
            self._zeroed_version = masks.version

    def _check_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        # Once per optimizer, before the first step that finds state for a sparse parameter (so before step 2):
        # state that is not one entry per weight cannot be kept exact (lightning_sparse.optimizer_support).
        if id(optimizer) in self._checked_optimizers:
            return
        parameters = self.masks.parameters
        if not any(optimizer.state.get(param) for param in parameters.values()):
            return
        names = {id(param): name for name, param in parameters.items()}
        check_state_shapes(optimizer, parameters.values(), names)
        self._checked_optimizers.add(id(optimizer))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the global sparsity curves when the masks changed (and at the first step).

        The per-tensor densities are logged at epoch ends only: every key logged on step is converted by Lightning
        on every later batch of the epoch, which for a ResNet's 20-odd tensors cost more than the masking (issue 14).
        """
        if self.masks.version != self._logged_version:
            self._logged_version = self.masks.version
            log_sparsity(pl_module, self.masks, per_layer=False, on_step=True, requested=self._requested())

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the sparsity curves at every epoch end, and the per-layer density heatmap."""
        self._repair_nonfinite()
        log_sparsity(
            pl_module, self.masks, per_layer=self.log_layer_densities, on_step=False, requested=self._requested()
        )
        if self.layer_report:
            self.density_history.record(trainer.current_epoch, self.masks)
            if heatmap_due(len(self.density_history)):
                self._draw_heatmap(trainer)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """In a ``validate`` run (not inside fit), log the sparsity of the evaluated model."""
        if trainer.state.fn == "validate":
            self._log_evaluated_sparsity(pl_module)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the sparsity of the tested model."""
        self._log_evaluated_sparsity(pl_module)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the optimizer hooks (the masks stay available as ``mask_init.masks``); report the layers."""
        self._remove_hooks()
        self.masks.follow_parameters_()  # the strategy's teardown has moved the model (to the CPU) by now
        self._repair_nonfinite()
        if self.verbose == 1:
            rank_zero_info(f"MaskInit: at the end of fit, {sparsity_summary(self.masks, self._requested())[0]}")
        if self.layer_report and self._heatmap_drawn != len(self.density_history):
            self._draw_heatmap(trainer)
        report_layer_table(trainer, self.masks, console=self.verbose >= 2, tensorboard=self.layer_report)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the optimizer hooks."""
        self._remove_hooks()

    # ------------------------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        """The masks (bool, on the CPU) and the settings that made them."""
        if self._masks is None:
            return {}
        return {
            **self._masks.state_dict(),
            "sparsity": self.sparsity,
            "distribution": self.distribution,
            "density_history": self.density_history.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the saved masks; they replace freshly drawn ones at the start of fit (checked against the model)."""
        if "density_history" in state_dict:
            self.density_history.load_state_dict(state_dict["density_history"])
        if "masks" not in state_dict:
            return
        masks = dict(state_dict["masks"])
        ever_active = state_dict.get("ever_active")
        saved = state_dict.get("sparsity")
        self._checkpoint_sparsity = None if saved is None else float(saved)
        if self._masks is not None:
            self._warn_if_other_sparsity(masks)
            self._masks.load_state_dict({"masks": masks, "ever_active": ever_active})
        else:
            self._checkpoint_masks = masks
            self._checkpoint_ever_active = None if ever_active is None else dict(ever_active)

    # ---------------------------------------------------------------------------------------- internals
    def _draw_heatmap(self, trainer: pl.Trainer) -> None:
        log_density_heatmap(trainer, self.density_history)
        self._heatmap_drawn = len(self.density_history)

    def _requested(self) -> float | None:
        return None if self.from_zeros else self.sparsity

    def _log_evaluated_sparsity(self, pl_module: pl.LightningModule) -> None:
        # Outside fit there may be no masks (a `test --ckpt_path` run): the zeros of the selected tensors are the
        # sparsity of the model being evaluated, and equal the masks' after a fit (masked weights are exactly 0).
        parameters = select_sparse_parameters(pl_module, self.include, self.exclude)
        uses = parameter_uses(pl_module)
        masks = SparseMasks(
            parameters,
            {name: param.detach() != 0 for name, param in parameters.items()},
            uses={name: uses[name] for name in parameters},
        )
        log_sparsity(pl_module, masks, per_layer=False, on_step=False, requested=self._requested())

    def _warn_if_other_sparsity(self, masks: Mapping[str, Tensor]) -> None:
        saved = self._checkpoint_sparsity
        if self.from_zeros or self.sparsity is None or saved is None or math.isclose(saved, self.sparsity):
            return
        nnz = sum(int(mask.sum()) for mask in masks.values())
        numel = sum(mask.numel() for mask in masks.values())
        rank_zero_warn(
            f"MaskInit(sparsity={self.sparsity}) resumes a checkpoint written with sparsity={saved}: the checkpoint's "
            f"masks are kept (sparsity {1 - nnz / numel:.4%} in effect), since a resume continues the saved run. "
            "To train at the new sparsity, start a new fit from the weights (not ckpt_path) with "
            "MaskInit(from_zeros=True) or a fresh MaskInit."
        )
        self._checkpoint_sparsity = None

    def _uses(self, pl_module: pl.LightningModule, parameters: Mapping[str, torch.nn.Parameter]) -> dict[str, int]:
        uses = parameter_uses(pl_module)
        return {name: uses[name] for name in parameters}

    def _repair_nonfinite(self) -> None:
        count = self.masks.repair_nonfinite_()
        if count and not self._warned_nonfinite:
            self._warned_nonfinite = True
            rank_zero_warn(
                f"MaskInit: {count} masked weights were not finite (a nan/inf gradient reached the optimizer; masking "
                "multiplies by 0 and nan x 0 is nan) and were set back to 0. Check the loss for nan/inf; see "
                "docs/troubleshooting.md"
            )

    def _draw_masks(
        self,
        parameters: Mapping[str, torch.nn.Parameter],
        uses: Mapping[str, int],
        notes: list[str],
        weight_sharing: bool,
    ) -> dict[str, Tensor]:
        assert self.sparsity is not None
        shapes = {name: tuple(param.shape) for name, param in parameters.items()}
        density = 1.0 - self.sparsity
        shared = any(count > 1 for count in uses.values())
        apply_rule = self.shared_budget if self.shared_budget is not None else shared and weight_sharing
        if apply_rule and shared:
            real = sum(math.prod(shape) for shape in shapes.values())
            unshared = sum(math.prod(shapes[name]) * uses[name] for name in shapes)
            density *= unshared / real
            notes.append(
                f"EAST's budget rule for shared weights: the real tensors get density {density:.4f} so that the "
                f"active weights are (1 - {self.sparsity}) x the unshared model's (docs/algorithms.md §3d)"
            )
            if density >= 1.0:
                raise ValueError(
                    f"under weight sharing the real tensors would need density {density:.3f} >= 1 to give "
                    f"(1 - {self.sparsity}) x the unshared model's weights; raise the sparsity or set "
                    "shared_budget=False"
                )
        fixed = self._fixed_densities(shapes)
        densities = layer_densities(
            shapes, 1.0 - density, self.distribution, power_scale=self.power_scale, fixed_densities=fixed
        )
        counts = active_counts(shapes, densities)
        seed = self.seed if self.seed is not None else int(torch.randint(0, 2**62, (1,)).item())
        generator = torch.Generator().manual_seed(seed)
        masks: dict[str, Tensor] = {}
        for name, shape in shapes.items():
            numel = math.prod(shape)
            flat = torch.zeros(numel, dtype=torch.bool)
            flat[torch.randperm(numel, generator=generator)[: counts[name]]] = True
            masks[name] = flat.view(shape)
        return masks

    def _fixed_densities(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, float]:
        fixed: dict[str, float] = {}
        for pattern, value in self.layer_sparsity.items():
            matched = [name for name in shapes if fnmatchcase(name, pattern)]
            if not matched:
                raise ValueError(
                    f"layer_sparsity pattern {pattern!r} matches no sparse parameter; sparse parameters: {list(shapes)}"
                )
            fixed.update(dict.fromkeys(matched, 1.0 - value))
        return fixed

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []


def _kept_parameters(pl_module: pl.LightningModule, masks: SparseMasks) -> dict[str, torch.nn.Parameter]:
    """The model's parameters named by existing masks, checked against them (names and shapes)."""
    named = dict(pl_module.named_parameters())
    present = {name: named[name] for name in masks if name in named}
    check_masks_fit(
        {name: masks[name] for name in masks},
        {name: param.shape for name, param in present.items()},
    )
    return present
