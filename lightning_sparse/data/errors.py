"""Error raised by the datamodules when a dataset is not on disk and cannot be fetched."""

from __future__ import annotations


class DatasetNotFoundError(RuntimeError):
    """A dataset is missing (or corrupted) and could not be downloaded.

    The message says where the datamodule looked and how to get the data. It subclasses ``RuntimeError``
    because that is what torchvision raises for a missing dataset.
    """
