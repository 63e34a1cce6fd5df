"""VLAPolicy: the model plus everything needed to turn observations into env actions and back.

Used by the inference service (act) and the learner (log-probs of stored tokens).
"""

from __future__ import annotations

import numpy as np
import torch

from common.records import ActionChunk, Observation
from policy.action_tokenizer import ActionStats, ActionTokenizer, select_unnorm_key
from policy.modeling import OpenVLAOFTPolicy
from policy.processor import PROMPT_END_ID, ImageProcessor, PromptBuilder
from policy.sampling import choose_actions, chosen_log_probs


class VLAPolicy:
    def __init__(
        self,
        model: OpenVLAOFTPolicy,
        tokenizer,
        image_processor: ImageProcessor,
        norm_stats: dict,
        unnorm_key: str | None = None,
        prompt_end_id: int = PROMPT_END_ID,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.prompts = PromptBuilder(tokenizer, prompt_end_id)
        cfg = model.config
        self.action_tokenizer = ActionTokenizer(vocab_size=cfg.vocab_size, n_bins=cfg.n_action_bins)
        self.norm_stats = norm_stats
        self.unnorm_key = select_unnorm_key(norm_stats, unnorm_key)
        self.stats = ActionStats.from_json(norm_stats[self.unnorm_key])
        self.graphed = None  # policy/cuda_graphs.py, once use_cuda_graphs() is called (serving only)
        if len(self.stats.q01) != cfg.action_dims:
            raise ValueError(
                f"statistics {self.unnorm_key!r} have {len(self.stats.q01)} action dims, the model {cfg.action_dims}"
            )

    @property
    def chunk_shape(self) -> tuple[int, int]:
        return self.model.config.action_chunk, self.model.config.action_dims

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def uses_proprio(self) -> bool:
        return self.model.config.proprio_dim > 0

    def pixels(self, images) -> torch.Tensor:
        """[B, H, W, 3] uint8 (array, list of arrays, or tensor on any device) -> the model's pixel
        values: the images travel to the model's device as uint8 and are processed there."""
        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(np.ascontiguousarray(np.stack(images)))
        dtype = next(self.model.parameters()).dtype
        return self.image_processor.on_device(images.to(self.device, non_blocking=True), dtype)

    def model_inputs(self, images, instructions: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids, lengths = self.prompts(instructions)
        return self.pixels(images), ids.to(self.device), lengths.to(self.device)

    def normalize_proprio(self, proprio) -> torch.Tensor | None:
        """[B, P] raw proprio -> [-1, 1] with the dataset's q01/q99 (constant dims -> 0)."""
        if not self.uses_proprio:
            return None
        if proprio is None or any(p is None for p in proprio):
            raise ValueError("this policy reads proprio: every observation needs `proprio`")
        x = np.asarray(np.stack(proprio), dtype=np.float64)
        stats = self.norm_stats[self.unnorm_key].get("proprio")
        if stats is not None and "q01" in stats:
            lo, hi = np.asarray(stats["q01"]), np.asarray(stats["q99"])
            span = hi - lo
            x = np.where(span > 1e-6, 2.0 * (x - lo) / np.where(span > 1e-6, span, 1.0) - 1.0, 0.0)
        return torch.tensor(np.clip(x, -1.5, 1.5), dtype=torch.float32, device=self.device)

    def use_cuda_graphs(self, max_batch: int) -> None:
        """Inference forwards (no autograd) replay bucketed CUDA graphs from now on (policy/cuda_graphs.py),
        where the policy is on a CUDA device; elsewhere they stay eager."""
        if self.device.type != "cuda":
            return
        from policy.cuda_graphs import GraphedActionLogits

        self.graphed = GraphedActionLogits(self.model, max_batch)

    def action_logits(self, images, instructions: list[str], proprio=None) -> torch.Tensor:  # [B, A, 256]
        ids, lengths = self.prompts(instructions)
        padded = bool(lengths.min() < lengths.max())  # read here, on the CPU: no device sync in the forward
        forward = self.model.action_logits
        if self.graphed is not None and not torch.is_grad_enabled():  # the learner's forwards stay eager
            forward = self.graphed
        return forward(self.pixels(images), ids.to(self.device), lengths.to(self.device),
                       stop_token_id=self.tokenizer.eos_token_id, proprio=self.normalize_proprio(proprio), padded=padded)

    @torch.no_grad()
    def act(
        self,
        observations: list[Observation],
        temperature: float = 1.6,
        greedy: bool = False,
        version: int = 0,
        generator: torch.Generator | None = None,
    ) -> list[ActionChunk]:
        proprio = [o.proprio for o in observations] if self.uses_proprio else None
        logits = self.action_logits([o.image for o in observations], [o.instruction for o in observations], proprio)
        index, logp = choose_actions(logits, temperature, greedy, generator)  # [B, A]
        chunk, dims = self.chunk_shape
        ids = self.action_tokenizer.index_to_id(index.cpu().numpy()).reshape(-1, chunk, dims)
        logp = logp.float().cpu().numpy().reshape(-1, chunk, dims)
        actions = self.action_tokenizer.tokens_to_actions(ids, self.stats).astype(np.float32)
        return [ActionChunk(tokens=t, logprobs=lp, actions=a, policy_version=version) for t, lp, a in zip(ids, logp, actions)]

    def token_log_probs(self, images, instructions: list[str], token_ids: torch.Tensor, temperature: float, proprio=None):
        """Differentiable log-probs [B, A] and entropies [B, A] of stored token ids [B, A]."""
        logits = self.action_logits(images, instructions, proprio)
        index = token_ids.to(logits.device) - self.action_tokenizer.first_id
        return chosen_log_probs(logits, index, temperature)
