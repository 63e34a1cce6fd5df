"""Build the env of the configured backend behind the one episode API."""

from __future__ import annotations

from common.config import EnvConfig
from env_workers.api import EpisodeEnv


def make_env(env_cfg: EnvConfig) -> EpisodeEnv:
    if env_cfg.backend == "tabletop":
        from env_workers.tabletop.env import TabletopEnv

        return TabletopEnv(env_cfg)
    raise NotImplementedError(
        f"env.backend={env_cfg.backend!r} is not available yet in this build; use env.backend=tabletop"
    )
