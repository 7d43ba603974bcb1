"""The CLI's other files written atomically: Lightning checkpoints and the saved config.

Lightning writes a checkpoint by opening the target for writing and streaming into it, and LightningCLI's
:class:`~lightning.pytorch.cli.SaveConfigCallback` writes ``config.yaml`` the same way, so a failed overwrite
(disk full, a killed process) destroys the previous file. These adapters route both through
:func:`lightning_sparse._atomic.atomic_write` (write a temporary file in the same folder, then rename) for local
paths; remote filesystems (``s3://`` ...) keep Lightning's own behaviour.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from lightning_sparse._atomic import atomic_write

__all__ = ["AtomicCheckpointIO", "AtomicSaveConfigCallback", "use_atomic_checkpoints"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local checkpoint files are replaced atomically."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to a temporary file next to ``path`` and rename it over ``path``."""
        if not _is_local_file_protocol(str(path)):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)


def use_atomic_checkpoints(trainer: pl.Trainer) -> None:
    """Make ``trainer`` write checkpoints atomically, unless the user chose another ``CheckpointIO``."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


class AtomicSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback``, writing ``config.yaml`` atomically."""

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Save the config as LightningCLI does, through a temporary file and a rename."""
        parser = self.parser
        save = parser.save

        def atomic_parser_save(cfg: Any, path: Any, *args: Any, **kwargs: Any) -> None:
            local = isinstance(path, (str, os.PathLike)) and _is_local_file_protocol(str(path))
            if not local or kwargs.get("multifile") or (not kwargs.get("overwrite") and Path(path).exists()):
                save(cfg, path, *args, **kwargs)  # jsonargparse's own behaviour (and its error for an existing file)
                return
            with atomic_write(path) as tmp:
                save(cfg, str(tmp), *args, **{**kwargs, "overwrite": True})

        parser.save = atomic_parser_save  # type: ignore[method-assign]
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            del parser.save
