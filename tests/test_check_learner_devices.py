"""scripts/check_learner_devices.py: the learner, run in two processes from one seed, takes the same
steps; on one device (the CPU here) bit for bit. On a GPU box the same script compares cpu with cuda."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_cpu_processes_learn_identically(tmp_path):
    out = tmp_path / "devices.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/check_learner_devices.py"), "--config", "configs/tiny.yaml",
         "--devices", "cpu,cpu", "--steps", "3", "--samples", "8", "--traj-chunks", "2", "--out", str(out),
         "cluster.learner_world_size=1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["devices"] == ["cpu", "cpu"] and len(result["steps"]) == 3
    losses = [s["loss"][0] for s in result["steps"]]
    assert len(set(losses)) == 3  # the steps moved the weights: each step's loss differs
    for s in result["steps"]:
        assert s["loss"][0] == s["loss"][1] and s["grad_norm"][0] == s["grad_norm"][1] > 0
    assert result["weights_rel_l2_diff"] == 0.0 and result["equal_within_tolerance"] is True
    assert "equal within 0.01: True" in proc.stdout


def test_one_device_is_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts/check_learner_devices.py"), "--devices", "cpu"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--devices" in proc.stderr.strip().splitlines()[-1]
