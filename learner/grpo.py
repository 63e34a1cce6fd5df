"""GRPO pieces as pure torch functions: advantages, the dynamic-sampling rule, masks, the clip-higher loss.

Shapes: N trajectories in a step, B trajectories in a (micro-)batch, T policy queries (chunks)
per trajectory, L = T * chunk * dims action tokens per trajectory, V = 256 action bins.
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


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    normalizer: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clip-higher PPO/GRPO loss: token-mean per trajectory, then sum / normalizer (default B)."""
    valid = mask > 0  # [B, L]
    m = valid.to(torch.float32)  # [B, L]
    log_ratio = torch.where(valid, logp.float() - old_logp.float(), torch.zeros_like(logp, dtype=torch.float32))
    ratio = log_ratio.exp()  # [B, L]; masked tokens: ratio 1, zero gradient
    adv = advantages.float()[:, None]  # [B, 1]
    pg_unclipped = -adv * ratio  # [B, L]
    pg_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # [B, L]
    pg = torch.maximum(pg_unclipped, pg_clipped)  # [B, L]
    n_tok = m.sum(-1)  # [B]
    per_traj = (pg * m).sum(-1) / n_tok.clamp(min=1)  # [B]; 0 for trajectories without valid tokens
    normalizer = logp.shape[0] if normalizer is None else normalizer
    loss = per_traj.sum() / normalizer

    with torch.no_grad():
        n_all = m.sum().clamp(min=1)
        clipped = (pg_clipped > pg_unclipped).float()  # clipped branch active -> zero gradient
        stats = {
            "clip_fraction": float((clipped * m).sum() / n_all),
            "ratio_mean": float((ratio * m).sum() / n_all),
            "approx_kl": float((((ratio - 1) - log_ratio) * m).sum() / n_all),
            "adv_mean": float(advantages.float().mean()) if advantages.numel() else 0.0,
        }
    return loss, stats


def sft_loss(action_logits: torch.Tensor, target_index: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over action bins, mean over valid tokens. logits [..., V], target/mask [...]."""
    valid = mask > 0  # [...]
    v = action_logits.shape[-1]
    target = torch.where(valid, target_index, torch.zeros_like(target_index))  # masked -> any legal index
    ce = F.cross_entropy(action_logits.float().reshape(-1, v), target.reshape(-1).long(), reduction="none")
    m = valid.reshape(-1).float()  # [M]
    return (ce * m).sum() / m.sum().clamp(min=1)
