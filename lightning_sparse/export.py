"""Compressed export of a sparse model: only the active weights (plus their positions) and the dense remainder.

Training-time sparsity is simulated (weights are stored dense and masked); this is where the size gain becomes
real. Each floating-point tensor of the model's ``state_dict()`` is stored in whichever form is smaller:

* **sparse**: the flat positions of its non-zero entries (``int16`` when the tensor has fewer than 32,768
  entries, else ``int32``) and their values, in the tensor's dtype;
* **dense**: the tensor itself (biases, BatchNorm, layers kept dense, integer buffers).

At 99% sparsity a float32 weight costs about ``0.01 x (4 + 4) = 0.08`` bytes instead of 4 (2%).
No Lightning import.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

FORMAT_NAME = "lightning-sparse-export"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportReport:
    """What :func:`save_sparse` wrote.

    Attributes:
        path: the file written.
        file_bytes: its size on disk.
        dense_bytes: the size of the same ``state_dict()`` saved densely with ``torch.save``.
        sparse_tensors: how many tensors were stored in sparse form.
        nonzero_weights: non-zero entries kept in the sparse tensors.
    """

    path: str
    file_bytes: int
    dense_bytes: int
    sparse_tensors: int
    nonzero_weights: int

    @property
    def ratio(self) -> float:
        """``file_bytes / dense_bytes``: 0.03 means the export is 3% of the dense file."""
        return self.file_bytes / self.dense_bytes

    def __str__(self) -> str:
        return (
            f"{self.path}: {self.file_bytes:,} bytes, {self.ratio:.2%} of the dense state_dict "
            f"({self.dense_bytes:,} bytes); {self.sparse_tensors} tensors stored sparse, "
            f"{self.nonzero_weights:,} non-zero weights"
        )


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int16 if numel < 2**15 else torch.int32


def _sparse_bytes(tensor: Tensor, nnz: int) -> int:
    return nnz * (tensor.element_size() + torch.empty(0, dtype=_index_dtype(tensor.numel())).element_size())


def dense_state_dict_bytes(state_dict: Mapping[str, Tensor]) -> int:
    """Size of ``torch.save(state_dict)``: the reference the export is compared with."""
    buffer = io.BytesIO()
    torch.save(dict(state_dict), buffer)
    return buffer.tell()


def save_sparse(model: nn.Module | Mapping[str, Tensor], path: str | os.PathLike) -> ExportReport:
    """Write a model's ``state_dict()`` with every mostly-zero tensor in sparse form.

    Args:
        model: a module (its ``state_dict()`` is saved) or a state_dict.
        path: the file to write.

    Returns:
        An :class:`ExportReport` with the file size next to the dense ``state_dict``'s.

    Example::

        report = save_sparse(model, "model.sparse.pt")
        print(report)          # model.sparse.pt: 231,450 bytes, 2.05% of the dense state_dict ...
        load_sparse("model.sparse.pt", fresh_model)
    """
    state_dict = model.state_dict() if isinstance(model, nn.Module) else dict(model)
    sparse: dict[str, dict[str, object]] = {}
    dense: dict[str, Tensor] = {}
    nonzero_weights = 0
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point() and tensor.numel() > 0:
            flat = tensor.reshape(-1)
            positions = torch.nonzero(flat, as_tuple=True)[0]
            if _sparse_bytes(tensor, positions.numel()) < tensor.numel() * tensor.element_size():
                sparse[name] = {
                    "shape": tuple(tensor.shape),
                    "positions": positions.to(_index_dtype(tensor.numel())),
                    "values": flat[positions].clone(),
                }
                nonzero_weights += positions.numel()
                continue
        dense[name] = tensor.clone()
    payload = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "order": list(state_dict),
        "sparse": sparse,
        "dense": dense,
    }
    torch.save(payload, path)
    return ExportReport(
        path=str(path),
        file_bytes=Path(path).stat().st_size,
        dense_bytes=dense_state_dict_bytes(state_dict),
        sparse_tensors=len(sparse),
        nonzero_weights=nonzero_weights,
    )


def read_sparse_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` back into an ordinary dense ``state_dict``.

    Raises:
        ValueError: if the file is not a lightning-sparse export, or of a newer format version.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a torch archive
        raise ValueError(
            f"{path} is not a lightning-sparse export (torch.load failed: {type(error).__name__}); "
            "write one with lightning_sparse.export.save_sparse(model, path)"
        ) from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a lightning-sparse export (no '{FORMAT_NAME}' marker); for a plain checkpoint use "
            "torch.load, or write an export with lightning_sparse.export.save_sparse(model, path)"
        )
    if payload.get("version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has export format version {payload['version']}; this library reads up to {FORMAT_VERSION}"
        )
    state_dict: dict[str, Tensor] = {}
    for name in payload["order"]:
        if name in payload["dense"]:
            state_dict[name] = payload["dense"][name]
            continue
        entry = payload["sparse"][name]
        shape = tuple(entry["shape"])
        values = entry["values"]
        flat = torch.zeros(int(torch.Size(shape).numel()), dtype=values.dtype, device=values.device)
        flat[entry["positions"].long()] = values
        state_dict[name] = flat.view(shape)
    return state_dict


def load_sparse(path: str | os.PathLike, model: nn.Module, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load an export written by :func:`save_sparse` into ``model`` (strictly) and return the model.

    Raises:
        ValueError: if the file is not an export, or its tensors do not fit ``model`` (names or shapes, all
            listed).
    """
    state_dict = read_sparse_state_dict(path, map_location=map_location)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{name}: file {tuple(state_dict[name].shape)} vs model {tuple(expected[name].shape)}"
        for name in set(state_dict) & set(expected)
        if state_dict[name].shape != expected[name].shape
    )
    if missing or unexpected or wrong:
        raise ValueError(
            f"the export {path} does not match {type(model).__name__}: missing {missing[:10]}, "
            f"unexpected {unexpected[:10]}, shape mismatches {wrong[:10]}"
        )
    model.load_state_dict(state_dict, strict=True)
    return model
