"""The rule that lets an earlier validated policy replace the last one (deploy/validation.py)."""

import pytest

from deploy.validation import clearly_better


@pytest.mark.parametrize("best,last,episodes,margin,expected", [
    (0.92, 0.90, 200, 2.0, False),  # session 14's run: 2 points apart, within the noise of 200 episodes
    (0.92, 0.71, 200, 2.0, True),   # a task lost late in the run (session 11's 300-step run dipped to 71 %)
    (0.92, 0.90, 200, 0.0, True),   # margin 0: whichever validated best
    (0.90, 0.90, 200, 0.0, False),  # a tie keeps the last
    (0.0, 0.0, 10, 2.0, False),
    (1.0, 0.0, 10, 2.0, True),      # no spread at either end: any gap counts
    (0.80, 0.70, 100, 2.0, False),  # se = 0.061: 10 points is 1.6 se
    (0.80, 0.70, 400, 2.0, True),   # se = 0.031: 3.3 se
])
def test_an_earlier_policy_wins_only_by_more_than_the_margin(best, last, episodes, margin, expected):
    assert clearly_better(best, last, episodes, margin) is expected
