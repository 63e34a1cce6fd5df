"""`ray job submit` of `vla-grpo train` to a real Ray head started with `ray start` (dashboard and
job API on) with Ray's token authentication on, the way docs/operations.md submits to a cluster: a
client without the token is refused, the code travels as the job's working dir, the job sets its own
env_vars, the driver joins the job's cluster through $RAY_ADDRESS, and the run writes its metrics,
checkpoint and final policy to an absolute run_dir.

The head is a separate cluster on free ports with its own temp dir (deploy/job_submit.py), not the
session's in-process `ray_cluster` (auth off), and is stopped by process tree, never with `ray stop`.
The token reaches only the head's and the clients' subprocesses (and explicit HTTP headers here),
never this process's environment."""

import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request

import pytest

from deploy.job_submit import LocalHead, auth_headers, job_entrypoint, submit, wait_for_job
from deploy.runtime import FORWARDED
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

TRAIN_OVERRIDES = ["rollout.min_group_success=0.0", "env.max_steps=24", "cluster.learner_world_size=1",
                   "checkpoint.every=100"]
# keys the driver forwards to its workers too: the job's own values must not clash with the driver's
JOB_ENV = {"MUJOCO_GL": os.environ["MUJOCO_GL"], "TOKENIZERS_PARALLELISM": "false"}


def _jobs_api_status(url: str, headers: dict) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(f"{url}/api/jobs/", headers=headers), timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_train_submitted_as_ray_job_with_auth_succeeds_and_writes_its_outputs(tiny_policy_dir, tmp_path):
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    assert set(JOB_ENV) <= set(FORWARDED)
    auth_env = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    token = secrets.token_urlsafe(32)
    run_dir = tmp_path / "run"
    start = time.monotonic()
    with LocalHead(num_cpus=2, token=token) as head:
        entry = job_entrypoint("train", "configs/tiny.yaml", [
            f"policy.path={tiny_policy_dir}", f"run_dir={run_dir}", "total_steps=1", *TRAIN_OVERRIDES,
        ], python=sys.executable)
        # refused: the CLI without a token (auth off in this process's env: tests/conftest.py), the API
        # without one or with a wrong one
        with pytest.raises(RuntimeError, match="Missing authentication token"):
            submit(head.dashboard_url, entry, working_dir=ROOT)
        assert _jobs_api_status(head.dashboard_url, auth_headers("not-" + token)) == 403
        assert _jobs_api_status(head.dashboard_url, {}) == 401

        job_id = submit(head.dashboard_url, entry, working_dir=ROOT, env_vars=JOB_ENV, token=token)
        status, logs = wait_for_job(head.dashboard_url, job_id, timeout_s=240, token=token)
        jobs = JobSubmissionClient(head.dashboard_url, headers=auth_headers(token)).list_jobs()
        assert status == "SUCCEEDED", f"job {job_id} ended {status}: {jobs[-1].message}; log tail:\n{logs[-4000:]}"
        assert [j.submission_id for j in jobs] == [job_id], "the refused submission must leave no job"
        assert jobs[0].runtime_env["env_vars"] == JOB_ENV
        # the driver joined this head (through $RAY_ADDRESS) rather than starting a private instance
        learners = StateApiClient(head.dashboard_url, headers=auth_headers(token)).list(
            StateResource.ACTORS, options=ListApiOptions(filters=[("class_name", "=", "LearnerWorker")]),
            raise_on_missing_output=False)
        assert len(learners) == 1, f"LearnerWorker actors on the submitted-to cluster: {learners}"
    elapsed = time.monotonic() - start
    assert {k: os.environ.get(k) for k in auth_env} == auth_env, "the head's auth settings leaked into the tests"

    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [rec["step"] for rec in lines] == [1], lines
    assert lines[0]["rollout/episodes"] >= 8 and lines[0]["policy/version"] == 1
    latest = run_dir / "checkpoints" / "latest"
    assert latest.is_file() and (run_dir / "checkpoints" / latest.read_text().strip() / "state.json").is_file()
    assert (run_dir / "rl_policy" / "config.json").is_file()
    assert "[step    1 |" in logs, logs[-2000:]
    print(f"job submit round trip (auth on): {elapsed:.0f}s")
