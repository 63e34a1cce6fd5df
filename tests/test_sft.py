"""SFT through the DeepSpeed learner group on recorded expert demos: the loss falls and the
greedy policy succeeds on held-out initial states of at least one task."""

import numpy as np

from common.config_loading import load_config
from tests.conftest import ROOT

TASK = "red_on_yellow"


def test_sft_on_expert_demos_lowers_loss_and_succeeds_greedily(ray_cluster, tmp_path):
    from deploy.sft import run_sft
    from env_workers.factory import make_env
    from policy.action_tokenizer import postprocess_gripper
    from policy.checkpoint import load_policy

    cfg = load_config(ROOT / "configs/tiny.yaml", [
        f"run_dir={tmp_path}", f"env.tasks=[{TASK}]", "policy.use_proprio=true", "sft.demos_per_task=20",
        "sft.steps=300", "sft.lr=0.001", "sft.batch_size=16", "cluster.learner_world_size=1", "learner.micro_batch_chunks=8",
        "learner.mini_batch_size=8", "env.max_steps=64",
    ])
    summary = run_sft(cfg, tmp_path / "sft_policy", log=lambda *_: None)
    losses = summary["losses"]
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])

    policy = load_policy(tmp_path / "sft_policy")
    env = make_env(cfg.env)
    successes = 0
    try:
        for state in env.init_states(TASK, "eval")[:10]:
            obs, done = env.reset(TASK, state), False
            while not done:
                chunk = policy.act([obs], greedy=True)[0]
                result = env.step_chunk(postprocess_gripper(chunk.actions))  # stops where the episode ends
                obs, done = result.observation, result.done
                successes += int(result.success)  # success ends the episode: counted once
    finally:
        env.close()
    assert successes > 0, "greedy SFT policy never succeeded on held-out states"
