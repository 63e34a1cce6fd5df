"""scripts/tune_inprocess.py, the in-process copy of the demo loop behind docs/demo.md's A/B
tables, runs end to end: SFT, greedy eval, GRPO iterations with updates, eval, result.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tune_inprocess_runs_sft_grpo_and_writes_its_result(tmp_path):
    overrides = [
        "env.control=absolute", "sft.steps=3", "sft.batch_size=4", "eval.episodes_per_task=1",
        "env.tasks=[red_in_bowl,stack_red_on_green]",
        "rollout.groups_per_batch=2", "rollout.group_size=2", "rollout.max_rounds=1",
        "rollout.min_group_success=0", "learner.mini_batch_size=2", "learner.micro_batch_size=2",
        "learner.ema_decay=0.5",  # evaluates the weight average and, beside it, the live weights
        f"policy.path={ROOT / 'policy/pretrained/tabletop_base'}",  # the demo's base; the run's cwd is tmp_path
    ]
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tune_inprocess.py"), str(ROOT / "configs" / "demo.yaml"), "smoke", "3",
         "--envs", "2", "--threads", "1", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "runs" / "tune" / "smoke" / "result.json").read_text())
    assert result["iterations"] >= 1 and len(result["rollout_success"]) == result["iterations"]
    assert set(result["sft_per_task"]) == set(result["rl_per_task"]) == {"red_in_bowl", "stack_red_on_green"}
    assert 0.0 <= result["sft"] <= 1.0 and 0.0 <= result["rl"] <= 1.0 and 0.0 <= result["rl_live"] <= 1.0
    assert "live weights: RL" in (tmp_path / "runs" / "tune" / "smoke" / "log.txt").read_text()
    assert result["overrides"] == overrides
