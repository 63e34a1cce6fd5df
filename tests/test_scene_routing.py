"""actors/scene_book.py: episodes start on idle envs that already hold their task's scene. Checked in
a simulation of a GRPO rollout (task groups, a backlog of episodes, envs freed at random times, the
workers' own hand-off of env_workers/slot_pool.py), scene builds counted."""

import random
from collections import deque

from actors.env_pool import Episode
from actors.scene_book import SceneBook


class SimulatedWorker:
    """A worker's envs as SlotPool hands them out: the idle env that last ran the task, else the
    first idle one (a scene build when its task differs); a freed env goes to a queued episode of
    its task, else the oldest."""

    def __init__(self, envs: int):
        self.idle: list = [None] * envs  # task each idle env holds
        self.queued: deque = deque()
        self.builds = 0

    def start(self, task) -> object:
        if not self.idle:
            self.queued.append(task)
            return None
        env = task if task in self.idle else self.idle[0]
        self.idle.remove(env)
        self.builds += env != task
        return task

    def finish(self, task) -> object:
        """-> the task the freed env runs next (None: it idles)."""
        if not self.queued:
            self.idle.append(task)
            return None
        nxt = task if task in self.queued else self.queued[0]
        self.queued.remove(nxt)
        self.builds += nxt != task
        return nxt


def simulate(pick, route, workers=12, envs=4, tasks=10, groups=200, group_size=8, seed=0) -> int:
    """Scene builds over `groups` task groups, all queued at once (as a step's groups are), an episode
    started whenever an env is idle."""
    rng = random.Random(seed)
    sims = [SimulatedWorker(envs) for _ in range(workers)]
    book, load, running, turn = SceneBook(workers, envs), [0] * workers, [], 0
    backlog = deque(Episode(f"task{t}", 0, 1.6, False) for t in (rng.randrange(tasks) for _ in range(groups))
                    for _ in range(group_size))
    while backlog or running:
        while (ep := pick(book, backlog, workers * envs)) is not None:
            backlog.remove(ep)
            w = route(book, ep.task, load, turn)
            turn += 1
            book.started(w, ep.task)
            load[w] += 1
            if sims[w].start(ep.task) is not None:
                running.append((rng.random(), w, ep.task))
        running.sort()
        _, w, task = running.pop(0)
        load[w] -= 1
        book.finished(w, task)
        nxt = sims[w].finish(task)
        if nxt is not None:
            running.append((rng.random(), w, nxt))
    return sum(s.builds for s in sims)


def oldest_first(book, backlog, limit):
    """What the pool did before it kept a scene book: the oldest episode, ..."""
    return backlog[0] if backlog and any(+idle for idle in book.idle) else None


def least_loaded(book, task, load, turn):
    """... to the least loaded worker."""
    n = len(load)
    return min(range(n), key=lambda i: (load[i], (i - turn) % n))


def test_scene_book_routes_a_group_to_idle_envs_that_hold_its_task():
    book = SceneBook(3, 2)
    for w, task in ((0, "a"), (0, "b"), (1, "c"), (1, "d"), (2, "a"), (2, "e")):
        book.started(w, task)
    for w, task in ((0, "a"), (0, "b"), (1, "c"), (1, "d"), (2, "a"), (2, "e")):
        book.finished(w, task)
    load = [0, 0, 0]
    picks = []
    for turn in range(3):  # a group of "a": the two envs that hold it first, then any idle env
        w = book.choose("a", load, turn)
        book.started(w, "a")
        load[w] += 1
        picks.append(w)
    assert sorted(picks[:2]) == [0, 2] and picks[2] == 1  # worker 1 gives up one of its two idle envs
    assert book.choose("d", load, 0) == 1 and book.choose("b", load, 0) == 0


def test_pick_prefers_a_held_task_but_never_starves_the_oldest():
    def book_with_idle_a():
        book = SceneBook(1, 2)
        book.started(0, "a")
        book.finished(0, "a")  # one idle env holds "a", the other is unbuilt
        return book

    b, a0, a1 = Episode("b", 0, 1.6, False), Episode("a", 0, 1.6, False), Episode("a", 1, 1.6, False)
    book, backlog = book_with_idle_a(), deque([b, a0, a1])
    assert book.pick(backlog, 5) is a0 and b.passed_over == 1
    backlog.remove(a0)
    book.started(0, "a")
    assert book.pick(backlog, 5) is b  # no idle env holds "a" now: the oldest takes the unbuilt env
    backlog.remove(b)
    book.started(0, "b")
    assert book.pick(backlog, 5) is None  # every env busy
    book, backlog = book_with_idle_a(), deque([b, a1])  # b passed over once already
    assert book.pick(backlog, 1) is b


def test_scene_book_cuts_scene_builds_in_a_grpo_rollout():
    """10 tasks, groups of 8, 12 workers x 4 envs, 1,600 episodes."""
    booked = simulate(SceneBook.pick, SceneBook.choose)
    blind = simulate(oldest_first, least_loaded)
    first = 12 * 4  # every env builds its first scene either way
    print(f"scene builds per episode: {booked / 1600:.3f} booked, {blind / 1600:.3f} by load alone")
    assert (booked - first) * 5 <= blind - first, (booked, blind)
