"""scripts/tune_inprocess.py, the in-process copy of the demo loop behind docs/demo.md's A/B
tables, runs end to end: SFT, greedy eval, GRPO iterations with updates, eval, result.json."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, overrides: list[str]) -> dict:
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "tune_inprocess.py"), str(ROOT / "configs" / "demo.yaml"), "smoke", "3",
         "--envs", "2", "--threads", "1", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((tmp_path / "runs" / "tune" / "smoke" / "result.json").read_text())


SMALL = [
    "env.control=absolute", "sft.steps=3", "sft.batch_size=4", "eval.episodes_per_task=1",
    "env.tasks=[red_in_bowl,stack_red_on_green]",
    "rollout.groups_per_batch=2", "rollout.group_size=2", "rollout.max_rounds=1",
    "rollout.min_group_success=0", "learner.mini_batch_size=2", "learner.micro_batch_size=2",
    f"policy.path={ROOT / 'policy/pretrained/tabletop_base'}",  # the demo's base; the run's cwd is tmp_path
]


def test_tune_inprocess_runs_sft_grpo_and_writes_its_result(tmp_path):
    overrides = SMALL + ["learner.ema_decay=0.5"]  # evaluates the weight average and, beside it, the live weights
    result = _run(tmp_path, overrides)
    assert result["iterations"] >= 1 and len(result["rollout_success"]) == result["iterations"]
    assert set(result["sft_per_task"]) == set(result["rl_per_task"]) == {"red_in_bowl", "stack_red_on_green"}
    assert 0.0 <= result["sft"] <= 1.0 and 0.0 <= result["rl"] <= 1.0 and 0.0 <= result["rl_live"] <= 1.0
    assert "live weights: RL" in (tmp_path / "runs" / "tune" / "smoke" / "log.txt").read_text()
    assert result["overrides"] == overrides


def test_tune_inprocess_validates_on_train_states_and_trains_on_the_demos_and_rehearsal(tmp_path):
    result = _run(tmp_path, SMALL + ["eval.validate_every=1", "eval.validation_states_per_task=1",
                                     "learner.demo_bc_coef=0.5", "learner.demo_bc_batch_size=2",
                                     "learner.rehearsal_coef=0.5", "learner.rehearsal_suite=tabletop_pretrain",
                                     "learner.rehearsal_demos_per_task=1", "learner.rehearsal_batch_size=2"])
    steps = [step for step, _ in result["validations"]]
    assert steps == list(range(1, result["iterations"] + 1)), "one validation per iteration, the last included"
    assert result["best_iteration"] in steps and 0.0 <= result["rl_best"] <= 1.0
    assert "validated best (iteration" in (tmp_path / "runs" / "tune" / "smoke" / "log.txt").read_text()
