"""GRPO and SFT training (DeepSpeed): losses, advantages, micro-batching, checkpoints."""
