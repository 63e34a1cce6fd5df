"""scripts/success_lengths.py (how long a policy's successes take, per task) runs and writes its JSON."""

import json
import os
import subprocess
import sys

from tests.conftest import ROOT


def test_success_lengths_reports_every_task_against_its_step_limit(tiny_policy_dir, tmp_path):
    out = tmp_path / "lengths.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "success_lengths.py"), str(tiny_policy_dir), "--sampled", "--states", "2",
         "--out", str(out), str(ROOT / "configs" / "tiny.yaml"), "env.tasks=[red_in_bowl,push_red_to_yellow]",
         "env.max_steps=16", "env.task_max_steps={push_red_to_yellow: 24}"],
        cwd=tmp_path, env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "sampled" and report["split"] == "train"
    assert {t: r["step_limit"] for t, r in report["tasks"].items()} == {"red_in_bowl": 16, "push_red_to_yellow": 24}
    for row in report["tasks"].values():
        assert row["episodes"] == 2 and 0.0 <= row["success"] <= 1.0
        assert all(1 <= n <= row["step_limit"] for n in row["success_lengths"])
    assert "push_red_to_yellow" in proc.stdout and "limit 24" in proc.stdout
