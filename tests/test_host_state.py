"""HostState: a state dict that goes through Ray's object store with its tensors out of band (not
copied through the pickle stream) and comes back equal, dtypes and shapes included."""

import pickle

import ray
import torch

from common.host_state import HostState


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 32, generator=g).to(torch.bfloat16), "b": torch.randn(32, generator=g),
            "half": torch.randn(4, 4, generator=g).half(), "steps": torch.tensor(7), "mask": torch.rand(5, generator=g) > 0.5,
            "ids": torch.arange(6, dtype=torch.int64).reshape(2, 3), "strided": torch.randn(8, 8, generator=g)[:, ::2]}


def _equal(got: dict, want: dict) -> bool:
    return list(got) == list(want) and all(
        got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v) for k, v in want.items())


def test_the_tensors_travel_out_of_band_and_come_back_equal():
    state = _state()
    buffers = []
    stream = pickle.dumps(HostState(state), protocol=5, buffer_callback=buffers.append)
    assert len(buffers) == len(state) and len(stream) < 2_000  # only names and dtypes in the stream itself
    back = pickle.loads(stream, buffers=buffers)
    assert isinstance(back, HostState) and _equal(back, state)
    assert _equal(pickle.loads(pickle.dumps(HostState(state))), state)  # plain pickling too


def test_a_round_trip_through_the_object_store(ray_cluster):
    state = _state()
    back = ray.get(ray.put(HostState(state)), timeout=60)
    assert isinstance(back, HostState) and _equal(back, state)
    model = torch.nn.Linear(32, 64).to(torch.bfloat16)
    model.load_state_dict({"weight": back["w"], "bias": back["w"][:, 0]})  # read-only views load by copying
    assert torch.equal(model.weight, state["w"])
