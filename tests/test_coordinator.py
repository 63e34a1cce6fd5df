"""Dynamic sampling, surplus, the lag filter, the init-state samplers, and the surplus in checkpoints."""

import json

import pytest

from actors.coordinator import Group, RolloutCoordinator
from actors.env_pool import Episode, FinishedEpisode
from actors.samplers import AdaptiveStateSampler, AdaptiveTaskSampler, InitStateSampler, make_sampler
from common.config import RolloutConfig
from common.records import EpisodeMeta


def _feed(coord, group_id, key, successes, version=0):
    coord.open_groups[group_id] = Group(key)
    for s in successes:
        meta = EpisodeMeta(task=key[0], init_state=key[1], success=bool(s), env_steps=10, policy_version=version,
                           num_chunks=2, seconds=0.1)
        coord.add(FinishedEpisode(Episode(key[0], key[1], 1.6, greedy=False, tag=group_id), meta, ref=None))


def _balanced(coord) -> bool:
    led = coord.ledger
    return led.finished == led.trained + led.filtered + led.stale + led.discarded + coord.held()


def _coordinator(**kw):
    cfg = RolloutConfig(group_size=8, **kw)
    return RolloutCoordinator(cfg, pool=None, sampler=InitStateSampler([("a", 0)], seed=0))


def test_all_success_and_all_fail_groups_are_dropped():
    coord = _coordinator()
    _feed(coord, 0, ("a", 0), [1] * 8)
    _feed(coord, 1, ("a", 1), [0] * 8)
    _feed(coord, 2, ("a", 2), [1] + [0] * 7)
    _feed(coord, 3, ("a", 3), [1] * 7 + [0])
    assert [g.key for g in coord.ready] == [("a", 2), ("a", 3)]
    assert (coord.stats.groups_filtered, coord.stats.groups_kept) == (2, 2)
    assert coord.ledger.filtered == 16 and _balanced(coord)


def test_batch_is_always_full_and_surplus_is_kept_for_the_next_step():
    coord = _coordinator(groups_per_batch=2)
    for i in range(5):
        _feed(coord, i, ("a", i), [1, 0, 0, 0, 0, 0, 0, 0])
    batch = coord.next_batch(2, current_version=0, timeout_s=10)
    assert len(batch) == 2 and [g.key[1] for g in batch] == [0, 1]
    assert [g.key[1] for g in coord.ready] == [2, 3, 4]
    batch = coord.next_batch(2, current_version=1, timeout_s=10)
    assert [g.key[1] for g in batch] == [2, 3] and len(coord.ready) == 1
    assert coord.ledger.trained == 32 and coord.held() == 8 and _balanced(coord)


def test_surplus_is_discarded_when_keep_surplus_is_off():
    coord = _coordinator(keep_surplus=False)
    for i in range(3):
        _feed(coord, i, ("a", i), [1, 0, 0, 0, 0, 0, 0, 0])
    assert len(coord.next_batch(1, 0, timeout_s=10)) == 1 and coord.ready == []
    assert coord.ledger.discarded == 16 and _balanced(coord)


# strict mode (lag 0) still lets surplus groups lag one version unless keep_surplus is off
@pytest.mark.parametrize("max_lag,keep_surplus,current,kept", [
    (0, True, 1, [0, 1, 2]), (0, True, 2, [1, 2]), (0, False, 2, [2]), (0, False, 1, [1, 2]),
    (2, True, 3, [1, 2]), (2, True, 4, [2]),
])
def test_groups_older_than_the_allowed_lag_are_dropped(max_lag, keep_surplus, current, kept):
    coord = _coordinator(max_policy_lag=max_lag, keep_surplus=keep_surplus)
    for gid, version in enumerate([0, 1, 2]):
        _feed(coord, gid, ("a", gid), [1, 0, 0, 0, 0, 0, 0, 0], version=version)
    coord.drop_stale(current)
    assert [g.policy_version for g in coord.ready] == kept
    assert coord.stats.groups_stale == 3 - len(kept) and _balanced(coord)


def test_a_group_sampled_by_weights_older_than_the_lag_is_rejected_when_it_completes():
    coord = _coordinator(max_policy_lag=0)
    coord.drop_stale(4)  # the learner is at version 4
    _feed(coord, 0, ("a", 0), [1, 0, 0, 0, 0, 0, 0, 0], version=4)
    # one episode ran partly on a replica that restarted on its initial weights (version 0)
    coord.open_groups[1] = Group(("a", 1))
    for version in [4] * 7 + [0]:
        meta = EpisodeMeta(task="a", init_state=1, success=version == 4, env_steps=10, policy_version=version,
                           num_chunks=2, seconds=0.1)
        coord.add(FinishedEpisode(Episode("a", 1, 1.6, greedy=False, tag=1), meta, ref=None))
    assert [g.key for g in coord.ready] == [("a", 0)]
    assert coord.stats.groups_stale == 1 and coord.stats.groups_done == 2 and not coord.open_groups
    assert coord.ledger.stale == 8 and _balanced(coord)


def test_sampler_cycles_every_pair_and_resumes_exactly():
    pairs = [(t, s) for t in "ab" for s in range(3)]
    a = InitStateSampler(pairs, seed=1)
    first = [a.next() for _ in range(6)]
    assert sorted(first) == sorted(pairs)
    state = a.state()
    rest = [a.next() for _ in range(5)]
    b = InitStateSampler(pairs, seed=1)
    b.load(state)
    assert [b.next() for _ in range(5)] == rest


def test_adaptive_sampler_moves_groups_to_failing_tasks_and_keeps_a_floor():
    pairs = [(t, s) for t in ("hopeless", "half", "solved") for s in range(5)]
    sampler = AdaptiveTaskSampler(pairs, seed=3, floor=0.1)
    rate = {"hopeless": 0.0, "half": 0.5, "solved": 1.0}
    counts = {t: 0 for t in rate}
    for i in range(900):
        task, state = sampler.next()
        assert (task, state) in pairs
        counts[task] += 1
        sampler.observe(task, success_rate=rate[task])
    # after warm-up the weights are 1 : 0.5 : 0.1 (failure rates, floored) -> 62.5 / 31 / 6 %
    w = sampler.weights()
    assert w == pytest.approx({"hopeless": 1 / 1.6, "half": 0.5 / 1.6, "solved": 0.1 / 1.6}, rel=1e-3)
    assert counts["hopeless"] > counts["half"] > counts["solved"] > 0.03 * 900
    # init states of a task are still cycled: every state of "hopeless" served equally often
    more = [sampler.next() for _ in range(200)]
    per_state = [sum(1 for t, s in more if t == "hopeless" and s == k) for k in range(5)]
    assert max(per_state) - min(per_state) <= 1


def test_adaptive_sampler_resumes_exactly_and_config_picks_it():
    pairs = [(t, s) for t in "abc" for s in range(4)]
    a = AdaptiveTaskSampler(pairs, seed=1)
    for i in range(25):
        t, _ = a.next()
        a.observe(t, success_rate=(i % 3) / 4 if t != "b" else 1.0)
    state = json.loads(json.dumps(a.state()))  # what a checkpoint's state.json holds
    rest = [a.next() for _ in range(30)]
    b = AdaptiveTaskSampler(pairs, seed=1)
    b.load(state)
    assert [b.next() for _ in range(30)] == rest
    assert isinstance(make_sampler(pairs, 0, RolloutConfig(task_sampling="adaptive")), AdaptiveTaskSampler)
    assert isinstance(make_sampler(pairs, 0, RolloutConfig()), InitStateSampler)
    with pytest.raises(ValueError, match="task_sampling"):
        RolloutConfig(task_sampling="greedy")


def test_state_sampler_moves_a_task_s_groups_to_its_failing_states():
    """Within a task, states the policy has solved get few groups and failing ones many; the task
    weights are AdaptiveTaskSampler's; every state is tried early; resume replays the same draws."""
    pairs = [(t, s) for t in ("a", "b") for s in range(10)]
    sampler = AdaptiveStateSampler(pairs, seed=0, group_size=8)
    solved = {("a", s): s < 5 for s in range(10)} | {("b", s): True for s in range(10)}
    counts = {p: 0 for p in pairs}
    for i in range(1000):
        task, state = sampler.next()
        counts[(task, state)] += 1
        # a solved state succeeds in every episode; the others in one of eight (kept, mostly failing)
        sampler.observe(task, success_rate=1.0 if solved[(task, state)] else 0.125, init_state=state)
        if i == 60:
            assert all(counts[("a", s)] > 0 for s in range(10)), "every state of the failing task is tried early"
    failing = sum(counts[("a", s)] for s in range(5, 10))
    assert failing > 10 * sum(counts[("a", s)] for s in range(5))
    # the task's failure rate is that of the groups it got, now nearly all at failing states
    assert sampler.weights() == pytest.approx({"a": 0.875 / 0.975, "b": 0.1 / 0.975}, abs=0.03)
    assert sampler.state_weight("a", 9) > 20 * sampler.state_weight("a", 0)
    state = json.loads(json.dumps(sampler.state()))  # what a checkpoint's state.json holds
    rest = [sampler.next() for _ in range(40)]
    again = AdaptiveStateSampler(pairs, seed=0, group_size=8)
    again.load(state)
    assert [again.next() for _ in range(40)] == rest
    assert isinstance(make_sampler(pairs, 0, RolloutConfig(task_sampling="adaptive_state")), AdaptiveStateSampler)


def test_coordinator_tells_the_sampler_every_finished_group_kept_or_not():
    coord = RolloutCoordinator(RolloutConfig(group_size=8), pool=None,
                               sampler=AdaptiveTaskSampler([("a", 0), ("b", 0)], seed=0, ema=0.5))
    _feed(coord, 0, ("a", 0), [1] * 8)  # all success: filtered, failure rate 1 -> 0.5
    _feed(coord, 1, ("b", 0), [1, 1] + [0] * 6)  # kept, failure rate 1 -> 0.875
    assert coord.sampler.failure_rate == pytest.approx({"a": 0.5, "b": 0.875})
    assert [g.key for g in coord.ready] == [("b", 0)]
    per_state = RolloutCoordinator(RolloutConfig(group_size=8), pool=None,
                                   sampler=AdaptiveStateSampler([("a", 0), ("a", 1)], seed=0, group_size=8))
    _feed(per_state, 0, ("a", 1), [1] * 8)  # the state's own counts: solved there, not at state 0
    assert per_state.sampler.counts == {("a", 1): [8.0, 8.0]}
    assert per_state.sampler.state_weight("a", 1) < 0.05 < per_state.sampler.state_weight("a", 0)


def test_surplus_survives_a_checkpoint_round_trip_in_order():
    coord = _coordinator(keep_surplus=True)
    for gid, version in enumerate([3, 4]):
        _feed(coord, gid, ("a", gid), [1, 0, 0, 0, 0, 0, 0, 1], version=version)
    metas, refs = coord.surplus_state()
    state = json.loads(json.dumps(metas))  # what a checkpoint's state.json holds
    again = _coordinator(keep_surplus=True)
    again.restore_surplus(state, [f"trajectory {i}" for i in range(len(refs))])
    assert [g.key for g in again.ready] == [("a", 0), ("a", 1)] and [g.policy_version for g in again.ready] == [3, 4]
    assert [e.ref for g in again.ready for e in g.episodes] == [f"trajectory {i}" for i in range(16)]
    assert [e.meta for g in again.ready for e in g.episodes] == [e.meta for g in coord.ready for e in g.episodes]
    assert again.buffered() == 16 and _balanced(again)


def test_unschedulable_env_workers_fail_naming_the_fields_to_change(ray_cluster, monkeypatch):
    from actors import env_pool
    from common.config_loading import load_config

    monkeypatch.setattr(env_pool, "READY_TIMEOUT_S", 3.0)
    cfg = load_config("configs/tiny.yaml", ["cluster.env_worker_cpus=64"])  # the test cluster has 2 CPUs
    with pytest.raises(TimeoutError, match=r"cluster\.env_worker_cpus=64\.0 CPUs.*the cluster has 2 CPUs"):
        env_pool.EnvWorkerPool(cfg.env, cfg.cluster, "no-such-app")
