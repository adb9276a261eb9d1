"""The export command with its tilt stacks read from the device, not the page cache, this tree against another.

Usage: ``python benchmarks/export/bench_cold_stack.py --manifest DATA/manifest.json [--box 64] [--rounds 4]
[--before SRC] [--warm] [--throttle-bytes-per-s 300000000] [--json FILE]``

* Before every run each stack of the manifest is evicted from the page cache (``fsync``, then
  ``POSIX_FADV_DONTNEED``; checked with ``mincore``: the run stops if the file system keeps it, as tmpfs does), so
  the command reads it from the device as a user's first export of a tilt series does. ``--warm`` leaves the stacks
  cached instead (the same runs, for comparison).
* ``--throttle-bytes-per-s``: the children run in a cgroup (v1 ``blkio``) whose reads from the stacks' device are
  limited to that rate, as from a file server; needs root and ``/sys/fs/cgroup/blkio``.
* The trees take turns at running first; each command is ``python -m mspecies export --manifest … --box …
  --diameter …`` into a new folder, timed from start to exit, its modules from a bytecode cache (``bench_cli.py``'s
  ``bench_cli`` and ``use_bytecode_cache``). Reported: every wall time, sorted, and the median.

Detector-size stacks show the effect: ``generate_dataset(folder, n_tomograms=1, n_particles=96,
image_shape_yx=(4096, 4096))`` (41 tilts, 2.75 GB).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import mmap
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench_cli import ROOT, bench_cli, use_bytecode_cache

BLKIO = Path("/sys/fs/cgroup/blkio")


def resident_fraction(path: Path) -> float:
    """Fraction of the pages of ``path`` in the page cache (``mincore`` of a map that is never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size, page = path.stat().st_size, mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    finally:
        os.close(fd)
    if address in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), f"mmap of {path}")
    try:
        pages = (ctypes.c_ubyte * ((size + page - 1) // page))()
        if libc.mincore(address, size, pages) != 0:
            raise OSError(ctypes.get_errno(), f"mincore of {path}")
        return sum(value & 1 for value in pages) / len(pages)
    finally:
        libc.munmap(address, size)


def evict(path: Path) -> None:
    """Drop ``path`` from the page cache; RuntimeError where the file system keeps it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    left = resident_fraction(path)
    if left > 0.01:
        raise RuntimeError(f"{path}: {left:.0%} of it stays in the page cache after POSIX_FADV_DONTNEED (tmpfs?)")


def stack_paths(manifest: Path) -> list[Path]:
    data = json.loads(manifest.read_text())
    return [manifest.parent / entry["files"]["stack"] for entry in data["tilt_series"]]


@contextlib.contextmanager
def throttled_reads(paths: list[Path], bytes_per_s: int | None) -> Iterator[None]:
    """With a rate: this process (and so its children) in a new blkio cgroup limiting reads from the devices of
    ``paths`` to ``bytes_per_s``; moved back and the cgroup removed after."""
    if bytes_per_s is None:
        yield
        return
    if not BLKIO.is_dir() or os.geteuid() != 0:
        raise RuntimeError(f"--throttle-bytes-per-s needs root and a cgroup v1 blkio hierarchy at {BLKIO}")
    group = BLKIO / f"mspecies-bench-{os.getpid()}"
    group.mkdir()
    try:
        for device in {os.stat(path).st_dev for path in paths}:
            disk = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}")
            whole = disk.resolve().parent / "dev" if (disk / "partition").exists() else disk / "dev"
            (group / "blkio.throttle.read_bps_device").write_text(f"{whole.read_text().strip()} {bytes_per_s}\n")
        (group / "cgroup.procs").write_text(str(os.getpid()))
        yield
    finally:
        (BLKIO / "cgroup.procs").write_text(str(os.getpid()))
        group.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True, help="a synthetic dataset (detector-size tilts)")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--diameter", type=float, default=150.0, help="particle diameter (Å)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--before", type=Path, help="source tree whose command is timed too")
    parser.add_argument("--warm", action="store_true", help="leave the stacks in the page cache")
    parser.add_argument("--throttle-bytes-per-s", type=int, help="limit the reads from the stacks' device (root)")
    parser.add_argument("--scratch", type=Path, help="folder for the outputs (default: the temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    manifest = args.manifest.resolve()
    stacks = stack_paths(manifest)
    trees = {"this tree": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    walls: dict[str, list[float]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder, throttled_reads(stacks, args.throttle_bytes_per_s):
        use_bytecode_cache(Path(folder) / "bytecode", list(trees.values()))  # as bench_cli.py: installed modules
        for round_ in range(args.rounds):
            names = list(trees)
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:
                if not args.warm:
                    for stack in stacks:
                        evict(stack)
                walls[name].append(bench_cli(trees[name], manifest, args.box, args.diameter, Path(folder))["wall_s"])
            print(f"round {round_ + 1}: " + "; ".join(f"{name} {walls[name][-1]:.2f} s" for name in trees), flush=True)
    cache = "in the page cache" if args.warm else "evicted before each run"
    limit = f", reads limited to {args.throttle_bytes_per_s / 1e6:.0f} MB/s" if args.throttle_bytes_per_s else ""
    print(f"\n{len(stacks)} stack(s) of {sum(path.stat().st_size for path in stacks) / 1e9:.2f} GB, {cache}{limit}; "
          f"box {args.box}")
    for name, values in walls.items():
        print(f"{name}: {', '.join(f'{v:.2f}' for v in sorted(values))} s (median {statistics.median(values):.2f})")
    if args.json:
        args.json.write_text(json.dumps({"stacks_gb": sum(p.stat().st_size for p in stacks) / 1e9, "box": args.box,
                                         "cold": not args.warm, "throttle_bytes_per_s": args.throttle_bytes_per_s,
                                         "wall_s": walls, "load_average": os.getloadavg()}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
