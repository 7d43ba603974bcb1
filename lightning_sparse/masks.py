"""SparseMasks: the single owner of every mask and of the invariants that keep training exactly sparse.

docs/architecture.md §3. A :class:`SparseMasks` is a read-only mapping from a parameter's name (as in
``pl_module.named_parameters()``, never with a DDP ``module.`` prefix) to a bool mask (``True`` = active). Masks
are not module buffers, so the user's ``state_dict()`` keeps exactly its own keys; they travel in the
:class:`~lightning_sparse.callbacks.MaskInit` callback state instead.

After every change made through its methods:

* a masked weight is exactly 0, and so is every optimizer-state tensor entry at a masked position;
* the total active count equals the budget the caller asked for (checked, not assumed);
* masks live on their parameter's device;
* all DDP ranks hold identical masks (after :meth:`SparseMasks.broadcast_`).

This module also holds :func:`find_mask_owner`, which the other sparsity callbacks use to find the callback that
owns the masks, so that callbacks never import one another. No Lightning import here.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sparse.optimizer_support import check_optimizer, initial_state_value


class SparseMasks(Mapping[str, Tensor]):
    """Bool masks of the sparse parameters and the batched operations that keep them exact.

    Args:
        parameters: parameter name -> the parameter itself, for every sparse parameter.
        masks: parameter name -> bool mask of the same shape (``True`` = active). Copied onto the
            parameter's device.
        uses: parameter name -> how many places of the model use it (weight sharing, docs/algorithms.md §3d);
            1 for unshared parameters. Only used to report the effective density.
        ever_active: parameter name -> bool tensor of the positions active at some earlier point (kept across a
            re-fit or a resume); ``None`` starts from ``masks``. Every later mask change adds to it
            (:attr:`ever_active`, the in-time over-parameterisation of Liu et al. 2021).

    Raises:
        ValueError: if the names of ``parameters`` and ``masks`` differ, or a mask's shape does not match.

    Example::

        >>> layer = torch.nn.Linear(4, 2)
        >>> masks = SparseMasks({"weight": layer.weight}, {"weight": torch.eye(2, 4, dtype=torch.bool)})
        >>> masks.apply_()
        >>> masks.nnz(), masks.density()
        (2, 0.25)
    """

    def __init__(
        self,
        parameters: Mapping[str, nn.Parameter],
        masks: Mapping[str, Tensor],
        uses: Mapping[str, int] | None = None,
        ever_active: Mapping[str, Tensor] | None = None,
    ) -> None:
        if set(parameters) != set(masks):
            raise ValueError(
                f"masks and parameters must name the same tensors; only in masks: "
                f"{sorted(set(masks) - set(parameters))}, only in parameters: {sorted(set(parameters) - set(masks))}"
            )
        if not parameters:
            raise ValueError("SparseMasks needs at least one sparse parameter")
        self._params: dict[str, nn.Parameter] = dict(parameters)
        self._masks: dict[str, Tensor] = {}
        for name, param in self._params.items():
            mask = masks[name]
            _check_mask_shape(name, mask, param)
            self._masks[name] = mask.detach().to(device=param.device, dtype=torch.bool).clone()
        self._uses = {name: int((uses or {}).get(name, 1)) for name in self._params}
        self._optimizers: list[torch.optim.Optimizer] = []
        self._multipliers: list[Tensor] | None = None
        self._nnz_cache: tuple[int, dict[str, int]] | None = None
        self.version = 0
        """Incremented at every mask change; lets observers (loggers) notice changes cheaply."""
        self._budget_holder: str | None = None
        self._ever_active: dict[str, Tensor] = {name: mask.clone() for name, mask in self._masks.items()}
        if ever_active is not None:
            self.merge_ever_active_(ever_active)

    # ----------------------------------------------------------------------------------- mapping interface
    def __getitem__(self, name: str) -> Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tensors={len(self)}, nnz={self.nnz()}, density={self.density():.6f})"

    @property
    def parameters(self) -> Mapping[str, nn.Parameter]:
        """Parameter name -> the sparse parameter (read-only view)."""
        return dict(self._params)

    @property
    def uses(self) -> Mapping[str, int]:
        """Parameter name -> number of places of the model that use it (> 1 under weight sharing)."""
        return dict(self._uses)

    # ------------------------------------------------------------------------------------------- statistics
    def nnz(self, name: str | None = None) -> int:
        """Number of active weights in one tensor, or in all sparse tensors."""
        if name is not None:
            return self.layer_nnz()[name] if name in self._masks else int(torch.count_nonzero(self._masks[name]))
        return int(sum(counts for counts in self.layer_nnz().values()))

    def layer_nnz(self) -> dict[str, int]:
        """Active weights per tensor (one device sync for all tensors; cached until the masks change)."""
        if self._nnz_cache is None or self._nnz_cache[0] != self.version:
            counts = torch.stack([torch.count_nonzero(mask).cpu() for mask in self._masks.values()]).tolist()
            self._nnz_cache = (self.version, dict(zip(self._masks, (int(c) for c in counts))))
        return dict(self._nnz_cache[1])

    def numel(self, name: str | None = None) -> int:
        """Number of positions in one tensor, or in all sparse tensors."""
        if name is not None:
            return self._masks[name].numel()
        return sum(mask.numel() for mask in self._masks.values())

    def density(self) -> float:
        """Fraction of active weights over all sparse tensors."""
        return self.nnz() / self.numel()

    def sparsity(self) -> float:
        """``1 - density()``: the sparsity within the sparse tensors (DSR's definition, docs/algorithms.md §2d.7)."""
        return 1.0 - self.density()

    def layer_densities(self) -> dict[str, float]:
        """Tensor name -> its density."""
        return {name: count / self._masks[name].numel() for name, count in self.layer_nnz().items()}

    def effective_density(self) -> float:
        """Density counting each shared tensor once per use (EAST's "effective connections", docs/algorithms.md §3d)."""
        counts = self.layer_nnz()
        active = sum(counts[name] * self._uses[name] for name in self._masks)
        total = sum(self._masks[name].numel() * self._uses[name] for name in self._masks)
        return active / total

    @property
    def ever_active(self) -> Mapping[str, Tensor]:
        """Parameter name -> bool tensor of the positions that have been active at some point.

        Updated inside :meth:`update_`, so every mask change counts whoever makes it (reallocation, a density
        schedule, a resume), and saved in :meth:`state_dict`.
        """
        return dict(self._ever_active)

    def itop_rate(self) -> float:
        """Fraction of sparse-tensor positions that have been active at some point (Liu et al. 2021)."""
        counts = torch.stack([torch.count_nonzero(mask).cpu() for mask in self._ever_active.values()])
        return int(counts.sum()) / self.numel()

    def merge_ever_active_(self, ever_active: Mapping[str, Tensor]) -> None:
        """Add saved ever-active positions (from a checkpoint or an earlier fit); names and shapes must fit."""
        check_masks_fit(ever_active, {name: mask.shape for name, mask in self._masks.items()})
        for name, mask in self._ever_active.items():
            mask |= ever_active[name].to(device=mask.device, dtype=torch.bool)

    def fingerprint(self) -> str:
        """A short hash of all masks: equal on two processes exactly when their masks are equal."""
        digest = hashlib.sha256()
        for name, mask in self._masks.items():
            digest.update(name.encode())
            digest.update(mask.detach().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    # -------------------------------------------------------------------------------------- budget holding
    @property
    def budget_holder(self) -> str | None:
        """Name of the callback that currently owns the active-weight count, or ``None``.

        docs/architecture.md §3: while a density schedule (EAST's cyclic sparsity) is changing the number of active
        weights, it is the only one allowed to; count-preserving updaters (DynamicReallocation) stand aside.
        The holder re-asserts the hold from its own state in its topology updater, which runs first (lower
        ``order``), so the hold needs no checkpointing.
        """
        return self._budget_holder

    def hold_budget(self, holder: str) -> None:
        """Claim the active-weight count for ``holder``; other updaters skip their updates until it is released.

        Raises:
            RuntimeError: if another holder already holds it.
        """
        if self._budget_holder not in (None, holder):
            raise RuntimeError(f"{holder} cannot hold the mask budget: {self._budget_holder} already holds it")
        self._budget_holder = holder

    def release_budget(self, holder: str) -> None:
        """Give the active-weight count back (a no-op if ``holder`` does not hold it)."""
        if self._budget_holder == holder:
            self._budget_holder = None

    # ------------------------------------------------------------------------------------------ invariants
    def attach_optimizers(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Remember the optimizers whose state must be reset at masked and changed positions.

        Raises:
            UnsupportedOptimizerError: for an optimizer whose state cannot be kept exact (LBFGS, ...; see
                :mod:`lightning_sparse.optimizer_support`).
        """
        optimizers = list(optimizers)
        for optimizer in optimizers:
            check_optimizer(optimizer)
        self._optimizers = optimizers

    def _multiplier_list(self) -> list[Tensor]:
        # A cached copy of each mask in the parameter's dtype: one _foreach_mul_ over resnet18's weights took 2.1 ms
        # with it, 6.5 ms with the bool masks and 14.5 ms as a masked_fill_ loop (1 CPU thread). It costs one
        # tensor per mask, rebuilt only when the masks change.
        if self._multipliers is None:
            self._multipliers = [self._masks[name].to(dtype=param.dtype) for name, param in self._params.items()]
        return self._multipliers

    def _refresh_multipliers(self, names: Iterable[str]) -> None:
        # In place: no new allocation (and page faults) for tensors the size of the model at every update.
        if self._multipliers is None:
            return
        index = {name: position for position, name in enumerate(self._params)}
        for name in names:
            self._multipliers[index[name]].copy_(self._masks[name])

    @torch.no_grad()
    def apply_(self) -> None:
        """Set every masked weight to exactly 0 (one batched pass over all sparse tensors)."""
        params = [param.data for param in self._params.values()]
        torch._foreach_mul_(params, self._multiplier_list())

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Set the gradient at every masked position to 0 (one batched pass; tensors without grad are skipped)."""
        grads, multipliers = [], []
        for param, multiplier in zip(self._params.values(), self._multiplier_list()):
            if param.grad is not None:
                grads.append(param.grad)
                multipliers.append(
                    multiplier if param.grad.dtype == multiplier.dtype else multiplier.to(param.grad.dtype)
                )
        if grads:
            torch._foreach_mul_(grads, multipliers)

    def grads_are_finite(self) -> bool:
        """Whether every sparse parameter's gradient is finite (one device sync)."""
        grads = [p.grad for p in self._params.values() if p.grad is not None]
        if not grads:
            return True
        # A sum is finite when every entry is (a read-only pass, ~8x cheaper than isfinite(...).all() on resnet18);
        # a non-finite sum can also come from finite entries that overflow, so those tensors are checked exactly.
        sums = torch.stack(
            [grad.sum(dtype=torch.float64 if grad.dtype == torch.float64 else torch.float32) for grad in grads]
        )
        suspects = torch.nonzero(~torch.isfinite(sums)).flatten().tolist()
        return all(bool(torch.isfinite(grads[index]).all()) for index in suspects)

    @torch.no_grad()
    def reset_optimizer_state_(self, positions: Mapping[str, Tensor] | None = None) -> None:
        """Reset the optimizer state at the given positions of each parameter to the value a new weight starts from.

        Every state tensor whose shape equals its parameter's (SGD's momentum buffer, Adam's two moments, Rprop's
        step sizes, and any other optimizer's likewise) is set where ``positions`` is True to its initial value:
        0 for moments, the learning rate for Rprop's ``step_size``, ``initial_accumulator_value`` for Adagrad's
        ``sum`` (:mod:`lightning_sparse.optimizer_support`; 0 for optimizers it does not list). With
        ``positions=None``, every masked position of every sparse parameter is reset.

        Args:
            positions: parameter name -> bool tensor of the parameter's shape.
        """
        if positions is None:
            positions = {name: ~mask for name, mask in self._masks.items()}
        by_param = {id(self._params[name]): where for name, where in positions.items()}
        for optimizer in self._optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    where = by_param.get(id(param))
                    state = optimizer.state.get(param)
                    if where is None or not state:
                        continue
                    for key, value in state.items():
                        if isinstance(value, Tensor) and value.shape == param.shape:
                            value.masked_fill_(where.to(value.device), initial_state_value(optimizer, group, key))

    def follow_parameters_(self) -> None:
        """Move each mask (and its ever-active record) to its parameter's current device.

        Lightning's teardown moves the model to the CPU before ``on_fit_end``; after this call the masks are
        there too. The mask tensors are replaced, so call it only when nothing holds them (MaskInit calls it at
        the end of fit, after removing its hooks).
        """
        for name, param in self._params.items():
            if self._masks[name].device != param.device:
                self._masks[name] = self._masks[name].to(param.device)
                self._ever_active[name] = self._ever_active[name].to(param.device)
                self._multipliers = None

    @torch.no_grad()
    def repair_nonfinite_(self) -> int:
        """Set every non-finite weight or optimizer-state entry at a masked position back to its initial value.

        Masking multiplies by 0, and ``nan x 0`` is ``nan``: one non-finite gradient leaves ``nan`` at masked
        positions. This puts them back (one device sync).

        Returns:
            How many masked weights were not finite.
        """
        bad = {name: ~mask & ~torch.isfinite(self._params[name].detach()) for name, mask in self._masks.items()}
        count = int(torch.stack([where.sum().cpu() for where in bad.values()]).sum())
        if count:
            for name, where in bad.items():
                self._params[name].data.masked_fill_(where, 0)
            self.reset_optimizer_state_()
        return count

    @torch.no_grad()
    def update_(self, new_masks: Mapping[str, Tensor], *, expected_nnz: int | None = None) -> dict[str, int]:
        """Replace some masks, keeping every invariant.

        Newly masked weights are set to 0; newly activated weights start at 0; the optimizer state at every
        changed position is zeroed (RigL's choice, docs/algorithms.md §2d.2 and §4a). Masks are updated in place
        (``copy_``), never reassigned, so references held elsewhere stay valid.

        Args:
            new_masks: parameter name -> new bool mask, for the tensors that change.
            expected_nnz: the total active count the caller's budget requires after the update; checked.

        Returns:
            Parameter name -> number of positions whose state changed.

        Raises:
            KeyError: for a name that is not a sparse parameter.
            ValueError: for a wrong shape, or when the new total differs from ``expected_nnz``.
        """
        changed: dict[str, Tensor] = {}
        checked: dict[str, Tensor] = {}
        for name, new_mask in new_masks.items():
            if name not in self._masks:
                raise KeyError(f"{name!r} is not a sparse parameter; sparse parameters: {list(self._masks)}")
            new_mask = new_mask.to(device=self._masks[name].device, dtype=torch.bool)
            _check_mask_shape(name, new_mask, self._params[name])
            checked[name] = new_mask
            changed[name] = new_mask ^ self._masks[name]
        # All counts (new active per tensor, changed per tensor) in one device sync.
        counts = (
            torch.stack(
                [torch.count_nonzero(mask).cpu() for mask in checked.values()]
                + [torch.count_nonzero(where).cpu() for where in changed.values()]
            ).tolist()
            if checked
            else []
        )
        new_counts = dict(zip(checked, (int(c) for c in counts[: len(checked)])))
        changed_counts = dict(zip(changed, (int(c) for c in counts[len(checked) :])))
        old_counts = self.layer_nnz()
        if expected_nnz is not None:
            new_total = sum(new_counts.get(n, old_counts[n]) for n in self._masks)
            if new_total != expected_nnz:
                raise ValueError(f"mask update would leave {new_total} active weights, the budget is {expected_nnz}")
        for name, new_mask in checked.items():
            self._masks[name].copy_(new_mask)
            # Both pruned and grown positions restart from 0 (grown weights start at value 0).
            self._params[name].data.masked_fill_(changed[name], 0)
        self._refresh_multipliers(checked)
        self.reset_optimizer_state_(changed)
        self.apply_()
        for name in new_masks:
            self._ever_active[name] |= self._masks[name]
        self.version += 1
        self._nnz_cache = (self.version, {**old_counts, **new_counts})
        return changed_counts

    # ------------------------------------------------------------------------------------- state and DDP
    def state_dict(self) -> dict[str, Any]:
        """Masks and ever-active positions on the CPU, keyed by parameter name."""
        return {
            "masks": {name: mask.detach().cpu().clone() for name, mask in self._masks.items()},
            "ever_active": {name: mask.detach().cpu().clone() for name, mask in self._ever_active.items()},
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load masks saved by :meth:`state_dict` (names and shapes must match exactly) and apply them.

        The saved ever-active positions replace the current ones (a resume continues the saved run's history).
        """
        masks = state_dict["masks"]
        check_masks_fit(masks, {name: param.shape for name, param in self._params.items()})
        self.update_(masks)
        if state_dict.get("ever_active") is not None:
            check_masks_fit(state_dict["ever_active"], {name: param.shape for name, param in self._params.items()})
            for name, mask in self._ever_active.items():
                mask.copy_(state_dict["ever_active"][name].to(device=mask.device, dtype=torch.bool) | self._masks[name])

    @torch.no_grad()
    def broadcast_(self, src: int = 0) -> None:
        """Make every DDP rank hold rank ``src``'s masks (one collective for all tensors); a no-op without DDP."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        flat = torch.cat([mask.reshape(-1).to(torch.uint8) for mask in self._masks.values()])
        if torch.distributed.get_backend() == "nccl":
            flat = flat.cuda()
        torch.distributed.broadcast(flat, src=src)
        offset = 0
        received: dict[str, Tensor] = {}
        for name, mask in self._masks.items():
            received[name] = flat[offset : offset + mask.numel()].view(mask.shape).bool()
            offset += mask.numel()
        if any(not torch.equal(received[name].to(mask.device), mask) for name, mask in self._masks.items()):
            self.update_(received)


def _check_mask_shape(name: str, mask: Tensor, param: Tensor) -> None:
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(f"mask for {name!r} has shape {tuple(mask.shape)}, the parameter has {tuple(param.shape)}")


def check_masks_fit(masks: Mapping[str, Tensor], shapes: Mapping[str, torch.Size]) -> None:
    """Raise a ValueError that lists every name or shape by which saved masks do not fit a model.

    Args:
        masks: saved parameter name -> mask.
        shapes: the model's sparse parameter name -> shape.
    """
    missing = sorted(set(shapes) - set(masks))
    unexpected = sorted(set(masks) - set(shapes))
    wrong = sorted(
        f"{name}: mask {tuple(masks[name].shape)} vs parameter {tuple(shapes[name])}"
        for name in set(masks) & set(shapes)
        if tuple(masks[name].shape) != tuple(shapes[name])
    )
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"sparse parameters with no saved mask: {missing}")
        if unexpected:
            problems.append(f"saved masks for parameters the model does not select: {unexpected}")
        if wrong:
            problems.append(f"shape mismatches: {wrong}")
        raise ValueError(
            "the checkpoint's masks do not fit the model (" + "; ".join(problems) + "). Resume with the same model "
            "and the same MaskInit include/exclude settings that wrote the checkpoint."
        )


# -------------------------------------------------------------------------------------------- mask owner
TopologyUpdater = Callable[[Any, Any], None]
"""Called as ``updater(trainer, pl_module)`` on every optimizer step, with dense gradients, before masking."""


class MaskOwner(abc.ABC):
    """What the sparsity callbacks may ask of the callback that owns the masks (MaskInit).

    The owner masks the gradients on every optimizer step. Callbacks that change the topology register an
    updater, and the owner calls the updaters *before* masking the gradients, whatever the order of the callbacks
    list, so that gradient-based growth reads the dense gradient (docs/architecture.md §4).

    An owner also says how it shares a budget among tensors, so that a density schedule can re-distribute a new
    total the same way (EAST's cyclic sparsity, docs/algorithms.md §3e).
    """

    distribution: str = "erk"
    """Per-tensor distribution of the budget: ``"erk"``, ``"er"`` or ``"uniform"``."""
    power_scale: float = 1.0
    """Exponent of the ER/ERK scores."""
    layer_sparsity: dict[str, float] = {}
    """Glob pattern -> fixed sparsity of the matching tensors."""

    @property
    @abc.abstractmethod
    def masks(self) -> SparseMasks:
        """The masks; available from ``on_fit_start`` on (read them from ``on_train_start`` on)."""

    @abc.abstractmethod
    def register_topology_updater(self, updater: TopologyUpdater, order: int) -> None:
        """Call ``updater(trainer, pl_module)`` at every optimizer step before the gradients are masked.

        Updaters run in increasing ``order`` (the cyclic density schedule before reallocation).
        """


def find_mask_owner(trainer: Any, requester: str) -> MaskOwner:
    """The one callback of ``trainer`` that owns the masks.

    Args:
        trainer: the Lightning Trainer.
        requester: the name of the callback asking, for the error message.

    Raises:
        RuntimeError: if there is no mask owner (add ``MaskInit``) or more than one.
    """
    owners = [callback for callback in trainer.callbacks if isinstance(callback, MaskOwner)]
    if not owners:
        raise RuntimeError(
            f"{requester} changes masks that MaskInit creates, but the Trainer has no MaskInit callback: add "
            f"MaskInit(sparsity=...) to Trainer(callbacks=[...])"
        )
    if len(owners) > 1:
        raise RuntimeError(f"the Trainer has {len(owners)} MaskInit callbacks; keep exactly one")
    return owners[0]
