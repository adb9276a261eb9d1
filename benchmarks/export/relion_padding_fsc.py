"""RELION maps at smaller padding factors: FSC per shell against the ground truth, and its change from f = 2.

Usage: ``python benchmarks/export/relion_padding_fsc.py [--boxes 48 64] [--factors 2 1.5 1.25] [--json FILE]``

For each box, a noise-free (80 particles) and a noisy (default SNR 0.05, 200 particles) synthetic dataset as in
``tests/test_export_relion.py`` (1 tomogram, 41 tilts ±60°, 4 Å/px, 448² px, ~3 µm defocus) is exported with the
CLI at each padding factor (a factor whose padded box M equals an earlier one's is not exported again), and
``relion_reconstruct --ctf`` (RELION 3.1) reconstructs each export. The FSC of each map against the ground truth
(after the sub-voxel alignment of the test) is compared per shell with the first factor's: the largest |ΔFSC| up to
Nyquist and up to the last shell before the first factor's FSC falls below 0.143 (shells 1..N/2; shell 0, the
mean of maps normalised to mean ~0, is left out).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from test_export_relion import _export, _relion_reconstruct, fsc_against_truth  # noqa: E402

from mspecies.synth.dataset import generate_dataset  # noqa: E402

THRESHOLD = 0.143


def padded_box_of(out: Path) -> int:
    """The padded box M the export recorded."""
    record = json.loads((out / "export_record.json").read_text())
    return int(next(iter(record["per_tilt_series"].values()))["padded_box_px"])


def last_shell_above(fsc: np.ndarray, threshold: float) -> int:
    """Last shell before the FSC first falls below ``threshold`` from shell 1 on (shell 0, the mean, is left out:
    both maps are normalised to mean ~0, so its FSC is arbitrary); the last shell when it never does."""
    below = np.flatnonzero(fsc[1:] < threshold) + 1
    return int(below[0] - 1 if below.size else fsc.size - 1)


def relion_test_dataset(folder: Path, box: int, noisy: bool) -> Path:
    """The synthetic dataset of ``tests/test_export_relion.py`` (1 tomogram, 41 tilts, 4 Å/px, 448² px):
    noise-free with 80 particles, or noisy (the default SNR) with 200 → its manifest."""
    snr = {} if noisy else {"snr": None}
    return generate_dataset(folder, seed=3, n_tomograms=1, n_particles=200 if noisy else 80, n_tilts=41, box_px=box,
                            pixel_size_angst=4.0, image_shape_yx=(448, 448), thickness_angst=600.0, **snr)


def measure(folder: Path, box: int, noisy: bool, factors: list[float], ctf_method: str = "direct"
            ) -> dict[str, object]:
    """FSC per shell of each factor's RELION map, and the largest |ΔFSC| against the first factor."""
    manifest = relion_test_dataset(folder / "data", box, noisy)
    curves: dict[int, np.ndarray] = {}
    boxes: dict[float, int] = {}
    for factor in factors:
        out = folder / f"f{factor:g}"
        _export(out, ["--manifest", str(manifest)], "--box", str(box), "--padding-factor", f"{factor:g}",
                "--ctf-method", ctf_method)
        boxes[factor] = padded_box_of(out)
        if boxes[factor] not in curves:
            curves[boxes[factor]] = fsc_against_truth(_relion_reconstruct(out))
    reference = curves[boxes[factors[0]]]
    limit = last_shell_above(reference, THRESHOLD)
    rows = []
    for factor in factors:
        delta = np.abs(curves[boxes[factor]] - reference)[1:]  # shells 1..N/2
        worst = int(np.argmax(delta)) + 1
        rows.append({"factor": factor, "padded_box_px": boxes[factor], "max_abs_delta_fsc": float(delta.max()),
                     "max_abs_delta_fsc_to_0143": float(delta[:limit].max()) if limit >= 1 else 0.0,
                     "worst_shell": worst, "fsc_at_worst_shell": float(curves[boxes[factor]][worst]),
                     "first_factor_fsc_at_worst_shell": float(reference[worst]),
                     "fsc": curves[boxes[factor]].round(4).tolist()})
    return {"box": box, "noisy": noisy, "ctf_method": ctf_method, "shell_0143_of_first_factor": limit,
            "factors": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boxes", type=int, nargs="+", default=[48, 64])
    parser.add_argument("--factors", type=float, nargs="+", default=[2.0, 1.5, 1.25])
    parser.add_argument("--ctf-method", choices=("direct", "padded"), default="direct",
                        help="the exports' 3D CTF (default: direct, the export's default)")
    parser.add_argument("--datasets", choices=("noise-free", "noisy"), nargs="+", default=["noise-free", "noisy"])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()
    results = []
    for box in args.boxes:
        for noisy in [dataset == "noisy" for dataset in args.datasets]:
            with tempfile.TemporaryDirectory() as folder:
                result = measure(Path(folder), box, noisy, args.factors, args.ctf_method)
            results.append(result)
            for row in result["factors"]:
                print(f"box {box}, {'noisy' if noisy else 'noise-free'}, factor {row['factor']:g} (M "
                      f"{row['padded_box_px']}): max |ΔFSC| vs factor {args.factors[0]:g} "
                      f"{row['max_abs_delta_fsc']:.4f} up to Nyquist (shell {row['worst_shell']}: "
                      f"{row['fsc_at_worst_shell']:.3f} vs {row['first_factor_fsc_at_worst_shell']:.3f}), "
                      f"{row['max_abs_delta_fsc_to_0143']:.4f} up to shell {result['shell_0143_of_first_factor']} "
                      "(FSC ≥ 0.143)", flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
