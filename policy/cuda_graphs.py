"""CUDA graphs for the serving forward (`policy.cuda_graphs`): `action_logits` captured once per
batch shape and replayed for every later batch of that shape.

Why: at the batch sizes a rollout produces (a mean of ~5 observations per forward at 7B), an eager
forward is bound by the CPU thread that launches its kernels one by one; its time depends on the
host's CPU and it takes a core away from the env workers. A replay launches the whole forward at
once.

Shapes: a batch of n rows is padded up to the next bucket (1-8, 12, 16, ..., 32, 40, ..., max batch) by
repeating its first row, and the padded rows' outputs are dropped: rows never mix (each attends only within its own
sequence). A graph is keyed by (bucket, prompt width, whether the prompts differ in length, proprio):
the prompt width and padding change the sequence length and the attention mask. Graphs share one
memory pool, so their activations cost the largest one, not the sum; past `max_graphs` shapes a batch
runs eagerly.

Weights stay valid across syncs: every weight update of a replica copies into the same tensors
(load_state_dict copies, the collective and CUDA-IPC receivers copy into state_dict() views), which
the graphs read at replay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

MAX_GRAPHS = 64  # shapes captured per replica; a capture costs ~0.7 s at 7B (H100) and a little graph memory


def buckets(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: every size to 8, then steps of 4 to 32 and of 8 beyond, and
    max_batch itself. A padded row costs a row's compute (at 7B a forward is compute-bound from a
    few rows up), so no bucket wastes more than a third; powers of two would waste up to half."""
    sizes = [*range(1, 9), *range(12, 33, 4), *range(40, max_batch, 8)]
    return [b for b in sizes if b < max_batch] + [max_batch]


def pad_rows(x: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """x with its first row repeated until it has `rows` rows."""
    if x is None or x.shape[0] == rows:
        return x
    return torch.cat([x, x[:1].expand(rows - x.shape[0], *x.shape[1:])])


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: list  # static input tensors (None where the model takes none)
    output: torch.Tensor


class GraphedActionLogits:
    """Calls model.action_logits(pixels, ids, lengths, stop_token_id=, proprio=, padded=) through
    bucketed CUDA graphs. `capture=False` (a CPU model) runs the same bucket padding eagerly: the
    padding path that tests check against the plain forward."""

    def __init__(self, model, max_batch: int, capture: bool | None = None, max_graphs: int = MAX_GRAPHS):
        self.model = model
        self.buckets = buckets(max_batch)
        device = next(model.parameters()).device
        self.capture = device.type == "cuda" if capture is None else capture
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None
        self.capture_s = 0.0  # seconds spent capturing, all graphs

    def bucket(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def __call__(self, pixels, ids, lengths, stop_token_id: int, proprio, padded: bool) -> torch.Tensor:
        rows = pixels.shape[0]
        size = self.bucket(rows)
        key = (size, ids.shape[1], padded, proprio is not None)
        if size is None or (key not in self.graphs and len(self.graphs) >= self.max_graphs):
            return self.model.action_logits(pixels, ids, lengths, stop_token_id=stop_token_id, proprio=proprio, padded=padded)
        inputs = [pad_rows(x, size) for x in (pixels, ids, lengths, proprio)]
        if not self.capture:
            return self._forward(inputs, stop_token_id, padded)[:rows]
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(inputs, stop_token_id, padded)
        for dst, src in zip(entry.inputs, inputs):
            if dst is not None:
                dst.copy_(src, non_blocking=True)
        entry.graph.replay()
        # a copy: the output buffer is the graph's, and the next replay of any graph of the pool may reuse it
        return entry.output[:rows].clone()

    def _forward(self, inputs, stop_token_id: int, padded: bool) -> torch.Tensor:
        pixels, ids, lengths, proprio = inputs
        return self.model.action_logits(pixels, ids, lengths, stop_token_id=stop_token_id, proprio=proprio, padded=padded)

    @torch.no_grad()
    def _capture(self, inputs, stop_token_id: int, padded: bool) -> _Graph:
        start = time.perf_counter()
        with torch.inference_mode(False):  # ordinary tensors: replays may come under no_grad or inference_mode
            static = [x.clone() if x is not None else None for x in inputs]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: lazy inits, cuBLAS workspaces, autotuning
            for _ in range(2):
                self._forward(static, stop_token_id, padded)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a replica may form a weight-sync group on another thread meanwhile (its CUDA calls
        # would otherwise break the capture); no other thread touches this capture's stream
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            output = self._forward(static, stop_token_id, padded)
        torch.cuda.synchronize()
        self.capture_s += time.perf_counter() - start
        return _Graph(graph, static, output)
