"""Headless rendering for robosuite 1.4: pick the GL backend, and two patches of its render context.

- Backend: MUJOCO_GL=egl (the default everywhere, see deploy/runtime.py), falling back to osmesa
  when no EGL display can be initialised. robosuite and PyOpenGL read the choice once, at import,
  so it is probed in a child process (with a deadline) before anything imports them here.
- MSAA off (`env.msaa: false`): robosuite gives every context 4x multisampling, which dominates
  software rendering (llvmpipe): 224 px steps take ~190 ms with it, ~75 ms without. The image
  mean changes by < 0.1 grey level. Set per context from `model.vis.quality.offsamples` before
  the MjrContext is created.
- Make current before drawing: robosuite's `MjRenderContext.render` draws into whatever GL
  context is current, i.e. the newest env's, so a second env in one process would read another
  scene's framebuffer. The patch binds the context's own GL context first (microseconds).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

_PROBE = "import mujoco; c = mujoco.GLContext(8, 8); c.make_current(); c.free()"
_offsamples: int | None = None  # None = robosuite's default (MSAA on)
_patched = False


def select_gl_backend(timeout_s: float = 60.0) -> str:
    """Set MUJOCO_GL / PYOPENGL_PLATFORM for this process (and its children) and return the
    backend. Must run before robosuite or OpenGL is imported."""
    backend = os.environ.get("MUJOCO_GL", "egl").lower() or "egl"
    if backend == "egl" and os.environ.get("VLA_GRPO_GL_PROBED") != "egl" and not _works("egl", timeout_s):
        if not _works("osmesa", timeout_s):
            raise RuntimeError("neither EGL nor OSMesa can create a GL context for LIBERO's renderer; install "
                               "`libegl1 libgl1-mesa-dri` (EGL) or `libosmesa6` (OSMesa), e.g. via `make apt`")
        warnings.warn("EGL is not available; LIBERO renders with OSMesa (MUJOCO_GL=osmesa)", RuntimeWarning, stacklevel=2)
        backend = "osmesa"
    os.environ["MUJOCO_GL"] = backend
    os.environ["PYOPENGL_PLATFORM"] = backend
    os.environ["VLA_GRPO_GL_PROBED"] = backend  # children of this process skip the probe
    return backend


def _works(backend: str, timeout_s: float) -> bool:
    env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
    try:
        return subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, timeout=timeout_s).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def set_msaa(enabled: bool) -> None:
    """Applies to render contexts created from now on (envs are built after this is called)."""
    global _offsamples
    _offsamples = None if enabled else 0


def patch_robosuite() -> None:
    """Install both patches once per process. Imports robosuite: call after select_gl_backend()."""
    global _patched
    if _patched:
        return
    from robosuite.utils import binding_utils

    ctx_cls = binding_utils.MjRenderContext
    original_init, original_render = ctx_cls.__init__, ctx_cls.render

    def __init__(self, sim, *args, **kwargs):
        if _offsamples is not None:
            sim.model._model.vis.quality.offsamples = _offsamples
        original_init(self, sim, *args, **kwargs)

    def render(self, *args, **kwargs):
        self.gl_ctx.make_current()
        return original_render(self, *args, **kwargs)

    ctx_cls.__init__, ctx_cls.render = __init__, render
    _patched = True
