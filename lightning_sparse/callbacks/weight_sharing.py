r"""
WeightSharing
^^^^^^^^^^^^^

Lets the later blocks of each residual stage reuse one block's conv weights (EAST, docs/algorithms.md §3d).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_sparse._validation import check_int, check_real
from lightning_sparse.callbacks._progress import isolated_rng
from lightning_sparse.nn.weight_sharing import SharedConv2d, WeightSharingReport, share_stage_weights

__all__ = ["WeightSharing"]


class WeightSharing(Callback):
    r"""Apply :func:`~lightning_sparse.nn.share_stage_weights` to the LightningModule in ``setup("fit")``.

    In every residual stage of ``min_blocks`` or more structurally identical blocks, each block after
    ``source_block`` reuses the source block's conv weights (the same ``Parameter``, hence one mask and the summed
    gradient of every user), each use scaled by its own learnable scalar; BatchNorm, activations and shortcut convs
    are not shared (docs/algorithms.md §3d). EAST's default is ``source_block=1``: blocks 3..n of a stage reuse block 2.

    The transform runs in ``setup``, before the optimizers are built, so ``configure_optimizers`` sees the shared
    model. It is idempotent: a model that already shares weights (a second ``fit``, or a resume in the same
    process) is left as it is. On a resume in a new process the transform is applied again to the fresh model
    and the checkpoint's weights then load into it.

    With :class:`~lightning_sparse.callbacks.MaskInit` (whatever the order of the callbacks list, since MaskInit
    builds the masks after every ``setup``), EAST's budget rule holds: the number of active learnable weights is
    ``(1 - sparsity) x`` the unshared model's prunable weights, and MaskInit logs both the real density
    (``sparsity/global``, over the real tensors) and the effective one (``sparsity/effective``, counting a shared
    tensor once per use).

    The scales are drawn from U(0, 1) as in the authors' code, from a random stream seeded from
    ``torch.initial_seed()`` (so ``seed_everything`` makes them reproducible and the callbacks' order does not
    change them); ``scale_init`` sets them all to one value instead (``1.0`` starts every reuse as an exact copy
    of the source conv). Without Lightning, call :func:`~lightning_sparse.nn.share_stage_weights` directly.

    Args:
        source_block: 0-based index, inside each stage, of the block whose convs are reused.
        min_blocks: stages with fewer blocks are left alone (>= 2).
        scale_init: initial value of every scale; ``None`` draws U(0, 1).

    Raises:
        TypeError: at construction, for an argument of the wrong type.
        ValueError: at construction, for ``source_block < 0``, ``min_blocks < 2`` or a non-finite ``scale_init``;
            in ``setup``, when the model has no stage to share (the message lists the stages found).

    Example::

        trainer = Trainer(callbacks=[WeightSharing(), MaskInit(sparsity=0.999, distribution="erk")])
        trainer.fit(model, datamodule)
        print(trainer.callbacks[0].report.shared_blocks)   # {'layer1.2': 'layer1.1', ...}
    """

    def __init__(self, source_block: int = 1, min_blocks: int = 3, scale_init: float | None = None) -> None:
        super().__init__()
        self.source_block = check_int(source_block, "source_block", minimum=0, what=" (a 0-based block index)")
        self.min_blocks = check_int(
            min_blocks, "min_blocks", minimum=2, what=" (a source block and one block reusing it)"
        )
        self.scale_init = None if scale_init is None else check_real(scale_init, "scale_init")
        self._report: WeightSharingReport | None = None

    @property
    def report(self) -> WeightSharingReport | None:
        """What the transform did (stages, sharing blocks, weight counts); ``None`` before it ran in this process."""
        return self._report

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Share the stage weights, unless the model already shares them."""
        if stage != "fit":
            return
        if any(isinstance(module, SharedConv2d) for module in pl_module.modules()):
            return
        with isolated_rng(type(self).__name__):
            report = share_stage_weights(pl_module, source_block=self.source_block, min_blocks=self.min_blocks)
        if self.scale_init is not None:
            with torch.no_grad():
                for module in pl_module.modules():
                    if isinstance(module, SharedConv2d):
                        module.scale.fill_(self.scale_init)
        self._report = report
        rank_zero_info(
            f"WeightSharing: {len(report.shared_blocks)} blocks reuse their stage's block {self.source_block}; conv "
            f"weights {report.conv_weights_before:,} -> {report.conv_weights_after:,} real "
            f"(+{report.virtual_weights:,} reused)"
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        """The settings (the shared weights themselves are in the model's ``state_dict``)."""
        return {"source_block": self.source_block, "min_blocks": self.min_blocks}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check that the checkpoint was written with the same sharing layout.

        Raises:
            ValueError: if ``source_block`` or ``min_blocks`` differ from the checkpoint's.
        """
        saved = (state_dict.get("source_block", self.source_block), state_dict.get("min_blocks", self.min_blocks))
        if saved != (self.source_block, self.min_blocks):
            raise ValueError(
                f"the checkpoint was written with WeightSharing(source_block={saved[0]}, min_blocks={saved[1]}); "
                f"resume with the same settings (this run has source_block={self.source_block}, "
                f"min_blocks={self.min_blocks})"
            )
