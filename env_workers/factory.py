"""`make_env`: the one place that maps `env.backend` to a simulator class.

Backends import lazily, so a worker only needs the simulator it runs.
"""

from __future__ import annotations

from common.config import EnvConfig
from env_workers.api import EpisodeEnv


class BackendUnavailable(RuntimeError):
    """The configured simulator backend is not installed or not implemented in this build."""


def make_env(env_cfg: EnvConfig) -> EpisodeEnv:
    if env_cfg.backend == "tabletop":
        from env_workers.tabletop.env import TabletopEnv

        return TabletopEnv(env_cfg)
    if env_cfg.backend in ("libero", "maniskill"):
        extra = {"libero": "libero==0.1.1 robosuite==1.4.0", "maniskill": "mani-skill==3.0.1 sapien==3.0.3"}
        raise BackendUnavailable(
            f"env.backend {env_cfg.backend!r} is not implemented in this build yet (its simulator would also "
            f"need `pip install -e '.[{env_cfg.backend}]'`, i.e. {extra[env_cfg.backend]}); "
            "use env.backend: tabletop (suite: tabletop) for the built-in MuJoCo suite"
        )
    raise BackendUnavailable(f"unknown env.backend {env_cfg.backend!r}; known: tabletop, libero, maniskill")
