"""Test-session setup: hermetic env vars before anything heavy is imported."""

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", os.environ["MUJOCO_GL"])
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(tempfile.gettempdir(), "vla-grpo-torch-ext"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_config():
    from common.config_loading import load_config

    return load_config(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="session")
def tiny_policy(tiny_config):
    from policy.checkpoint import build_policy

    return build_policy(tiny_config.policy, seed=0)


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the whole test session."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "MUJOCO_GL": os.environ["MUJOCO_GL"],
                                       "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}})
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_policy_dir(tiny_policy, tmp_path_factory):
    from policy.checkpoint import save_policy

    return save_policy(tiny_policy, tmp_path_factory.mktemp("policy") / "tiny")
