"""`vla-grpo sft CONFIG`: supervised warm start on demonstrations, through the same DeepSpeed
learner group that GRPO uses. Demos come from `sft.dataset` (robomimic/LIBERO HDF5 files) or, when
unset, are recorded from the backend's experts (tabletop: scripted; maniskill: motion planners) on train
initial states."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from common.config import RunConfig
from learner.group import LearnerGroup
from learner.sft_data import DemoSamples, build_sft_samples


def demo_folder(cfg: RunConfig) -> Path:
    """The configured dataset, or expert demos recorded once into the run folder (again when the
    recorded ones use another action convention than `env.control`)."""
    from env_workers.demos import record_demos, recorded_controls

    if cfg.sft.dataset is not None:
        controls = recorded_controls(cfg.sft.dataset)
        if controls - {cfg.env.control}:
            raise ValueError(f"sft.dataset {cfg.sft.dataset}: demos recorded with env.control {sorted(controls)}, "
                             f"but this run has env.control {cfg.env.control!r}; their actions would be misread")
        return Path(cfg.sft.dataset)
    if cfg.env.backend not in ("tabletop", "maniskill"):
        raise ValueError(f"sft.dataset: experts exist for the tabletop and maniskill backends only; give the HDF5 "
                         f"demos of the {cfg.env.backend} tasks as sft.dataset=DIR")
    from env_workers.factory import make_env

    folder = Path(cfg.run_dir) / "demos"
    if any(folder.glob("*.hdf5")) and recorded_controls(folder) != {cfg.env.control}:
        for stale in folder.glob("*.hdf5"):
            stale.unlink()
    if not any(folder.glob("*.hdf5")):
        env = make_env(cfg.env)
        try:
            tasks = cfg.env.tasks or env.task_names
            record_demos(env, tasks, cfg.sft.demos_per_task, folder)
        finally:
            env.close()
    return folder


def select_demos(demos: list, per_task: int) -> list:
    chosen, counts = [], {}
    for d in demos:
        if counts.get(d.task, 0) < per_task:
            chosen.append(d)
            counts[d.task] = counts.get(d.task, 0) + 1
    return chosen


def load_demos(cfg: RunConfig) -> list:
    """The run's SFT demonstrations (`sft.demos_per_task` of each task), in the policy's action convention."""
    from env_workers.demos import read_demos

    demos = select_demos(read_demos(demo_folder(cfg)), cfg.sft.demos_per_task)
    if not demos:
        raise RuntimeError("no demonstrations found for SFT")
    if cfg.env.backend in ("libero", "maniskill"):  # their files store LIBERO's gripper; OpenVLA policies speak RLDS's
        from env_workers.maniskill.conventions import env_to_openvla  # LIBERO's conversion, per arm

        for d in demos:
            d.actions = env_to_openvla(d.actions)
    return demos


def demo_samples(cfg: RunConfig, demos: list) -> DemoSamples:
    """SFT samples of `demos` with the run's augmentation (also the GRPO learner's BC data)."""
    from env_workers.factory import env_scene_shift

    images, instructions, chunks, proprio = build_sft_samples(demos, cfg.policy.action_chunk)
    scene = env_scene_shift(cfg.env) if cfg.sft.shift_moves_labels else None
    return DemoSamples(images, instructions, chunks, proprio, cfg.sft.shift_augment_px, scene)


def loss_term_samples(cfg: RunConfig) -> dict[str, DemoSamples]:
    """The samples each of `learner.loss_terms` draws from (learner/loss_terms.py)."""
    sources = {"demo_bc": lambda: demo_samples(cfg, load_demos(cfg))}
    return {name: sources[name]() for name in cfg.learner.loss_terms}


def run_sft(cfg: RunConfig, out_folder: Path, log=print) -> dict:
    from env_workers.demos import dataset_statistics
    from env_workers.factory import env_gripper_dims, env_scaled_action_dims
    from policy.checkpoint import initial_policy, save_policy

    demos = load_demos(cfg)
    key = cfg.policy.unnorm_key or cfg.env.suite
    norm_stats = {key: dataset_statistics(demos, scaled_dims=env_scaled_action_dims(cfg.env),
                                          gripper_dims=env_gripper_dims(cfg.env))}
    policy = initial_policy(cfg.policy, norm_stats, seed=cfg.seed)
    samples = demo_samples(cfg, demos)
    if not policy.uses_proprio:
        samples.proprio = None
    init_folder = save_policy(policy, Path(cfg.run_dir) / "sft_init")
    log(f"SFT: {len(demos)} demos ({cfg.sft.demos_per_task}/task), {len(samples.images)} samples, {cfg.sft.steps} steps")

    learner = LearnerGroup(cfg)
    try:
        learner.setup_sft(init_folder, cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        losses, start = [], time.monotonic()
        for step in range(cfg.sft.steps):
            stats = learner.sft_step(*samples.batch(cfg.sft.batch_size, policy.stats, policy.action_tokenizer, rng))
            losses.append(stats["loss"])
            if (step + 1) % max(1, cfg.sft.steps // 10) == 0:
                log(f"  sft step {step + 1:5d}/{cfg.sft.steps}  loss {np.mean(losses[-20:]):.4f}  ({time.monotonic() - start:.0f}s)")
        learner.save_policy(out_folder)
    finally:
        learner.shutdown()
    summary = {"demos": len(demos), "samples": len(samples.images), "losses": losses, "seconds": time.monotonic() - start}
    (Path(out_folder) / "sft_summary.json").write_text(json.dumps(summary))
    return summary
