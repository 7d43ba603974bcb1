"""Atomic file writes: a file is either its old contents or its complete new contents, never a torn mix.

Every file the library writes (exports, and through the CLI's adapters its checkpoints and configs) goes
through :func:`atomic_write`: the data is written to a temporary file in the target's folder, flushed to disk,
and renamed over the target (``os.replace``, atomic on POSIX and Windows for paths on one filesystem). A write
that fails (disk full, a file-size limit, a killed process) leaves the previous file as it was. No Lightning
import.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "atomic_write"]


def _default_mode(target: Path) -> int:
    if target.exists():
        return target.stat().st_mode & 0o777
    umask = os.umask(0)  # read the umask (only settable): restore it at once
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s folder; on success it replaces ``path``, on error it is removed.

    Example::

        with atomic_write("model.sparse.pt") as tmp:
            torch.save(payload, tmp)      # model.sparse.pt is untouched until this has succeeded

    Args:
        path: the file to write (its folder must exist).
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, _default_mode(target))
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through :func:`atomic_write`."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)
