"""learner.lr_schedule: the GRPO lr from lr to lr * lr_final_ratio over the run."""

import pytest

from common.config_loading import load_config
from learner.lr_schedule import run_progress, scheduled_lr
from tests.conftest import ROOT


def _learner(*overrides):
    return load_config(ROOT / "configs/tiny.yaml", ["learner.lr=0.001", *overrides]).learner


def test_constant_ignores_progress():
    cfg = _learner()
    assert [scheduled_lr(cfg, p) for p in (0.0, 0.5, 1.0)] == [0.001] * 3


@pytest.mark.parametrize("schedule, middle", [("linear", 0.55), ("cosine", 0.55)])
def test_decays_from_lr_to_the_final_ratio_and_holds_there(schedule, middle):
    cfg = _learner(f"learner.lr_schedule={schedule}", "learner.lr_final_ratio=0.1")
    assert scheduled_lr(cfg, 0.0) == pytest.approx(0.001)
    assert scheduled_lr(cfg, 0.5) == pytest.approx(0.001 * middle)
    assert scheduled_lr(cfg, 1.0) == pytest.approx(0.0001)
    assert scheduled_lr(cfg, 3.0) == pytest.approx(0.0001)  # past the end (resumed past total_steps): the final lr
    lrs = [scheduled_lr(cfg, p / 10) for p in range(11)]
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    if schedule == "cosine":  # flat at both ends, unlike linear
        assert lrs[0] - lrs[1] < lrs[5] - lrs[6]


def test_bad_schedule_names_the_field():
    with pytest.raises(Exception, match="lr_schedule"):
        _learner("learner.lr_schedule=step")


def test_progress_follows_steps_or_the_clock_whichever_is_further():
    assert run_progress(3, 12) == 0.25
    assert run_progress(3, 12, elapsed_s=30.0, budget_s=60.0) == 0.5  # the budget ends the run first
    assert run_progress(9, 12, elapsed_s=30.0, budget_s=60.0) == 0.75
    assert run_progress(20, 12) == 1.0 and run_progress(1, 12, elapsed_s=90.0, budget_s=60.0) == 1.0
