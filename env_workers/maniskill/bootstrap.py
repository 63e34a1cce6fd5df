"""Import ManiSkill3 offline and check its renderer, once per process.

- Offline: a ManiSkill task that declares asset downloads would, at `gym.make`, ask on stdin (EOFError
  in CI) or, with MS_SKIP_ASSET_DOWNLOAD_PROMPT=1, download from a hub. `check_offline` refuses such a
  task before that; none of ours declares any (tasks.py), so nothing is ever fetched.
- Renderer: SAPIEN renders through Vulkan. On a machine without a GPU that is Mesa's lavapipe, which
  SAPIEN accepts only from Mesa 24.3 on (Debian 12 needs bookworm-backports; `make apt` installs it).
  Without a usable device ManiSkill fails deep inside env creation; we fail first, in one line.
"""

from __future__ import annotations

import importlib
import importlib.util
import threading

INSTALL_HINT = ("env.backend 'maniskill' needs ManiSkill3, which is not installed: run `make setup`, or "
                "`pip install -c constraints.txt -e '.[maniskill]'` (mani-skill==3.0.1 sapien==3.0.3; docs/maniskill.md)")
DEVICE_HINT = ("SAPIEN (ManiSkill's renderer) finds no usable Vulkan device ({err}); on a CPU-only machine install "
               "Mesa >= 24.3 lavapipe: `make apt` (Debian 12: mesa-vulkan-drivers from bookworm-backports; docs/maniskill.md)")
_lock = threading.Lock()
_ready: str | None = None
# SAPIEN frees its Vulkan context, compiled render pipelines included, with the last scene that uses it.
# On lavapipe that compile costs ~3.6 s of CPU at the first image of every new scene, i.e. every time an
# env switches task. A render system held for the whole process keeps the context, so only the first
# scene of a process pays it.
_keep_context = None


class ManiSkillUnavailable(ImportError):
    """mani-skill or sapien is not installed."""


class RenderDeviceError(RuntimeError):
    """SAPIEN cannot render on this machine."""


def maniskill_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("mani_skill", "sapien"))


def render_backend() -> str:
    """ManiSkill's render backend: the GPU where this process sees one, else SAPIEN's CPU path (lavapipe)."""
    import torch

    return "gpu" if torch.cuda.is_available() else "cpu"


def check_render_device() -> None:
    import sapien

    try:
        sapien.render.get_device_summary()  # raises when no Vulkan device qualifies
    except RuntimeError as err:
        raise RenderDeviceError(DEVICE_HINT.format(err=err)) from None


def check_offline(task: str) -> None:
    """Refuse a task whose assets ManiSkill would download at creation (we never fetch at run time)."""
    from mani_skill.utils.registration import REGISTERED_ENVS

    needs = REGISTERED_ENVS[task].asset_download_ids
    if needs:
        raise RuntimeError(f"ManiSkill task {task} needs downloaded assets {list(needs)}; this project runs "
                           "offline and supports only tasks built from what the mani-skill wheel ships")


def check_physx_gpu() -> None:
    """sim_backend physx_cuda: SAPIEN loads PhysX's GPU library from ~/.sapien/physx/<version>/, and
    when it is missing fetches it from GitHub at the first GPU scene. We never fetch at run time: a
    missing library fails here, naming the file and where to get it once."""
    from pathlib import Path

    import sapien

    version = sapien.physx.version()
    lib = Path.home() / ".sapien" / "physx" / version / "libPhysXGpu_64.so"
    if not lib.exists():
        raise RuntimeError(
            f"env.sim_backend physx_cuda needs PhysX's GPU library at {lib}, which SAPIEN would download at run time; "
            f"place it there once (unzip https://github.com/sapien-sim/physx-precompiled/releases/download/{version}/"
            f"linux-so.zip into {lib.parent}; docs/maniskill.md), or use env.sim_backend physx_cpu")


def ensure_maniskill() -> str:
    """Make `mani_skill.envs` (the task registry) importable and import it; returns the render backend.
    Raises ManiSkillUnavailable or RenderDeviceError, each with the fix."""
    global _ready, _keep_context
    with _lock:
        if _ready is not None:
            return _ready
        if not maniskill_installed():
            raise ManiSkillUnavailable(INSTALL_HINT)
        check_render_device()
        importlib.import_module("mani_skill.envs")  # registers the tasks with gymnasium (2-5 s)
        import sapien

        backend = render_backend()
        _keep_context = sapien.render.RenderSystem(sapien.Device("cuda" if backend == "gpu" else "cpu"))
        _ready = backend
        return _ready
