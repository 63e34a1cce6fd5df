"""Checks of a run config that need the disk or the machine, done before any Ray process starts.

The schema (common/config.py) rejects what is wrong in itself; these catch what is wrong only
here: a policy folder that is missing or lacks the statistics the run un-normalises with, a suite
or task that does not exist, LIBERO assets that do not verify, no Vulkan device for ManiSkill's
renderer, more CPUs/GPUs than a local cluster has, a run folder that cannot be written, a resume
with nothing to resume. Each failure is one line that names the field and what would be valid.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from common.config import RunConfig
from common.config_loading import ConfigError

# commands that start from policy.path as it is (sft/demo may start without one, or add statistics)
SERVES_POLICY_AS_IS = ("train", "eval", "serve")


class PreflightError(ConfigError):
    """A config that validates but cannot run here."""


def preflight(cfg: RunConfig, command: str) -> None:
    """Every check that applies to `command`; raises PreflightError on the first failure."""
    check_policy(cfg, command)
    check_tasks(cfg)
    if cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS"):
        check_local_resources(cfg, learner=command not in ("eval", "serve"))
    if command in ("train", "eval", "sft", "demo"):
        check_run_dir(Path(cfg.run_dir))
    if command == "train" and cfg.checkpoint.resume:
        check_resumable(Path(cfg.run_dir))


def check_policy(cfg: RunConfig, command: str) -> None:
    path = cfg.policy.path
    if path is None:
        if command in SERVES_POLICY_AS_IS:
            raise PreflightError(f"policy.path: {command} needs a local policy folder to start from, e.g. "
                                 "policy.path=runs/demo/sft_policy (the output of `vla-grpo sft`)")
        return
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise PreflightError(f"policy.path: {folder} is not a policy folder (no config.json there)")
    try:
        stats = policy_norm_stats(folder)
    except (OSError, ValueError) as err:
        raise PreflightError(f"policy.path: {folder}: unreadable metadata ({err})") from None
    key = cfg.policy.unnorm_key
    if command not in SERVES_POLICY_AS_IS:
        return  # SFT adds the demos' statistics under unnorm_key
    if key is None and len(stats) > 1:
        raise PreflightError(f"policy.unnorm_key: {folder} has statistics for several datasets; choose one of "
                             f"{sorted(stats)}")
    if key is not None and key not in stats:
        raise PreflightError(f"policy.unnorm_key: {folder} has no action statistics for {key!r} (it has "
                             f"{sorted(stats)}); set policy.unnorm_key to one of them, or start from a policy "
                             f"fine-tuned on {key!r} (e.g. the output of `vla-grpo sft`)")


def policy_norm_stats(folder: Path) -> dict:
    """The action statistics a policy folder records, read without its weights."""
    stats_file = folder / "dataset_statistics.json"  # it wins over config.json, as load_policy reads them
    if stats_file.is_file():
        return json.loads(stats_file.read_text())
    return json.loads((folder / "config.json").read_text()).get("norm_stats") or {}


def suite_task_names(cfg: RunConfig) -> list[str]:
    """The task names of env.suite, without building a simulator."""
    env = cfg.env
    if env.backend == "tabletop":
        from env_workers.tabletop.tasks import SUITES

        if env.suite not in SUITES:
            raise PreflightError(f"env.suite: unknown tabletop suite {env.suite!r}; choose one of {sorted(SUITES)}")
        return list(SUITES[env.suite])
    if env.backend == "libero":
        from env_workers.libero.bootstrap import ensure_libero, libero_installed
        from env_workers.libero.suites import SUITES, SuiteCatalog

        if env.suite not in SUITES:
            raise PreflightError(f"env.suite: unknown LIBERO suite {env.suite!r}; choose one of {list(SUITES)}")
        if not libero_installed():
            raise PreflightError("env.backend: 'libero' needs the LIBERO simulator, which is not installed: "
                                 "run `make setup` (docs/libero.md)")
        try:
            ensure_libero(env.msaa)  # verifies the scene assets against their checksums
        except Exception as err:
            raise PreflightError(f"env.backend: LIBERO assets do not verify: {err}") from None
        return SuiteCatalog(env.suite).names
    if env.backend == "maniskill":
        from env_workers.maniskill.bootstrap import INSTALL_HINT, check_render_device, maniskill_installed
        from env_workers.maniskill.tasks import SUITES

        if env.suite not in SUITES:
            raise PreflightError(f"env.suite: unknown ManiSkill suite {env.suite!r}; choose one of {sorted(SUITES)}")
        if not maniskill_installed():
            raise PreflightError(INSTALL_HINT)
        try:
            check_render_device()  # SAPIEN's Vulkan device: the one machine-level need of ManiSkill
        except RuntimeError as err:
            raise PreflightError(f"env.backend: {err}") from None
        return list(SUITES[env.suite])
    raise PreflightError(f"env.backend: {env.backend!r} is not implemented in this build; use tabletop, libero or maniskill")


def check_tasks(cfg: RunConfig) -> None:
    names = suite_task_names(cfg)
    unknown = [t for t in cfg.env.tasks or [] if t not in names]
    if unknown:
        raise PreflightError(f"env.tasks: {unknown} not in the {cfg.env.suite} suite; its tasks: {names}")
    limits = [t for t in cfg.env.task_max_steps if t not in names]
    if limits:
        raise PreflightError(f"env.task_max_steps: {limits} not in the {cfg.env.suite} suite; its tasks: {names}")
    if cfg.env.backend == "maniskill" and cfg.env.batched_sim:
        from env_workers.maniskill.tasks import batch_task

        try:
            batch_task(cfg.env.suite, list(cfg.env.tasks or names))
        except ValueError as err:
            raise PreflightError(str(err)) from None


def check_local_resources(cfg: RunConfig, learner: bool = True) -> None:
    """A local cluster gets this machine's CPUs (deploy/runtime.py: init_ray) and GPUs; the roles
    started are the env workers, the replicas and, with `learner`, the learner ranks."""
    c = cfg.cluster
    cpus = max(os.cpu_count() or 2, 2)
    ranks = c.learner_world_size if learner else 0
    need = c.num_env_workers * c.env_worker_cpus + c.serve_replicas * c.replica_cpus + ranks * c.learner_cpus
    if need > cpus:
        raise PreflightError(
            f"cluster: the roles ask for {need:g} CPUs (num_env_workers x env_worker_cpus + serve_replicas x "
            f"replica_cpus{' + learner_world_size x learner_cpus' if learner else ''}) but this machine has "
            f"{cpus}; lower those fields (0 lets roles share cores, as configs/demo.yaml does) or give "
            "cluster.address of a larger cluster")
    gpus = c.num_env_workers * c.env_worker_gpus + c.serve_replicas * c.replica_gpus + ranks * c.learner_gpus
    if gpus > 0:
        import torch

        have = torch.cuda.device_count()
        if gpus > have:
            raise PreflightError(f"cluster: the roles ask for {gpus:g} GPUs (num_env_workers x env_worker_gpus + "
                                 f"serve_replicas x replica_gpus + learner_world_size x learner_gpus) but this machine has {have}")


def check_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-check-"):
            pass
    except OSError as err:
        raise PreflightError(f"run_dir: {run_dir} is not writable ({err.strerror or err})") from None


def check_resumable(run_dir: Path) -> None:
    from learner.checkpoints import CheckpointManager

    if CheckpointManager(run_dir / "checkpoints", keep=1).latest() is None:
        raise PreflightError(f"checkpoint.resume: {run_dir / 'checkpoints'} holds no complete checkpoint to resume "
                             "from; set checkpoint.resume=false to start a new run there")
