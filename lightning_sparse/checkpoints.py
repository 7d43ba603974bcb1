"""Read a sparse model out of a Lightning checkpoint: the weights from its ``state_dict``, the masks from MaskInit.

A checkpoint written while the callbacks run holds everything an export needs, whatever the LightningModule:
the module's ``state_dict`` (its own keys, untouched by the callbacks) and, in the callback states, MaskInit's
boolean masks keyed by parameter name (docs/architecture.md §3). Nothing here imports the module's class, so a
checkpoint of a user's own module exports without that module being importable. No Lightning import.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["SparseCheckpoint", "read_sparse_checkpoint"]

# The class paths LightningCLI records (``hyper_parameters["_class_path"]``) for an ImageClassifier.
_IMAGE_CLASSIFIER_PATHS = ("lightning_sparse.ImageClassifier", "lightning_sparse.classification.ImageClassifier")
# Hyperparameters only ImageClassifier has; they recognise one built in Python (no ``_class_path`` then).
_IMAGE_CLASSIFIER_HPARAMS = {"num_classes", "lr_schedule", "milestones", "input_shape"}
_AS_THEY_ARE = "save_sparse(torch.load(path, weights_only={})['state_dict'], output)"


@dataclass(frozen=True)
class SparseCheckpoint:
    """The masked weights of a checkpoint, ready for :func:`~lightning_sparse.export.save_sparse`.

    Attributes:
        state_dict: the weights with every masked position zero; keys relative to ``submodule``.
        submodule: the attribute of the LightningModule that was kept (``"network"`` for an ``ImageClassifier``),
            or ``""`` for the whole module.
        module_class_path: the LightningModule's class as LightningCLI recorded it (``hyper_parameters``'
            ``_class_path``), or ``None`` (a plain Trainer script, or a CLI run without subclass mode).
        network_config: for an ``ImageClassifier`` trained through the CLI, its network's ``class_path`` and
            ``init_args``; ``None`` otherwise.
        masked_tensors: how many tensors have a MaskInit mask.
    """

    state_dict: dict[str, Tensor]
    submodule: str
    module_class_path: str | None
    network_config: dict[str, Any] | None
    masked_tensors: int

    def load_hint(self) -> str:
        """What to build to load the export: ``load_sparse(path, <this>)``."""
        if self.submodule == "network" and self.network_config is not None:
            init_args = ", ".join(f"{key}={value!r}" for key, value in self.network_config.get("init_args", {}).items())
            return f"{self.network_config['class_path']}({init_args})"
        if self.submodule:
            return f"the `{self.submodule}` module of the LightningModule that wrote the checkpoint"
        if self.module_class_path is not None:
            return f"{self.module_class_path}(...) built with the checkpoint's hyper_parameters"
        return "the LightningModule that wrote the checkpoint, built as for training"


def read_sparse_checkpoint(ckpt_path: str | os.PathLike, submodule: str | None = None) -> SparseCheckpoint:
    """Read a Lightning checkpoint's weights and apply the MaskInit masks saved in it.

    The masks come from MaskInit's callback state, the weights from the checkpoint's ``state_dict``. MaskInit keeps
    every masked weight exactly zero during training, so applying the masks changes nothing in a checkpoint it
    wrote; it makes the export exactly the masked model whatever happened to the weights afterwards.

    Which tensors are kept (``submodule``):

    * ``None`` (the default): an ``ImageClassifier``'s ``network`` (recognised by the class path LightningCLI
      records, or by ImageClassifier's hyperparameters), so the export loads into the bare network as before;
      any other module whole, with the keys of its own ``state_dict()``, so it loads into a fresh instance of it;
    * a name such as ``"network"`` or ``"backbone"``: the tensors under that attribute, without its prefix;
    * ``""``: the whole LightningModule.

    Args:
        ckpt_path: a ``.ckpt`` written by ``ModelCheckpoint`` or ``trainer.save_checkpoint`` during or after a fit
            with the MaskInit callback (a plain Trainer script or ``lightning-sparse fit``).
        submodule: see above.

    Returns:
        A :class:`SparseCheckpoint`.

    Raises:
        FileNotFoundError: if ``ckpt_path`` is not a file.
        ValueError: if it is not a Lightning checkpoint, holds no MaskInit masks (e.g. saved with
            ``save_weights_only=True``, which leaves callback states out), its masks do not fit its weights, or
            ``submodule`` names no tensors. Each message says what to do instead.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; pass the .ckpt file written by ModelCheckpoint (or trainer.save_checkpoint)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file it cannot read this way
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"{path} could not be read as a Lightning checkpoint (torch.load(weights_only=True) failed: {reason}). "
            "Pass a .ckpt written by ModelCheckpoint or trainer.save_checkpoint. If it is one and holds pickled "
            "Python objects (e.g. an object in save_hyperparameters), export it in Python from a source you trust: "
            f"{_AS_THEY_ARE.format(False)}"
        ) from error
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(
            f"{path} is not a Lightning checkpoint (no 'state_dict' entry). For a bare nn.Module state_dict, export "
            "it in Python: save_sparse(state_dict, output)"
        )
    state_dict = {name: tensor for name, tensor in checkpoint["state_dict"].items() if isinstance(tensor, Tensor)}
    masks = _mask_init_masks(path, checkpoint)
    _apply_masks(path, state_dict, masks)

    hparams = checkpoint.get("hyper_parameters") or {}
    class_path = hparams.get("_class_path") if isinstance(hparams.get("_class_path"), str) else None
    image_classifier = _is_image_classifier(class_path, hparams, state_dict)
    if submodule is None:
        submodule = "network" if image_classifier else ""
    selected = _select(path, state_dict, submodule)
    network = hparams.get("network")
    network_config = (
        dict(network) if image_classifier and isinstance(network, Mapping) and "class_path" in network else None
    )
    return SparseCheckpoint(selected, submodule, class_path, network_config, len(masks))


def _mask_init_masks(path: Path, checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    # MaskInit's state is {"masks": {name: bool tensor}, ...}; found by content so a subclass's state works too.
    states = [
        state["masks"]
        for state in (checkpoint.get("callbacks") or {}).values()
        if isinstance(state, Mapping) and isinstance(state.get("masks"), Mapping) and state["masks"]
    ]
    if not states:
        raise ValueError(
            f"{path} holds no MaskInit masks: it was not saved during a fit with the MaskInit callback, or it was "
            "saved with ModelCheckpoint(save_weights_only=True), which leaves the callback states out. Export a "
            "checkpoint of a run with MaskInit in trainer.callbacks (save_weights_only=False, the default); to store "
            f"a checkpoint's tensors as they are, in Python: {_AS_THEY_ARE.format(True)}"
        )
    if len(states) > 1:
        raise ValueError(
            f"{path} holds masks from {len(states)} callbacks; a run has one MaskInit. Export in Python with "
            "save_sparse(model, output) after loading the model you mean"
        )
    return {name: mask for name, mask in states[0].items()}


def _apply_masks(path: Path, state_dict: dict[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    missing = sorted(name for name in masks if name not in state_dict)
    wrong = sorted(
        f"{name}: mask {tuple(mask.shape)} vs weight {tuple(state_dict[name].shape)}"
        for name, mask in masks.items()
        if name in state_dict and tuple(mask.shape) != tuple(state_dict[name].shape)
    )
    if missing or wrong:
        raise ValueError(
            f"the MaskInit masks in {path} do not fit its state_dict (masks without a weight: {missing[:10]}; "
            f"shape mismatches: {wrong[:10]}). The file was edited or assembled from two runs; export the "
            "checkpoint that MaskInit's run wrote"
        )
    for name, mask in masks.items():
        # In place: a weight shared under several names (WeightSharing) is one storage in the checkpoint.
        state_dict[name].masked_fill_(~mask.to(device=state_dict[name].device, dtype=torch.bool), 0)


def _is_image_classifier(class_path: str | None, hparams: Mapping[str, Any], state_dict: Mapping[str, Tensor]) -> bool:
    if class_path is not None:
        return class_path in _IMAGE_CLASSIFIER_PATHS
    return _IMAGE_CLASSIFIER_HPARAMS <= set(hparams) and all(name.startswith("network.") for name in state_dict)


def _select(path: Path, state_dict: dict[str, Tensor], submodule: str) -> dict[str, Tensor]:
    if not submodule:
        return state_dict
    prefix = submodule.rstrip(".") + "."
    selected = {name[len(prefix) :]: tensor for name, tensor in state_dict.items() if name.startswith(prefix)}
    if not selected:
        top_level = sorted({name.split(".", 1)[0] for name in state_dict})
        raise ValueError(
            f"{path} has no tensors under {submodule!r}; its state_dict's top-level names are {top_level}. Pass one "
            "of them, or an empty submodule for the whole LightningModule"
        )
    return selected
