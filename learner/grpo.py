"""GRPO pieces as pure torch functions: advantages, the dynamic-sampling rule, masks, the clip-higher loss.

Shapes: N trajectories in a step, B trajectories in a batch, T policy queries (chunks) per
trajectory, C chunks in a micro-batch, A = chunk * dims action tokens per query, L = T * A action
tokens per trajectory, V = 256 action bins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-6


def _group_ids(group_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Map arbitrary group labels to 0..G-1; returns (inverse [N], counts [G], G)."""
    _, inverse, counts = torch.unique(group_index, return_inverse=True, return_counts=True)
    return inverse, counts, int(counts.numel())


def _group_mean(values: torch.Tensor, inverse: torch.Tensor, counts: torch.Tensor, g: int) -> torch.Tensor:
    sums = torch.zeros(g, dtype=values.dtype, device=values.device).index_add_(0, inverse, values)
    return sums / counts.to(values.dtype)  # [G]


def group_advantages(rewards: torch.Tensor, group_index: torch.Tensor) -> torch.Tensor:
    """GRPO advantages (r - mean_g) / (std_g + 1e-6), unbiased std; constant or size-1 groups -> 0."""
    rewards = torch.as_tensor(rewards, dtype=torch.float32)  # [N]
    group_index = torch.as_tensor(group_index, device=rewards.device)  # [N]
    inverse, counts, g = _group_ids(group_index)
    mean = _group_mean(rewards, inverse, counts, g)[inverse]  # [N]
    sq = torch.zeros(g, dtype=rewards.dtype, device=rewards.device)
    sq.index_add_(0, inverse, (rewards - mean) ** 2)  # [G]
    std = (sq / (counts - 1).clamp(min=1).to(rewards.dtype)).sqrt()[inverse]  # [N]
    # constant groups (this includes size-1 groups) get exactly 0, not rounding noise or NaN
    gmax = torch.full((g,), -torch.inf, device=rewards.device).scatter_reduce(0, inverse, rewards, "amax")
    gmin = torch.full((g,), torch.inf, device=rewards.device).scatter_reduce(0, inverse, rewards, "amin")
    constant = (gmax == gmin)[inverse]  # [N]
    adv = (rewards - mean) / (std + EPS)
    return torch.where(constant, torch.zeros_like(adv), adv)  # [N]


def keep_group(success_rate: float, low: float = 0.1, high: float = 0.9) -> bool:
    """Dynamic sampling: keep a group whose mean success is within [low, high] (inclusive)."""
    return bool(low <= success_rate <= high)


def token_mask(executed: torch.Tensor, dims: int) -> torch.Tensor:
    """executed [B, T, chunk] bool -> [B, T*chunk*dims] float, row-major like tokens [B, T, chunk, dims]."""
    executed = torch.as_tensor(executed, dtype=torch.bool)
    b = executed.shape[0]
    return executed[..., None].expand(*executed.shape, dims).reshape(b, -1).float()  # [B, L]


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_low: float = 0.2, clip_high: float = 0.28) -> dict[str, torch.Tensor]:
    """Per-token clip-higher surrogate to minimise, and what its statistics read. logp, old_logp,
    mask [R, L] (rows: trajectories or chunks), advantages [R]; masked tokens: ratio 1, zero gradient."""
    valid = mask > 0  # [R, L]
    log_ratio = torch.where(valid, logp.float() - old_logp.float(), torch.zeros_like(logp, dtype=torch.float32))
    ratio = log_ratio.exp()  # [R, L]
    adv = advantages.float()[:, None]  # [R, 1]
    pg_unclipped = -adv * ratio  # [R, L]
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [R, L]
    return {"pg": torch.maximum(pg_unclipped, pg_clipped), "m": valid.to(torch.float32), "ratio": ratio,
            "log_ratio": log_ratio, "clipped": (pg_clipped > pg_unclipped).float()}  # clipped branch: zero gradient


def surrogate_sums(s: dict[str, torch.Tensor]) -> dict[str, float]:
    """Token sums of the statistics (over valid tokens), to be divided by the sum of `tokens`."""
    with torch.no_grad():
        m = s["m"]
        return {"tokens": float(m.sum()), "clip_fraction": float((s["clipped"] * m).sum()),
                "ratio_mean": float((s["ratio"] * m).sum()),
                "approx_kl": float((((s["ratio"] - 1) - s["log_ratio"]) * m).sum())}


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective (clip-higher PPO surrogate) over whole trajectories [B, L]: token-mean per
    trajectory, then mean over trajectories. The learner takes it chunk by chunk: grpo_chunk_loss."""
    s = clipped_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high)
    n_tok = s["m"].sum(-1)  # [B]
    per_traj = (s["pg"] * s["m"]).sum(-1) / n_tok.clamp(min=1)  # [B]; 0 for trajectories without valid tokens
    sums = surrogate_sums(s)
    n_all = max(sums.pop("tokens"), 1.0)
    stats = {k: v / n_all for k, v in sums.items()}
    stats["adv_mean"] = float(advantages.float().mean()) if advantages.numel() else 0.0
    return per_traj.mean(), stats


def grpo_chunk_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    weight: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.28) -> tuple[torch.Tensor, dict[str, float]]:
    """The same surrogate over chunks (one policy query each): sum_c weight_c * sum_a pg_ca * mask_ca.
    logp, old_logp, mask [C, A]; advantages, weight [C] (their trajectory's). With weight = 1 / (the
    trajectory's valid tokens x B), the sum over every chunk of B trajectories is grpo_loss,
    however the chunks are split into micro-batches. Returns the loss and surrogate_sums."""
    s = clipped_surrogate(logp, old_logp, advantages, mask, clip_low, clip_high)
    loss = (weight.float() * (s["pg"] * s["m"]).sum(-1)).sum()
    return loss, surrogate_sums(s)


def sft_loss(action_logits: torch.Tensor, target_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over action bins, mean over valid tokens. logits [..., V], target/mask [...]."""
    valid = mask > 0  # [...]
    v = action_logits.shape[-1]
    target = torch.where(valid, target_index, torch.zeros_like(target_index))  # masked -> any legal index
    ce = F.cross_entropy(action_logits.float().reshape(-1, v), target.reshape(-1).long(), reduction="none")
    m = valid.reshape(-1).float()  # [M]
    return (ce * m).sum() / m.sum().clamp(min=1)
