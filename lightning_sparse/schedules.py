"""Small YAML-friendly schedules for how often sparse-topology updates run.

Each class has a type-hinted ``__init__`` so LightningCLI / jsonargparse can build it from a ``class_path`` entry:

.. code-block:: yaml

    period:
      class_path: lightning_sparse.schedules.SteppedPeriod
      init_args: {every_n_steps: 100, milestones: [0.125, 0.4, 0.7]}

Pure Python: no Lightning or torch import. docs/algorithms.md §4c lists the schedule options; this module provides the
constant period (SET, RigL's Delta T) and DSR's stepped period (§2b).
"""

from __future__ import annotations

import bisect
from abc import ABC, abstractmethod
from collections.abc import Sequence

__all__ = ["ConstantPeriod", "PeriodSchedule", "SteppedPeriod", "should_update"]


def _check_progress(progress: float) -> None:
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"`progress` is the fraction of training done and must be in [0, 1], got {progress}.")


def _check_every_n_steps(every_n_steps: int) -> None:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int):
        raise TypeError(f"`every_n_steps` must be an int, got {type(every_n_steps).__name__}.")
    if every_n_steps < 1:
        raise ValueError(f"`every_n_steps` must be >= 1, got {every_n_steps}.")


class PeriodSchedule(ABC):
    """Number of optimizer steps between two topology updates, as a function of training progress."""

    @abstractmethod
    def period(self, progress: float) -> int:
        """Return the update period (>= 1 steps) at ``progress``, the fraction of training done, in [0, 1]."""


class ConstantPeriod(PeriodSchedule):
    """Update every ``every_n_steps`` steps throughout training (RigL's Delta T = 100, docs/algorithms.md §4a).

    Args:
        every_n_steps: The period in optimizer steps (>= 1).

    Raises:
        ValueError: If ``every_n_steps < 1``.

    Example:
        >>> ConstantPeriod(100).period(0.9)
        100
    """

    def __init__(self, every_n_steps: int) -> None:
        _check_every_n_steps(every_n_steps)
        self.every_n_steps = every_n_steps

    def period(self, progress: float) -> int:
        _check_progress(progress)
        return self.every_n_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(every_n_steps={self.every_n_steps})"


class SteppedPeriod(PeriodSchedule):
    """A period multiplied by ``factor`` at each milestone: DSR's reallocation schedule P (docs/algorithms.md §2b).

    The period is ``every_n_steps * factor**m`` where m is the number of milestones <= progress. DSR on
    WRN-28-2 (200 epochs) uses 100 steps for epochs 0-24, 200 for 25-79, 400 for 80-139 and 800 from 140:
    ``SteppedPeriod(100, milestones=[0.125, 0.4, 0.7])``. For ResNet-50 (100 epochs): ``SteppedPeriod(1000,
    milestones=[0.25, 0.5, 0.75])``.

    Args:
        every_n_steps: The period before the first milestone, in optimizer steps (>= 1).
        milestones: Strictly increasing fractions of training in (0, 1) at which the period is multiplied.
        factor: The multiplier applied at each milestone (>= 1).

    Raises:
        ValueError: If an argument is out of range or the milestones are not strictly increasing.

    Example:
        >>> schedule = SteppedPeriod(100, milestones=[0.125, 0.4, 0.7])
        >>> [schedule.period(epoch / 200) for epoch in (0, 24, 25, 80, 140, 199)]
        [100, 100, 200, 400, 800, 800]
    """

    def __init__(self, every_n_steps: int, milestones: list[float], factor: int = 2) -> None:
        _check_every_n_steps(every_n_steps)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise TypeError(f"`milestones` must be a list of floats, got {type(milestones).__name__}.")
        milestones = [float(milestone) for milestone in milestones]
        if any(not 0.0 < milestone < 1.0 for milestone in milestones):
            raise ValueError(f"Every milestone must be a fraction of training in (0, 1), got {milestones}.")
        if any(later <= earlier for earlier, later in zip(milestones, milestones[1:])):
            raise ValueError(f"`milestones` must be strictly increasing, got {milestones}.")
        if isinstance(factor, bool) or not isinstance(factor, int):
            raise TypeError(f"`factor` must be an int, got {type(factor).__name__}.")
        if factor < 1:
            raise ValueError(f"`factor` must be >= 1, got {factor}.")
        self.every_n_steps = every_n_steps
        self.milestones = milestones
        self.factor = factor

    def period(self, progress: float) -> int:
        _check_progress(progress)
        passed = bisect.bisect_right(self.milestones, progress)
        return self.every_n_steps * self.factor**passed

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(every_n_steps={self.every_n_steps}, milestones={self.milestones}, "
            f"factor={self.factor})"
        )


def should_update(step: int, schedule: PeriodSchedule, progress: float) -> bool:
    """Whether a topology update is due at ``step``: ``step > 0 and step % schedule.period(progress) == 0``.

    DSR's rule (docs/algorithms.md §2a TRAIN LOOP): the counter is the global optimizer step, never reset per epoch.

    Args:
        step: The global optimizer step (>= 0), e.g. ``trainer.global_step``.
        schedule: The period schedule.
        progress: Fraction of training done, in [0, 1].

    Returns:
        True if an update should run at this step.

    Raises:
        ValueError: If ``step`` is negative or ``progress`` is outside [0, 1].

    Example:
        >>> should_update(200, ConstantPeriod(100), 0.5), should_update(0, ConstantPeriod(100), 0.0)
        (True, False)
    """
    if step < 0:
        raise ValueError(f"`step` must be >= 0, got {step}.")
    period = schedule.period(progress)
    return step > 0 and step % period == 0
