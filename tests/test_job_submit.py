"""`ray job submit` of `vla-grpo train` to a real Ray head started with `ray start` (dashboard and
job API on), the way docs/operations.md submits to a cluster: the code travels as the job's
working dir, the driver joins the job's cluster through $RAY_ADDRESS, and the run writes its
metrics, checkpoint and final policy to an absolute run_dir.

The head is a separate cluster on free ports with its own temp dir (deploy/job_submit.py), not the
session's in-process `ray_cluster`, and is stopped by process tree, never with `ray stop`."""

import json
import sys
import time

import pytest

from deploy.job_submit import LocalHead, job_entrypoint, submit, wait_for_job
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TRAIN_OVERRIDES = ["rollout.min_group_success=0.0", "env.max_steps=24", "cluster.learner_world_size=1",
                   "checkpoint.every=100"]


def test_train_submitted_as_ray_job_succeeds_and_writes_its_outputs(tiny_policy_dir, tmp_path):
    from ray.util.state import list_actors

    run_dir = tmp_path / "run"
    start = time.monotonic()
    with LocalHead(num_cpus=2) as head:
        entry = job_entrypoint("train", "configs/tiny.yaml", [
            f"policy.path={tiny_policy_dir}", f"run_dir={run_dir}", "total_steps=1", *TRAIN_OVERRIDES,
        ], python=sys.executable)
        job_id = submit(head.dashboard_url, entry, working_dir=ROOT)
        status, logs = wait_for_job(head.dashboard_url, job_id, timeout_s=240)
        assert status == "SUCCEEDED", f"job {job_id} ended {status}; log tail:\n{logs[-4000:]}"
        # the driver joined this head (through $RAY_ADDRESS) rather than starting a private instance
        learners = list_actors(address=head.dashboard_url, filters=[("class_name", "=", "LearnerWorker")],
                               raise_on_missing_output=False)
        assert len(learners) == 1, f"LearnerWorker actors on the submitted-to cluster: {learners}"
    elapsed = time.monotonic() - start

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [rec["step"] for rec in lines] == [1], lines
    assert lines[0]["rollout/episodes"] >= 8 and lines[0]["policy/version"] == 1
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file() and (run_dir / "checkpoints" / latest.read_text().strip() / "state.json").is_file()
    assert (run_dir / "rl_policy" / "config.json").is_file()
    assert "[step    1 |" in logs, logs[-2000:]
    print(f"job submit round trip: {elapsed:.0f}s")
