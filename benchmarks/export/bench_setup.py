"""Per-tilt-series geometry setup of the export engine: seconds, in a fresh process and warm.

Usage: ``python benchmarks/export/bench_setup.py [--boxes 64 128] [--rounds 5] [--trees /work/main .]``

The setup timed is :meth:`TiltSeriesEngine.create` given an already prepared stack (the stack preparation is
measured elsewhere): the sample grid and CTF tables, the shared insertion (splat entries, y-major CSR blocks,
normalisation scale), the direct 3D CTF's pair tables and slots, and the gridding correction. NumPy, default
options (direct 3D CTF, not pre-rotated), 41 tilts.

Every measurement runs in a new ``python`` (started with ``PYTHONPATH`` = one of ``--trees``, so that two
checkouts can be compared), which calls :func:`~mspecies.core.memory.retain_freed_memory` as the export worker
does, prepares the stack, then times the first ``create`` (fresh: first-touch page faults included) and the
fastest of ``--warm`` more (warm). Trees alternate within each round, so a loaded machine slows both alike;
the ratio of medians is printed per box.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(box_px: int, warm_repeats: int) -> dict[str, float]:
    """Time the geometry setup in this (fresh) process: first call and fastest warm call, seconds."""
    import numpy as np

    from mspecies.core.memory import retain_freed_memory
    from mspecies.core.reconstruct import ExportOptions, TiltSeriesEngine, prepare_engine_stack
    from mspecies.synth.dataset import SynthParameters, make_tilt_series

    retain_freed_memory()  # as the export worker does
    params = SynthParameters(box_px=box_px, image_shape_yx=(512, 512), n_tilts=41,
                             thickness_angst=max(1000.0, 1.25 * box_px * 4.0))  # a box fits the thickness
    rng = np.random.default_rng(0)
    tilt_series = make_tilt_series(params, "TS", rng)
    stack = rng.standard_normal((41, 512, 512), dtype=np.float32)
    options = ExportOptions(4.0, box_px, 0.6 * box_px * 4.0, workers=1)
    prepared = prepare_engine_stack(tilt_series, stack, options)
    times = []
    for _ in range(1 + warm_repeats):
        start = time.perf_counter()
        engine = TiltSeriesEngine.create(tilt_series, None, options, prepared=prepared)
        times.append(time.perf_counter() - start)
        del engine
    return {"fresh_s": times[0], "warm_s": min(times[1:]) if warm_repeats else float("nan")}


def measure(tree: str, box_px: int, warm_repeats: int) -> dict[str, float]:
    """One measurement in a new interpreter importing ``mspecies`` from ``tree``."""
    env = dict(os.environ, PYTHONPATH=str(Path(tree).resolve()), OMP_NUM_THREADS="1")
    output = subprocess.run([sys.executable, __file__, "--child", str(box_px), "--warm", str(warm_repeats)],
                            env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm", type=int, default=3, help="warm repeats after the first call")
    parser.add_argument("--trees", nargs="+", default=["."], help="source trees to compare (PYTHONPATH)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.warm)))
        return
    results: dict[tuple[int, str], list[dict[str, float]]] = {}
    for _ in range(args.rounds):
        for box in args.boxes:
            for tree in args.trees:
                results.setdefault((box, tree), []).append(measure(tree, box, args.warm))
    for box in args.boxes:
        medians = {}
        for tree in args.trees:
            runs = results[(box, tree)]
            medians[tree] = {key: statistics.median(run[key] for run in runs) for key in ("fresh_s", "warm_s")}
            print(f"box {box} {tree}: fresh {medians[tree]['fresh_s']:.3f} s, warm {medians[tree]['warm_s']:.3f} s "
                  f"(median of {len(runs)})")
        first = args.trees[0]
        for tree in args.trees[1:]:
            print(f"box {box} {first} / {tree}: fresh {medians[first]['fresh_s'] / medians[tree]['fresh_s']:.2f}x, "
                  f"warm {medians[first]['warm_s'] / medians[tree]['warm_s']:.2f}x")


if __name__ == "__main__":
    main()
