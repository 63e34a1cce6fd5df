"""learner.lora: the learner trains peft LoRA adapters on the language model's blocks (plus the parts
learner.lora.trainable names) and everything that leaves it is in the policy's own layout, merged:
published weights, policy folders (loadable by load_policy, same logits as the training model).
A resumed LoRA run continues exactly. Real DeepSpeed (gloo, CPU) in Ray actors, the tiny policy."""

import numpy as np
import pytest
import ray
import torch

from common.config_loading import ConfigError, load_config
from tests.conftest import ROOT
from tests.test_learner_resume import _batch, _run_steps

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _cfg(tmp_path, *overrides):
    return load_config(ROOT / "configs/tiny.yaml", [f"run_dir={tmp_path}", "cluster.learner_world_size=1",
                                                    "learner.lr=0.001", "learner.lora={rank: 4, alpha: 8}", *overrides])


@ray.remote(num_cpus=1)
class LoraRank:
    """One learner rank (world size 1) whose engine and policy the test can look into."""

    def __init__(self):
        import socket

        from learner.engine import init_distributed

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        init_distributed(0, 1, "127.0.0.1", port, "gloo")

    def build(self, cfg, policy_dir: str) -> dict:
        from learner.engine import LearnerEngine
        from policy.checkpoint import load_policy

        torch.manual_seed(0)
        self.policy = load_policy(policy_dir, dtype=cfg.policy.dtype, policy=cfg.policy)
        self.policy.model.train()
        self.engine = LearnerEngine(self.policy, cfg.learner, cfg.learner.lr, cfg.learner.micro_batch_chunks)
        params = dict(self.policy.model.named_parameters())
        self.before = {n: p.detach().clone() for n, p in params.items()}
        return {"trainable": sorted(n for n, p in params.items() if p.requires_grad),
                "optimized": sum(p.numel() for g in self.engine.optimizer.param_groups for p in g["params"]),
                "trainable_numel": sum(p.numel() for p in params.values() if p.requires_grad)}

    def step(self, trajs, advantages) -> dict:
        s = self.engine.grpo_minibatch(trajs, advantages, 1.6, len(trajs))
        changed = sorted(n for n, p in self.policy.model.named_parameters() if not torch.equal(p.detach(), self.before[n]))
        return {"loss": s.loss, "changed": changed, "weights": self.engine.weights()}

    @torch.no_grad()
    def logits(self, images, instruction: str) -> torch.Tensor:
        self.policy.model.eval()
        out = self.policy.action_logits(images, [instruction] * len(images))
        self.policy.model.train()
        return out

    def save_merged(self, folder: str) -> None:
        from learner.lora import merged_tensors
        from policy.checkpoint import save_policy

        save_policy(self.policy, folder, merged_tensors(self.policy.model))


@pytest.fixture(scope="module")
def lora_rank(ray_cluster):
    rank = LoraRank.remote()
    yield rank
    ray.kill(rank)


def test_only_adapters_and_listed_parts_train_and_merged_weights_differ_only_there(lora_rank, tiny_policy_dir, tmp_path):
    from policy.checkpoint import load_policy

    built = ray.get(lora_rank.build.remote(_cfg(tmp_path), str(tiny_policy_dir)), timeout=300)
    adapters = [n for n in built["trainable"] if ".lora_" in n]
    assert sorted(set(built["trainable"]) - set(adapters)) == ["action_head", "action_queries"]
    layers = {n.split(".lora_")[0] for n in adapters}
    assert len(layers) == 2 * len(TARGETS)  # every targeted Linear of both LM blocks, nothing else
    assert all(n.startswith("language_model.model.layers.") and n.rpartition(".")[2] in TARGETS for n in layers)
    assert built["optimized"] == built["trainable_numel"], "optimiser state only for what trains"

    trajs = _batch(0)
    adv = np.array([1.0 if t.success else -1.0 for t in trajs], dtype=np.float32)
    got = ray.get(lora_rank.step.remote(trajs, adv), timeout=300)
    assert set(got["changed"]) == set(built["trainable"]) - {n for n in adapters if ".lora_A." in n}, \
        "B (zero at start) and the listed parts move; A gets no gradient while B is zero; the base stays"

    base = load_policy(tiny_policy_dir).model.state_dict()
    merged = got["weights"]
    assert set(merged) == set(base), "published weights are in the policy's layout: no adapter keys"
    differ = {k for k in base if not torch.equal(merged[k], base[k])}
    assert differ == {f"{layer}.weight" for layer in layers} | {"language_model.lm_head.weight", "action_queries"}
    head = merged["language_model.lm_head.weight"] != base["language_model.lm_head.weight"]
    rows = head.any(dim=1).nonzero().flatten()
    assert rows.min() >= 31744 and rows.max() < 32000 and len(rows) > 200, "only the head's action rows (ids 31744-31999) train"


def test_merged_policy_folder_gives_the_training_models_logits(lora_rank, tiny_policy_dir, tmp_path):
    from policy.checkpoint import load_policy

    ray.get(lora_rank.build.remote(_cfg(tmp_path), str(tiny_policy_dir)), timeout=300)
    for seed in (1, 2):  # two steps: A moves too once B is non-zero
        trajs = _batch(seed)
        ray.get(lora_rank.step.remote(trajs, np.where([t.success for t in trajs], 1.0, -1.0).astype(np.float32)),
                timeout=300)
    images = np.random.default_rng(3).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    instruction = "put the red block in the bowl"
    trained = ray.get(lora_rank.logits.remote(images, instruction), timeout=300)
    ray.get(lora_rank.save_merged.remote(str(tmp_path / "merged")), timeout=300)
    served = load_policy(tmp_path / "merged")
    with torch.no_grad():
        served_logits = served.action_logits(images, [instruction] * 4)
        base_logits = load_policy(tiny_policy_dir).action_logits(images, [instruction] * 4)
    assert (trained - base_logits).abs().max() > 1e-2, "the steps should move the logits well past the tolerance"
    torch.testing.assert_close(served_logits, trained, rtol=1e-4, atol=1e-5)


def test_lora_run_resumes_exactly_and_saves_a_servable_folder(ray_cluster, tiny_policy_dir, tmp_path):
    from learner.group import LearnerGroup
    from policy.checkpoint import load_policy

    cfg = _cfg(tmp_path)
    batches = [_batch(s) for s in range(4)]
    straight = LearnerGroup(cfg)
    straight.setup_grpo(tiny_policy_dir, 0, {})
    expected = _run_steps(straight, batches)
    want = ray.get(straight.publish_weights())
    straight.shutdown()
    assert len(set(expected)) == 4

    first = LearnerGroup(cfg)
    first.setup_grpo(tiny_policy_dir, 0, {})
    assert _run_steps(first, batches[:2]) == pytest.approx(expected[:2], abs=0)
    first.save_state(tmp_path / "ckpt", {"step": 2})
    first.shutdown()

    resumed = LearnerGroup(cfg)
    resumed.setup_grpo(tiny_policy_dir, 123, {})
    assert resumed.load_state(tmp_path / "ckpt")["step"] == 2
    assert _run_steps(resumed, batches[2:]) == pytest.approx(expected[2:], abs=0)
    got = ray.get(resumed.publish_weights())
    resumed.save_policy(tmp_path / "policy")
    resumed.shutdown()
    for name, w in want.items():
        assert torch.equal(got[name], w), name
    saved = load_policy(tmp_path / "policy").model.state_dict()
    assert set(saved) == set(want)
    for name, w in want.items():
        assert torch.equal(saved[name], w), name


@pytest.mark.parametrize("override, field", [
    ("learner.lora.rank=0", "learner.lora.rank: Input should be greater than 0"),
    ("learner.lora={target_modules: [qproj]}", "learner.lora.target_modules.0: Input should be 'q_proj'"),
    ("learner.lora={target_modules: []}", "learner.lora.target_modules: List should have at least 1 item"),
    ("learner.lora.dropout=1.5", "learner.lora.dropout: Input should be less than 1"),
    ("learner.lora={trainable: [vision]}", "learner.lora.trainable.0: Input should be 'action_head'"),
])
def test_bad_lora_settings_fail_at_load_naming_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/tiny.yaml", [override])
    lines = str(err.value).splitlines()
    assert len(lines) == 2 and lines[1].strip().startswith(field), str(err.value)


def test_unknown_lora_field_is_named_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown field 'learner.lora.rnk'; learner.lora has: rank, alpha, dropout"):
        load_config(ROOT / "configs/tiny.yaml", ["learner.lora.rnk=4"])
