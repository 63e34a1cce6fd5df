"""The learner as a Ray actor group: one LearnerWorker per rank (per GPU in production), joined in
one torch.distributed group (gloo on CPU, NCCL on GPUs) under DeepSpeed.

Each rank receives the same list of trajectory refs and fetches only its own slice of every
mini-batch, so payloads go from the object store straight to the rank that needs them.
"""

from __future__ import annotations

import socket
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray
import torch

from common.config import RunConfig
from common.records import Trajectory
from learner.success_replay import SuccessReplay
from learner.weight_average import WeightAverage


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class LearnerWorker:
    def __init__(self, rank: int, world_size: int, cfg: RunConfig):
        torch.set_num_threads(max(1, int(cfg.cluster.learner_cpus)))  # the CPUs Ray reserved for this rank
        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        self.engine = None
        self.ema: WeightAverage | None = None  # learner.ema_decay
        # (name, coef, samples per mini-batch, DemoSamples): learner.demo_bc_coef, learner.rehearsal_coef
        self.sample_terms: list[tuple] = []
        self.replay: SuccessReplay | None = None  # learner.success_replay_coef
        self.bc_rng = np.random.default_rng(cfg.seed + rank)

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int, policy_path: str, mode: str, seed: int, demos=None,
              rehearsal=None) -> int:
        from learner.engine import LearnerEngine, init_distributed
        from policy.checkpoint import load_policy

        if self.engine is None:
            init_distributed(self.rank, self.world_size, master_addr, master_port, self.cfg.cluster.comm_backend)
        torch.manual_seed(seed)
        self.policy = load_policy(policy_path, unnorm_key=self.cfg.policy.unnorm_key, dtype=self.cfg.policy.dtype,
                                  policy=self.cfg.policy)
        self.policy.model.train()
        lc = self.cfg.learner
        if mode == "sft":
            per_rank = self.cfg.sft.batch_size // self.world_size
            micro = min(self.cfg.sft.micro_batch_size or lc.micro_batch_size, per_rank)
            self.engine = LearnerEngine(self.policy, lc, self.cfg.sft.lr, micro, max(1, per_rank // micro),
                                        self.cfg.sft.frozen_modules)
        else:
            per_rank = lc.mini_batch_size // self.world_size
            self.engine = LearnerEngine(self.policy, lc, lc.lr, lc.micro_batch_size, per_rank // lc.micro_batch_size,
                                        lc.frozen_modules)
            if lc.ema_decay is not None:  # the average starts at the policy RL starts from
                self.ema = WeightAverage(self.policy.model, lc.ema_decay)
            self.sample_terms = []
            for name, field, size, samples, what in (
                ("demo_bc", "demo_bc_coef", lc.demo_bc_batch_size, demos, "the demonstrations (LearnerGroup.setup demos=)"),
                ("rehearsal", "rehearsal_coef", lc.rehearsal_batch_size, rehearsal,
                 "the rehearsal demos (LearnerGroup.setup rehearsal=)"),
            ):
                coef = getattr(lc, field)
                if coef > 0:
                    if samples is None:
                        raise ValueError(f"learner.{field} > 0 needs {what}")
                    if not self.policy.uses_proprio:
                        samples.proprio = None
                    self.sample_terms.append((name, coef, size, samples))
            if lc.success_replay_coef > 0:
                self.replay = SuccessReplay(lc.success_replay_capacity)
        return sum(p.numel() for p in self.policy.model.parameters())

    def grpo_step(self, traj_refs: list, advantages: np.ndarray, order: np.ndarray, lr: float | None = None) -> dict:
        """One RL step: the batch in `order`, split into mini-batches, one optimiser step each, at
        `lr` when given (the trainer's learner.lr_schedule) or the optimizer's current lr."""
        lc = self.cfg.learner
        if lr is not None:
            self.engine.set_lr(lr)
        stats: list[dict] = []
        for _ in range(lc.epochs):
            for start in range(0, len(order), lc.mini_batch_size):
                mine = order[start : start + lc.mini_batch_size][self.rank :: self.world_size]
                trajs: list[Trajectory] = ray.get([traj_refs[i] for i in mine], timeout=300)
                old = None
                if lc.recompute_old_logprobs:
                    old = self.engine.recompute_logprobs(trajs, self.cfg.rollout.temperature)
                bc_terms = []
                for name, coef, size, samples in self.sample_terms:
                    drawn = samples.batch(size, self.policy.stats, self.policy.action_tokenizer, self.bc_rng)
                    bc_terms.append((name, coef, (*drawn, None)))
                if self.replay is not None:  # successes of earlier mini-batches only
                    replayed = self.replay.batch(lc.success_replay_batch_size, self.bc_rng)
                    if replayed is not None:
                        bc_terms.append(("success_replay", lc.success_replay_coef, replayed))
                s = self.engine.grpo_minibatch(trajs, advantages[mine], self.cfg.rollout.temperature, old, bc_terms)
                if self.replay is not None:
                    self.replay.add(trajs)
                stats.append({"loss": s.loss, "grad_norm": s.grad_norm, **s.extra})
        if self.ema is not None:
            self.ema.update(self.policy.model)
        out = {k: float(np.mean([s[k] for s in stats if k in s])) for k in dict.fromkeys(k for s in stats for k in s)}
        if self.replay is not None:
            out["success_replay_size"] = float(len(self.replay))
        return {**out, "lr": self.engine.lr}

    def sft_step(self, images: np.ndarray, instructions: list[str], tokens: np.ndarray, proprio=None) -> dict:
        sl = slice(self.rank, None, self.world_size)
        s = self.engine.sft_minibatch(images[sl], instructions[sl], tokens[sl], None if proprio is None else proprio[sl])
        return {"loss": s.loss, "grad_norm": s.grad_norm}

    def publish_weights(self) -> list:
        """Rank 0 puts the full state dict in the object store once; replicas read it by ref."""
        return [ray.put(self.engine.weights())] if self.rank == 0 else []

    def save_policy(self, folder: str) -> None:
        """The servable policy: the weight average when learner.ema_decay is set."""
        if self.rank == 0:
            from policy.checkpoint import save_policy

            with self.ema.swapped_into(self.policy.model) if self.ema is not None else nullcontext():
                save_policy(self.policy, folder)

    def save_state(self, folder: str, client_state: dict) -> None:
        self.engine.save(folder, client_state)
        # per rank: DeepSpeed writes client_state from rank 0 only, and every rank loads that copy
        torch.save({"torch_rng": torch.get_rng_state(), "bc_rng": self.bc_rng.bit_generator.state},
                   Path(folder) / f"rng_rank{self.rank}.pt")
        if self.ema is not None and self.rank == 0:  # every rank holds the same average
            self.ema.save(Path(folder) / "ema.safetensors")
        if self.replay is not None:  # every rank keeps the successes of its own slices
            self.replay.save(Path(folder) / f"success_replay_rank{self.rank}")

    def load_state(self, folder: str) -> dict:
        state = self.engine.load(folder)
        legacy = {"torch_rng": state.pop("torch_rng", None), "bc_rng": state.pop("demo_rng", None)}  # rank 0's, older checkpoints
        path = Path(folder) / f"rng_rank{self.rank}.pt"
        rng = torch.load(path, weights_only=False) if path.is_file() else legacy
        if rng["torch_rng"] is not None:
            torch.set_rng_state(rng["torch_rng"])
        if rng["bc_rng"] is not None:
            self.bc_rng.bit_generator.state = rng["bc_rng"]
        if self.ema is not None:
            path = Path(folder) / "ema.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"learner.ema_decay is set but the checkpoint {folder} holds no ema.safetensors")
            self.ema.load(path)
        if self.replay is not None:
            path = Path(folder) / f"success_replay_rank{self.rank}"
            if not path.is_dir():
                raise FileNotFoundError(f"learner.success_replay_coef is set but the checkpoint {folder} holds no {path.name}")
            self.replay.load(path)
        return state


class LearnerGroup:
    def __init__(self, cfg: RunConfig):
        cc = cfg.cluster
        opts = {"num_cpus": cc.learner_cpus, "num_gpus": cc.learner_gpus}
        if "learner" in cc.resources:
            opts["resources"] = {cc.resources["learner"]: 0.001}
        self.workers = [LearnerWorker.options(**opts).remote(r, cc.learner_world_size, cfg) for r in range(cc.learner_world_size)]
        self.master = ray.get(self.workers[0].address.remote(), timeout=120)
        self.timeout = cfg.rollout.rollout_timeout_s

    def _all(self, method: str, *args):
        return ray.get([getattr(w, method).remote(*args) for w in self.workers], timeout=self.timeout)

    def setup(self, policy_path: str, mode: str, seed: int, demos=None, rehearsal=None) -> int:
        """`demos` and `rehearsal` (DemoSamples) for learner.demo_bc_coef and learner.rehearsal_coef: put in the
        object store once, read by every rank."""
        refs = [None if x is None else ray.put(x) for x in (demos, rehearsal)]
        return self._all("setup", self.master[0], self.master[1], str(policy_path), mode, seed, *refs)[0]

    def grpo_step_async(self, traj_refs: list, advantages: np.ndarray, order: np.ndarray, lr: float | None = None) -> list:
        return [w.grpo_step.remote(traj_refs, advantages, order, lr) for w in self.workers]

    def sft_step(self, images, instructions, tokens, proprio=None) -> dict:
        refs = [ray.put(x) for x in (images, tokens, proprio)]  # once in the object store, read by every rank
        out = ray.get([w.sft_step.remote(refs[0], instructions, refs[1], refs[2]) for w in self.workers], timeout=self.timeout)
        return {k: float(np.mean([o[k] for o in out])) for k in out[0]}

    def publish_weights(self):
        return ray.get(self.workers[0].publish_weights.remote(), timeout=self.timeout)[0]

    def save_policy(self, folder: str) -> None:
        ray.get(self.workers[0].save_policy.remote(str(folder)), timeout=self.timeout)

    def save_state(self, folder: str, client_state: dict) -> None:
        self._all("save_state", str(folder), client_state)

    def load_state(self, folder: str) -> dict:
        return self._all("load_state", str(folder))[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
