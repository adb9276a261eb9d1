"""``python -m mspecies export``: sub-tomograms + 3D CTFs (or image series) from raw tilt series.

Three ways to give the input (no Scipion needed):

1. ``--manifest manifest.json [--ts-id TS_01]``: the synthetic dataset of ``python -m mspecies synth``
   (ground-truth geometry; all tilt series unless ``--ts-id``).
2. ``--geometry ts.json --particles particles.star``: one tilt series described by a JSON file (this is what
   the Scipion protocol writes, one per tilt series). Schema (units in the names; arrays in stack order)::

       {
         "ts_id": "TS_01",                      # tomogram name, matched against rlnTomoName / rlnMicrographName
         "stack_path": "TS_01/TS_01.mrc",       # raw (non-aligned) stack; relative to the JSON file's folder
         "pixel_size_angst": 4.0,
         "image_shape_yx": [512, 512],
         "tilt_angles_deg": [...],              # T values
         "xf": [[[A11, A12, DX], [A21, A22, DY]], ...],   # IMOD .xf per image: aligned = A raw + d (centred px)
         "defocus_u_angst": [...], "defocus_v_angst": [...], "defocus_angle_deg": [...],
         "phase_shift_deg": [...],              # optional, default 0
         "dose_e_per_angst2": [...],            # accumulated dose INCLUDING the tilt (Scipion getAccumDose)
         "acquisition_order": [...],            # optional 0-based ranks, default: by dose
         "excluded": [...],                     # optional booleans, default all false
         "voltage_kv": 300.0, "cs_mm": 2.7, "amplitude_contrast": 0.07,
         "tomogram_shape_xyz_px": [512, 512, 250]   # unbinned tomogram at pixel_size_angst
       }

3. IMOD-style files: ``--stack --tlt --xf --defocus (IMOD .defocus) --dose (two columns: prior dose, own dose)
   --particles --pixel-size --voltage --cs --amplitude-contrast --tomo-shape X Y Z [--ts-id]``.

Particles STAR: any dialect of :func:`mspecies.formats.star_dialects.read_particle_star` (RELION 3.0/3.1/4/5, Warp,
M); corner-based coordinates are in pixels at the file's pixel size, else ``--coord-pixel-size-angst`` (default: the
tilt-series pixel size), origins subtracted, angles 0 if absent. Rows belong to the tilt series whose name equals the
tomogram name, or its normalised form (``/a/TS_01.mrc`` → ``TS_01``).

Writes the MRCs and ``particles.star`` (RELION 3.1 with optics; ``--star-flavour 3.0`` for M's style) into
``--out``; logs per tilt series the particles done, particles/s, padded box, backend and memory plan.
Bad input: exit code 2 and a message naming the parameter or file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from mspecies.common.types import InputError, Microscope, ParticlePoses, TiltSeriesData

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Declare ``export`` and its options (they mirror :class:`~mspecies.core.reconstruct.ExportOptions`)."""
    parser = subparsers.add_parser("export", help="reconstruct sub-tomograms + 3D CTFs from raw tilt series")
    source = parser.add_argument_group("input")
    source.add_argument("--manifest", help="synthetic dataset manifest.json")
    source.add_argument("--geometry", help="tilt-series geometry JSON (schema in the module docstring)")
    source.add_argument("--ts-id", help="tilt series to export (manifest: default all; IMOD files: its name)")
    source.add_argument("--stack", help="raw tilt stack (MRC)")
    source.add_argument("--tlt", help="IMOD .tlt tilt angles")
    source.add_argument("--xf", help="IMOD .xf alignment")
    source.add_argument("--defocus", help="IMOD .defocus file")
    source.add_argument("--dose", help="dose text file: prior dose and own dose per tilt (e/A^2)")
    source.add_argument("--particles", help="particles STAR file")
    source.add_argument("--pixel-size", type=float, help="tilt-series pixel size (A)")
    source.add_argument("--coord-pixel-size-angst", type=float,
                        help="pixel size of rlnCoordinate* (A; default: tilt-series pixel)")
    source.add_argument("--voltage", type=float, default=300.0, help="kV")
    source.add_argument("--cs", type=float, default=2.7, help="mm")
    source.add_argument("--amplitude-contrast", type=float, default=0.07)
    source.add_argument("--tomo-shape", type=int, nargs=3, metavar=("X", "Y", "Z"),
                        help="unbinned tomogram size in px at the tilt-series pixel size")
    options = parser.add_argument_group("export options")
    options.add_argument("--out", required=True, help="output folder (created)")
    options.add_argument("--pixel-size-out", type=float, help="output pixel size (A; default: tilt series)")
    options.add_argument("--box", type=int, required=True, help="output box (px, even)")
    options.add_argument("--diameter", type=float, required=True, help="particle diameter (A)")
    options.add_argument("--mode", choices=("volumes", "series"), default="volumes")
    options.add_argument("--shift", type=float, nargs=3, default=(0.0, 0.0, 0.0), metavar=("X", "Y", "Z"),
                         help="shift in the reference frame (A)")
    options.add_argument("--prerotate", action="store_true")
    options.add_argument("--n-tilts-by-dose", type=int, help="keep only the first N tilts by dose")
    options.add_argument("--no-invert", action="store_true", help="do not invert the contrast")
    options.add_argument("--no-normalize-input", action="store_true")
    options.add_argument("--no-normalize-output", action="store_true")
    options.add_argument("--sparse-ctf", action="store_true")
    options.add_argument("--ctf-layout", choices=("half", "centred"), default="half")
    options.add_argument("--ctf-method", choices=("direct", "padded"), default="direct",
                         help="3D CTF on the output grid (direct, fast) or M's padded reconstruction + crop (padded)")
    options.add_argument("--defocus-gradient-sign", type=int, choices=(-1, 1), default=-1)
    options.add_argument("--no-ctf", action="store_true", help="diagnostic: C_u = C_w = 1 (no CTF or dose weighting)")
    options.add_argument("--backend", choices=("auto", "numpy", "cupy"), default="auto")
    options.add_argument("--memory-gb", type=float, help="memory budget (GB; default 25%% of the available memory)")
    options.add_argument("--max-batch", type=int, default=16)
    options.add_argument("--star-flavour", choices=("3.1", "3.0"), default="3.1")


# ----------------------------------------------------------------------------------------------- inputs


def _require(args: argparse.Namespace, names: list[str], context: str) -> None:
    missing = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is None]
    if missing:
        raise InputError(f"{context}: missing {', '.join(missing)}")


def _load_manifest_inputs(args: argparse.Namespace) -> list[tuple[TiltSeriesData, ParticlePoses, tuple[int, ...]]]:
    from mspecies.synth.dataset import load_manifest, manifest_particles, manifest_tilt_series

    manifest = load_manifest(args.manifest)
    all_particles = manifest_particles(manifest)
    ids = [entry["ts_id"] for entry in manifest["tilt_series"]]  # type: ignore[union-attr]
    if args.ts_id is not None:
        if args.ts_id not in ids:
            raise InputError(f"--ts-id: {args.ts_id!r} not in {args.manifest} (has {ids})")
        ids = [args.ts_id]
    entries = {entry["ts_id"]: entry for entry in manifest["tilt_series"]}  # type: ignore[union-attr]
    inputs = []
    for ts_id in ids:
        nz, ny, nx = entries[ts_id]["unbinned_tomogram_shape_zyx"]
        inputs.append((manifest_tilt_series(manifest, ts_id), all_particles.subset(all_particles.tomo_names == ts_id),
                       (nx, ny, nz)))
    return inputs


def tilt_series_from_geometry(path: str | Path) -> tuple[TiltSeriesData, tuple[int, int, int]]:
    """Read a geometry JSON (schema in the module docstring) → (tilt series, tomogram shape (x, y, z) px)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--geometry: {path} not found")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"--geometry: {path} is not valid JSON ({error})") from error
    required = ("ts_id", "stack_path", "pixel_size_angst", "image_shape_yx", "tilt_angles_deg", "xf", "defocus_u_angst",
                "defocus_v_angst", "defocus_angle_deg", "dose_e_per_angst2", "voltage_kv", "cs_mm",
                "amplitude_contrast", "tomogram_shape_xyz_px")
    missing = [key for key in required if key not in data]
    if missing:
        raise InputError(f"--geometry: {path} lacks {missing}")
    n = len(data["tilt_angles_deg"])
    dose = np.asarray(data["dose_e_per_angst2"], dtype=np.float64)
    order = data.get("acquisition_order")
    if order is None:
        order = np.argsort(np.argsort(dose, kind="stable"), kind="stable")
    stack = Path(data["stack_path"])
    stack = stack if stack.is_absolute() else path.parent / stack
    tilt_series = TiltSeriesData(
        ts_id=str(data["ts_id"]), pixel_size_angst=float(data["pixel_size_angst"]),
        image_shape_yx=tuple(data["image_shape_yx"]), tilt_angles_deg=data["tilt_angles_deg"], xf=data["xf"],
        defocus_u_angst=data["defocus_u_angst"], defocus_v_angst=data["defocus_v_angst"],
        defocus_angle_deg=data["defocus_angle_deg"], dose_e_per_angst2=dose, acquisition_order=order,
        excluded=data.get("excluded", [False] * n),
        microscope=Microscope(float(data["voltage_kv"]), float(data["cs_mm"]), float(data["amplitude_contrast"])),
        stack_path=str(stack), phase_shift_deg=data.get("phase_shift_deg"))
    shape = tuple(int(v) for v in data["tomogram_shape_xyz_px"])
    if len(shape) != 3:
        raise InputError(f"--geometry: tomogram_shape_xyz_px must have 3 values, got {shape}")
    return tilt_series, shape  # type: ignore[return-value]


def _tilt_series_from_imod(args: argparse.Namespace) -> TiltSeriesData:
    from mspecies.formats import imod
    from mspecies.formats.mrc import read_mrc

    _require(args, ["stack", "tlt", "xf", "defocus", "dose", "pixel_size", "tomo_shape"], "IMOD-style input")
    angles = imod.read_tlt(args.tlt)
    xf = imod.read_xf(args.xf)
    defocus = imod.read_imod_defocus(args.defocus)
    dose = imod.read_dose_txt(args.dose)
    stack, _ = read_mrc(args.stack, mmap=True)
    n = angles.size
    for name, values in (("--xf", xf), ("--defocus", defocus["defocus_u_angst"]),
                         ("--dose", dose["pre_exposure_e_per_angst2"])):
        if len(values) != n:
            raise InputError(f"{name}: {len(values)} entries but --tlt has {n} tilt angles")
    if stack.ndim != 3 or stack.shape[0] != n:
        raise InputError(f"--stack: {args.stack} has shape {stack.shape}, expected {n} images")
    order = np.argsort(np.argsort(dose["pre_exposure_e_per_angst2"], kind="stable"), kind="stable")
    ts_id = args.ts_id or Path(args.stack).stem
    return TiltSeriesData(
        ts_id=ts_id, pixel_size_angst=args.pixel_size, image_shape_yx=stack.shape[1:], tilt_angles_deg=angles, xf=xf,
        defocus_u_angst=defocus["defocus_u_angst"], defocus_v_angst=defocus["defocus_v_angst"],
        defocus_angle_deg=defocus["defocus_angle_deg"], dose_e_per_angst2=dose["accumulated_dose_e_per_angst2"],
        acquisition_order=order, excluded=np.zeros(n, dtype=bool),
        microscope=Microscope(args.voltage, args.cs, args.amplitude_contrast), stack_path=str(args.stack),
        phase_shift_deg=defocus["phase_shift_deg"])


def read_particles_star(path: str | Path, ts_id: str, tomogram_shape_xyz_px: tuple[int, int, int],
                        data_pixel_angst: float, coords_pixel_angst: float | None) -> ParticlePoses:
    """Particles of one tomogram from a particle STAR of any RELION/Warp/M dialect → centred Å poses.

    Parameters
    ----------
    tomogram_shape_xyz_px
        Unbinned tomogram size at ``data_pixel_angst`` (rescaled to the coordinate grid for corner-based dialects).
    coords_pixel_angst
        Å/px of ``rlnCoordinate*`` when the file does not say (default: the tilt-series pixel size).
    """
    from mspecies.formats.star_dialects import read_particle_star
    from mspecies.formats.tomo_names import normalise_tomo_name

    if not Path(path).is_file():
        raise InputError(f"--particles: {path} not found")
    pixel = coords_pixel_angst or data_pixel_angst
    shape = tuple(int(round(n * data_pixel_angst / pixel)) for n in tomogram_shape_xyz_px)
    poses = read_particle_star(path, coord_pixel_size_angst=pixel, tomo_shape_px=shape).poses
    names = np.array([normalise_tomo_name(str(name)) for name in poses.tomo_names], dtype=object)
    mine = (poses.tomo_names.astype(str) == ts_id) | (names == normalise_tomo_name(ts_id))
    if not np.any(mine):
        raise InputError(f"--particles: no particle of {path} belongs to tomogram {ts_id!r} "
                         f"(names found: {sorted(set(poses.tomo_names.astype(str)))[:5]})")
    selected = poses.subset(mine)
    return ParticlePoses(selected.positions_angst, selected.euler_zyz_deg,
                         np.array([ts_id] * len(selected), dtype=object))


def load_inputs(args: argparse.Namespace) -> list[tuple[TiltSeriesData, ParticlePoses, tuple[int, ...]]]:
    """(tilt series, its particles, tomogram shape xyz) for every tilt series to export."""
    if args.manifest:
        return _load_manifest_inputs(args)
    _require(args, ["particles"], "--geometry / IMOD-style input")
    if args.geometry:
        tilt_series, shape = tilt_series_from_geometry(args.geometry)
    else:
        tilt_series, shape = _tilt_series_from_imod(args), tuple(args.tomo_shape)
    particles = read_particles_star(args.particles, tilt_series.ts_id, shape, tilt_series.pixel_size_angst,
                                    args.coord_pixel_size_angst)
    return [(tilt_series, particles, shape)]


def export_options(args: argparse.Namespace, data_pixel_angst: float):  # noqa: ANN201 (lazy import)
    """:class:`~mspecies.core.reconstruct.ExportOptions` from the command line."""
    from mspecies.core.reconstruct import ExportOptions

    return ExportOptions(
        output_pixel_size_angst=args.pixel_size_out or data_pixel_angst, box_px=args.box,
        particle_diameter_angst=args.diameter, mode=args.mode, shift_angst=tuple(args.shift),
        prerotate=args.prerotate or args.mode == "series", n_tilts_by_dose=args.n_tilts_by_dose,
        invert_contrast=not args.no_invert, normalize_input=not args.no_normalize_input,
        normalize_output=not args.no_normalize_output, sparse_ctf=args.sparse_ctf, ctf_layout=args.ctf_layout,
        ctf_method=args.ctf_method,
        defocus_gradient_sign=args.defocus_gradient_sign, apply_ctf=not args.no_ctf, backend=args.backend,
        memory_budget_bytes=None if args.memory_gb is None else int(args.memory_gb * 1e9), max_batch=args.max_batch)


# ----------------------------------------------------------------------------------------------- run


def run(args: argparse.Namespace) -> int:
    """Export every requested tilt series; write ``particles.star``. Returns the exit code."""
    from mspecies.cli.export_files import export_tilt_series
    from mspecies.core.memory import retain_freed_memory
    from mspecies.core.reconstruct import ReconstructionError
    from mspecies.formats.mrc import read_mrc
    from mspecies.formats.relion_subtomo import write_series_star, write_subtomo_star

    retain_freed_memory()  # this process is the worker: per-particle arrays reuse freed pages

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out: {out} is a file, expected a folder")
    inputs = load_inputs(args)
    out.mkdir(parents=True, exist_ok=True)
    tables, tilt_tables, first = [], [], 0
    options = None
    for tilt_series, particles, shape in inputs:
        options = export_options(args, tilt_series.pixel_size_angst)
        stack, _ = read_mrc(tilt_series.stack_path, mmap=True)
        try:
            rows, _ = export_tilt_series(tilt_series, stack, particles, options, out / tilt_series.ts_id,
                                         tomogram_shape_xyz_px=shape, star_dir=out, first_subset_index=first,
                                         log=lambda line: print(line, flush=True))
        except ReconstructionError as error:
            print(f"mspecies export: error: {error}", file=sys.stderr)
            return EXIT_FAILED
        tables.append(rows)
        if "tilts" in rows.attrs:
            tilt_tables.append(rows.attrs["tilts"])
        first += len(particles)
    particles_table = pd.concat(tables, ignore_index=True)
    optics = {"pixel_size_angst": options.output_pixel_size_angst, "box_px": options.box_px,
              "microscope": inputs[0][0].microscope}
    if args.mode == "series":
        star = write_series_star(out / "particles.star", particles_table.drop(columns=["rlnCtfImage"]),
                                 pd.concat(tilt_tables, ignore_index=True), **optics)
    else:
        star = write_subtomo_star(out / "particles.star", particles_table, flavour=args.star_flavour, **optics)
    print(f"wrote {len(particles_table)} particles: {star}")
    return EXIT_OK
