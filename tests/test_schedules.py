"""Tests for lightning_sparse.schedules (period schedules; DSR P schedule, docs/algorithms.md §2b)."""

from __future__ import annotations

import pytest
from jsonargparse import ArgumentParser

from lightning_sparse.schedules import ConstantPeriod, PeriodSchedule, SteppedPeriod, should_update


def test_constant_period() -> None:
    schedule = ConstantPeriod(100)
    assert [schedule.period(p) for p in (0.0, 0.5, 1.0)] == [100, 100, 100]
    with pytest.raises(ValueError, match="every_n_steps"):
        ConstantPeriod(0)
    with pytest.raises(ValueError, match="progress"):
        schedule.period(1.2)


def test_stepped_period_reproduces_dsr_wrn_schedule() -> None:
    # WRN-28-2, 200 epochs: 100 steps for epochs 0-24, 200 for 25-79, 400 for 80-139, 800 from 140.
    schedule = SteppedPeriod(100, milestones=[0.125, 0.4, 0.7])
    epochs = [0, 24, 25, 79, 80, 139, 140, 199, 200]
    assert [schedule.period(e / 200) for e in epochs] == [100, 100, 200, 200, 400, 400, 800, 800, 800]


def test_stepped_period_factor_and_no_milestones() -> None:
    assert [SteppedPeriod(10, [0.5], factor=3).period(p) for p in (0.2, 0.5, 0.9)] == [10, 30, 30]
    assert SteppedPeriod(10, []).period(0.9) == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"every_n_steps": 0, "milestones": [0.5]}, "every_n_steps"),
        ({"every_n_steps": 10, "milestones": [0.5, 0.4]}, "strictly increasing"),
        ({"every_n_steps": 10, "milestones": [0.5, 0.5]}, "strictly increasing"),
        ({"every_n_steps": 10, "milestones": [0.0, 0.5]}, r"\(0, 1\)"),
        ({"every_n_steps": 10, "milestones": [1.0]}, r"\(0, 1\)"),
        ({"every_n_steps": 10, "milestones": [0.5], "factor": 0}, "factor"),
    ],
)
def test_stepped_period_validates_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SteppedPeriod(**kwargs)


def test_should_update() -> None:
    constant = ConstantPeriod(100)
    assert not should_update(0, constant, 0.0)
    assert should_update(100, constant, 0.1)
    assert not should_update(150, constant, 0.1)
    stepped = SteppedPeriod(100, milestones=[0.125, 0.4, 0.7])
    assert should_update(300, stepped, 0.1)
    assert not should_update(300, stepped, 0.2)  # period 200 now
    assert should_update(400, stepped, 0.2)
    with pytest.raises(ValueError, match="step"):
        should_update(-1, constant, 0.0)


def test_period_schedule_is_abstract() -> None:
    with pytest.raises(TypeError):
        PeriodSchedule()  # type: ignore[abstract]


def test_schedules_build_from_class_path_config() -> None:
    parser = ArgumentParser()
    parser.add_argument("--period", type=PeriodSchedule)
    config = parser.parse_object(
        {
            "period": {
                "class_path": "lightning_sparse.schedules.SteppedPeriod",
                "init_args": {"every_n_steps": 100, "milestones": [0.125, 0.4, 0.7]},
            }
        }
    )
    # jsonargparse >= 4.49 renamed instantiate_classes to instantiate.
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes
    schedule = instantiate(config).period
    assert isinstance(schedule, SteppedPeriod)
    assert schedule.period(0.5) == 400
