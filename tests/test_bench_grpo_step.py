"""scripts/bench_grpo_step.py runs whole GRPO steps through the real trainer on the CPU with the tiny
config (on the session's Ray cluster), times every phase, and extrapolates the paper's batch from
the last step."""

import json

import pytest

from scripts.bench_grpo_step import main

GROUPS, GROUP_SIZE, MAX_STEPS, CHUNK = 2, 2, 16, 8


def test_bench_grpo_step_times_every_phase_and_extrapolates(ray_cluster, tiny_policy_dir, tmp_path, capsys):
    out = tmp_path / "step.json"
    main(["--config", "configs/tiny.yaml", "--steps", "2", "--paper-groups", "4", "--paper-group-size", "8",
          "--paper-max-steps", "32", "--out", str(out), f"env.max_steps={MAX_STEPS}",
          f"rollout.groups_per_batch={GROUPS}", f"rollout.group_size={GROUP_SIZE}",
          f"learner.mini_batch_size={GROUPS * GROUP_SIZE}", "cluster.learner_world_size=1",
          f"policy.path={tiny_policy_dir}", f"run_dir={tmp_path / 'run'}"])
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and len(result["steps"]) == 2
    assert "rollout.min_group_success=0" in result["overrides"]  # a random policy's groups are trained, not dropped
    for step in result["steps"]:
        assert step["trajectories"] == GROUPS * GROUP_SIZE <= step["episodes"], step
        assert 0 < step["env_steps"] <= step["episodes"] * MAX_STEPS
        # each episode's chunks: ceil(its env steps / chunk), at least one, at most MAX_STEPS / CHUNK
        assert GROUPS * GROUP_SIZE <= step["chunks"] <= GROUPS * GROUP_SIZE * MAX_STEPS // CHUNK
        assert all(s >= 0 for s in step["seconds"].values()) and step["seconds"]["train"] > 0
        assert abs(step["total_s"] - sum(step["seconds"].values())) < 1e-9
    paper, last = result["paper_batch"], result["steps"][-1]
    assert paper["trajectories"] == 32 and paper["env_steps"] == 32 * 32 and paper["chunks"] == 32 * 4
    assert abs(paper["seconds"]["train"] - 128 * last["train_s_per_chunk"]) < 1e-6
    assert abs(paper["seconds"]["rollout"] - 1024 / last["env_steps_per_s"]) < 1e-6
    assert paper["seconds"]["weight_sync"] == last["seconds"]["weight_sync"]
    assert all(st["store_copy_s"] >= 0 for st in result["steps"])
    assert paper["seconds"]["store_copy_wait"] == max(0.0, last["store_copy_s"] - paper["seconds"]["rollout"])
    assert abs(paper["total_s"] - sum(paper["seconds"].values())) < 1e-6
    printed = capsys.readouterr().out
    assert "paper batch (4 x 8, 32 steps)" in printed and "chunks x" in printed
    assert ray_cluster.is_initialized()  # the session's cluster is the caller's: left up


def test_a_bad_override_stops_the_bench_before_anything_starts(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--config", "configs/tiny.yaml", "learner.weight_sync=carrier_pigeon", f"run_dir={tmp_path / 'run'}"])
    assert stop.value.code == 2
    assert "learner.weight_sync" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_an_overlapped_run_extrapolates_from_its_steady_state(ray_cluster, tiny_policy_dir, tmp_path):
    """max_policy_lag 1: rollout runs beside the update, so the paper's batch comes from the wall time
    per trained chunk of the steps after the first, not from phases that overlap."""
    out = tmp_path / "step.json"
    main(["--config", "configs/tiny.yaml", "--steps", "3", "--paper-groups", "4", "--paper-group-size", "8",
          "--paper-max-steps", "32", "--out", str(out), f"env.max_steps={MAX_STEPS}", "rollout.max_policy_lag=1",
          f"rollout.groups_per_batch={GROUPS}", f"rollout.group_size={GROUP_SIZE}",
          f"learner.mini_batch_size={GROUPS * GROUP_SIZE}", "cluster.learner_world_size=1",
          f"policy.path={tiny_policy_dir}", f"run_dir={tmp_path / 'run'}"])
    result = json.loads(out.read_text())
    steps, paper = result["steps"], result["paper_batch"]
    assert [st["step"] for st in steps] == [1, 2, 3] and all(st["wall_s"] > 0 for st in steps)
    assert all("store_copy_s" not in st for st in steps)  # overlapped, the copy's wait is in the wall time
    per_chunk = (steps[1]["wall_s"] + steps[2]["wall_s"]) / (steps[1]["chunks"] + steps[2]["chunks"])
    assert paper["overlapped"] and paper["chunks"] == 32 * 4
    assert abs(paper["total_s"] - 128 * per_chunk) < 1e-6
