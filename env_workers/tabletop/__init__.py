"""Built-in MuJoCo tabletop suites ("tabletop", the benchmark, and "tabletop_pretrain", a disjoint
pretraining suite): fast, offline, language-conditioned, with scripted experts.

scene.py builds the MJCF and wraps the sim, tasks.py holds the task specs and seeded initial
states, env.py is the `EpisodeEnv`, experts.py the scripted experts.
"""

from env_workers.tabletop.env import TabletopEnv
from env_workers.tabletop.experts import ScriptedExpert, run_expert
from env_workers.tabletop.tasks import SUITE, TASKS, TaskSpec, get_task

DEFAULT_IMAGE_SIZE = 128  # what bench_env.py measures by default; configs set env.image_size explicitly

__all__ = ["DEFAULT_IMAGE_SIZE", "SUITE", "TASKS", "ScriptedExpert", "TabletopEnv", "TaskSpec", "get_task", "run_expert"]
