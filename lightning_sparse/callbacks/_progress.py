"""Helpers shared by the EAST callbacks: schedule positions in optimizer steps, and order-independent transforms.

EAST's schedules (docs/algorithms.md §3c phase-out window, §3e cycle length) are stated in epochs in the authors' code
and as fractions of training in the paper's protocol (§3f). The callbacks accept both and convert them once the run's
length is known, so that they can advance from ``trainer.global_step`` (optimizer steps; gradient accumulation is
then handled).

EAST's model transforms (weight sharing's U(0, 1) scales, DyReLU's hyper-network init) draw random numbers in the
callbacks' ``setup``. :func:`isolated_rng` gives each transform its own stream, so the result does not depend on
the order of the callbacks list (docs/architecture.md §6) and the global generator is left as it was.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from numbers import Real

import lightning.pytorch as pl
import torch

__all__ = ["check_schedule_point", "isolated_rng", "run_length", "schedule_point_to_step"]


def check_schedule_point(value: int | float, name: str, *, allow_zero: bool = True) -> int | float:
    """Validate a schedule position: an int number of epochs (>= 0) or a float fraction of training in [0, 1].

    Args:
        value: the position.
        name: the argument's name, for the error message.
        allow_zero: whether 0 (the start of training) is a valid position.

    Returns:
        ``value`` unchanged (an ``int`` or a ``float``).

    Raises:
        TypeError: for a bool or a non-number.
        ValueError: for a negative int, or a float outside [0, 1] (or equal to 0 when ``allow_zero`` is False).
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(
            f"{name} must be an int (a number of epochs) or a float (a fraction of the total optimizer steps), "
            f"got {type(value).__name__}"
        )
    if isinstance(value, int):
        if value < 0 or (value == 0 and not allow_zero):
            raise ValueError(
                f"{name} as an int is a number of epochs and must be >= {0 if allow_zero else 1}, got {value}"
            )
        return value
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0 or (value == 0.0 and not allow_zero):
        bound = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(
            f"{name} as a float is a fraction of the total optimizer steps and must be in {bound}, got {value}; "
            "pass an int for a number of epochs"
        )
    return value


def schedule_point_to_step(value: int | float, total_steps: int, steps_per_epoch: int | None) -> int:
    """Convert a schedule position to an optimizer-step count.

    Args:
        value: an int number of epochs, or a float fraction of ``total_steps``.
        total_steps: optimizer steps of the whole run (``trainer.estimated_stepping_batches``).
        steps_per_epoch: optimizer steps per epoch, or ``None`` when the epoch length is unknown.

    Returns:
        ``value * steps_per_epoch`` for an int, ``round(value * total_steps)`` for a float.

    Raises:
        ValueError: for an int position when the epoch length is unknown.

    Example:
        >>> schedule_point_to_step(0.25, 1000, 10), schedule_point_to_step(3, 1000, 10)
        (250, 30)
    """
    if isinstance(value, int) and not isinstance(value, bool):
        if steps_per_epoch is None:
            raise ValueError(
                f"the position {value} is a number of epochs, but the training dataloader has no length; "
                "give the position as a float fraction of the total optimizer steps instead"
            )
        return value * steps_per_epoch
    return round(float(value) * total_steps)


def run_length(trainer: pl.Trainer, requester: str) -> tuple[int, int | None]:
    """Optimizer steps of the whole run and per epoch.

    Args:
        trainer: the Trainer, during fit (the training dataloader is set up by this call if needed).
        requester: the callback asking, for the error message.

    Returns:
        ``(total_steps, steps_per_epoch)``; ``steps_per_epoch`` is ``None`` when the dataloader has no length.

    Raises:
        ValueError: when the run's length is unknown (neither ``max_epochs`` nor ``max_steps``).
    """
    total = trainer.estimated_stepping_batches
    if not math.isfinite(total):
        raise ValueError(
            f"{requester} places its schedule on the run's length: set Trainer(max_epochs=...) or Trainer(max_steps=...)"
        )
    batches = trainer.num_training_batches
    per_epoch = None if not math.isfinite(batches) else max(math.ceil(batches / trainer.accumulate_grad_batches), 1)
    return max(int(total), 1), per_epoch


@contextmanager
def isolated_rng(tag: str) -> Iterator[int]:
    """Run a block with torch's CPU generator seeded from ``torch.initial_seed()`` and ``tag``, then restore it.

    The seed depends only on the process's initial seed (``seed_everything(s)`` sets it to ``s``) and the tag, so
    two transforms done in either order draw the same numbers, and code after the block sees the global generator
    as if the block had not run.

    Args:
        tag: names the transform (e.g. the callback's class name).

    Yields:
        The seed used.
    """
    seed = (torch.initial_seed() + zlib.crc32(tag.encode())) % (2**63)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield seed
