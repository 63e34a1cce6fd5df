"""The run config: YAML + overrides, paper defaults, and errors that name the field."""

from pathlib import Path

import pytest

from common.config import RunConfig
from common.config_loading import ConfigError, dump_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_papers_values():
    cfg = RunConfig()
    assert (cfg.rollout.group_size, cfg.rollout.temperature) == (8, 1.6)
    assert (cfg.rollout.min_group_success, cfg.rollout.max_group_success) == (0.1, 0.9)
    assert (cfg.learner.lr, cfg.learner.clip_low, cfg.learner.clip_high, cfg.learner.grad_clip) == (5e-6, 0.2, 0.28, 1.0)
    assert cfg.policy.action_bins == 256 and cfg.policy.action_chunk * cfg.policy.action_dims == 56
    assert cfg.rollout.groups_per_batch * cfg.rollout.group_size // cfg.learner.mini_batch_size == 4


def test_libero_spatial_config_loads_with_paper_values():
    cfg = load_config(ROOT / "configs/libero_spatial.yaml")
    assert cfg.env.backend == "libero" and cfg.env.max_steps == 512 and cfg.env.num_steps_wait == 10
    assert cfg.policy.unnorm_key == "libero_spatial_no_noops"
    assert cfg.learner.lr == 5e-6 and cfg.rollout.temperature == 1.6


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), RunConfig), path


def test_overrides_set_nested_values_with_yaml_types():
    cfg = load_config(
        ROOT / "configs/tiny.yaml",
        ["rollout.temperature=1.0", "env.tasks=[a, b]", "policy.path=/ckpt", "checkpoint.resume=true", "seed=7"],
    )
    assert cfg.rollout.temperature == 1.0 and cfg.env.tasks == ["a", "b"]
    assert str(cfg.policy.path) == "/ckpt" and cfg.checkpoint.resume is True and cfg.seed == 7


def test_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/tiny.yaml", ["rollout.temperature=1.3"])
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_config_is_frozen():
    with pytest.raises(Exception):
        RunConfig().rollout.temperature = 2.0


BAD_OVERRIDES = [
    (["rollout.temprature=1.0"], ["rollout.temprature", "temperature"]),
    (["rollout.temperature=-1"], ["rollout.temperature", "greater than 0"]),
    (["rollout.temperature=hot"], ["rollout.temperature", "hot"]),
    (["env.backend=gazebo"], ["env.backend", "tabletop", "libero", "maniskill"]),
    (["learner.zero_stage=3"], ["learner.zero_stage", "0", "1", "2"]),
    (["policy.action_bins=128"], ["policy.action_bins", "256"]),
    (["rollout.min_group_success=0.95"], ["min_group_success", "max_group_success"]),
    (["learner.mini_batch_size=4"], ["learner.mini_batch_size 4", "cluster.learner_world_size 8"]),
    (["learner.micro_batch_size=4"], ["learner.micro_batch_size", "micro_batch_chunks"]),
    (["learner.micro_batch_chunks=0"], ["learner.micro_batch_chunks", "greater than 0"]),
    (["sft.batch_size=4"], ["sft.batch_size 4", "cluster.learner_world_size 8"]),
    (["learner.mini_batch_size=96"], ["groups_per_batch", "mini_batch_size"]),
    (["policy.image_size=100"], ["image_size", "patch_size"]),
    (["nonsense.field=1"], ["nonsense", "policy", "rollout"]),
    (["rollout.group_size=1"], ["rollout.group_size", "greater than or equal to 2"]),
    (["rollout.temperature"], ["section.field=value"]),
    (["rollout.temperature.x=1"], ["rollout.temperature", "not a section"]),
    (["cluster.resources={gpu: x}"], ["cluster.resources", "sim", "inference", "learner"]),
    (["policy.llm.num_heads=3"], ["policy.llm", "divisible"]),
    (["learner.loss_terms={demo_bc: {weight: -1}}"], ["learner.loss_terms.demo_bc.weight", "greater than 0"]),
    (["learner.loss_terms={rehearsal: {weight: 1}}"], ["learner.loss_terms", "demo_bc"]),
    (["learner.sync_every=3", "rollout.max_policy_lag=1"], ["learner.sync_every", "rollout.max_policy_lag"]),
    (["rollout.queue_capacity=100"], ["queue_capacity", "groups_per_batch x group_size = 512"]),
    (["learner.weight_sync=nccl"], ["learner.weight_sync", "auto", "object_store", "collective", "cuda_ipc"]),
    (["learner.weight_sync_bucket_mb=0"], ["learner.weight_sync_bucket_mb", "greater than 0"]),
    (["env.init_states.num_train=40"], ["init_states", "50 initial states", "needs 65"]),
]


@pytest.mark.parametrize("overrides,expected", BAD_OVERRIDES, ids=[o[0][0] for o in BAD_OVERRIDES])
def test_bad_override_fails_naming_the_field(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/libero_spatial.yaml", overrides)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))


def test_unknown_key_in_file_lists_allowed_fields(tmp_path):
    (tmp_path / "c.yaml").write_text("learner:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path / "c.yaml")
    assert "learner.learning_rate" in str(err.value) and "lr" in str(err.value)


def test_missing_and_malformed_files_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("policy: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
