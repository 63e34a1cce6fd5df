"""Role placement by node group (`cluster.resources`) on a real multi-node Ray cluster, and a sim node
that goes away mid-run. The cluster (separate raylets on this machine) is built by
tests/multinode_run.py in a process of its own, beside the session's cluster rather than in it."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from tests.conftest import ROOT

DEADLINE_S = 420  # the whole scenario: five raylets, a 4-step run, and their shutdown


def run_scenario(policy_dir, run_dir) -> dict:
    """The facts tests/multinode_run.py prints, or a failure with its output's tail."""
    # a short private RAY_TMPDIR: the cluster's sockets, logs and address file stay out of /tmp/ray,
    # where other local clusters (the session's included) keep theirs
    ray_tmp = tempfile.mkdtemp(prefix="vla-mn-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    python_path = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=python_path)
    proc = subprocess.Popen([sys.executable, "-m", "tests.multinode_run", "--policy", str(policy_dir),
                             "--run-dir", str(run_dir)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the scenario and the raylets it started (its session)
        out, _ = proc.communicate(timeout=60)
        pytest.fail(f"the multi-node scenario ran past {DEADLINE_S}s:\n{out[-6000:]}")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    results = [line for line in out.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and results, f"the multi-node scenario failed (rc {proc.returncode}):\n{out[-6000:]}"
    return json.loads(results[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def multinode(tiny_policy_dir, tmp_path_factory):
    facts = run_scenario(tiny_policy_dir, tmp_path_factory.mktemp("multinode"))
    print(f"multi-node scenario: {json.dumps(facts)}")
    return facts


def test_each_role_runs_only_on_the_nodes_that_advertise_its_resource(multinode):
    nodes, placed = multinode["nodes"], multinode["placed"]
    assert set(placed["sim"]) == {nodes["sim_a"], nodes["sim_b"]}, "env workers not spread over both sim nodes"
    assert set(placed["inference"]) == {nodes["inference"]}
    assert len(placed["inference"]) == multinode["serve_replicas"]
    assert set(placed["learner"]) == {nodes["learner"]}


def test_a_removed_sim_node_loses_no_episode_and_its_workers_return_on_the_other(multinode):
    nodes, removal, ledger = multinode["nodes"], multinode["removal"], multinode["ledger"]
    assert removal["removed"] and removal["at_step"] >= 2
    # the removal hit episodes in flight there and finished episodes whose trajectories were made there
    assert removal["running_there"] >= 1 and removal["held_made_there"] >= 1
    assert multinode["made_there_readable"] == removal["held_made_there"]
    steps = multinode["total_steps"]
    assert multinode["step"] == steps and multinode["versions"] == [steps] * multinode["serve_replicas"]
    assert multinode["policy_lag"] == [0.0] * steps
    assert ledger["trained"] == steps * multinode["episodes_per_step"]
    assert ledger["finished"] == (ledger["trained"] + ledger["filtered"] + ledger["stale"] + ledger["discarded"]
                                  + multinode["held"])
    assert multinode["rerun"] >= 1 and multinode["replaced"] >= 1
    assert set(multinode["sim_after"]) == {nodes[multinode["survivor"]]}
