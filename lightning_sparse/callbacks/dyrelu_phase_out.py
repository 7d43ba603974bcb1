r"""
DyReLUPhaseOut
^^^^^^^^^^^^^^

Trains with dynamic ReLU (DyReLU-B) early and blends it back to plain ReLU (EAST, docs/algorithms.md §3c).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_sparse._validation import check_int
from lightning_sparse.callbacks._log_gate import ChangeGate
from lightning_sparse.callbacks._progress import check_schedule_point, isolated_rng, run_length, schedule_point_to_step
from lightning_sparse.callbacks._rank_logging import log_replicated
from lightning_sparse.nn.dyrelu import DyReLU, validate_blend
from lightning_sparse.nn.dyrelu_conversion import convert_dyrelu_to_relu, convert_relu_to_dyrelu, dyrelu_modules

__all__ = ["DyReLUPhaseOut", "phase_out_blend"]


def phase_out_blend(step: int, start_step: int, end_step: int) -> float:
    """EAST's DyReLU blend factor at an optimizer step (docs/algorithms.md §3c "Phasing").

    ``beta = 1`` up to ``start_step``, ``1 - (step - start_step) / (end_step - start_step)`` in between, and 0 from
    ``end_step`` on. With ``start_step == end_step`` beta drops from 1 to 0 at that step.

    Args:
        step: optimizer steps done (``trainer.global_step``).
        start_step: last step with beta = 1.
        end_step: first step with beta = 0 (``>= start_step``).

    Returns:
        beta in [0, 1].

    Example:
        >>> phase_out_blend(150, 100, 200)
        0.5
    """
    if step >= end_step:
        return 0.0
    if step <= start_step:
        return 1.0
    return 1.0 - (step - start_step) / (end_step - start_step)


class DyReLUPhaseOut(Callback):
    r"""Swap a model's ReLUs for DyReLU-B in ``setup``, then phase DyReLU out to ReLU between ``start`` and ``end``.

    EAST (Li et al. 2024; docs/algorithms.md §3c): every ``nn.ReLU`` module becomes a channel-wise
    :class:`~lightning_sparse.nn.DyReLU` (K = 2, reduction 4, lambdas (1.0, 0.5), initial coefficients
    (1, 0, 0, 0)). Its blend factor beta is 1 until ``start``, falls linearly to 0 at ``end`` and stays 0; at beta = 0
    the unit is exactly ReLU and skips its hyper-network. The model's outputs after ``end`` therefore equal those
    of the same weights with plain ReLU, and :meth:`export_relu` (or ``export_relu_at_end=True``) turns the
    phased-out modules back into ``nn.ReLU`` for export.

    Choices where the authors' code and the paper differ (docs/algorithms.md §3h item 1): the paper's semantics are
    implemented, DyReLU from the first step with a linear decay of beta; the latest code's variant (DyReLU active only
    inside the window) is not. Beta advances per optimizer step from ``trainer.global_step`` rather than per epoch, so
    the decay is linear at a finer grain than the code's per-epoch steps; with ``start``/``end`` as whole epochs the
    values at epoch boundaries agree. The code's optional freeze of the hyper-network at ``start`` never fires with its
    defaults (§3h item 2) and is not reproduced; once beta is 0 the hyper-network's gradients are set to ``None``
    before each optimizer step, so it stays frozen (no momentum or weight-decay drift) while it is unused.

    Channel counts are found without asking where the model allows it: by a dry forward pass on ``example_input``
    (or the LightningModule's ``example_input_array`` when it is a tensor), else from the BatchNorm/Conv/Linear
    registered just before each ReLU. A model whose widths cannot be found gets a ``ValueError`` naming the module;
    pass ``channels={"name.of.relu": C}`` then. Only ``nn.ReLU`` modules are swapped (``F.relu`` calls cannot be).

    DDP: once beta is 0 the hyper-networks take no part in the forward pass, which with
    ``find_unused_parameters=False`` would make DDP fail at the next step. While the model is wrapped in
    ``DistributedDataParallel`` and beta is 0, each DyReLU's training-mode output gets ``0 x`` the sum of its
    hyper-network parameters added (the output is unchanged, the parameters stay in the graph and receive zero
    gradients); those gradients are then dropped before the optimizer step as above. No ``strategy`` setting is
    needed.

    The transform uses its own random stream seeded from ``torch.initial_seed()`` (so ``seed_everything`` makes
    it reproducible and the order of the callbacks list does not matter). Beta and the schedule position are in
    :meth:`state_dict`; restoring sets beta on the modules.

    Args:
        start: end of the pure-DyReLU phase: an int number of epochs or a float fraction of the total optimizer
            steps (``trainer.estimated_stepping_batches``). EAST: 62.5 of 250 epochs, i.e. ``0.25``.
        end: first point at which beta is 0, in the same units (``end >= start``). EAST: epoch 124 of 250,
            ``0.496``.
        example_input: a batch for the dry forward pass that finds the channel counts; defaults to the
            LightningModule's ``example_input_array`` when that is a tensor.
        channels: explicit widths, qualified ReLU module name (in the LightningModule) -> C.
        reduction: the hyper-network's reduction ratio R (EAST: 4).
        export_relu_at_end: at the end of fit, replace the DyReLU modules by ``nn.ReLU`` when beta is 0 (the model
            then no longer has the hyper-network parameters; do it when no further fit will resume from a
            checkpoint of this run).

    Raises:
        TypeError: at construction, for a position of the wrong type.
        ValueError: at construction, for a position out of range or ``end`` before ``start``; in ``setup``, when the
            model has no ``nn.ReLU`` module or a channel count cannot be found; at the start of training, when the
            run's length is unknown or ``end`` falls before ``start`` once converted to steps.

    Example::

        trainer = Trainer(max_epochs=250, callbacks=[DyReLUPhaseOut(start=0.25, end=0.496), MaskInit(sparsity=0.999)])
        trainer.fit(model, datamodule)
        DyReLUPhaseOut.export_relu(model)   # plain nn.ReLU modules again
    """

    def __init__(
        self,
        start: int | float = 0.25,
        end: int | float = 0.5,
        example_input: Tensor | None = None,
        channels: dict[str, int] | None = None,
        reduction: int = 4,
        export_relu_at_end: bool = False,
    ) -> None:
        super().__init__()
        self.start = check_schedule_point(start, "start")
        self.end = check_schedule_point(end, "end")
        if type(self.start) is type(self.end) and self.end < self.start:
            raise ValueError(f"end ({end}) must not come before start ({start})")
        if example_input is not None and not isinstance(example_input, Tensor):
            raise TypeError(f"example_input must be a torch.Tensor batch, got {type(example_input).__name__}")
        reduction = check_int(reduction, "reduction", minimum=1)
        self.example_input = example_input
        self.channels = dict(channels) if channels is not None else None
        self.reduction = reduction
        self.export_relu_at_end = export_relu_at_end

        self._module: nn.Module | None = None
        self._beta = 1.0
        self._step = 0
        self._start_step: int | None = None
        self._end_step: int | None = None
        self._hook_handles: list[Any] = []
        self._hyper_parameters: list[nn.Parameter] = []
        self._log_gate = ChangeGate()

    # ----------------------------------------------------------------------------------------------- public
    @property
    def beta(self) -> float:
        """The current blend factor (1 = DyReLU, 0 = ReLU)."""
        return self._beta

    @property
    def window(self) -> tuple[int, int] | None:
        """``(start_step, end_step)`` in optimizer steps, once training has started."""
        if self._start_step is None or self._end_step is None:
            return None
        return self._start_step, self._end_step

    @staticmethod
    def export_relu(model: nn.Module) -> nn.Module:
        """Replace every phased-out DyReLU (beta = 0) of ``model`` by ``nn.ReLU``, in place (for export).

        See :func:`lightning_sparse.nn.convert_dyrelu_to_relu`; raises ``ValueError`` if a DyReLU has beta > 0.
        """
        return convert_dyrelu_to_relu(model)

    # ------------------------------------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Swap the ReLU modules for DyReLU (once: a model that already has DyReLU modules is left as it is)."""
        if stage != "fit":
            return
        self._module = pl_module
        if not dyrelu_modules(pl_module):
            self._swap(pl_module)
        self._set_modules_beta(self._beta)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Place the phase-out window in optimizer steps and set beta for the current step."""
        total, per_epoch = run_length(trainer, type(self).__name__)
        self._start_step = schedule_point_to_step(self.start, total, per_epoch)
        self._end_step = schedule_point_to_step(self.end, total, per_epoch)
        if self._end_step < self._start_step:
            raise ValueError(
                f"DyReLUPhaseOut: end={self.end!r} is step {self._end_step}, before start={self.start!r} "
                f"(step {self._start_step}); put end after start"
            )
        self._advance(trainer.global_step)
        self._hyper_parameters = [
            param for dyrelu in dyrelu_modules(pl_module).values() for param in dyrelu.parameters()
        ]
        self._log_gate.reset()
        self._remove_hooks()
        if isinstance(trainer.strategy.model, nn.parallel.DistributedDataParallel):
            for dyrelu in set(dyrelu_modules(pl_module).values()):
                self._hook_handles.append(dyrelu.register_forward_hook(_keep_hypernetwork_in_graph))
        rank_zero_info(f"DyReLUPhaseOut: beta 1 until step {self._start_step}, 0 from step {self._end_step} of {total}")

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Set beta for this step."""
        self._advance(trainer.global_step)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Once beta is 0, drop the hyper-networks' gradients so that the optimizer leaves them as they are."""
        if self._beta == 0.0:
            for param in self._hyper_parameters:  # listed once at the start of training, not searched every step
                param.grad = None

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Log beta (``dyrelu/beta``) when it changed."""
        if self._log_gate.changed(trainer, {"dyrelu/beta": self._beta}):
            log_replicated(pl_module, {"dyrelu/beta": self._beta}, on_step=True)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the DDP hooks; with ``export_relu_at_end`` and beta = 0, turn DyReLU back into ``nn.ReLU``."""
        self._remove_hooks()
        if self.export_relu_at_end and self._beta == 0.0:
            convert_dyrelu_to_relu(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the DDP hooks."""
        self._remove_hooks()

    # ------------------------------------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        """Beta, the step it was computed for, and the window in steps."""
        return {"beta": self._beta, "step": self._step, "start_step": self._start_step, "end_step": self._end_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore beta (and set it on the model's DyReLU modules) and the schedule position."""
        self._beta = validate_blend(float(state_dict["beta"]))
        self._step = int(state_dict["step"])
        self._start_step = state_dict.get("start_step")
        self._end_step = state_dict.get("end_step")
        self._set_modules_beta(self._beta)

    # ------------------------------------------------------------------------------------------- internals
    def _swap(self, pl_module: pl.LightningModule) -> None:
        example = self.example_input
        if example is None and isinstance(getattr(pl_module, "example_input_array", None), Tensor):
            example = pl_module.example_input_array
        if not any(type(module) is nn.ReLU for module in pl_module.modules()):
            raise ValueError(
                "DyReLUPhaseOut found no nn.ReLU module in the model to swap for DyReLU (activations called as "
                "F.relu/torch.relu cannot be swapped): build the model with nn.ReLU modules, one per activation site"
            )
        try:
            with isolated_rng(type(self).__name__):
                convert_relu_to_dyrelu(
                    pl_module, example_input=example, channels=self.channels, reduction=self.reduction
                )
        except ValueError as error:
            raise ValueError(
                f"DyReLUPhaseOut could not swap the model's ReLUs for DyReLU: {error} With the callback, pass "
                "DyReLUPhaseOut(channels={'<relu module name>': C}) or example_input=<a batch>, or set the "
                "LightningModule's example_input_array."
            ) from error
        rank_zero_info(f"DyReLUPhaseOut: {len(dyrelu_modules(pl_module))} ReLU modules swapped for DyReLU")

    def _advance(self, step: int) -> None:
        if self._start_step is None or self._end_step is None:
            return
        self._step = step
        beta = phase_out_blend(step, self._start_step, self._end_step)
        if beta != self._beta:
            self._beta = beta
            self._set_modules_beta(beta)

    def _set_modules_beta(self, beta: float) -> None:
        if self._module is None:
            return
        for dyrelu in dyrelu_modules(self._module).values():
            dyrelu.beta = beta

    def _remove_hooks(self) -> None:
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles = []


def _keep_hypernetwork_in_graph(module: nn.Module, inputs: Any, output: Tensor) -> Tensor | None:
    """Forward hook (DDP only): at beta = 0, tie the unused hyper-network into the graph with a zero term."""
    if not isinstance(module, DyReLU) or module.beta != 0.0 or not module.training or not torch.is_grad_enabled():
        return None
    anchor = sum(param.sum() for param in module.parameters() if param.requires_grad)
    return output + 0.0 * anchor
