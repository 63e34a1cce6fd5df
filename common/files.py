"""Reading the files a run depends on (policies, checkpoints, demonstrations), with errors that name
the file: a truncated or corrupted file should say which one, not end in a library's traceback."""

from __future__ import annotations

import contextlib
from pathlib import Path


class UnreadableFile(RuntimeError):
    def __init__(self, path: str | Path, err: BaseException, what: str = "file"):
        super().__init__(f"{what} {path} is unreadable (corrupted or truncated?): {type(err).__name__}: {err}")
        self.path = Path(path)


@contextlib.contextmanager
def reading(path: str | Path, what: str = "file"):
    """Any error while the block reads `path` becomes an UnreadableFile naming it."""
    try:
        yield
    except UnreadableFile:
        raise
    except Exception as err:  # h5py, numpy's zip reader, safetensors, json, torch.load: each raises its own
        raise UnreadableFile(path, err, what) from err
