"""The export command in a memory cgroup (a SLURM job's ``--mem`` under ``task/cgroup``, a container's limit), this
tree against another: does it finish, fail with a message, or is it killed by the kernel, and how much did it use?

Usage (root, a cgroup v1 ``memory`` hierarchy or v2 with the memory controller): ``python
benchmarks/export/bench_memory_limit.py --manifest DATA/manifest.json --limits-gb 0.65 0.7 1.0 [--box 64]
[--pixel-size-out 16] [--diameter 600] [--before SRC] [--scratch DIR] [--json FILE]``

For every limit and tree: a new cgroup with that limit, ``python -m mspecies export --manifest … --box …
--diameter … [--pixel-size-out …]`` started in it (``PYTHONPATH`` = the tree) into a new folder; reported: exit
code (negative: killed by that signal), wall seconds, the cgroup's peak usage (v1 ``memory.max_usage_in_bytes``,
v2 ``memory.peak``; page cache included), and the log's memory plan or the error line. The eleventh pass used a
float16 copy of a 4096² dataset (``generate_dataset(folder, n_tomograms=1, n_particles=96, image_shape_yx=(4096,
4096))``, the stack rewritten as MRC mode 12), exported at 16 Å/px.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def memory_hierarchy() -> tuple[Path, str, str]:
    """(mount point, limit file, peak file) of a memory cgroup hierarchy this process can make cgroups in."""
    from mspecies.core.cgroups import controller_hierarchy

    hierarchy = controller_hierarchy("memory")
    if hierarchy is None:
        raise RuntimeError("no memory cgroup hierarchy to make a cgroup in (cgroup v1 memory, or v2 with memory "
                           "enabled)")
    version, point = hierarchy
    if version == 1:
        return Path(point), "memory.limit_in_bytes", "memory.max_usage_in_bytes"
    return Path(point), "memory.max", "memory.peak"


def run_limited(tree: Path, command: list[str], limit_bytes: int, out: Path) -> dict[str, object]:
    """One run of ``command`` (after ``python``) from ``tree`` in a new cgroup of ``limit_bytes``."""
    point, limit_file, peak_file = memory_hierarchy()
    group = point / f"mspecies-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / limit_file).write_text(str(limit_bytes))
        started = time.perf_counter()
        done = subprocess.run(["sh", "-c", f'echo $$ > "{group / "cgroup.procs"}" && exec "$@"', "sh",
                               sys.executable, *command, "--out", str(out)],
                              env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True, cwd=tree)
        wall = time.perf_counter() - started
        peak_path = group / peak_file
        peak = int(peak_path.read_text()) if peak_path.exists() else None
    finally:
        group.rmdir()
    lines = (done.stdout + done.stderr).splitlines()
    said = next((line for line in lines if "particles in" in line or "error" in line), lines[-1] if lines else "")
    if done.returncode < 0:
        said = f"killed by signal {-done.returncode} (the log ends: {said})"
    return {"limit_bytes": limit_bytes, "returncode": done.returncode, "wall_s": wall, "peak_bytes": peak,
            "said": said}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--limits-gb", type=float, nargs="+", required=True, help="cgroup limits (GB = 1e9 bytes)")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--diameter", type=float, default=600.0, help="particle diameter (Å)")
    parser.add_argument("--pixel-size-out", type=float, help="output pixel size (Å; default the data's)")
    parser.add_argument("--before", type=Path, help="source tree whose command runs too")
    parser.add_argument("--scratch", type=Path, help="folder for the outputs (default: the temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_memory_limit.py makes cgroups: run it as root")
    command = ["-m", "mspecies", "export", "--manifest", str(args.manifest.resolve()), "--box", str(args.box),
               "--diameter", f"{args.diameter:g}"]
    if args.pixel_size_out:
        command += ["--pixel-size-out", f"{args.pixel_size_out:g}"]
    trees = {"this tree": ROOT} | ({"before": args.before.resolve()} if args.before else {})
    results: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        for limit in args.limits_gb:
            for name, tree in trees.items():
                out = Path(folder) / f"{name.replace(' ', '_')}_{limit:g}"
                result = {"tree": name, **run_limited(tree, command, int(limit * 1e9), out)}
                results.append(result)
                peak = result["peak_bytes"]
                print(f"limit {limit:g} GB, {name}: exit {result['returncode']}, {result['wall_s']:.1f} s, peak "
                      f"{'?' if peak is None else f'{peak / 1e9:.2f} GB'}: {result['said']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"command": command, "results": results}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
