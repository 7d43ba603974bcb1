"""The ``lightning-sparse`` console script: LightningCLI (fit / validate / test / predict) plus ``export``.

.. code-block:: bash

    lightning-sparse fit --config examples/configs/quickstart.yaml
    lightning-sparse test --config examples/configs/quickstart.yaml --ckpt_path checkpoints/quickstart/quickstart.ckpt
    lightning-sparse export --ckpt_path checkpoints/quickstart/quickstart.ckpt --output quickstart.sparse.pt
    lightning-sparse fit --config examples/configs/quickstart.yaml --print_config   # the full resolved config

    # your own LightningModule and any torch optimizer / scheduler:
    lightning-sparse fit --model=my_pkg.MyModule --model.width=64 --optimizer=torch.optim.AdamW \\
        --optimizer.lr=1e-3 --lr_scheduler=torch.optim.lr_scheduler.StepLR --lr_scheduler.step_size=10 \\
        --data=lightning_sparse.data.DigitsDataModule \\
        --trainer.callbacks+=lightning_sparse.callbacks.MaskInit --trainer.callbacks.sparsity=0.9

The model is any ``LightningModule`` given as ``--model=<class path>`` (LightningCLI's subclass mode); without
one it is :class:`~lightning_sparse.classification.ImageClassifier`, so a config's ``model:`` section may hold
ImageClassifier's arguments directly, as the example configs do. The datamodule is any ``LightningDataModule``;
the sparsity callbacks go in ``trainer.callbacks`` (docs/architecture.md §1).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse import ArgumentParser
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_sparse._cli_atomic import AtomicSaveConfigCallback, use_atomic_checkpoints
from lightning_sparse.checkpoints import SparseCheckpoint, read_sparse_checkpoint
from lightning_sparse.classification import ImageClassifier
from lightning_sparse.export import ExportReport, save_sparse

__all__ = ["SparseCLI", "export_checkpoint", "main"]

DEFAULT_MODEL = f"{ImageClassifier.__module__}.{ImageClassifier.__name__}"

_DESCRIPTION = (
    "Dynamic sparse training with PyTorch Lightning. Subcommands: fit, validate, test, predict (LightningCLI; "
    "see `lightning-sparse fit --help`) and export (`lightning-sparse export --help`). The model is any "
    "LightningModule (--model=my_pkg.MyModule; default lightning_sparse.ImageClassifier, whose arguments: "
    "`lightning-sparse fit --model.help ImageClassifier`). A module without its own configure_optimizers takes "
    "--optimizer=torch.optim.AdamW --optimizer.lr=... and optionally --lr_scheduler=... (stepped every epoch)."
)
_EXPORT_HELP = (
    "Write a checkpoint's sparse weights in the compressed format (any LightningModule trained with MaskInit)."
)
_EXPORT_DESCRIPTION = (
    "Write the sparse model of a Lightning checkpoint in the compressed format (only the non-zero weights and "
    "their positions, plus the dense tensors) and report its size against the dense state_dict. Works on any "
    "checkpoint saved during a fit with the MaskInit callback, from `lightning-sparse fit` or from a plain Trainer "
    "script with your own LightningModule: the weights come from the checkpoint's state_dict, the masks from "
    "MaskInit's saved state, and the module's class is never imported. What is exported: for an ImageClassifier "
    "its network alone (load it with lightning_sparse.load_sparse(path, WideResNet(...)), the architecture is "
    "printed); for any other module the whole module with the keys of its own state_dict() (load it with "
    "load_sparse(path, MyModule(...))). --submodule picks one attribute instead."
)


_USAGE = "%(prog)s [--config CONFIG.yaml] [--section.option VALUE ...]   (all options: --help)"


class SparseCLI(LightningCLI):
    """LightningCLI over any LightningModule (default :class:`ImageClassifier`) and any datamodule.

    Subcommands fit, validate, test and predict. The model is chosen with ``--model=<class path>`` (subclass
    mode); without it the ``model:`` arguments go to ``ImageClassifier``, so configs that describe an
    ImageClassifier need no ``class_path``. ``--optimizer`` / ``--lr_scheduler`` (LightningCLI's, any
    ``torch.optim`` class) configure a module that has no ``configure_optimizers`` of its own; they are an error
    for a module that has one (``ImageClassifier`` takes ``--model.optimizer``, ``--model.lr``, ...), since one of
    the two settings would be ignored.
    """

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        """Build (and with ``run=True`` run) the CLI; ``kwargs`` go to ``LightningCLI``.

        Args:
            args: the command line without the program name; ``None`` reads ``sys.argv``.
            run: ``True``: the arguments start with a subcommand, which runs. ``False``: only parse the config
                (no subcommand) and build the model, datamodule and Trainer as ``cli.model``, ``cli.datamodule``,
                ``cli.trainer``.
        """
        command_line = sys.argv[1:] if args is None else args
        if run and isinstance(command_line, list) and command_line[:1] == ["export"]:
            raise ValueError(
                "export is not a Trainer subcommand: run it with lightning_sparse.cli.main(['export', ...]) (the "
                "console script) or lightning_sparse.cli.export_checkpoint(ckpt_path, output)"
            )
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
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
        """fit, validate, test and predict (LightningCLI's; ``export`` is handled by :func:`main`)."""
        return LightningCLI.subcommands()

    def add_core_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """LightningCLI's trainer / model / data arguments, with ``ImageClassifier`` as the default model."""
        super().add_core_arguments_to_parser(parser)
        if self.subclass_mode_model and issubclass(ImageClassifier, self._model_class):
            parser.set_defaults({"model": {"class_path": DEFAULT_MODEL}})

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        # Listed so that the usage line and `lightning-sparse --help` show it; main() runs it.
        subcommands = getattr(parser, "_subcommands_action", None)
        if subcommands is not None:
            subcommands.add_subcommand("export", _export_parser(), help=_EXPORT_HELP)

    def before_instantiate_classes(self) -> None:
        """Check ``--optimizer`` / ``--lr_scheduler`` against the model before anything is built."""
        config = self.config.get(str(self.subcommand), self.config)
        optimizer, lr_scheduler = config.get("optimizer"), config.get("lr_scheduler")
        model_class = self._configured_model_class(config)
        if model_class is None:
            return
        name = model_class.__name__
        own = model_class.configure_optimizers is not pl.LightningModule.configure_optimizers
        parser = self._parser(self.subcommand)
        if own and (optimizer or lr_scheduler):
            given = " and ".join(
                flag for flag, value in (("--optimizer", optimizer), ("--lr_scheduler", lr_scheduler)) if value
            )
            hint = (
                f"remove {given} and set ImageClassifier's own --model.optimizer (sgd/adamw), --model.lr, "
                "--model.lr_schedule, ..."
                if issubclass(model_class, ImageClassifier)
                else f"either remove {given} (the optimizer is {name}'s to configure) or remove that method from {name}"
            )
            parser.error(f"{name} defines configure_optimizers, which {given} would replace: {hint}")
        if lr_scheduler and not optimizer:
            parser.error(
                "--lr_scheduler needs an optimizer: add --optimizer=torch.optim.SGD --optimizer.lr=0.1 (or another)"
            )
        if self.subcommand == "fit" and not own and not optimizer:
            parser.error(
                f"{name} has no configure_optimizers: pass the optimizer, e.g. --optimizer=torch.optim.AdamW "
                "--optimizer.lr=0.001 (and optionally --lr_scheduler=torch.optim.lr_scheduler.CosineAnnealingLR "
                "--lr_scheduler.T_max=<epochs>)"
            )

    def before_predict(self) -> None:
        """Say where the predictions go: LightningCLI keeps none, a ``BasePredictionWriter`` callback writes them."""
        if not any(isinstance(callback, BasePredictionWriter) for callback in self.trainer.callbacks):
            rank_zero_warn(
                "predict: no BasePredictionWriter in trainer.callbacks, so the predictions are computed and not saved; "
                "add a writer callback (a subclass of lightning.pytorch.callbacks.BasePredictionWriter) to keep them"
            )

    def _configured_model_class(self, config: Any) -> type[pl.LightningModule] | None:
        if not self.subclass_mode_model:
            return self._model_class if isinstance(self._model_class, type) else None
        class_path = (config.get("model") or {}).get("class_path")
        if not isinstance(class_path, str) or "." not in class_path:
            return None
        module_name, class_name = class_path.rsplit(".", 1)
        model_class = getattr(importlib.import_module(module_name), class_name, None)
        return model_class if isinstance(model_class, type) else None


def export_checkpoint(
    ckpt_path: str | Path, output: str | Path | None = None, submodule: str | None = None
) -> ExportReport:
    """Write the sparse model of a Lightning checkpoint with :func:`~lightning_sparse.export.save_sparse`.

    Works on any checkpoint saved during a fit with the MaskInit callback, whatever the LightningModule (one
    trained by ``lightning-sparse fit`` or by a plain Trainer script): the weights come from the checkpoint's
    ``state_dict`` with MaskInit's saved masks applied (:func:`~lightning_sparse.checkpoints.read_sparse_checkpoint`);
    the module's class is never imported. An ``ImageClassifier``'s network is exported alone (keys without the
    ``network.`` prefix), so it loads into the bare architecture: ``load_sparse(output, WideResNet(depth=28,
    width=2))``; any other module is exported whole, so it loads into a fresh instance:
    ``load_sparse(output, MyModule(...))``.

    Args:
        ckpt_path: the ``.ckpt`` file (``ModelCheckpoint`` or ``trainer.save_checkpoint``).
        output: the export file; ``None`` writes ``<checkpoint name>.sparse.pt`` next to the checkpoint.
        submodule: ``None``: the choice above; a name such as ``"backbone"``: that attribute's tensors without
            its prefix; ``""``: the whole LightningModule.

    Returns:
        The :class:`~lightning_sparse.export.ExportReport` (file size against the dense ``state_dict``).

    Raises:
        FileNotFoundError: if ``ckpt_path`` does not exist.
        ValueError: if it is not a Lightning checkpoint, holds no MaskInit masks, or ``submodule`` names nothing;
            the message says what to do.
    """
    return _export(ckpt_path, output, submodule)[0]


def _export(
    ckpt_path: str | Path, output: str | Path | None, submodule: str | None
) -> tuple[ExportReport, SparseCheckpoint]:
    ckpt_path = Path(ckpt_path)
    sparse = read_sparse_checkpoint(ckpt_path, submodule)
    output = Path(output) if output is not None else ckpt_path.with_suffix(".sparse.pt")
    output.parent.mkdir(parents=True, exist_ok=True)
    return save_sparse(sparse.state_dict, output), sparse


def _export_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="lightning-sparse export", description=_EXPORT_DESCRIPTION)
    parser.add_argument(
        "--ckpt_path",
        type=str,
        required=True,
        help="checkpoint saved during a fit with MaskInit (lightning-sparse fit, or any Trainer script)",
    )
    parser.add_argument(
        "--output", type=str | None, default=None, help="export file (default: <checkpoint>.sparse.pt next to it)"
    )
    parser.add_argument(
        "--submodule",
        type=str | None,
        default=None,
        help="export only this attribute of the LightningModule (e.g. backbone), without its prefix; '' for the "
        "whole module (default: `network` for an ImageClassifier, the whole module otherwise)",
    )
    return parser


def _run_export(args: list[str]) -> None:
    parser = _export_parser()
    config = parser.parse_args(args)
    try:
        report, sparse = _export(config.ckpt_path, config.output, config.submodule)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(report)
    print(f"load it with lightning_sparse.load_sparse({report.path!r}, model), model = {sparse.load_hint()}")


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
