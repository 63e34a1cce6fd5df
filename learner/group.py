"""The learner as a Ray actor group: one LearnerWorker per rank (per GPU in production), joined in
one torch.distributed group (gloo on CPU, NCCL on GPUs) under DeepSpeed.

Each rank receives the same list of trajectory refs and fetches only its own slice of every
mini-batch, so payloads go from the object store straight to the rank that needs them.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import numpy as np
import ray
import torch

from common.config import RunConfig
from common.files import reading
from common.records import Trajectory
from learner.loss_terms import LossTerm
from learner.sft_data import DemoSamples


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
        self.loss_terms: list[LossTerm] = []  # learner.loss_terms
        self.term_rng = np.random.default_rng(cfg.seed + rank)  # each rank draws its own term samples
        self.rendezvous = None  # rank 0, learner.weight_sync collective: (TCPStore, host, port)
        self.weight_group = None  # ... and its membership in the broadcast group (actors/weight_group.py)
        self.ipc = None  # rank 0, learner.weight_sync cuda_ipc: (session id, IpcSender) of the delivery under way

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), _free_port()

    def pid(self) -> int:
        """The rank's process id (fault drills)."""
        return os.getpid()

    def node_id(self) -> str:
        """The Ray node this rank runs on (placement checks)."""
        return ray.get_runtime_context().get_node_id()

    def _load(self, master_addr: str, master_port: int, policy_path: str, seed: int) -> None:
        from learner.engine import init_distributed
        from policy.checkpoint import actor_device, load_policy

        if self.engine is None:
            init_distributed(self.rank, self.world_size, master_addr, master_port, self.cfg.cluster.comm_backend)
        torch.manual_seed(seed)
        self.policy = load_policy(policy_path, unnorm_key=self.cfg.policy.unnorm_key, dtype=self.cfg.policy.dtype,
                                  policy=self.cfg.policy, device=actor_device(self.cfg.policy))
        self.policy.model.train()

    def setup_sft(self, master_addr: str, master_port: int, policy_path: str, seed: int) -> int:
        """SFT: sft.lr, sft.batch_size per optimiser step, split over ranks and micro-batches."""
        from learner.engine import LearnerEngine

        self._load(master_addr, master_port, policy_path, seed)
        micro = self.cfg.sft.micro_batch_size or self.cfg.learner.micro_batch_chunks
        self.engine = LearnerEngine(self.policy, self.cfg.learner, self.cfg.sft.lr, micro)
        return sum(p.numel() for p in self.policy.model.parameters())

    def setup_grpo(self, master_addr: str, master_port: int, policy_path: str, seed: int,
                   term_samples: dict[str, DemoSamples]) -> int:
        """GRPO: learner.lr, one optimiser step per mini-batch; `term_samples` holds the samples of
        every configured loss term."""
        from learner.engine import LearnerEngine

        self._load(master_addr, master_port, policy_path, seed)
        lc = self.cfg.learner
        self.engine = LearnerEngine(self.policy, lc, lc.lr, lc.micro_batch_chunks)
        self.loss_terms = [LossTerm(name, term.weight, term.batch_size, term_samples[name])
                           for name, term in lc.loss_terms.items()]
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
                batch = order[start : start + lc.mini_batch_size]
                mine = batch[self.rank :: self.world_size]
                trajs: list[Trajectory] = ray.get([traj_refs[i] for i in mine], timeout=300)
                old = None
                if lc.recompute_old_logprobs:
                    old = self.engine.recompute_logprobs(trajs, self.cfg.rollout.temperature)
                terms = [term.draw(self.policy, self.term_rng) for term in self.loss_terms]
                s = self.engine.grpo_minibatch(trajs, advantages[mine], self.cfg.rollout.temperature, len(batch), old, terms)
                stats.append({"loss": s.loss, "grad_norm": s.grad_norm, **s.extra})
        out = {k: float(np.mean([s[k] for s in stats if k in s])) for k in dict.fromkeys(k for s in stats for k in s)}
        return {**out, "lr": self.engine.lr}

    def sft_step(self, images: np.ndarray, instructions: list[str], tokens: np.ndarray, proprio=None) -> dict:
        sl = slice(self.rank, None, self.world_size)
        s = self.engine.sft_minibatch(images[sl], instructions[sl], tokens[sl], None if proprio is None else proprio[sl],
                                      batch_samples=len(images))
        return {"loss": s.loss, "grad_norm": s.grad_norm}

    def weights(self) -> dict[str, torch.Tensor]:
        """Rank 0's full state dict on the host, in the replicas' layout (LoRA merged)."""
        if self.rank != 0:
            raise RuntimeError("the learner's weights are read from rank 0")
        return self.engine.weights()

    # --- learner.weight_sync: collective (rank 0 only; actors/weight_sync.py drives these) ----------
    def weight_member(self) -> dict:
        from actors.weight_group import member_info
        from learner.lora import base_layout

        return member_info(base_layout(self.policy.model))

    def weight_rendezvous(self, timeout_s: float) -> tuple[str, int]:
        """The host and port of the TCPStore every formation of the group meets at (started once)."""
        from actors.weight_group import host_rendezvous

        if self.rendezvous is None:
            self.rendezvous = host_rendezvous(timeout_s)
        return self.rendezvous[1:]

    def join_weight_group(self, spec) -> str:
        from actors.weight_group import WeightGroup

        self.weight_group = None
        self.weight_group = WeightGroup(spec, 0, self.rendezvous[0])
        return spec.group_id

    def send_weights(self, group_id: str) -> int:
        """Broadcast the current weights to the members of `group_id`; the bytes sent."""
        if self.weight_group is None or self.weight_group.spec.group_id != group_id:
            raise RuntimeError(f"weight sync: rank 0 is not in the broadcast group {group_id}")
        from learner.lora import base_layout, merger

        try:
            # in the replicas' layout; with LoRA each layer is merged as its bucket is packed
            return self.weight_group.send(base_layout(self.policy.model), merger(self.policy.model))
        except Exception:
            self.weight_group = None  # a failed formation is never used again
            raise

    # --- learner.weight_sync: cuda_ipc (rank 0 only; actors/weight_sync.py drives these) ------------
    def open_weight_ipc(self, session: str, receivers: list[str], bucket_bytes: int) -> int:
        """Start delivering the current weights to `receivers` through shared-memory handles
        (actors/weight_ipc.py): they stream from the model's tensors on this rank's device, bucket by
        bucket, with no copy of the state dict (with LoRA, each layer is merged as its bucket is packed).
        Replaces a delivery still open. The bytes to deliver."""
        from actors.weight_ipc import IpcSender
        from learner.lora import base_layout, merger

        if self.ipc is not None:
            self.ipc[1].close()
        model = self.policy.model
        self.ipc = session, IpcSender(base_layout(model), receivers, bucket_bytes, merger(model))
        return self.ipc[1].bytes

    def weight_ipc_next(self, session: str, receiver: str, bucket: int) -> bytes | None:
        """A receiver copied the buckets before `bucket` and asks for it (IpcSender.next)."""
        if self.ipc is None or self.ipc[0] != session:
            raise RuntimeError(f"weight sync: rank 0 has no open delivery {session}")
        return self.ipc[1].next(receiver, bucket)

    def close_weight_ipc(self, session: str) -> bool:
        """End the delivery and free its buckets: whether every receiver copied every bucket."""
        if self.ipc is None or self.ipc[0] != session:
            return False
        finished = self.ipc[1].finished()
        self.ipc[1].close()
        self.ipc = None
        return finished

    def save_policy(self, folder: str) -> None:
        if self.rank == 0:
            from learner.lora import merged_tensors
            from policy.checkpoint import save_policy

            save_policy(self.policy, folder, merged_tensors(self.policy.model))

    def save_state(self, folder: str, client_state: dict) -> None:
        self.engine.save(folder, client_state)
        # per rank: DeepSpeed writes client_state from rank 0 only, and every rank loads that copy
        torch.save({"torch_rng": torch.get_rng_state(), "term_rng": self.term_rng.bit_generator.state},
                   Path(folder) / f"rng_rank{self.rank}.pt")

    def load_state(self, folder: str) -> dict:
        with reading(folder, "checkpoint folder"):  # DeepSpeed's own error does not say which checkpoint
            state = self.engine.load(folder)
        path = Path(folder) / f"rng_rank{self.rank}.pt"
        # older checkpoints: rank 0's RNGs in the client state, and the term RNG under earlier names
        rng = torch.load(path, weights_only=False) if path.is_file() else {
            "torch_rng": state.pop("torch_rng", None), "term_rng": state.pop("demo_rng", None)}
        term_rng = rng.get("term_rng", rng.get("bc_rng"))
        if rng["torch_rng"] is not None:
            torch.set_rng_state(rng["torch_rng"])
        if term_rng is not None:
            self.term_rng.bit_generator.state = term_rng
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

    def setup_sft(self, policy_path: str, seed: int) -> int:
        return self._all("setup_sft", *self.master, str(policy_path), seed)[0]

    def setup_grpo(self, policy_path: str, seed: int, term_samples: dict[str, DemoSamples]) -> int:
        """`term_samples` (learner.loss_terms) go into the object store once, read by every rank."""
        return self._all("setup_grpo", *self.master, str(policy_path), seed, ray.put(term_samples))[0]

    def grpo_step_async(self, traj_refs: list, advantages: np.ndarray, order: np.ndarray, lr: float | None = None) -> list:
        return [w.grpo_step.remote(traj_refs, advantages, order, lr) for w in self.workers]

    def sft_step(self, images, instructions, tokens, proprio=None) -> dict:
        refs = [ray.put(x) for x in (images, tokens, proprio)]  # once in the object store, read by every rank
        out = ray.get([w.sft_step.remote(refs[0], instructions, refs[1], refs[2]) for w in self.workers], timeout=self.timeout)
        return {k: float(np.mean([o[k] for o in out])) for k in out[0]}

    def publish_weights(self):
        """A ref to rank 0's weights as of this call, copied into the object store by a task queued on
        rank 0: it may finish later, but runs before any call made after it (an update), so it holds
        these weights. The caller owns the copy: it outlives the ranks. Read it with a deadline."""
        return self.workers[0].weights.remote()

    @property
    def rank0(self):
        """The rank that publishes and broadcasts the weights."""
        return self.workers[0]

    def save_policy(self, folder: str) -> None:
        ray.get(self.workers[0].save_policy.remote(str(folder)), timeout=self.timeout)

    def save_state(self, folder: str, client_state: dict) -> None:
        self._all("save_state", str(folder), client_state)

    def load_state(self, folder: str) -> dict:
        return self._all("load_state", str(folder))[0]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
