r"""
MaskInit
^^^^^^^^

Makes a LightningModule sparse at the start of fit and keeps it exactly sparse through training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_sparse.callbacks._sparsity_logging import (
    DensityHistory,
    log_density_heatmap,
    log_sparsity,
    report_layer_table,
)
from lightning_sparse.functional.distributions import DISTRIBUTIONS, _validate_sparsity, active_counts, layer_densities
from lightning_sparse.masks import MaskOwner, SparseMasks, TopologyUpdater, check_masks_fit
from lightning_sparse.nn.weight_sharing import parameter_uses
from lightning_sparse.selection import select_sparse_parameters


class MaskInit(Callback, MaskOwner):
    r"""Create the masks of a model's sparse parameters and keep every masked weight exactly zero.

    At the start of fit, MaskInit selects the sparse parameters (by default the weights of every Conv1d/2d/3d
    and Linear layer), shares the active-weight budget ``(1 - sparsity) x`` their size out among them with the
    chosen distribution (ALGORITHMS.md §3b), draws exactly that many active positions per tensor from a seeded
    generator, and zeroes the rest. On every optimizer step it zeroes the gradient at masked positions
    (``on_before_optimizer_step``: after backward, DDP averaging and AMP unscaling, before gradient clipping),
    and after every step it zeroes the masked weights again, so that masked weights and the optimizer state
    at masked positions stay exactly 0 with any optimizer (ARCHITECTURE.md §4).

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
            default selection, e.g. ``["layer*.conv*.weight"]``.
        exclude: glob patterns removed from the selection, e.g. ``["fc.weight"]`` keeps the classifier dense.
        layer_sparsity: glob pattern -> fixed sparsity for the matching sparse tensors; they are left out of
            the distribution's fit and take their share of the global budget first.
        power_scale: exponent of the ER/ERK scores (1.0 = ERK; 0.0 = uniform).
        from_zeros: take the masks from the zeros already in the model (fine-tuning a sparse checkpoint).
        seed: seed of the generator that draws the masks. ``None`` draws the seed from torch's global
            generator (so ``seed_everything`` makes it reproducible). Rank 0's masks are broadcast under DDP.
        shared_budget: under weight sharing (a parameter used in several places), apply EAST's budget rule:
            the active learnable weights equal ``(1 - sparsity) x`` the size of the unshared model's sparse
            tensors, i.e. the real tensors get the density ``d x (P_real + P_virtual) / P_real`` (ALGORITHMS.md
            §3d). ``False`` applies ``sparsity`` to the real tensors.
        log_layer_densities: also log each tensor's density (``sparsity/density/<name>``).
        layer_report: at every training epoch end, record the per-tensor densities and write them to TensorBoard
            as a heatmap image (``sparsity/density_heatmap``, layers x epochs; kept in the checkpoint so a
            resumed run continues the picture); at the end of fit, print a table of the sparse tensors (shape,
            active weights, density, empty output channels) on rank 0.

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
        distribution: str = "erk",
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        layer_sparsity: dict[str, float] | None = None,
        power_scale: float = 1.0,
        from_zeros: bool = False,
        seed: int | None = None,
        shared_budget: bool = True,
        log_layer_densities: bool = True,
        layer_report: bool = True,
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
            _validate_sparsity(sparsity)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown distribution {distribution!r}; choose one of {', '.join(DISTRIBUTIONS)}")
        if power_scale < 0:
            raise ValueError(f"power_scale must be >= 0, got {power_scale}")
        for pattern, value in (layer_sparsity or {}).items():
            _validate_sparsity(value, what=f"layer_sparsity[{pattern!r}]")
        self.sparsity = sparsity
        self.distribution = distribution
        self.include = list(include) if include else None
        self.exclude = list(exclude) if exclude else None
        self.layer_sparsity = dict(layer_sparsity or {})
        self.power_scale = power_scale
        self.from_zeros = from_zeros
        self.seed = seed
        self.shared_budget = shared_budget
        self.log_layer_densities = log_layer_densities
        self.layer_report = layer_report
        self.density_history = DensityHistory()

        self._masks: SparseMasks | None = None
        self._checkpoint_masks: dict[str, Tensor] | None = None
        self._updaters: list[tuple[int, TopologyUpdater]] = []
        self._hook_handles: list[Any] = []
        self._last_updated_step = -1
        self._logged_version = -1

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
        parameters = select_sparse_parameters(pl_module, self.include, self.exclude)
        uses = parameter_uses(pl_module)
        uses = {name: uses[name] for name in parameters}
        if self._checkpoint_masks is not None:
            check_masks_fit(self._checkpoint_masks, {name: p.shape for name, p in parameters.items()})
            masks = self._checkpoint_masks
            self._checkpoint_masks = None
        elif self.from_zeros:
            masks = {name: param.detach() != 0 for name, param in parameters.items()}
        else:
            masks = self._draw_masks(parameters, uses)
        self._masks = SparseMasks(parameters, masks, uses=uses)
        self._masks.broadcast_(src=0)
        self._masks.apply_()
        self._masks.attach_optimizers(trainer.optimizers)
        self._remove_hooks()
        for optimizer in trainer.optimizers:
            self._hook_handles.append(optimizer.register_step_post_hook(self._after_optimizer_step))
        self._last_updated_step = -1
        self._logged_version = -1
        rank_zero_info(
            f"MaskInit: {len(parameters)} sparse tensors, {self._masks.nnz():,} of {self._masks.numel():,} weights "
            f"active (sparsity {self._masks.sparsity():.4%})"
        )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Zero the optimizer state at masked positions (it has just been restored on a resume)."""
        self.masks.reset_optimizer_state_()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Run the topology updaters on the dense gradients, then zero the gradients at masked positions."""
        if self._updaters and trainer.global_step != self._last_updated_step:
            self._last_updated_step = trainer.global_step
            for _, updater in self._updaters:
                updater(trainer, pl_module)
        self.masks.mask_grads_()

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # Safety net for optimizers that move weights whose gradient is zero.
        self.masks.apply_()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log the sparsity curves when the masks changed (and at the first step)."""
        if self.masks.version != self._logged_version:
            self._logged_version = self.masks.version
            log_sparsity(pl_module, self.masks, per_layer=self.log_layer_densities, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the sparsity curves at every epoch end, and the per-layer density heatmap."""
        log_sparsity(pl_module, self.masks, per_layer=self.log_layer_densities, on_step=False)
        if self.layer_report:
            self.density_history.record(trainer.current_epoch, self.masks)
            log_density_heatmap(trainer, self.density_history)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the optimizer hooks (the masks stay available as ``mask_init.masks``); print the layer table."""
        self._remove_hooks()
        if self.layer_report:
            report_layer_table(trainer, self.masks)

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
        if self._masks is not None:
            self._masks.load_state_dict({"masks": masks})
        else:
            self._checkpoint_masks = masks

    # ---------------------------------------------------------------------------------------- internals
    def _draw_masks(self, parameters: Mapping[str, torch.nn.Parameter], uses: Mapping[str, int]) -> dict[str, Tensor]:
        assert self.sparsity is not None
        shapes = {name: tuple(param.shape) for name, param in parameters.items()}
        density = 1.0 - self.sparsity
        if self.shared_budget and any(count > 1 for count in uses.values()):
            real = sum(math.prod(shape) for shape in shapes.values())
            unshared = sum(math.prod(shapes[name]) * uses[name] for name in shapes)
            density *= unshared / real
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
