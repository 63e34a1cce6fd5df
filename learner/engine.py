"""The DeepSpeed training engine shared by SFT and GRPO (ZeRO-1/2; gloo on CPU, NCCL on GPUs).

One instance per rank. Callers hand each rank its own slice of a mini-batch; the engine splits it
into micro-batches and lets DeepSpeed accumulate gradients and all-reduce across ranks.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence

from common.config import LearnerConfig
from common.records import Trajectory
from learner.grpo import grpo_loss, sft_loss, token_mask
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


def trajectory_logprobs(policy: VLAPolicy, trajs: list[Trajectory], temperature: float):
    """Forward every chunk of every trajectory at once -> per-trajectory padded log-probs and
    entropies [B, L] of the stored tokens."""
    images = np.concatenate([t.images for t in trajs])  # [sum T, H, W, 3]
    instructions = [t.instruction for t in trajs for _ in range(t.num_chunks)]
    tokens = torch.from_numpy(np.concatenate([t.tokens.reshape(t.num_chunks, -1) for t in trajs]))  # [sum T, A]
    proprio = np.concatenate([t.proprio for t in trajs]) if policy.uses_proprio else None
    logp, entropy = policy.token_log_probs(images, instructions, tokens, temperature, proprio)  # [sum T, A]
    sizes = [t.num_chunks for t in trajs]
    pad = lambda x: pad_sequence([c.reshape(-1) for c in torch.split(x, sizes)], batch_first=True)  # noqa: E731
    return pad(logp), pad(entropy)  # [B, L]


def grpo_batch_loss(policy: VLAPolicy, trajs: list[Trajectory], advantages: np.ndarray, temperature: float,
                    cfg: LearnerConfig, old_logprobs=None) -> tuple[torch.Tensor, dict]:
    """The GRPO loss of these trajectories (normalised by their number) and its statistics;
    old log-probs are the rollout's unless given (recomputed)."""
    logp, entropy = trajectory_logprobs(policy, trajs, temperature)  # [M, L]
    dims = trajs[0].tokens.shape[-1]
    old_src = old_logprobs if old_logprobs is not None else [t.logprobs for t in trajs]
    old = pad_sequence([torch.tensor(np.asarray(o, dtype=np.float32)).reshape(-1) for o in old_src], batch_first=True)
    mask = token_mask(pad_sequence([torch.tensor(t.executed) for t in trajs], batch_first=True), dims)  # [M, L]
    adv = torch.as_tensor(advantages, dtype=torch.float32)
    old, mask, adv = old.to(logp.device), mask.to(logp.device), adv.to(logp.device)
    loss, stats = grpo_loss(logp, old, adv, mask, cfg.clip_low, cfg.clip_high, normalizer=len(trajs))
    stats["entropy"] = float((entropy.detach() * mask).sum() / mask.sum().clamp(min=1))
    return loss, stats


def sft_batch_loss(policy: VLAPolicy, images: np.ndarray, instructions: list[str], tokens: np.ndarray,
                   proprio=None) -> torch.Tensor:
    """Cross-entropy on action tokens; images [N, H, W, 3], tokens [N, A] action ids."""
    logits = policy.action_logits(images, instructions, proprio)
    # np.array copies: arrays read from the object store are read-only, which torch warns about
    target = torch.from_numpy(np.array(tokens, dtype=np.int64)).to(logits.device) - policy.action_tokenizer.first_id
    return sft_loss(logits, target, torch.ones_like(target, dtype=torch.float32))


class LearnerEngine:
    def __init__(self, policy: VLAPolicy, cfg: LearnerConfig, lr: float, micro_batch: int, grad_accum: int):
        import deepspeed

        self.policy = policy
        self.cfg = cfg
        self.micro_batch = micro_batch
        policy.model.split_action_head()  # the head's other 31,808 rows are never read: no gradient, no optimiser state
        params = [p for p in policy.model.parameters() if p.requires_grad]
        # fused: one kernel over the parameters (ZeRO-1/2: its flat fp32 partition) instead of a pass per elementwise op;
        # the demo policy's optimiser step (8.7M parameters) takes ~21 ms instead of ~48 on 2 CPU cores
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999), fused=True)
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": cfg.grad_clip,
            "zero_optimization": {"stage": cfg.zero_stage},
            "zero_allow_untested_optimizer": True,
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
        logp, _ = trajectory_logprobs(self.policy, trajs, temperature)
        return [logp[i, : t.tokens.size].reshape(t.tokens.shape).float().numpy() for i, t in enumerate(trajs)]

    def grpo_minibatch(self, trajs: list[Trajectory], advantages: np.ndarray, temperature: float, old_logprobs=None,
                       terms: list[TermBatch] = ()) -> StepStats:
        """One optimiser step over this rank's slice of a mini-batch (micro-batched). Each loss term's
        samples are split over the micro-batches; it adds weight x their action-token cross-entropy
        to the loss, logged as `{name}_loss` (learner.loss_terms)."""
        totals: dict[str, float] = {}
        term_losses: dict[str, list[float]] = {t.name: [] for t in terms}
        starts = range(0, len(trajs), self.micro_batch)
        parts = [np.array_split(np.arange(len(t.images)), len(starts)) for t in terms]
        for i, start in enumerate(starts):
            sl = slice(start, start + self.micro_batch)
            loss, stats = grpo_batch_loss(self.policy, trajs[sl], advantages[sl], temperature, self.cfg,
                                          None if old_logprobs is None else old_logprobs[sl])
            for term, term_parts in zip(terms, parts):
                if len(term_parts[i]):
                    term_loss = sft_batch_loss(self.policy, *term.part(term_parts[i]))
                    loss = loss + term.weight * term_loss
                    term_losses[term.name].append(float(term_loss.detach()))
            self.engine.backward(loss)
            self._step()
            stats["loss"] = float(loss.detach())
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + float(v)
        means = {k: v / len(starts) for k, v in totals.items()}
        means.update({f"{name}_loss": float(np.mean(v)) for name, v in term_losses.items() if v})
        return StepStats(loss=means.pop("loss"), grad_norm=self._grad_norm(), extra=means)

    # --- SFT --------------------------------------------------------------------------------
    def sft_minibatch(self, images: np.ndarray, instructions: list[str], tokens: np.ndarray, proprio=None) -> StepStats:
        """Cross-entropy on action tokens; images [N, H, W, 3], tokens [N, A] action ids."""
        losses = []
        for start in range(0, len(images), self.micro_batch):
            sl = slice(start, start + self.micro_batch)
            loss = sft_batch_loss(self.policy, images[sl], instructions[sl], tokens[sl], None if proprio is None else proprio[sl])
            self.engine.backward(loss)
            self._step()
            losses.append(float(loss.detach()))
        return StepStats(loss=float(np.mean(losses)), grad_norm=self._grad_norm(), extra={})

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

    def weights(self) -> dict[str, torch.Tensor]:
        """Full weights on CPU (ZeRO-1/2 keep parameters replicated, so any rank has them)."""
        return {k: v.detach().cpu().clone() for k, v in self.engine.module.state_dict().items()}

    def save(self, folder: str, client_state: dict) -> None:
        self.engine.save_checkpoint(folder, tag="deepspeed", client_state=client_state)

    def load(self, folder: str) -> dict:
        _, client_state = self.engine.load_checkpoint(folder, tag="deepspeed")
        return client_state or {}
