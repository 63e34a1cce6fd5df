"""The DeepSpeed training engine shared by SFT and GRPO (ZeRO-1/2; gloo on CPU, NCCL on GPUs).

One instance per rank. Callers hand each rank its own slice of a mini-batch; the engine splits it
into micro-batches of at most `micro_batch` samples (chunks: one observation and its action chunk),
sums their weighted gradients and takes one optimiser step, DeepSpeed all-reducing across ranks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from common.config import LearnerConfig
from common.host_state import HostState
from common.records import Trajectory
from learner.chunk_samples import ChunkSamples, micro_batches
from learner.grpo import grpo_chunk_loss, sft_loss
from learner.lora import attach_adapters, merged_tensors
from learner.loss_terms import TermBatch
from policy.vla import VLAPolicy


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, backend: str = "gloo") -> None:
    """Join the process group. DeepSpeed would JIT-compile a shared-memory comm op on CPU (~40 s);
    gloo needs none of it, so that builder is switched off before init."""
    os.environ.update(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE=str(world_size),
                      MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
    # the accelerator follows the comm backend (the driver forwards its own CPU default to workers)
    os.environ["DS_ACCELERATOR"] = "cpu" if backend == "gloo" else "cuda"
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the submodule itself, see below)

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    extra: dict


def sft_batch_loss(policy: VLAPolicy, images: np.ndarray, instructions: list[str], tokens: np.ndarray,
                   proprio=None) -> torch.Tensor:
    """Cross-entropy on action tokens; images [N, H, W, 3], tokens [N, A] action ids."""
    logits = policy.action_logits(images, instructions, proprio)
    # np.array copies: arrays read from the object store are read-only, which torch warns about
    target = torch.from_numpy(np.array(tokens, dtype=np.int64)).to(logits.device) - policy.action_tokenizer.first_id
    return sft_loss(logits, target, torch.ones_like(target, dtype=torch.float32))


OFFLOAD_HOST_BYTES = 16  # per trained weight in host memory: fp32 master copy, fp32 gradient, Adam's two fp32 moments


def offload(cfg: LearnerConfig, trained: int, world_size: int = 1) -> dict:
    """learner.offload_optimizer: ZeRO's fp32 partition and Adam's state in host memory, pinned where a
    GPU copies to and from it. A rank whose share would not fit the node's available memory stops
    here, before DeepSpeed allocates it (at 7B: ~120 GB; the kernel would kill the process midway)."""
    if not cfg.offload_optimizer:
        return {}
    import psutil

    need, have = OFFLOAD_HOST_BYTES * trained / world_size, psutil.virtual_memory().available
    if need > have:
        raise MemoryError(
            f"learner.offload_optimizer keeps {need / 2**30:.0f} GiB in host memory for this rank's share of "
            f"{trained / 1e9:.2f} B trained weights (fp32 weights and gradients, Adam's two moments), and this "
            f"node has {have / 2**30:.0f} GiB available: train LoRA (learner.lora), spread the learner over "
            "more ranks, or use a node with more memory")
    return {"offload_optimizer": {"device": "cpu", "pin_memory": torch.cuda.is_available()}}


class LearnerEngine:
    """`micro_batch`: samples (chunks) per forward/backward on this rank."""

    def __init__(self, policy: VLAPolicy, cfg: LearnerConfig, lr: float, micro_batch: int):
        import deepspeed

        self.policy = policy
        self.cfg = cfg
        self.micro_batch = micro_batch
        self.world_size = dist.get_world_size()
        policy.model.split_action_head()  # the head's other 31,808 rows are never read: no gradient, no optimiser state
        if cfg.lora is not None:  # adapters (and cfg.lora.trainable's parts) alone get gradients and optimiser state
            attach_adapters(policy.model, cfg.lora)
        if cfg.gradient_checkpointing:
            policy.model.enable_gradient_checkpointing()
        params = [p for p in policy.model.parameters() if p.requires_grad]
        host = offload(cfg, sum(p.numel() for p in params), self.world_size)  # before anything is allocated
        # fused: one kernel over the parameters (ZeRO-1/2: its flat fp32 partition) instead of a pass per elementwise op;
        # the demo policy's optimiser step (8.7M parameters) takes ~21 ms instead of ~48 on 2 CPU cores
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=True)
        ds_config = {
            # the engine weights each micro-batch's loss itself and marks the mini-batch's last backward
            # as the accumulation boundary (_accumulate): DeepSpeed's own count of micro-steps is unused
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage, **host},
            "zero_allow_untested_optimizer": True,
            # learner.offload_optimizer: the fused AdamW above steps ZeRO's host partition (DeepSpeed's own
            # CPUAdam would need its C++ extension built on every machine)
            "zero_force_ds_cpu_optimizer": False,
            "bf16": {"enabled": next(policy.model.parameters()).dtype == torch.bfloat16},
            "steps_per_print": 10**9,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=policy.model, optimizer=optimizer, config=ds_config)
        self._stage0_grad_norm: float | None = None
        self.policy.model = self.engine.module

    # --- GRPO -------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """The lr of the next optimiser steps (learner.lr_schedule); as DeepSpeed's own schedulers do it."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return float(self.engine.optimizer.param_groups[0]["lr"])

    @torch.no_grad()
    def recompute_logprobs(self, trajs: list[Trajectory], temperature: float) -> list[np.ndarray]:
        """The current policy's log-probs of the stored tokens, one [T, chunk, dims] array per
        trajectory, forwarded micro_batch chunks at a time (no gradient, no collective)."""
        samples = ChunkSamples.of(trajs)
        parts = micro_batches(len(samples), -(-len(samples) // self.micro_batch))
        logp = torch.cat([self.policy.token_log_probs(*self._inputs(samples, idx, temperature))[0].float().cpu()
                          for idx in parts if len(idx)])  # [S, A]
        return [c.reshape(t.tokens.shape).numpy() for c, t in zip(torch.split(logp, [t.num_chunks for t in trajs]), trajs)]

    def _inputs(self, samples: ChunkSamples, idx: np.ndarray, temperature: float) -> tuple:
        images, instructions, tokens, proprio = samples.inputs(idx, self.policy.uses_proprio)
        return images, instructions, tokens, temperature, proprio

    def grpo_minibatch(self, trajs: list[Trajectory], advantages: np.ndarray, temperature: float, batch_trajs: int,
                       old_logprobs=None, terms: list[TermBatch] = ()) -> StepStats:
        """One optimiser step over this rank's slice `trajs` of a mini-batch of `batch_trajs`
        trajectories (all ranks). The loss is grpo_loss's: token-mean per trajectory, mean over the
        mini-batch's trajectories, whichever rank and micro-batch each chunk lands in. Each loss
        term adds weight x the mean action-token cross-entropy of its samples, logged as
        `{name}_loss` (learner.loss_terms). Old log-probs are the rollout's unless given."""
        samples = ChunkSamples.of(trajs)
        # DeepSpeed averages the ranks' gradients: world_size / batch_trajs makes the sum the mini-batch's mean
        weights = self.world_size / batch_trajs / samples.valid_tokens()  # [B] per token of each trajectory
        term_sizes = [len(t.images) for t in terms]
        offsets = np.cumsum([len(samples), *term_sizes])  # samples: the GRPO chunks, then each term's in turn
        sums: dict[str, float] = {}
        term_losses = {t.name: 0.0 for t in terms}

        def micro_loss(idx: np.ndarray, real: bool) -> torch.Tensor:
            loss = torch.zeros((), device=self.engine.device)
            mine = idx[idx < len(samples)]
            if len(mine):
                logp, entropy = self.policy.token_log_probs(*self._inputs(samples, mine, temperature))  # [c, A]
                old, mask, adv, w = (x.to(logp.device) for x in samples.targets(mine, advantages, weights, old_logprobs))
                pg, stats = grpo_chunk_loss(logp, old, adv, mask, w, self.cfg.clip_low, self.cfg.clip_high)
                loss = loss + pg
                stats["entropy"] = float((entropy.detach() * mask).sum())
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v * real
            for term, size, start in zip(terms, term_sizes, offsets):
                part = idx[(idx >= start) & (idx < start + size)] - start
                if len(part):
                    term_loss = sft_batch_loss(self.policy, *term.part(part))  # mean over the part's samples
                    loss = loss + term.weight * term_loss * (len(part) / size)
                    term_losses[term.name] += float(term_loss.detach()) * len(part) / size * real
            return loss

        loss = self._accumulate(int(offsets[-1]), micro_loss)
        n_tok = max(sums.pop("tokens", 0.0), 1.0)
        extra = {k: v / n_tok for k, v in sums.items()}
        extra["adv_mean"] = float(np.mean(advantages)) if len(advantages) else 0.0
        extra.update({f"{name}_loss": v for name, v in term_losses.items()})
        return StepStats(loss=loss, grad_norm=self._grad_norm(), extra=extra)

    # --- SFT --------------------------------------------------------------------------------
    def sft_minibatch(self, images: np.ndarray, instructions: list[str], tokens: np.ndarray, proprio,
                      batch_samples: int) -> StepStats:
        """Cross-entropy on action tokens, mean over the `batch_samples` of all ranks; this rank's
        images [N, H, W, 3], tokens [N, A] action ids."""
        scale = self.world_size / batch_samples

        def micro_loss(idx: np.ndarray, real: bool) -> torch.Tensor:
            part = sft_batch_loss(self.policy, images[idx], [instructions[j] for j in idx], tokens[idx],
                                  None if proprio is None else proprio[idx])
            return part * (len(idx) * scale)

        return StepStats(loss=self._accumulate(len(images), micro_loss), grad_norm=self._grad_norm(), extra={})

    # --- accumulation -----------------------------------------------------------------------
    def _accumulate(self, n: int, micro_loss) -> float:
        """One optimiser step over this rank's `n` samples, in micro-batches of at most micro_batch;
        `micro_loss(idx, real)` gives a micro-batch's loss, already weighted so that the losses sum
        to the objective. Every rank runs as many micro-batches, since ZeRO-2 reduces gradients
        inside each backward: one with fewer samples runs smaller ones, or, with none left, one
        sample at weight 0 (`real` False: leave it out of the statistics). Returns the summed loss."""
        if n == 0:
            raise ValueError("a learner rank got no samples for an optimiser step: fewer trajectories or SFT "
                             "samples than cluster.learner_world_size")
        count = torch.tensor([-(-n // self.micro_batch)], device=self.engine.device)
        if self.world_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        count = int(count.item())
        total = 0.0
        for i, idx in enumerate(micro_batches(n, count)):
            real = len(idx) > 0
            loss = micro_loss(idx if real else np.arange(1), real)
            if not real:
                loss = loss * 0.0  # the same graph as a real micro-batch: every gradient hook fires, adding 0
            self.engine.set_gradient_accumulation_boundary(i == count - 1)
            self.engine.backward(loss)
            total += float(loss.detach())
        self._step()
        return total

    # --- state ------------------------------------------------------------------------------
    def _step(self) -> None:
        """engine.step(). Without ZeRO (float32), DeepSpeed clips the gradients but keeps no norm,
        so the pre-clip norm is taken here at the accumulation boundary (after the all-reduce)."""
        if self.engine.zero_optimization_stage() == 0 and self.engine.is_gradient_accumulation_boundary():
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            if grads:
                self._stage0_grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        self.engine.step()

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            norm = self._stage0_grad_norm
        return float(norm) if norm is not None else float("nan")

    def weights(self) -> HostState:
        """Full weights on CPU in the policy's layout, LoRA adapters merged (learner/lora.py); ZeRO-1/2
        keep parameters replicated, so any rank has them. A HostState: the object store takes it
        without pickling the tensors' bytes (common/host_state.py)."""
        return HostState({k: v.to("cpu", copy=True) for k, v in merged_tensors(self.engine.module)})

    def save(self, folder: str, client_state: dict) -> None:
        self.engine.save_checkpoint(folder, tag="deepspeed", client_state=client_state)

    def load(self, folder: str) -> dict:
        _, client_state = self.engine.load_checkpoint(folder, tag="deepspeed")
        return client_state or {}
