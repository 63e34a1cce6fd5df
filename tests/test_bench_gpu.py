"""scripts/bench_gpu.py runs all four phases on the CPU with the tiny config and reports every
phase's figures; the rollout benchmarks give every env slot a train state however many slots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SLOTS, MAX_STEPS, CHUNK = 2, 16, 8  # 1 worker x 2 envs, episodes of two chunks


def test_every_slot_gets_a_train_state_when_slots_outnumber_them():
    from scripts.bench_rollout import slot_requests

    info = {f"task{t}": {"train": list(range(100, 125))} for t in range(10)}  # LIBERO-Spatial: 10 tasks x 25 states
    requests = slot_requests(info, 12 * 8 * 4)  # 384 slots: every state of every task once, then round again
    assert len(requests) == 384 and len(set(requests)) == 250
    assert all(s in info[t]["train"] for t, s in requests)
    assert requests[:20] == [(f"task{i % 10}", 100 + i // 10) for i in range(20)]


def test_bench_gpu_reports_every_phase_on_the_cpu(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_gpu.py"), "--config", "configs/tiny.yaml", "--device", "cpu",
         "--phases", "sim,inference,ours,lockstep", "--batches", "1", "--prompts", "mixed", "--iters", "1",
         "--warmup", "0", "--latency-iters", "2", "--warmup-seconds", "0.5", "--rounds", "1",
         "--out", str(out), f"env.max_steps={MAX_STEPS}", "cluster.num_env_workers=1",
         f"cluster.envs_per_worker={SLOTS}", f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["phases"] == ["sim", "inference", "ours", "lockstep"] and result["device"] == "cpu"
    for phase in ("sim", "ours", "lockstep"):
        r = result[phase]
        assert r["env_steps"] > 0 and r["env_steps_per_s"] > 0 and r["cpu_ms_per_env_step"] > 0, (phase, r)
        assert r["gpu_util"] is None or 0 <= r["gpu_util"]["mean_pct"] <= 100
        # the sim threads' own clock: inside env calls for part of the wall time; the tabletop times no renders
        assert r["sim_thread_ms_per_env_step"] > 0 and 0 < r["sim_thread_busy_fraction"] <= 1.05, (phase, r)
        assert r["sim_thread_busy_by_worker"] == [pytest.approx(r["sim_thread_busy_fraction"])]  # one worker
        assert r["render_ms_per_env_step"] is None
        assert 0 < r["host_memory"]["used_gib"] < r["host_memory"]["total_gib"]
    # sim: the same whole episodes as ours, one per slot
    assert result["sim"]["episodes"] == SLOTS and result["sim"]["env_steps"] <= SLOTS * MAX_STEPS
    assert result["sim"]["mean_inference_batch"] is None
    # the CPU by role: the sim workers step in sim, the env workers and the replica in ours
    assert result["sim"]["cpu_ms_per_env_step_by_role"]["SimWorker"] > 0
    assert {"EnvWorker", "ServeReplica"} <= set(result["ours"]["cpu_ms_per_env_step_by_role"])
    ours, lockstep = result["ours"], result["lockstep"]
    assert ours["episodes"] == SLOTS and ours["env_steps"] <= SLOTS * MAX_STEPS and ours["mean_inference_batch"] >= 1
    # lock-step: one forward over every env per step, for every env up to the step limit
    assert lockstep["mean_inference_batch"] == SLOTS and lockstep["queries"] == SLOTS * MAX_STEPS // CHUNK
    assert lockstep["env_steps"] <= SLOTS * MAX_STEPS
    ceiling = result["inference_ceiling"]
    assert ceiling["env_steps_per_s"] == ceiling["chunks_per_s"] * CHUNK > 0 and ceiling["batch"] == 1
    assert result["inference"]["rows"][0]["act_chunks_per_s"] == ceiling["chunks_per_s"]
    for name, t in result["targets"].items():
        assert t["value"] > 0 and t["met"] == (t["value"] >= t["target"]), name
    assert "(d) lockstep" in proc.stdout and "target ours_over_lockstep" in proc.stdout


def test_roles_that_do_not_fit_the_machine_stop_the_bench_before_a_cluster_starts(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_gpu.py"), "--config", "configs/tiny.yaml", "--device", "cpu",
         "--phases", "ours", "cluster.num_env_workers=999", "cluster.env_worker_cpus=1", f"run_dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "cluster: the roles ask for" in proc.stderr and "num_env_workers" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_random_policy_with_an_unnorm_key_is_refused_in_one_line(capsys):
    """Random weights carry no dataset statistics: LIBERO's configs name a key only a checkpoint has."""
    from scripts.bench_gpu import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--config", "configs/libero_spatial.yaml", "--device", "cpu", "--phases", "inference"])
    assert exit_info.value.code == 2
    assert "policy.unnorm_key: 'libero_spatial_no_noops'" in capsys.readouterr().err
