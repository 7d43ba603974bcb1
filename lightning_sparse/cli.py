"""The ``lightning-sparse`` console script: LightningCLI (fit / validate / test) plus ``export``.

.. code-block:: bash

    lightning-sparse fit --config examples/configs/quickstart.yaml
    lightning-sparse test --config examples/configs/quickstart.yaml --ckpt_path checkpoints/quickstart/quickstart.ckpt
    lightning-sparse export --ckpt_path checkpoints/quickstart/quickstart.ckpt --output quickstart.sparse.pt
    lightning-sparse fit --config examples/configs/quickstart.yaml --print_config   # the full resolved config

The model is always an :class:`~lightning_sparse.classification.ImageClassifier` (its network a ``class_path``);
the datamodule is any ``LightningDataModule`` given as a ``class_path``; the sparsity callbacks go in
``trainer.callbacks`` (ECOSYSTEM.md §(c)9).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI

from lightning_sparse._cli_atomic import AtomicSaveConfigCallback, use_atomic_checkpoints
from lightning_sparse.classification import ImageClassifier
from lightning_sparse.export import ExportReport, save_sparse

__all__ = ["SparseCLI", "export_checkpoint", "main"]

_DESCRIPTION = (
    "Dynamic sparse training with PyTorch Lightning. Subcommands: fit, validate, test (LightningCLI; see "
    "`lightning-sparse fit --help`) and export (`lightning-sparse export --help`): write a checkpoint's network "
    "in the compressed sparse format."
)


_USAGE = "%(prog)s [--config CONFIG.yaml] [--section.option VALUE ...]   (all options: --help)"


class SparseCLI(LightningCLI):
    """LightningCLI over :class:`ImageClassifier` and any datamodule, with the fit / validate / test subcommands.

    The optimizer and schedule are :class:`ImageClassifier` arguments (``model.optimizer``, ``model.lr``, ...),
    so LightningCLI's generic ``--optimizer`` / ``--lr_scheduler`` options are not added.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        """Build (and with ``run=True`` run) the CLI; ``kwargs`` go to ``LightningCLI``.

        Args:
            args: the command line without the program name; ``None`` reads ``sys.argv``.
            run: ``True``: the arguments start with a subcommand, which runs. ``False``: only parse the config
                (no subcommand) and build the model, datamodule and Trainer as ``cli.model``, ``cli.datamodule``,
                ``cli.trainer``.
        """
        kwargs.setdefault("model_class", ImageClassifier)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("auto_configure_optimizers", False)
        # A short usage line for the subcommands: argparse prints it above every error, and the default one lists
        # every option (about 50 lines), which buried a config's one-line error.
        kwargs.setdefault(
            "parser_kwargs",
            {
                "description": _DESCRIPTION,
                **{
                    name: {"usage": _USAGE.replace("%(prog)s", f"lightning-sparse {name}")}
                    for name in self.subcommands()
                },
            },
        )
        kwargs.setdefault("save_config_callback", AtomicSaveConfigCallback)
        super().__init__(args=args, run=run, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """LightningCLI's Trainer, writing its checkpoints atomically (a failed overwrite keeps the old file)."""
        trainer = super().instantiate_trainer(**kwargs)
        use_atomic_checkpoints(trainer)
        return trainer

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """fit, validate and test (``ImageClassifier`` has no ``predict_step``)."""
        return {
            name: skipped for name, skipped in LightningCLI.subcommands().items() if name in ("fit", "validate", "test")
        }


def export_checkpoint(ckpt_path: str | Path, output: str | Path | None = None) -> ExportReport:
    """Write the network of an :class:`ImageClassifier` checkpoint with :func:`~lightning_sparse.export.save_sparse`.

    The network alone is exported (its ``state_dict`` keys have no ``network.`` prefix), so it loads into the bare
    architecture: ``load_sparse(output, WideResNet(depth=28, width=2))``.

    Args:
        ckpt_path: a Lightning checkpoint written by ``lightning-sparse fit`` (or by an ``ImageClassifier`` whose
            network is described in its hyperparameters).
        output: the export file; ``None`` writes ``<checkpoint name>.sparse.pt`` next to the checkpoint.

    Returns:
        The :class:`~lightning_sparse.export.ExportReport` (file size against the dense ``state_dict``).

    Raises:
        FileNotFoundError: if ``ckpt_path`` does not exist.
        ValueError: if the checkpoint cannot be loaded as an ``ImageClassifier``.
    """
    ckpt_path = Path(ckpt_path)
    if not ckpt_path.is_file():
        raise FileNotFoundError(f"no checkpoint at {ckpt_path}; pass the .ckpt file written by `lightning-sparse fit`")
    output = Path(output) if output is not None else ckpt_path.with_suffix(".sparse.pt")
    try:
        model = ImageClassifier.load_from_checkpoint(ckpt_path, map_location="cpu")
    except TypeError as error:
        if "network" not in str(error):
            raise
        raise ValueError(
            f"{ckpt_path} does not record how to build its network (it was trained with an ImageClassifier built "
            "in Python). Export it in Python instead: save_sparse(ImageClassifier.load_from_checkpoint(path, "
            "network=...).network, output)"
        ) from error
    except Exception as error:
        raise ValueError(
            f"{ckpt_path} could not be loaded as an ImageClassifier checkpoint ({type(error).__name__}: {error}); "
            "export checkpoints written by `lightning-sparse fit`"
        ) from error
    output.parent.mkdir(parents=True, exist_ok=True)
    return save_sparse(model.network, output)


def _export_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="lightning-sparse export",
        description=(
            "Write the network of an ImageClassifier checkpoint in the compressed sparse format (only the non-zero "
            "weights and their positions, plus the dense tensors) and report its size against the dense state_dict. "
            "Load it with lightning_sparse.load_sparse(path, network)."
        ),
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="checkpoint written by `lightning-sparse fit`")
    parser.add_argument(
        "--output", type=str | None, default=None, help="export file (default: <checkpoint>.sparse.pt next to it)"
    )
    return parser


def _run_export(args: list[str]) -> None:
    parser = _export_parser()
    config = parser.parse_args(args)
    try:
        report = export_checkpoint(config.ckpt_path, config.output)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(report)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-sparse`` console script.

    Args:
        args: the command line without the program name; ``None`` reads ``sys.argv[1:]``.
    """
    command_line = list(sys.argv[1:] if args is None else args)
    if command_line and command_line[0] == "export":
        _run_export(command_line[1:])
        return
    SparseCLI(args=None if args is None else command_line)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
