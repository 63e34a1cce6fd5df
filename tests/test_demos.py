"""Tests for env_workers/demos.py: recording expert demos, the robomimic/LIBERO HDF5 round trip
(ours and LIBERO's own files), and OpenVLA-format dataset statistics."""

import json
import os

os.environ.setdefault("MUJOCO_GL", "egl")

import h5py
import numpy as np
import pytest

from common.config import EnvConfig
from env_workers.demos import Demo, dataset_statistics, read_demos, record_demos, write_demos
from env_workers.tabletop import TabletopEnv

TASKS = ["red_in_bowl", "push_green_to_yellow"]


@pytest.fixture(scope="module")
def env():
    cfg = EnvConfig(backend="tabletop", suite="tabletop", tasks=TASKS, image_size=48, max_steps=100, num_steps_wait=0)
    e = TabletopEnv(cfg)
    yield e
    e.close()


@pytest.fixture(scope="module")
def recorded(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("demos")
    demos = record_demos(env, TASKS, {t: [0, 1] for t in TASKS}, out_dir=out)
    return out, demos


def test_record_demos_keeps_successful_expert_episodes(recorded):
    _, demos = recorded
    assert [(d.task, d.init_state) for d in demos] == [(t, i) for t in TASKS for i in (0, 1)]
    for d in demos:
        T = len(d)
        assert 10 < T < 100
        assert d.images.shape == (T, 48, 48, 3) and d.images.dtype == np.uint8
        assert d.actions.shape == (T, 7) and d.actions.dtype == np.float32
        assert d.proprio.shape == (T, 8) and d.proprio.dtype == np.float32


def test_files_follow_the_libero_layout(recorded):
    out, demos = recorded
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{t}_demo.hdf5" for t in TASKS)
    with h5py.File(out / "red_in_bowl_demo.hdf5", "r") as f:
        data = f["data"]
        assert json.loads(data.attrs["problem_info"])["language_instruction"] == "put the red block in the bowl"
        assert json.loads(data.attrs["env_args"])["type"] == "tabletop"
        assert data.attrs["total"] == sum(len(d) for d in demos if d.task == "red_in_bowl")
        g = data["demo_0"]
        T = g["actions"].shape[0]
        assert g["obs/agentview_rgb"].shape[0] == T and g["obs/agentview_rgb"].dtype == np.uint8
        assert g["obs/ee_pos"].shape == (T, 3) and g["obs/gripper_states"].shape == (T, 2)
        assert g["actions"].dtype == np.float32
        assert list(g["dones"][()]) == [0] * (T - 1) + [1]
        assert g["rewards"][-1] == 1 and g["rewards"][()].sum() == 1


def test_hdf5_round_trip_keeps_arrays_and_instruction(recorded):
    out, demos = recorded
    back = read_demos(out)
    assert len(back) == len(demos)
    by_key = {(d.task, d.init_state): d for d in back}
    for d in demos:
        r = by_key[(d.task, d.init_state)]
        assert r.instruction == d.instruction
        np.testing.assert_array_equal(r.images, d.images)
        np.testing.assert_array_equal(r.actions, d.actions)
        np.testing.assert_array_equal(r.proprio, d.proprio)
        np.testing.assert_array_equal(r.states, d.states)
    assert [d.task for d in read_demos(out, tasks=["red_in_bowl"])] == ["red_in_bowl"] * 2


def test_record_demos_with_a_count_takes_the_first_train_states(env):
    demos = record_demos(env, ["red_in_bowl"], 2)
    assert [d.init_state for d in demos] == [0, 1]


def test_reads_official_libero_files_upright_with_their_instruction(tmp_path):
    """A file as LIBERO ships it: upside-down ('opengl') frames, 12 demos, no tabletop attrs."""
    rng = np.random.default_rng(0)
    name = "pick_up_the_black_bowl_next_to_the_plate_and_place_it_on_the_plate"
    with h5py.File(tmp_path / f"{name}_demo.hdf5", "w") as f:
        data = f.create_group("data")
        data.attrs["problem_info"] = json.dumps(
            {"problem_name": "libero_spatial", "domain_name": "kitchen",
             "language_instruction": "pick up the black bowl next to the plate and place it on the plate"}
        )
        data.attrs["env_args"] = json.dumps({"type": 1, "env_name": "Libero_Tabletop_Manipulation"})
        data.attrs["macros_image_convention"] = "opengl"
        frames = {}
        for k in range(12):
            g = data.create_group(f"demo_{k}")
            frames[k] = rng.integers(0, 255, (5, 8, 8, 3), dtype=np.uint8)
            g.create_dataset("obs/agentview_rgb", data=frames[k])
            g.create_dataset("obs/ee_pos", data=np.full((5, 3), k, np.float64))
            g.create_dataset("obs/ee_ori", data=np.zeros((5, 3)))
            g.create_dataset("obs/gripper_states", data=np.zeros((5, 2)))
            g.create_dataset("obs/joint_states", data=np.zeros((5, 7)))
            g.create_dataset("actions", data=rng.uniform(-1, 1, (5, 7)))
    demos = read_demos(tmp_path)
    assert [d.proprio[0, 0] for d in demos] == list(range(12))  # demo_10 after demo_9, not after demo_1
    d = demos[3]
    assert d.task == name and d.instruction.startswith("pick up the black bowl")
    np.testing.assert_array_equal(d.images, frames[3][:, ::-1, ::-1])
    assert d.proprio.shape == (5, 8) and d.actions.dtype == np.float32


def test_dataset_statistics_in_openvla_format(recorded):
    _, demos = recorded
    stats = dataset_statistics(demos)
    json.dumps(stats)  # plain lists and numbers
    assert stats["num_trajectories"] == len(demos)
    assert stats["num_transitions"] == sum(len(d) for d in demos)
    act, prop = stats["action"], stats["proprio"]
    assert set(act) == {"mean", "std", "max", "min", "q01", "q99", "mask"}
    assert set(prop) == {"mean", "std", "max", "min", "q01", "q99"}
    assert act["mask"] == [True] * 6 + [False]
    assert len(act["q01"]) == 7 and len(prop["q01"]) == 8
    for s in (act, prop):
        assert all(lo <= hi for lo, hi in zip(s["q01"], s["q99"]))
        assert all(lo <= hi for lo, hi in zip(s["min"], s["max"]))
    assert act["min"][6] == -1.0 and act["max"][6] == 1.0  # the gripper both opens and closes


def test_statistics_without_proprio_use_zeros_like_openvla(tmp_path):
    d = Demo(task="t", instruction="do it", images=np.zeros((3, 4, 4, 3), np.uint8),
             actions=np.linspace(-1, 1, 21, dtype=np.float32).reshape(3, 7))
    stats = dataset_statistics([d])
    assert stats["proprio"]["max"] == [0.0] * 7
    write_demos([d], tmp_path)
    assert read_demos(tmp_path)[0].proprio is None


def test_demos_of_another_action_convention_are_re_recorded_or_refused(tmp_path):
    """Cached expert demos recorded under delta control must not feed an absolute-control SFT
    (their actions would be read as targets): the run's own cache is re-recorded, a given dataset
    is refused naming both conventions."""
    from common.config import RunConfig
    from deploy.sft import demo_folder
    from env_workers.demos import recorded_controls

    env_kw = dict(backend="tabletop", suite="tabletop", tasks=["red_in_bowl"], image_size=32, max_steps=48, num_steps_wait=0)
    delta = RunConfig(run_dir=tmp_path / "run", env=EnvConfig(**env_kw))
    absolute = RunConfig(run_dir=tmp_path / "run", env=EnvConfig(**env_kw, control="absolute"))
    folder = demo_folder(delta)
    assert recorded_controls(folder) == {"delta"}
    delta_actions = read_demos(folder)[0].actions
    assert demo_folder(absolute) == folder and recorded_controls(folder) == {"absolute"}
    absolute_actions = read_demos(folder)[0].actions
    assert len(absolute_actions) == len(delta_actions) and not np.allclose(absolute_actions[:, :3], delta_actions[:, :3])
    given = absolute.model_copy(update={"sft": absolute.sft.model_copy(update={"dataset": folder})})
    assert demo_folder(given) == folder
    refused = delta.model_copy(update={"sft": delta.sft.model_copy(update={"dataset": folder})})
    with pytest.raises(ValueError, match=r"sft.dataset .*env.control \['absolute'\].*'delta'"):
        demo_folder(refused)


def test_a_truncated_demo_file_is_named_in_the_error(recorded, tmp_path):
    import shutil

    from common.files import UnreadableFile

    out, _ = recorded
    for path in sorted(out.glob("*.hdf5")):
        shutil.copy(path, tmp_path / path.name)
    victim = sorted(tmp_path.glob("*.hdf5"))[-1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(UnreadableFile, match=rf"demo file {victim} is unreadable"):
        read_demos(tmp_path)
