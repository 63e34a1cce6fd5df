"""Bring the roles up on a Ray cluster: policy service and env workers (the learner: learner/group.py)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import ray

from actors.coordinator import RolloutCoordinator
from actors.env_pool import EnvWorkerPool
from actors.samplers import make_sampler
from common.config import RunConfig
from services.policy_service import APP_NAME, start_policy_service
from services.weight_store import start_weight_store

# Headless defaults for every entry point (CLI, scripts, job drivers); the caller's values win.
DEFAULT_ENV = {"MUJOCO_GL": "egl", "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "RAY_USAGE_STATS_ENABLED": "0"}
FORWARDED = ("MUJOCO_GL", "PYOPENGL_PLATFORM", "DS_ACCELERATOR", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM", "RAY_AUTH_MODE")


def apply_default_env() -> None:
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])


def job_env_vars() -> dict[str, str]:
    """The env_vars of the Ray job this driver runs in (`ray job submit --runtime-env-json`), else {}.
    Ray hands the job's config to its driver in this variable and refuses a ray.init runtime env
    that repeats one of its keys."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return {}
    return dict((json.loads(raw).get("runtime_env") or {}).get("env_vars") or {})


def worker_env_vars() -> dict[str, str]:
    """What every worker process needs from the driver (the repo on PYTHONPATH, headless GL, CPU
    DeepSpeed, offline hubs), less the keys a submitted job sets itself: the job's values win."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    forwarded = {k: os.environ[k] for k in FORWARDED if k in os.environ}
    env_vars = {"PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep), **forwarded}
    job = job_env_vars()
    return {k: v for k, v in env_vars.items() if k not in job}


def init_ray(cfg: RunConfig, num_cpus: int | None = None) -> None:
    if ray.is_initialized():
        return
    apply_default_env()
    kwargs = dict(runtime_env={"env_vars": worker_env_vars()}, include_dashboard=False, logging_level="WARNING",
                  log_to_driver=True)
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")  # set by `ray job submit`
    if address:
        ray.init(address=address, **kwargs)
    else:
        extra = {"_metrics_export_port": cfg.logging.metrics_port} if cfg.logging.metrics_port else {}
        ray.init(address="local", num_cpus=num_cpus or max(os.cpu_count() or 2, 2), **kwargs, **extra)


@dataclass
class Rollout:
    """The serving and simulation side of a run."""

    handle: object
    pool: EnvWorkerPool
    task_info: dict
    weights: object  # services/weight_store.py: the weights a (re)starting replica loads

    @classmethod
    def start(cls, cfg: RunConfig, policy_path: str) -> "Rollout":
        weights = start_weight_store(APP_NAME)
        ray.get(weights.publish.remote(None, []), timeout=60)  # replicas start on policy_path
        handle = start_policy_service(policy_path, cfg.cluster, cfg.policy, seed=cfg.seed)
        pool = EnvWorkerPool(cfg.env, cfg.cluster, APP_NAME)
        info = pool.task_info()
        if cfg.env.tasks:
            unknown = sorted(set(cfg.env.tasks) - set(info))
            if unknown:
                raise ValueError(f"env.tasks: unknown tasks {unknown}; the {cfg.env.suite} suite has {sorted(info)}")
            info = {t: info[t] for t in cfg.env.tasks}
        return cls(handle, pool, info, weights)

    def coordinator(self, cfg: RunConfig) -> RolloutCoordinator:
        pairs = [(t, s) for t, v in self.task_info.items() for s in v["train"]]
        return RolloutCoordinator(cfg.rollout, self.pool, make_sampler(pairs, cfg.seed, cfg.rollout))

    def shutdown(self) -> None:
        from ray import serve

        self.pool.shutdown()
        try:
            serve.delete(APP_NAME)
        except Exception:
            pass
        ray.kill(self.weights)
