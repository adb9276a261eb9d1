"""RELION maps of an export by an earlier source tree and by this one: FSC per shell against the ground truth.

Usage: ``python benchmarks/export/relion_before_after_fsc.py --before SRC [--box 48] [--json FILE]``

Where an algorithm changes the values of the export (issue 17: the pre-rotated path's compiled kernels sum in
single precision, the tilt preparation band-passes in single precision), the RELION maps must stay within ±0.01
of FSC per shell. On the synthetic datasets of ``tests/test_export_relion.py`` (noise-free, 80 particles; noisy,
SNR 0.05, 200 particles) the export is run by ``SRC``'s ``mspecies`` (a checkout of the earlier commit, put on
``PYTHONPATH``) and by this tree's, plain and ``--prerotate``; ``relion_reconstruct --ctf`` (RELION 3.1)
reconstructs each; reported are the largest difference of the exported sub-tomograms and 3D CTFs, and the largest
|ΔFSC| against the ground truth over shells 1..N/2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from relion_padding_fsc import relion_test_dataset  # noqa: E402
from test_export_relion import _relion_reconstruct, fsc_against_truth  # noqa: E402

from mspecies.formats.mrc import read_mrc  # noqa: E402

THIS_TREE = Path(__file__).resolve().parents[2]


def export(source: Path, out: Path, manifest: Path, box: int, extra: list[str]) -> None:
    """``python -m mspecies export`` with ``source``'s package first on the path."""
    env = dict(os.environ, PYTHONPATH=str(source))
    command = [sys.executable, "-m", "mspecies", "export", "--manifest", str(manifest), "--out", str(out),
               "--box", str(box), "--diameter", "140", "--backend", "numpy", *extra]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=source)
    if run.returncode != 0:
        raise RuntimeError(f"export by {source} failed: {run.stdout}{run.stderr}")


def largest_difference(before: Path, after: Path) -> tuple[float, float]:
    """(largest |after − before| over every exported MRC, largest |before|)."""
    worst = scale = 0.0
    for path in sorted(before.rglob("*.mrc")):
        if path.name == "rec.mrc":
            continue
        old, _ = read_mrc(path)
        new, _ = read_mrc(after / path.relative_to(before))
        worst, scale = max(worst, float(np.abs(new - old).max())), max(scale, float(np.abs(old).max()))
    return worst, scale


def measure(folder: Path, before_tree: Path, box: int, noisy: bool, extra: list[str]) -> dict[str, object]:
    data = folder / ("noisy" if noisy else "noise-free")
    manifest = data / "manifest.json"
    if not manifest.exists():
        manifest = relion_test_dataset(data, box, noisy)
    name = "-".join(flag.strip("-") for flag in extra) or "default"
    outs = {}
    for label, tree in (("before", before_tree), ("after", THIS_TREE)):
        outs[label] = folder / f"{data.name}_{name}_{label}"
        export(tree, outs[label], manifest, box, extra)
    difference, scale = largest_difference(outs["before"], outs["after"])
    curves = {label: fsc_against_truth(_relion_reconstruct(out)) for label, out in outs.items()}
    delta = np.abs(curves["after"] - curves["before"])[1:]
    return {"dataset": data.name, "options": name, "largest_value_difference": difference, "largest_value": scale,
            "max_abs_delta_fsc": float(delta.max()), "worst_shell": int(np.argmax(delta)) + 1,
            "fsc_before": curves["before"].round(4).tolist(), "fsc_after": curves["after"].round(4).tolist()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="source tree of the earlier commit")
    parser.add_argument("--box", type=int, default=48)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for noisy in (False, True):
            for extra in ([], ["--prerotate"]):
                row = measure(Path(folder), args.before.resolve(), args.box, noisy, extra)
                rows.append(row)
                print(f"{row['dataset']}, {row['options']}: exported values differ by ≤ "
                      f"{row['largest_value_difference']:.2g} (values up to {row['largest_value']:.3g}); "
                      f"RELION FSC against the truth: max |ΔFSC| {row['max_abs_delta_fsc']:.2g} "
                      f"(shell {row['worst_shell']} of {args.box // 2})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
