"""Which (task, train init state) the next GRPO group rolls out. No Ray here: the in-process tuning
loop (scripts/tune_inprocess.py) uses the same samplers as the coordinator.

- `InitStateSampler` (`rollout.task_sampling: uniform`, the paper's): cycles through every pair
  in a seeded shuffled order.
- `AdaptiveTaskSampler` (`adaptive`): picks the task in proportion to its recent rollout failure
  rate, then cycles that task's init states. The mean success over tasks rises fastest where the
  policy fails most, and a task whose groups all fail only yields a kept group when one of its
  episodes succeeds, so it needs more tries, not fewer; a task the policy has solved gets a floor
  share, so a drift back down is noticed. (Weighting by how often a task's groups pass dynamic
  sampling instead starves a task that starts near 0 %: in one `make demo` run blue_in_bowl fell
  to the floor within 10 steps and ended at 0 %.)

- `AdaptiveStateSampler` (`adaptive_state`): the task as `adaptive`, then the init state within it
  in proportion to how much a group there is worth: the chance that it fails and that dynamic
  sampling keeps it, from the state's own recent groups. A greedy evaluation fails on the states
  where the sampling policy mostly fails, while cycling gives a state the policy has solved as many
  groups as one it has not (and those groups are all-success, so they are dropped).

All are resumable from a JSON-able `state()`, and told of every finished group (`observe`).
"""

from __future__ import annotations

import random


class InitStateSampler:
    """Cycles through every (task, train init state) in a seeded shuffled order; resumable."""

    def __init__(self, pairs: list[tuple[str, int]], seed: int):
        self.pairs = sorted(pairs)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled()

    def _shuffled(self) -> list[tuple[str, int]]:
        order = list(self.pairs)
        random.Random(self.seed * 7919 + self.epoch).shuffle(order)
        return order

    def next(self) -> tuple[str, int]:
        if self.position >= len(self._order):
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._shuffled()
        self.position += 1
        return self._order[self.position - 1]

    def observe(self, task: str, success_rate: float, init_state: int | None = None) -> None:
        """Uniform sampling ignores outcomes."""

    def weights(self) -> dict[str, float]:
        tasks = sorted({t for t, _ in self.pairs})
        return {t: 1.0 / len(tasks) for t in tasks}

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffled()


class AdaptiveTaskSampler:
    """Task chosen with probability proportional to max(failure-rate estimate, floor); the estimate
    is an exponential moving average of the failure fraction of the task's finished groups,
    starting at 1 for every task (uniform until groups come back)."""

    def __init__(self, pairs: list[tuple[str, int]], seed: int, floor: float = 0.1, ema: float = 0.25):
        if not pairs:
            raise ValueError("AdaptiveTaskSampler needs at least one (task, init state) pair")
        self.seed, self.floor, self.ema = seed, floor, ema
        self.tasks = sorted({t for t, _ in pairs})
        self.cycles = {t: InitStateSampler([p for p in pairs if p[0] == t], seed * 31 + i) for i, t in enumerate(self.tasks)}
        self.failure_rate = {t: 1.0 for t in self.tasks}
        self.draws = 0

    def weights(self) -> dict[str, float]:
        raw = {t: max(self.failure_rate[t], self.floor) for t in self.tasks}
        total = sum(raw.values())
        return {t: w / total for t, w in raw.items()}

    def _draw_task(self) -> str:
        # one fresh generator per draw, keyed by the draw count: the state stays a few numbers
        u = random.Random(self.seed * 1_000_003 + self.draws).random()
        self.draws += 1
        weights = self.weights()
        return _pick(self.tasks, [weights[t] for t in self.tasks], u)

    def next(self) -> tuple[str, int]:
        return self.cycles[self._draw_task()].next()

    def observe(self, task: str, success_rate: float, init_state: int | None = None) -> None:
        if task in self.failure_rate:
            self.failure_rate[task] += self.ema * (1.0 - success_rate - self.failure_rate[task])

    def state(self) -> dict:
        return {"draws": self.draws, "failure_rate": dict(self.failure_rate),
                "cycles": {t: c.state() for t, c in self.cycles.items()}}

    def load(self, state: dict) -> None:
        self.draws = state["draws"]
        self.failure_rate.update(state["failure_rate"])
        for t, s in state["cycles"].items():
            self.cycles[t].load(s)


class AdaptiveStateSampler(AdaptiveTaskSampler):
    """The task as AdaptiveTaskSampler, then an init state of it with probability proportional to
    `(1 - p) * (1 - p**G - (1 - p)**G)`: the chance that an episode there fails times the chance
    that a group of G there is mixed (kept by dynamic sampling). `p` is the state's success rate
    from its recent groups, counts halved at every new group (`memory`), with half a success and
    half a failure as prior: an unvisited state has p = 0.5, near the largest weight, so every
    state is tried early; a state solved in its last group (p ~ 0.94 for G = 8) gets ~0.02, one
    failed in every episode (~0.06) ~0.35 (a later episode may still succeed)."""

    def __init__(self, pairs: list[tuple[str, int]], seed: int, group_size: int, floor: float = 0.1,
                 ema: float = 0.25, memory: float = 0.5):
        super().__init__(pairs, seed, floor=floor, ema=ema)
        self.group_size, self.memory = group_size, memory
        self.states = {t: sorted(s for task, s in pairs if task == t) for t in self.tasks}
        self.counts: dict[tuple[str, int], list[float]] = {}  # (task, state) -> [successes, episodes], decayed

    def state_weight(self, task: str, init_state: int) -> float:
        successes, episodes = self.counts.get((task, init_state), (0.0, 0.0))
        p = (successes + 0.5) / (episodes + 1.0)
        g = self.group_size
        return (1.0 - p) * (1.0 - p**g - (1.0 - p) ** g)

    def next(self) -> tuple[str, int]:
        task = self._draw_task()
        u = random.Random(self.seed * 2_000_003 + self.draws).random()  # its own stream, keyed the same way
        states = self.states[task]
        return task, _pick(states, [self.state_weight(task, s) for s in states], u)

    def observe(self, task: str, success_rate: float, init_state: int | None = None) -> None:
        super().observe(task, success_rate)
        if init_state is None or task not in self.states:
            return
        successes, episodes = self.counts.get((task, init_state), (0.0, 0.0))
        self.counts[(task, init_state)] = [self.memory * successes + success_rate * self.group_size,
                                           self.memory * episodes + self.group_size]

    def state(self) -> dict:
        return {**super().state(), "counts": [[t, s, *c] for (t, s), c in sorted(self.counts.items())]}

    def load(self, state: dict) -> None:
        super().load(state)
        self.counts = {(t, s): [succ, eps] for t, s, succ, eps in state["counts"]}


def _pick(items: list, weights: list[float], u: float):
    """The item whose share of the cumulative weights holds u in [0, 1)."""
    target, cumulative = u * sum(weights), 0.0
    for item, w in zip(items, weights):
        cumulative += w
        if target < cumulative:
            return item
    return items[-1]


def make_sampler(pairs: list[tuple[str, int]], seed: int, rollout_cfg) -> InitStateSampler | AdaptiveTaskSampler:
    """The sampler `rollout.task_sampling` names."""
    if rollout_cfg.task_sampling == "adaptive_state":
        return AdaptiveStateSampler(pairs, seed, rollout_cfg.group_size, floor=rollout_cfg.task_sampling_floor,
                                    ema=rollout_cfg.task_sampling_ema)
    if rollout_cfg.task_sampling == "adaptive":
        return AdaptiveTaskSampler(pairs, seed, floor=rollout_cfg.task_sampling_floor, ema=rollout_cfg.task_sampling_ema)
    return InitStateSampler(pairs, seed)
