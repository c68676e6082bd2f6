"""Carry designmodel's compiled kernels from one GPU call to the next.

    python3 bench/triton_cache.py pack $OUT/tcache.tgz      # at the end of a GPU call
    python3 bench/triton_cache.py unpack .tcache/tcache.tgz  # at the start of the next

A fresh GPU machine spends minutes compiling (about 90 s for the Riccati kernel alone on
Triton 3.6), and a device call's budget is 10 minutes. Triton's cache (TRITON_CACHE_DIR, else
~/.triton/cache) holds one folder per compiled kernel; `pack` keeps the folders of kernels
whose names appear in designmodel's templates, then those of fla's (the reference, whose
autotuned kernels compile every config on a fresh machine) where room is left, newest first
and at most LIMIT_MIB (a call carries 64 MiB in all; bench/device_call.sh splits the archive
into the 16 MiB files a call can return), and `unpack` puts them back. Triton checks its cache by a hash of the source, the options and
its own version, so an entry made by other code or another Triton is never used by mistake.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Where this Triton keeps its compiled kernels."""
    return Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))


def jit_names(paths) -> set[str]:
    """The names of the @triton.jit functions defined in these files."""
    names = set()
    for path in paths:
        names.update(re.findall(r"@triton\.jit[^\n]*\ndef (\w+)\(", path.read_text()))
    return names


def our_kernel_names() -> set[str]:
    """Every @triton.jit function name of the templates and of the generated zoo (user specs
    compile from the same templates, so their kernels have these names too)."""
    return jit_names([*(ROOT / "templates").rglob("*.j2"), *(ROOT / "generated").rglob("*.py")])


def reference_kernel_names() -> set[str]:
    """The @triton.jit names of fla, the speed reference, where it is importable: its
    autotuned kernels compile every config on a fresh machine (minutes of a call's budget)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or not spec.submodule_search_locations:
        return set()
    return jit_names(p for d in spec.submodule_search_locations for p in Path(d).rglob("*.py"))


def ours(entry: Path, names: set[str]) -> bool:
    """Whether a cache folder holds one of our kernels (its metadata JSON names it)."""
    for meta in entry.glob("*.json"):
        if meta.name.startswith("__grp__"):
            continue
        try:
            return json.loads(meta.read_text()).get("name") in names
        except (OSError, ValueError):
            return False
    return False


# what a device call may carry in all is 64 MiB, the working tree included
LIMIT_MIB = 40
# room left for what zlib buffers and the folder being added (the largest are a few MiB)
MARGIN_MIB = 4


def pack(archive: Path) -> int:
    """Our kernels' cache folders into archive, the newest first, then fla's, each while the
    archive stays under LIMIT_MIB (the folders past it are left out, not half of all)."""
    src = cache_dir()
    folders = [e for e in src.iterdir() if e.is_dir()] if src.is_dir() else []
    folders.sort(key=lambda e: e.stat().st_mtime, reverse=True)
    names, reference = our_kernel_names(), reference_kernel_names() - our_kernel_names()
    entries = [e for e in folders if ours(e, names)] + [e for e in folders if ours(e, reference)]
    tmp = archive.with_name(archive.name + ".part")
    kept = 0
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb") as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for e in entries:
            # what is compressed so far, less what zlib still buffers (the margin covers that)
            if raw.tell() + MARGIN_MIB * 2 ** 20 > LIMIT_MIB * 2 ** 20:
                break
            tar.add(e, arcname=e.name)
            kept += 1
    os.replace(tmp, archive)   # never a half-written archive under the final name
    print(f"packed {kept} of {len(entries)} kernels, {archive.stat().st_size / 2**20:.1f} MiB -> {archive}")
    return 0


def unpack(archive: Path) -> int:
    """The cache folders of archive back into this Triton's cache (none: nothing to do)."""
    if not archive.is_file():
        print(f"no {archive}: starting with an empty cache")
        return 0
    dst = cache_dir()
    dst.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dst, filter="data")
    print(f"unpacked {archive} into {dst}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("pack", "unpack"):
        print(__doc__)
        return 2
    return (pack if argv[0] == "pack" else unpack)(Path(argv[1]))


if __name__ == "__main__":
    sys.exit(main())
