"""Bad configs fail through the real CLI before any Ray process starts: non-zero exit within 10 s, a
message that names the field, and no Ray session: the CLI runs with a Ray temp dir of its own, where
any ray.init would create its session folder (machine-wide process counts would also see other
clusters' daemons)."""

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT


def _cli(ray_tmp, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "deploy.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    return out, time.monotonic() - start


def _cases(policy: str, tmp: str) -> list[tuple[list[str], list[str]]]:
    tiny = ["configs/tiny.yaml", f"policy.path={policy}", f"run_dir={tmp}/run"]
    return [
        # the demo's base has statistics for its pretraining suite only: train needs the SFT policy
        (["train", "configs/demo.yaml", f"run_dir={tmp}/demo"], ["policy.unnorm_key", "'tabletop'", "tabletop_pretrain"]),
        (["train", "configs/tiny.yaml", f"run_dir={tmp}/run"], ["policy.path", "sft"]),
        (["eval", "configs/tiny.yaml", f"run_dir={tmp}/run"], ["policy.path"]),
        (["serve", "configs/tiny.yaml"], ["policy.path"]),
        (["train", "configs/tiny.yaml", f"policy.path={tmp}/missing"], ["policy.path", "no config.json"]),
        (["train", *tiny, "env.suite=tabletop_pro"], ["env.suite", "tabletop_pretrain"]),
        (["train", *tiny, "env.tasks=[red_in_bowl,red_in_cup]"], ["env.tasks", "red_in_cup", "green_in_bowl"]),
        (["eval", *tiny, "env.task_max_steps={red_in_cup: 8}"], ["env.task_max_steps", "red_in_cup"]),
        (["train", *tiny, "cluster.env_worker_cpus=64"], ["cluster", "env_worker_cpus", "CPUs"]),
        (["train", *tiny, "cluster.learner_gpus=1"], ["cluster", "GPUs", "has 0"]),
        (["train", "configs/tiny.yaml", f"policy.path={policy}", "run_dir=/proc/vla-grpo-run"], ["run_dir", "not writable"]),
        (["train", *tiny, "checkpoint.resume=true"], ["checkpoint.resume", "no complete checkpoint"]),
        (["sft", "configs/tiny.yaml", f"run_dir={tmp}/run", "env.suite=nope"], ["env.suite"]),
    ]


def test_each_bad_config_fails_fast_naming_the_field_and_starts_no_ray(tiny_policy_dir, tmp_path):
    ray_tmp = tmp_path / "ray"
    ray_tmp.mkdir()
    for args, expected in _cases(str(tiny_policy_dir), str(tmp_path)):
        out, seconds = _cli(ray_tmp, *args)
        message = out.stderr.strip().splitlines()
        assert out.returncode != 0, (args, out.stdout[-2000:])
        assert seconds < 10, (args, seconds)
        assert message and all(text in message[-1] for text in expected), (args, out.stderr[-2000:])
        assert "Traceback" not in out.stderr, (args, out.stderr[-2000:])
        assert not any(ray_tmp.rglob("session_*")), (args, "a bad config started Ray")


def test_a_good_config_passes_preflight(tiny_policy_dir, tmp_path):
    from common.config_loading import load_config
    from deploy.preflight import preflight

    cfg = load_config(ROOT / "configs/tiny.yaml", [f"policy.path={tiny_policy_dir}", f"run_dir={tmp_path}"])
    for command in ("train", "eval", "sft", "demo", "serve"):
        preflight(cfg, command)
    demo = load_config(ROOT / "configs/demo.yaml", [f"run_dir={tmp_path}/demo"])
    preflight(demo, "demo")  # SFT adds the tabletop statistics to the base


@pytest.mark.parametrize("job_env, kept", [
    (None, {"PYTHONPATH", "MUJOCO_GL"}),
    ({"env_vars": {"MUJOCO_GL": "osmesa", "OTHER": "1"}}, {"PYTHONPATH"}),
])
def test_the_driver_leaves_a_submitted_job_s_env_vars_to_the_job(monkeypatch, job_env, kept):
    import json

    from deploy.runtime import worker_env_vars

    monkeypatch.setenv("MUJOCO_GL", "egl")
    if job_env is None:
        monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    else:
        monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": job_env}))
    env_vars = worker_env_vars()
    assert kept <= set(env_vars) and not ({"MUJOCO_GL", "PYTHONPATH"} - kept) & set(env_vars)
    assert str(ROOT) in env_vars["PYTHONPATH"]
