"""The pretraining suite and the base policy `make demo` starts from: the suite holds none of the
benchmark's goals and draws scenes over the whole workspace; its experts solve it; the pretraining
script writes a loadable base with only the pretraining suite's statistics; the shipped base
matches the demo config's architecture; SFT from a base adds the demos' statistics."""

import json
import os
import subprocess
import sys

os.environ.setdefault("MUJOCO_GL", "egl")

import numpy as np
import pytest
import torch
from safetensors import safe_open

from common.config import EnvConfig
from common.config_loading import load_config
from env_workers.tabletop import TASKS, TabletopEnv, run_expert
from env_workers.tabletop.tasks import INIT_NOISE, PRETRAIN_SUITE, PRETRAIN_TASKS
from tests.conftest import ROOT

BASE = ROOT / "policy/pretrained/tabletop_base"


def _env(suite: str, **kw) -> TabletopEnv:
    return TabletopEnv(EnvConfig(backend="tabletop", suite=suite, image_size=32, max_steps=96, num_steps_wait=0, **kw))


def test_pretraining_suite_shares_no_goal_task_or_instruction_with_the_benchmark():
    assert len(PRETRAIN_TASKS) == 14
    assert not set(PRETRAIN_TASKS) & set(TASKS)
    bench_goals = {g for t in TASKS.values() for g in t.goal}
    assert not {g for t in PRETRAIN_TASKS.values() for g in t.goal} & bench_goals
    assert not {t.instruction for t in PRETRAIN_TASKS.values()} & {t.instruction for t in TASKS.values()}
    assert not {t.layout.name for t in PRETRAIN_TASKS.values()} & {t.layout.name for t in TASKS.values()}


def _colours_put_in_a_bowl(tasks) -> set[str]:
    return {block for t in tasks for verb, block, _ in t.goal if verb == "in_bowl"}


def test_pretraining_bowl_scenes_hold_every_benchmark_colour_as_a_distractor_only():
    bench_bowl_colours = _colours_put_in_a_bowl(TASKS.values())
    bowl_tasks = [t for t in PRETRAIN_TASKS.values() if t.layout.bowl]
    beside_a_bowl = {b for t in bowl_tasks for b in t.layout.blocks}
    moved_to_a_bowl = _colours_put_in_a_bowl(bowl_tasks)
    assert bench_bowl_colours == {"red", "green", "blue"}
    assert bench_bowl_colours <= beside_a_bowl and not bench_bowl_colours & moved_to_a_bowl


def test_pretraining_scenes_spread_over_the_workspace_while_benchmark_scenes_stay_near_their_nominal():
    spread = np.array([PRETRAIN_TASKS["stack_blue_on_red"].layout.sample(s)["red"][:2] for s in range(40)])
    bench = TASKS["stack_red_on_green"].layout
    near = np.array([bench.sample(s)["red"][:2] for s in range(40)])
    assert np.abs(near - np.array(bench.nominal()["red"][:2])).max() <= INIT_NOISE + 1e-9
    assert spread.std(axis=0).min() > 3 * near.std(axis=0).max()
    assert PRETRAIN_TASKS["stack_blue_on_red"].layout.sample(7) == PRETRAIN_TASKS["stack_blue_on_red"].layout.sample(7)


def test_env_runs_the_pretraining_suite_and_names_the_known_suites_on_a_typo():
    with _env(PRETRAIN_SUITE) as env:
        assert env.task_names == list(PRETRAIN_TASKS)
    with pytest.raises(ValueError, match=r"env.suite.*'tabletop', 'tabletop_pretrain'"):
        _env("tabletop_pretrian")


def test_experts_solve_every_pretraining_task():
    with _env(PRETRAIN_SUITE) as env:
        for task in PRETRAIN_TASKS:
            for state in env.init_states(task, "train")[:2]:
                _, actions, success = run_expert(env, task, state)
                assert success, f"{task} init state {state}"
                assert np.all(np.abs(actions) <= 1.0)


def _pretrain(out, *extra):
    """scripts/pretrain_base.py on the tiny config (batch 4) into `out`."""
    cmd = [sys.executable, str(ROOT / "scripts/pretrain_base.py"), "--out", str(out), "--batch-size", "4",
           "--config", str(ROOT / "configs/tiny.yaml"), *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=600, capture_output=True)


def test_pretrain_script_writes_a_base_with_only_the_pretraining_statistics(tmp_path):
    from policy.checkpoint import load_policy

    out = tmp_path / "base"
    _pretrain(out, "--demos-per-task", "1", "--steps", "4")
    summary = json.loads((out / "pretrain_summary.json").read_text())
    assert summary["suite"] == PRETRAIN_SUITE and summary["demos"] == 14 and summary["steps"] == 4
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.bfloat16"}
    policy = load_policy(out)
    assert list(policy.norm_stats) == [PRETRAIN_SUITE] and policy.unnorm_key == PRETRAIN_SUITE


def test_pretrain_seconds_budget_cuts_the_steps_to_fit(tmp_path):
    out = tmp_path / "base"
    _pretrain(out, "--demos-per-task", "1", "--steps", "100000", "--seconds", "12")
    summary = json.loads((out / "pretrain_summary.json").read_text())
    # the budget is applied after the first 120 steps, from their speed (how long is the machine's business)
    assert 120 <= summary["steps"] < 100000


def test_pretrain_init_continues_from_a_base_and_records_its_history(tmp_path):
    def pretrain(out, *extra):
        _pretrain(out, *extra)
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            return {k: f.get_tensor(k).float() for k in f.keys()}

    first = pretrain(tmp_path / "a", "--steps", "3", "--demos-per-task", "1")
    second = pretrain(tmp_path / "b", "--steps", "2", "--demos-per-task", "2", "--init", str(tmp_path / "a"))
    summary = json.loads((tmp_path / "b" / "pretrain_summary.json").read_text())
    assert summary["steps"] == 2 and summary["init_summary"]["steps"] == 3
    assert first.keys() == second.keys() and any(not (first[k] == second[k]).all() for k in first)
    # the base's action statistics, not those of the new demos: its tokens keep meaning the same actions
    stats = lambda d: json.loads((tmp_path / d / "dataset_statistics.json").read_text())  # noqa: E731
    assert stats("b") == stats("a")


def test_pretrain_init_continues_a_base_at_twice_the_image_size_on_the_same_patch_grid(tmp_path):
    from policy.checkpoint import load_policy

    _pretrain(tmp_path / "a", "--steps", "2", "--demos-per-task", "1")
    bigger = ["policy.image_size=128", "policy.patch_size=16", "env.image_size=128"]
    _pretrain(tmp_path / "b", "--steps", "2", "--demos-per-task", "1", "--init", str(tmp_path / "a"), *bigger)
    small, big = load_policy(tmp_path / "a"), load_policy(tmp_path / "b")
    assert (big.model.config.image_size, big.model.config.patch_size) == (128, 16)
    assert big.image_processor.image_size == 128 and big.model.config.num_patches == small.model.config.num_patches
    assert json.loads((tmp_path / "b" / "pretrain_summary.json").read_text())["overrides"] == bigger
    with pytest.raises(subprocess.CalledProcessError) as failed:  # 96 px is no whole multiple of 64
        _pretrain(tmp_path / "c", "--steps", "1", "--demos-per-task", "1", "--init", str(tmp_path / "a"),
                  "policy.image_size=96", "policy.patch_size=12", "env.image_size=96")
    assert b"policy.image_size=96" in failed.value.stderr


def test_upscale_script_writes_the_same_base_for_twice_the_image_size_and_keeps_its_history(tmp_path):
    from policy.checkpoint import load_policy

    _pretrain(tmp_path / "a", "--steps", "2", "--demos-per-task", "1")
    subprocess.run([sys.executable, str(ROOT / "scripts/upscale_base.py"), str(tmp_path / "a"), str(tmp_path / "b"), "--factor", "2"],
                   check=True, cwd=ROOT, timeout=300, capture_output=True)
    summary = json.loads((tmp_path / "b" / "pretrain_summary.json").read_text())
    small, big = load_policy(tmp_path / "a"), load_policy(tmp_path / "b")
    assert (summary["image_size"], summary["patch_size"]) == (128, 16) == (big.model.config.image_size, big.model.config.patch_size)
    assert summary["suite"] == PRETRAIN_SUITE and summary["init_summary"]["steps"] == 2
    assert big.norm_stats == small.norm_stats
    small_state, big_state = small.model.state_dict(), big.model.state_dict()
    kernel = "vision_backbone.featurizer.embeddings.patch_embedding.weight"
    assert all(torch.equal(small_state[k], big_state[k]) for k in small_state if k != kernel)
    assert torch.equal(big_state[kernel][:, :, ::2, ::2] * 4, small_state[kernel])  # exact in bfloat16


def test_shipped_base_loads_and_matches_the_demo_configs_architecture():
    from policy.checkpoint import arch_from_config, load_policy

    cfg = load_config(ROOT / "configs/demo.yaml")
    assert cfg.policy.path is not None and (ROOT / cfg.policy.path).resolve() == BASE.resolve()
    policy = load_policy(BASE)
    assert policy.model.config.to_dict() == arch_from_config(cfg.policy).to_dict()
    assert list(policy.norm_stats) == [PRETRAIN_SUITE]
    summary = json.loads((BASE / "pretrain_summary.json").read_text())
    assert summary["suite"] == PRETRAIN_SUITE and summary["tasks"] == list(PRETRAIN_TASKS)


def test_loading_a_base_for_a_new_dataset_adds_its_statistics_and_keeps_the_bases(tiny_policy, tmp_path):
    from policy.checkpoint import load_policy, save_policy

    base_stats = tiny_policy.norm_stats
    (base_key,) = base_stats
    save_policy(tiny_policy, tmp_path / "base")
    new = json.loads(json.dumps(base_stats[base_key]))
    new["action"]["q99"] = [v + 0.5 for v in new["action"]["q99"]]
    with pytest.raises(KeyError, match="not in the checkpoint"):
        load_policy(tmp_path / "base", unnorm_key="new_suite")
    policy = load_policy(tmp_path / "base", unnorm_key="new_suite", fill_norm_stats={"new_suite": new})
    assert policy.unnorm_key == "new_suite" and set(policy.norm_stats) == {base_key, "new_suite"}
    np.testing.assert_allclose(policy.stats.q99, new["action"]["q99"])
    same = load_policy(tmp_path / "base", unnorm_key=base_key, fill_norm_stats={base_key: new})  # the checkpoint's own win
    assert same.norm_stats[base_key] == base_stats[base_key]


def test_sft_from_a_base_trained_elsewhere_keeps_its_weights_as_the_start(ray_cluster, tmp_path):
    from deploy.sft import run_sft
    from env_workers.demos import dataset_statistics, read_demos
    from env_workers.factory import env_scaled_action_dims
    from policy.checkpoint import build_policy, load_policy, save_policy

    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"run_dir={tmp_path}", "env.tasks=[red_on_yellow]", "sft.steps=2", "sft.batch_size=4",
        "cluster.learner_world_size=1", f"policy.path={tmp_path / 'base'}", "policy.unnorm_key=tabletop",
    ])
    from policy.tiny import default_norm_stats

    base = build_policy(cfg.policy.model_copy(update={"unnorm_key": "elsewhere", "path": None}),
                        default_norm_stats(cfg.policy.action_dims, key="elsewhere"), seed=3)
    save_policy(base, tmp_path / "base")
    run_sft(cfg, tmp_path / "sft_policy", log=lambda *_: None)
    init = load_policy(tmp_path / "sft_init", unnorm_key="tabletop")
    for name, tensor in base.model.state_dict().items():  # the SFT started from the base, not a fresh init
        np.testing.assert_array_equal(init.model.state_dict()[name].numpy(), tensor.numpy())
    tuned = load_policy(tmp_path / "sft_policy", unnorm_key="tabletop")
    assert set(tuned.norm_stats) == {"elsewhere", "tabletop"}
    demos = read_demos(tmp_path / "demos")
    expected = dataset_statistics(demos, scaled_dims=env_scaled_action_dims(cfg.env))
    np.testing.assert_allclose(tuned.stats.q99, expected["action"]["q99"])
