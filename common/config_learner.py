"""The learner's sections of the run config (common/config.py): GRPO's optimiser and loss, LoRA,
the weight sync, extra loss terms, and SFT."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from common.section import Section


class LossTermConfig(Section):
    """One extra loss term: `weight` x its loss, added to every GRPO mini-batch's loss."""

    weight: float = Field(gt=0)
    batch_size: int = Field(16, gt=0, description="samples the term draws per mini-batch, per learner rank")


LLAMA_BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Section):
    """Low-rank adapters (peft) on the language model's blocks: the one-GPU mode at 7B, where full
    training's fp32 master weights and Adam state (~16 bytes a parameter, ~120 GB) fit no GPU.
    The vision towers and, unless listed in `trainable`, the projector stay frozen: the backward
    then stops at the LM's input (no tower activations kept, no gradient through ~0.7B tower
    parameters), and RL fine-tunes an SFT policy whose visual features are already trained.
    Published weights and policy folders are merged (W + alpha / rank x B A), so replicas need no peft."""

    rank: int = Field(32, gt=0, description="adapter rank r (OpenVLA-OFT fine-tunes with 32)")
    alpha: float = Field(16.0, gt=0, description="scale alpha / rank on B A (OpenVLA-OFT: min(rank, 16))")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: list[Literal[LLAMA_BLOCK_LINEARS]] = Field(
        list(LLAMA_BLOCK_LINEARS), min_length=1,
        description="Linear layers of every language-model block that get adapters, by their name in the block")
    trainable: list[Literal["action_head", "action_queries", "proprio_projector", "projector"]] = Field(
        ["action_head", "action_queries", "proprio_projector"],
        description="parts trained in full beside the adapters (each where the policy has it): the LM head's 256 "
        "action rows, learned action queries, the proprio projector (small, and the action readout itself, "
        "as OFT trains its action head in full); projector: the vision-to-LM MLP (~71M parameters at 7B)")

    @model_validator(mode="after")
    def _no_repeats(self):
        for name in ("target_modules", "trainable"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name} lists a name twice: {values}")
        return self


class LearnerConfig(Section):
    lr: float = Field(5e-6, gt=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="GRPO learning rate over the run: from lr down to lr * lr_final_ratio at the end of "
        "total_steps, or of wall_budget_minutes when that comes first")
    lr_final_ratio: float = Field(0.1, ge=0, le=1, description="lr_schedule: the last step's lr as a fraction of lr")
    weight_decay: float = Field(0.0, ge=0)
    clip_low: float = Field(0.2, gt=0, lt=1)
    clip_high: float = Field(0.28, gt=0)
    mini_batch_size: int = Field(128, gt=0, description="trajectories per optimiser step")
    micro_batch_chunks: int = Field(
        8, gt=0, description="samples (one observation and its action chunk; loss_terms' samples count too) per "
        "forward/backward per rank: bounds the learner's activation memory whatever the episode lengths; the "
        "gradient is the same for any value")
    epochs: int = Field(1, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    zero_stage: Literal[0, 1, 2] = 2
    offload_optimizer: bool = Field(
        False, description="ZeRO-Offload: the fp32 master weights, the gradients' fp32 copy and Adam's moments "
        "live in host memory and the optimiser steps on the CPU; the GPU keeps the bf16 weights, gradients and "
        "activations. Full-parameter training of the 7B policy then fits one GPU's memory (~30 GB), but needs "
        "16 bytes of host memory per trained parameter (~112 GiB at 7.5 B: more than a 128 GB node has free; "
        "checked at the learner's start); needs zero_stage 1 or 2")
    sync_every: int = Field(1, gt=0)
    weight_sync: Literal["auto", "object_store", "collective", "cuda_ipc"] = Field(
        "auto", description="how new weights reach the Serve replicas. object_store: rank 0 puts the state dict "
        "in the object store once and every replica fetches it (each replica's node pulls a full copy). "
        "collective: rank 0 broadcasts it in buckets over a process group of its own with every replica (NCCL "
        "when all of them are on GPUs, each on its own GPU; gloo otherwise). cuda_ipc: the replicas on rank 0's "
        "own GPU (on CPUs, its node) copy it bucket by bucket from rank 0's buffers through shared-memory "
        "handles; replicas elsewhere fetch the object-store copy. Every backend still puts that copy, on rank "
        "0's node, for replicas that (re)start, after the sync (which does not wait for it). auto (the default) "
        "picks at the first sync: cuda_ipc when every replica shares rank 0's GPU, collective when every "
        "replica and rank 0 have a GPU each, object_store otherwise (CPU runs)")
    weight_sync_bucket_mb: int = Field(
        256, gt=0, description="weight_sync collective: MB per broadcast (one buffer of this size on every member); "
        "cuda_ipc: MB per shared bucket (two such buffers on rank 0's device)")
    recompute_old_logprobs: bool = False
    gradient_checkpointing: bool = Field(
        False, description="recompute each transformer block's activations in the backward instead of keeping them: "
        "far less activation memory per chunk (larger micro_batch_chunks fit) for about one more forward pass")
    loss_terms: dict[Literal["demo_bc"], LossTermConfig] = Field(
        default_factory=dict, description="extra loss terms by name (learner/loss_terms.py), e.g. demo_bc: "
        "cross-entropy on the SFT demonstrations' action tokens, as DAPG does; none = the paper's pure GRPO")
    lora: LoraConfig | None = Field(
        None, description="train low-rank adapters instead of every parameter (LoraConfig); None = full training")

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_optimizer and self.zero_stage not in (1, 2):
            raise ValueError(f"offload_optimizer needs zero_stage 1 or 2 (ZeRO's flat fp32 partition is what moves "
                             f"to host memory), got zero_stage {self.zero_stage}")
        return self


class SFTConfig(Section):
    demos_per_task: int = Field(1, gt=0)
    steps: int = Field(500, gt=0)
    lr: float = Field(3e-4, gt=0)
    batch_size: int = Field(16, gt=0)
    micro_batch_size: int | None = Field(
        None, gt=0, description="SFT samples per forward/backward per rank; None = learner.micro_batch_chunks "
        "(the same bound as GRPO); at least the per-rank batch = one pass, faster on CPU, same gradient"
    )
    shift_augment_px: int = Field(
        0, ge=0, description="random image shift of up to this many pixels per SFT sample (DrQ-style); 0 = off"
    )
    shift_moves_labels: bool = Field(
        True, description="read a shifted image as the scene translated on the table: under absolute position "
        "control the position targets and the gripper proprio move with it (delta actions stay as they are)"
    )
    dataset: Path | None = Field(None, description="folder of robomimic/LIBERO HDF5 files; None = record experts")
