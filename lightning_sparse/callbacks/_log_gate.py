"""Per-step logging that calls ``pl_module.log`` only when the logged values change (issue 14).

``pl_module.log(..., on_step=True)`` costs a few hundred microseconds per call in Lightning's result collection,
on every training batch, while the callbacks' curves (threshold, counters, beta...) change only at their updates.
A value logged once stays in Lightning's step metrics until the epoch's results are reset, so every
``log_every_n_steps`` write still carries the latest value when it is logged only when it changes and again at
the first batch of each epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ChangeGate:
    """Remembers what was logged last and says whether a new set of values needs logging."""

    def __init__(self) -> None:
        self._last: tuple[Any, dict[str, float]] | None = None

    def reset(self) -> None:
        """Forget what was logged (call at the start of fit: the next values are logged whatever they are)."""
        self._last = None

    def changed(self, trainer: Any, values: Mapping[str, float]) -> bool:
        """True when ``values`` differ from the last logged ones or a new epoch (or fit) began; records them."""
        key = (id(trainer), trainer.current_epoch)
        current = dict(values)
        if self._last is not None and self._last[0] == key and self._last[1] == current:
            return False
        self._last = (key, current)
        return True
