"""learner.success_replay_coef's buffer: only successes, the latest per task, tasks drawn
uniformly, targets only where the action ran, and a checkpoint round trip that keeps the order."""

import numpy as np
import pytest

from common.records import Trajectory
from learner.success_replay import SuccessReplay


def _traj(task: str, success: bool, tag: int, chunks: int = 3, ran_last: int = 5) -> Trajectory:
    executed = np.ones((chunks, 8), bool)
    executed[-1, ran_last:] = False
    return Trajectory(task=task, init_state=tag, instruction=f"do {task}",
                      images=np.full((chunks, 16, 16, 3), tag, dtype=np.uint8),
                      tokens=np.full((chunks, 8, 7), 31744 + tag, dtype=np.int64),
                      logprobs=np.zeros((chunks, 8, 7), np.float32), executed=executed, success=success,
                      env_steps=int(executed.sum()), policy_version=0,
                      proprio=np.full((chunks, 4), tag, dtype=np.float32))


def test_keeps_only_the_latest_successes_of_each_task():
    replay = SuccessReplay(capacity_per_task=2)
    assert replay.batch(4, np.random.default_rng(0)) is None  # nothing to replay yet
    assert replay.add([_traj("a", True, 1), _traj("a", False, 2), _traj("a", True, 3), _traj("a", True, 4)]) == 3
    assert replay.add([_traj("b", True, 5)]) == 1
    assert len(replay) == 3
    assert [t.init_state for t in replay.buffers["a"]] == [3, 4]


def test_tasks_are_drawn_uniformly_and_unexecuted_actions_are_masked():
    replay = SuccessReplay(capacity_per_task=100)
    replay.add([_traj("common", True, i) for i in range(1, 60)] + [_traj("rare", True, 99)])
    images, instructions, tokens, proprio, mask = replay.batch(2000, np.random.default_rng(0))
    assert images.shape == (2000, 16, 16, 3) and tokens.shape == (2000, 56) and mask.shape == (2000, 56)
    rare = np.array([i == "do rare" for i in instructions])
    assert 0.45 < rare.mean() < 0.55  # one trajectory of the rare task weighs as much as 59 of the other
    assert (tokens[rare] == 31744 + 99).all() and (images[rare] == 99).all() and (proprio[rare] == 99).all()
    # the last chunk ran 5 of its 8 actions: 5 x 7 tokens are targets, the rest masked
    assert set(mask.sum(axis=1).tolist()) == {56.0, 35.0}
    assert (mask.reshape(2000, 8, 7)[:, :5] == 1).all()


def test_round_trip_through_a_checkpoint_keeps_order_and_draws(tmp_path):
    replay = SuccessReplay(capacity_per_task=3)
    replay.add([_traj(t, True, i) for i, t in enumerate(["a", "b", "a", "a", "b", "a"], start=1)])
    replay.save(tmp_path / "replay")
    back = SuccessReplay(capacity_per_task=3)
    back.load(tmp_path / "replay")
    assert {t: [x.init_state for x in b] for t, b in back.buffers.items()} == {"a": [3, 4, 6], "b": [2, 5]}
    first, second = replay.batch(16, np.random.default_rng(7)), back.batch(16, np.random.default_rng(7))
    for x, y in zip(first, second):
        assert x == y if isinstance(x, list) else np.array_equal(x, y)


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity_per_task"):
        SuccessReplay(0)
