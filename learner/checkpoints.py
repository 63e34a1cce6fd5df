"""Run checkpoints with full resume state, written atomically.

    checkpoints/step_000010/
        learner/        DeepSpeed checkpoint of every rank (weights, optimizer), each rank's RNG
                        (rng_rank{r}.pt) and, with learner.success_replay_coef, replay buffer
        policy/         HF-layout policy folder (servable on its own)
        surplus/        dynamic-sampling surplus trajectories (npz, no pickle)
        validated_policy/  the best validated policy so far (eval.validate_every), when set
        state.json      step, weight version, sampler position, python/numpy RNG, surplus meta
    checkpoints/latest  name of the newest COMPLETE checkpoint

Everything is written to `step_N.tmp/` and renamed when complete; `latest` is replaced
atomically after that, so a crash at any moment leaves the previous checkpoint intact.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import fields
from pathlib import Path

import numpy as np

from common.files import reading
from common.records import Trajectory

ARRAYS = ("images", "tokens", "logprobs", "executed")


class CheckpointManager:
    def __init__(self, folder: Path, keep: int):
        self.folder = Path(folder)
        self.keep = keep
        self.folder.mkdir(parents=True, exist_ok=True)

    def begin(self, step: int) -> Path:
        tmp = self.folder / f"step_{step:06d}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, state: dict) -> Path:
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        latest_tmp = self.folder / "latest.tmp"
        latest_tmp.write_text(final.name)
        os.replace(latest_tmp, self.folder / "latest")
        self._prune()
        return final

    def abandon(self, step: int) -> None:
        """Remove a half-written step_N.tmp (frees the space a failed write took)."""
        shutil.rmtree(self.folder / f"step_{step:06d}.tmp", ignore_errors=True)

    def latest(self) -> Path | None:
        marker = self.folder / "latest"
        if not marker.is_file():
            return None
        path = self.folder / marker.read_text().strip()
        return path if (path / "state.json").is_file() else None

    def _prune(self) -> None:
        done = sorted(p for p in self.folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def save_trajectories(trajs: list[Trajectory], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(trajs):
        meta = {f.name: getattr(t, f.name) for f in fields(t) if f.init and f.name not in ARRAYS + ("proprio",)}
        extra = {"proprio": t.proprio} if t.proprio is not None else {}
        np.savez(folder / f"{i:05d}.npz", meta=json.dumps(meta), **{k: getattr(t, k) for k in ARRAYS}, **extra)


def load_trajectories(folder: Path) -> list[Trajectory]:
    out = []
    for path in sorted(Path(folder).glob("*.npz")):
        with reading(path, "checkpoint file"), np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            proprio = z["proprio"] if "proprio" in z.files else None
            out.append(Trajectory(**meta, **{k: z[k] for k in ARRAYS}, proprio=proprio))
    return out
