"""Expert demonstrations: record them, store them in robomimic/LIBERO HDF5 layout, read them back
(ours or official LIBERO files), and compute OpenVLA-format dataset statistics.

Layout, one file per task (`<task>_demo.hdf5`), as LIBERO ships it:
  data.attrs: problem_info (JSON with language_instruction), env_args (JSON), total, num_demos,
              macros_image_convention ("opencv" = upright rows; LIBERO's own files say "opengl")
  data/demo_N/obs/{agentview_rgb [T,H,W,3] uint8, ee_pos [T,3], ee_ori [T,3], gripper_states [T,2]}
  data/demo_N/{actions [T,7 per arm] float32, dones [T] uint8, rewards [T] float32, states [T,S] float64}
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import h5py
import numpy as np

from common.files import reading

PROPRIO_KEYS = ("ee_pos", "ee_ori", "gripper_states")  # concatenated: LIBERO / OpenVLA-OFT's 8-dim proprio


class ExpertFailed(RuntimeError):
    """The expert cannot act from this initial state (e.g. the motion planner finds no path)."""


@dataclass
class Demo:
    task: str
    instruction: str
    images: np.ndarray  # [T, H, W, 3] uint8, upright
    actions: np.ndarray  # [T, 7 per arm] float32; actions[t] was taken after seeing images[t]
    proprio: np.ndarray | None = None  # [T, 8] float32
    init_state: int | None = None
    states: np.ndarray | None = None  # [T, nq + nv] sim state before each action (replay / debugging)

    def __len__(self) -> int:
        return int(self.actions.shape[0])


# --- recording ---
def record_demos(
    env,
    tasks: Iterable[str],
    init_states: Mapping[str, Sequence[int]] | Sequence[int] | int,
    out_dir: str | Path | None = None,
    seed: int = 0,
) -> list[Demo]:
    """Run the backend's expert and keep its successful episodes.

    `init_states`: indices per task, one list for every task, or a count n (the first n expert
    successes over the task's train states, in order). Writes `<task>_demo.hdf5` files when
    `out_dir` is given. Experts: the tabletop's scripted ones (they read the sim state) and, for
    env.backend maniskill, ManiSkill's motion planners in our control mode (maniskill/experts.py).
    """
    tasks = list(tasks)
    expert = _make_expert(env, tasks, seed)
    demos: list[Demo] = []
    try:
        for task in tasks:
            if isinstance(init_states, int):
                candidates, want = env.init_states(task, "train"), init_states
            else:
                candidates = init_states[task] if isinstance(init_states, Mapping) else init_states
                want = len(candidates)
            got = 0
            for i in candidates:
                if got >= want:
                    break
                demo = _record_one(env, expert, task, int(i))
                if demo is not None:
                    demos.append(demo)
                    got += 1
    finally:
        if hasattr(expert, "close"):
            expert.close()
    if out_dir is not None:
        write_demos(demos, out_dir, env_args=_env_args(env))
    return demos


def _make_expert(env, tasks: Sequence[str], seed: int):
    backend = getattr(getattr(env, "cfg", None), "backend", "tabletop")
    if backend == "maniskill":
        from env_workers.maniskill.experts import EXPERT_TASKS, PlannerExpert

        missing = [t for t in tasks if t not in EXPERT_TASKS]
        if missing:
            raise ValueError(f"no ManiSkill expert reaches 90 % on {missing} (docs/maniskill.md); record demos of "
                             f"env.tasks within {list(EXPERT_TASKS)} or give sft.dataset=DIR")
        return PlannerExpert(env)
    from env_workers.tabletop.experts import ScriptedExpert

    return ScriptedExpert(env, seed=seed)


def _sim_state(env) -> np.ndarray:
    if hasattr(env, "sim_state"):  # ManiSkill: its flat actor and articulation state
        return env.sim_state()
    return np.concatenate([env.sim.data.qpos, env.sim.data.qvel])  # MuJoCo


def _record_one(env, expert, task: str, init_state: int) -> Demo | None:
    obs = env.reset(task, init_state)
    try:
        expert.reset()
    except ExpertFailed:  # e.g. the motion planner found no path from this state
        return None
    images, proprio, actions, states = [], [], [], []
    while True:
        images.append(obs.image)
        proprio.append(obs.proprio)
        states.append(_sim_state(env))
        a = expert.act()
        actions.append(a)
        res = env.step(a)
        obs = res.observation
        if res.done:
            break
    if not res.success:
        return None
    return Demo(
        task=task,
        instruction=obs.instruction,
        images=np.stack(images),
        actions=np.stack(actions).astype(np.float32),
        proprio=np.stack(proprio).astype(np.float32),
        init_state=init_state,
        states=np.stack(states),
    )


def _env_args(env) -> dict:
    cfg = getattr(env, "cfg", None)
    return {
        "type": cfg.backend if cfg is not None else "tabletop",
        "env_name": type(env).__name__,
        "env_kwargs": cfg.model_dump(mode="json") if cfg is not None else {},
    }


# --- writing ---
def write_demos(demos: Sequence[Demo], out_dir: str | Path, env_args: dict | None = None) -> list[Path]:
    """One `<task>_demo.hdf5` per task (overwritten), demos numbered demo_0.. in the given order."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_task: dict[str, list[Demo]] = {}
    for d in demos:
        by_task.setdefault(d.task, []).append(d)
    paths = []
    for task, group in by_task.items():
        path = out / f"{task}_demo.hdf5"
        with h5py.File(path, "w") as f:
            data = f.create_group("data")
            domain = (env_args or {}).get("type", "tabletop")
            info = {"problem_name": task, "domain_name": domain, "language_instruction": group[0].instruction}
            data.attrs["problem_info"] = json.dumps(info)
            data.attrs["env_args"] = json.dumps(env_args or {"type": "tabletop"})
            data.attrs["macros_image_convention"] = "opencv"
            data.attrs["num_demos"] = len(group)
            data.attrs["total"] = int(sum(len(d) for d in group))
            for k, d in enumerate(group):
                _write_demo(data.create_group(f"demo_{k}"), d)
        paths.append(path)
    return paths


def _write_demo(g: h5py.Group, d: Demo) -> None:
    T = len(d)
    g.attrs["num_samples"] = T
    if d.init_state is not None:
        g.attrs["init_state"] = int(d.init_state)
    obs = g.create_group("obs")
    # Per-frame chunks + light gzip: ~4x smaller, and still fast to read one frame.
    obs.create_dataset("agentview_rgb", data=d.images, chunks=(1, *d.images.shape[1:]), compression="gzip", compression_opts=1)
    if d.proprio is not None:
        obs.create_dataset("ee_pos", data=d.proprio[:, 0:3])
        obs.create_dataset("ee_ori", data=d.proprio[:, 3:6])
        obs.create_dataset("gripper_states", data=d.proprio[:, 6:8])
    g.create_dataset("actions", data=d.actions.astype(np.float32))
    dones = np.zeros(T, np.uint8)
    dones[-1] = 1
    g.create_dataset("dones", data=dones)
    g.create_dataset("rewards", data=dones.astype(np.float32))  # sparse: 1 on the final (success) step
    if d.states is not None:
        g.create_dataset("states", data=d.states)


# --- reading ---
def read_demos(folder: str | Path, tasks: Iterable[str] | None = None) -> list[Demo]:
    """Every demo of every `*.hdf5` in `folder` (sorted by file, then demo number).

    Reads official LIBERO files too: the instruction comes from `problem_info`, and their
    upside-down ("opengl") frames are turned upright like OpenVLA's LIBERO pipeline does
    (a 180-degree rotation), so all demos share one image convention.
    """
    files = sorted(Path(folder).glob("*.hdf5"))
    if not files:
        raise FileNotFoundError(f"no .hdf5 demo files in {folder}")
    want = set(tasks) if tasks is not None else None
    demos: list[Demo] = []
    for path in files:
        task = re.sub(r"_demo$", "", path.stem)
        if want is not None and task not in want:
            continue
        with reading(path, "demo file"), h5py.File(path, "r") as f:
            data = f["data"]
            instruction = _instruction(data, task)
            convention = _attr_str(data.attrs.get("macros_image_convention", "opengl"))
            keys = sorted((k for k in data.keys() if k.startswith("demo_")), key=lambda k: int(k.split("_")[1]))
            for k in keys:
                demos.append(_read_demo(data[k], task, instruction, flip=convention == "opengl"))
    return demos


def _read_demo(g: h5py.Group, task: str, instruction: str, flip: bool) -> Demo:
    obs = g["obs"]
    images = obs["agentview_rgb"][()]
    if flip:
        images = np.ascontiguousarray(images[:, ::-1, ::-1])
    proprio = None
    if all(k in obs for k in PROPRIO_KEYS):
        proprio = np.concatenate([obs[k][()].reshape(len(images), -1) for k in PROPRIO_KEYS], axis=1).astype(np.float32)
    init_state = g.attrs.get("init_state")
    return Demo(
        task=task,
        instruction=instruction,
        images=images,
        actions=g["actions"][()].astype(np.float32),
        proprio=proprio,
        init_state=int(init_state) if init_state is not None else None,
        states=g["states"][()] if "states" in g else None,
    )


def recorded_controls(folder: str | Path) -> set[str]:
    """The tabletop action conventions (`env.control`) the demo files in `folder` were recorded
    under; files without one (LIBERO's, or older ones) count as "delta"."""
    controls = set()
    for path in sorted(Path(folder).glob("*.hdf5")):
        with h5py.File(path, "r") as f:
            raw = f["data"].attrs.get("env_args")
        kwargs = json.loads(_attr_str(raw)).get("env_kwargs", {}) if raw is not None else {}
        controls.add(kwargs.get("control", "delta"))
    return controls


def _attr_str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _instruction(data: h5py.Group, task: str) -> str:
    raw = data.attrs.get("problem_info")
    if raw is not None:
        text = json.loads(_attr_str(raw)).get("language_instruction")
        if isinstance(text, list):  # some LIBERO exports store it as a one-item list
            text = " ".join(text)
        if text:
            return str(text).strip()
    return task.replace("_", " ")  # LIBERO file names spell the instruction


# --- statistics ---
def dataset_statistics(demos: Sequence[Demo], scaled_dims: Sequence[int] = (),
                       gripper_dims: Sequence[int] | None = None) -> dict:
    """OpenVLA's `dataset_statistics.json` entry for one dataset (lists of floats).

    `mask` says which action dims get normalised with q01/q99: all but the grippers (`gripper_dims`,
    default the last dim; a bimanual action has one per arm), which stay binary, and `scaled_dims`,
    which the env already gives in [-1, 1] over their whole range (absolute targets: a few demos'
    q01/q99 would cut off positions they never visited).
    """
    if not demos:
        raise ValueError("dataset_statistics needs at least one demo")
    actions = np.concatenate([d.actions for d in demos]).astype(np.float64)
    if all(d.proprio is not None for d in demos):
        proprio = np.concatenate([d.proprio for d in demos]).astype(np.float64)
    else:  # OpenVLA's convention for datasets without proprio
        proprio = np.zeros_like(actions)
    dims = actions.shape[1]
    grippers = set(gripper_dims) if gripper_dims is not None else {dims - 1}
    mask = [i not in scaled_dims and i not in grippers for i in range(dims)]
    return {
        "action": {**_stats(actions), "mask": mask},
        "proprio": _stats(proprio),
        "num_transitions": int(actions.shape[0]),
        "num_trajectories": len(demos),
    }


def _stats(x: np.ndarray) -> dict:
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "max": x.max(0).tolist(),
        "min": x.min(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }
