"""Compressed export of a sparse model: only the active weights (plus their positions) and the dense remainder.

Training-time sparsity is simulated (weights are stored dense and masked); this is where the size gain becomes
real. Each floating-point tensor of the model's ``state_dict()`` is stored in whichever form is smaller:

* **sparse**: the flat positions of its non-zero entries (``int16`` when the tensor has fewer than 32,768
  entries, else ``int32``) and their values, in the tensor's dtype;
* **dense**: the tensor itself (biases, BatchNorm, layers kept dense, integer buffers).

At 99% sparsity a float32 weight costs about ``0.01 x (4 + 4) = 0.08`` bytes instead of 4 (2%).

The file is written atomically (a failed overwrite leaves the previous export intact) and, from format version 2
on, carries a SHA-256 checksum of its contents that :func:`load_sparse` verifies. Every stored shape and position
is validated on loading; a damaged file raises a ``ValueError`` naming the tensor, never a wrong weight.
No Lightning import.
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_sparse._atomic import atomic_save

FORMAT_NAME = "lightning-sparse-export"
FORMAT_VERSION = 2
_ZIP_MAGIC = b"PK\x03\x04"


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
    payload["checksum"] = _checksum(payload["order"], sparse, dense)
    atomic_save(payload, path)
    return ExportReport(
        path=str(path),
        file_bytes=Path(path).stat().st_size,
        dense_bytes=dense_state_dict_bytes(state_dict),
        sparse_tensors=len(sparse),
        nonzero_weights=nonzero_weights,
    )


def _tensor_bytes(tensor: Tensor) -> bytes:
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _checksum(order: list[str], sparse: Mapping[str, Mapping[str, object]], dense: Mapping[str, Tensor]) -> str:
    """SHA-256 over every name, shape, dtype and byte of the stored tensors, in the file's order."""
    digest = hashlib.sha256()
    for name in order:
        digest.update(name.encode() + b"\0")
        if name in dense:
            tensors = [("dense", dense[name])]
        else:
            entry = sparse[name]
            digest.update(repr(tuple(int(d) for d in entry["shape"])).encode())  # type: ignore[union-attr]
            tensors = [("positions", entry["positions"]), ("values", entry["values"])]
        for kind, tensor in tensors:
            assert isinstance(tensor, Tensor)
            digest.update(f"{kind}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(_tensor_bytes(tensor))
    return digest.hexdigest()


def _load_payload(path: str | os.PathLike, map_location: str | torch.device) -> object:
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch raises several types for a file that is not a torch archive
        with open(path, "rb") as handle:
            is_zip = handle.read(4) == _ZIP_MAGIC
        if is_zip and not zipfile.is_zipfile(path):
            raise ValueError(
                f"{path} is truncated: it starts as a torch archive but ends before the archive's directory "
                f"({os.path.getsize(path):,} bytes; an interrupted copy or write?). Export it again."
            ) from error
        if is_zip:
            raise ValueError(
                f"{path} is damaged: it is a torch archive but cannot be read ({type(error).__name__}: {error}). "
                "Export it again."
            ) from error
        raise ValueError(
            f"{path} is not a lightning-sparse export (torch.load failed: {type(error).__name__}); "
            "write one with lightning_sparse.export.save_sparse(model, path)"
        ) from error


def _damaged(path: str | os.PathLike, what: str) -> ValueError:
    return ValueError(f"{path} is damaged: {what}. Export it again with lightning_sparse.save_sparse(model, path).")


def _check_entry(path: str | os.PathLike, name: str, entry: object) -> None:
    """Check one sparse-form entry's structure: its keys, shape, dtypes and lengths."""
    if not isinstance(entry, dict) or not {"shape", "positions", "values"} <= set(entry):
        raise _damaged(path, f"the entry of tensor {name!r} lacks its shape, positions or values")
    shape, positions, values = entry["shape"], entry["positions"], entry["values"]
    if not isinstance(shape, (tuple, list)) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise _damaged(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(positions, Tensor) or positions.dtype not in (torch.int16, torch.int32, torch.int64):
        raise _damaged(path, f"the positions of tensor {name!r} are not an integer tensor")
    if not isinstance(values, Tensor) or not values.is_floating_point():
        raise _damaged(path, f"the values of tensor {name!r} are not a floating-point tensor")
    if positions.dim() != 1 or values.dim() != 1 or positions.numel() != values.numel():
        raise _damaged(
            path,
            f"tensor {name!r} stores {positions.numel()} positions and {values.numel()} values (they must be two "
            "1-D tensors of one length)",
        )


def _sparse_tensor(path: str | os.PathLike, name: str, entry: dict) -> Tensor:
    """Rebuild one (structurally checked) sparse-form tensor, checking that its positions are in range and unique."""
    shape, positions, values = entry["shape"], entry["positions"], entry["values"]
    numel = int(torch.Size(shape).numel())
    flat_positions = positions.long()
    if flat_positions.numel():
        low, high = int(flat_positions.min()), int(flat_positions.max())
        if low < 0 or high >= numel:
            raise _damaged(
                path,
                f"tensor {name!r} of shape {tuple(shape)} stores a position out of [0, {numel}): {low if low < 0 else high}",
            )
        if flat_positions.numel() > 1 and not bool((flat_positions[1:] > flat_positions[:-1]).all()):
            raise _damaged(path, f"the positions of tensor {name!r} are not strictly increasing (a repeated position?)")
    flat = torch.zeros(numel, dtype=values.dtype, device=values.device)
    flat[flat_positions] = values
    return flat.view(tuple(shape))


def read_sparse_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Read a file written by :func:`save_sparse` back into an ordinary dense ``state_dict``.

    Raises:
        ValueError: if the file is not a lightning-sparse export, is of a newer format version, is truncated, or
            is damaged (a checksum mismatch, a position out of range, a missing or malformed entry; the message
            names the tensor).
    """
    payload = _load_payload(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
        raise ValueError(
            f"{path} is not a lightning-sparse export (no '{FORMAT_NAME}' marker); for a plain checkpoint use "
            "torch.load, or write an export with lightning_sparse.export.save_sparse(model, path)"
        )
    version = payload.get("version", 0)
    if not isinstance(version, int):
        raise _damaged(path, f"its format version is {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has export format version {version}; this library reads up to {FORMAT_VERSION}")
    order, sparse, dense = payload.get("order"), payload.get("sparse"), payload.get("dense")
    if not isinstance(order, list) or not all(isinstance(name, str) for name in order):
        raise _damaged(path, "its list of tensor names is missing or malformed")
    if not isinstance(sparse, dict) or not isinstance(dense, dict):
        raise _damaged(path, "its sparse or dense section is missing")
    listed = set(order)
    for name in order:
        if (name in sparse) == (name in dense):
            raise _damaged(path, f"tensor {name!r} is {'in both sections' if name in sparse else 'missing'}")
    extra = sorted((set(sparse) | set(dense)) - listed)
    if extra or len(listed) != len(order):
        raise _damaged(path, f"its tensors do not match its list of names (unlisted: {extra[:5]})")
    for name, tensor in dense.items():
        if not isinstance(tensor, Tensor):
            raise _damaged(path, f"tensor {name!r} is not a tensor")
    for name, entry in sparse.items():
        _check_entry(path, name, entry)
    if version >= 2:
        checksum = payload.get("checksum")
        try:
            actual = _checksum(order, sparse, dense)
        except (AssertionError, KeyError, TypeError, ValueError, RuntimeError):
            actual = None
        if actual is None or checksum != actual:
            raise _damaged(
                path, "its contents do not match the checksum written with it (bytes changed after it was written)"
            )
    state_dict: dict[str, Tensor] = {}
    for name in order:
        state_dict[name] = dense[name] if name in dense else _sparse_tensor(path, name, sparse[name])
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
