"""Standalone export input: one tilt series and its particles from the files users hold.

Every value read from a file is logged with its source; a flag overrides a file, with a warning when it
disagrees; values no file gives fall back to a logged default or stop the run with a message naming the flag.
Which file wins when several hold a value (first listed wins, the others are compared with it):

* tilt angles: ``--tlt``, ``--aln`` (TILT), ``--mdoc`` (TiltAngle);
* alignment: ``--xf`` or ``--aln`` (one of them);
* defocus: ``--ctf`` (CTFFIND 4/5) or ``--defocus`` (IMOD); phase shift from the same file;
* dose: ``--dose`` (layout told apart by :mod:`mspecies.formats.dose`, ``--dose-layout`` to say), ``--mdoc``;
* acquisition order: ``--mdoc`` (DateTime), else the rank of the dose;
* pixel size: ``--pixel-size``, the stack's MRC header (0 or 1.0 = unset), ``--mdoc``, the CTFFIND header;
* voltage: ``--voltage``, ``--mdoc``, the CTFFIND header, 300 kV; Cs and amplitude contrast: the flag, the
  CTFFIND header, 2.7 mm and 0.07;
* tomogram size: ``--tomo-shape`` (unbinned px at the tilt-series pixel), else ``--tomogram``'s header size ×
  its pixel size / the tilt-series pixel size;
* excluded views: those the ``.aln`` lists without a global row.

Particles: a STAR file of any dialect (``read_particle_star``; coordinate pixel size from the file, else
``--coord-pixel-size-angst``, else the ``--tomogram``'s pixel, else the tilt series') or a text list ``x y z [rot tilt
psi]`` in pixels from the tomogram corner (pixel size ``--coord-pixel-size-angst``, else the ``--tomogram``'s, else the
tilt series').
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mspecies.common.types import InputError, Microscope, ParticlePoses, TiltSeriesData
from mspecies.formats import validate

TILT_AGREEMENT_DEG = 0.5
DOSE_AGREEMENT = 0.05  # e⁻/Å²
SCALAR_RTOL = 1e-3
UNSET_MRC_PIXELS = (0.0, 1.0)
FILE_FLAGS = ("stack", "mdoc", "tlt", "xf", "aln", "ctf", "defocus", "dose", "tomogram")


def _print(line: str) -> None:
    print(line, flush=True)


def _warn(line: str) -> None:
    print(f"mspecies export: warning: {line}", file=sys.stderr, flush=True)


@dataclass
class SourceLog:
    """Logs each value with its source; warnings where a flag or a file disagrees with another file."""

    info: Callable[[str], None] = _print
    warn: Callable[[str], None] = _warn

    def scalar(self, name: str, unit: str, flag: str, flag_value: float | None,
               found: Sequence[tuple[float | None, str]], default: float | None = None) -> float:
        """The flag's value, else the first file's, else ``default`` (InputError when None); logged."""
        present = [(float(value), source) for value, source in found if value is not None]
        unit = f" {unit}" if unit else ""
        if flag_value is not None:
            for value, source in present:
                if not np.isclose(value, flag_value, rtol=SCALAR_RTOL):
                    self.warn(f"{flag} {flag_value:g}{unit} disagrees with {source} ({value:g}{unit}); using {flag}")
            self.info(f"{name}: {flag_value:g}{unit} (from {flag})")
            return float(flag_value)
        if present:
            value, source = present[0]
            for other, other_source in present[1:]:
                if not np.isclose(other, value, rtol=SCALAR_RTOL):
                    self.warn(f"{name}: {source} gives {value:g}{unit}, {other_source} gives {other:g}{unit}; "
                              f"using {source} ({flag} to choose)")
            self.info(f"{name}: {value:g}{unit} (from {source})")
            return value
        if default is None:
            raise InputError(f"{flag}: no file gives the {name}; pass {flag}")
        self.info(f"{name}: {default:g}{unit} (default: no file gives it; {flag} to set)")
        return float(default)

    def per_tilt(self, name: str, unit: str, found: Sequence[tuple[np.ndarray | None, str]], tolerance: float,
                 missing: str) -> np.ndarray:
        """(T,) values of the first source; NaN entries filled from the next; others compared; logged."""
        present = [(np.asarray(values, dtype=np.float64), source) for values, source in found if values is not None]
        if not present:
            raise InputError(missing)
        values, source = present[0][0].copy(), present[0][1]
        for other, other_source in present[1:]:
            known = np.isfinite(values) & np.isfinite(other)
            if np.any(known) and np.max(np.abs(values[known] - other[known])) > tolerance:
                worst = int(np.flatnonzero(known)[np.argmax(np.abs(values[known] - other[known]))])
                self.warn(f"{name}: {source} and {other_source} differ by up to "
                          f"{abs(values[worst] - other[worst]):.3g} {unit} (image {worst + 1}: {values[worst]:g} vs "
                          f"{other[worst]:g}); using {source}")
            fill = ~np.isfinite(values) & np.isfinite(other)
            if np.any(fill):
                values[fill] = other[fill]
                self.info(f"{name}: {int(fill.sum())} value(s) of views {source} does not list taken from "
                          f"{other_source}")
        if not np.all(np.isfinite(values)):
            raise InputError(f"{source}: no {name} for image(s) {(np.flatnonzero(~np.isfinite(values)) + 1).tolist()}"
                             f" and no other file gives them")
        self.info(f"{name}: {values.size} values (from {source})")
        return values


@dataclass(frozen=True)
class FileInputs:
    """What the files give besides the tilt series: the unbinned tomogram size and the tomogram's pixel size."""

    tomogram_shape_xyz_px: tuple[int, int, int]
    tomogram_pixel_angst: float | None


def _count(values: np.ndarray | None, n: int, what: str, source: str) -> None:
    if values is not None:
        validate.check_one_per_tilt(len(values), n, what, source, "--stack")


def _stack_header(args: argparse.Namespace) -> tuple[tuple[int, int, int], float | None]:
    """((T, ny, nx), header pixel size or None when unset) of ``--stack``."""
    from mspecies.formats.mrc import read_mrc

    stack, pixel = read_mrc(args.stack, mmap=True)
    if stack.ndim != 3:
        raise InputError(f"--stack: {args.stack} has shape {stack.shape}; expected a stack of tilt images")
    return tuple(int(v) for v in stack.shape), (None if pixel in UNSET_MRC_PIXELS else pixel)  # type: ignore[return-value]


def _alignment(args: argparse.Namespace, n: int, image_yx: tuple[int, int], log: SourceLog):
    """(xf, tilt angles or None, excluded, source) from ``--xf`` or ``--aln``."""
    from mspecies.formats import aretomo, imod

    if (args.xf is None) == (args.aln is None):
        raise InputError("--xf / --aln: give the alignment as an IMOD .xf or an AreTomo .aln (one of them)")
    if args.xf is not None:
        xf = imod.read_xf(args.xf)
        _count(xf, n, "transform", f"--xf {args.xf}")
        log.info(f"alignment: {n} transforms (from --xf {args.xf})")
        return xf, None, np.zeros(n, dtype=bool)
    aln = aretomo.read_aln(args.aln)
    validate.check_one_per_tilt(aln.n_tilts, n, "view", f"--aln {args.aln}", "--stack")
    if aln.raw_size_xyz is not None and tuple(aln.raw_size_xyz[:2]) != (image_yx[1], image_yx[0]):
        raise InputError(f"--aln {args.aln}: RawSize {aln.raw_size_xyz[0]} × {aln.raw_size_xyz[1]} differs from the "
                         f"stack's {image_yx[1]} × {image_yx[0]} (the .aln must describe this raw stack)")
    log.info(f"alignment: {n} views, {int(aln.excluded.sum())} excluded (from --aln {args.aln}, "
             f"{'0' if aln.zero_based else '1'}-based sections)")
    return aln.xf, aln.tilt_angles_deg, aln.excluded


def _says_ctffind(path: str | Path) -> bool:
    """Whether the first line of ``path`` is CTFFIND's ``# Output from CTFFIND ...`` header."""
    with contextlib.suppress(OSError), open(path, encoding="utf-8", errors="replace") as handle:
        return "ctffind" in handle.readline().lower()
    return False


def _defocus(args: argparse.Namespace, n: int, log: SourceLog):
    """(u, v, angle, phase shift deg, CTFFIND fit or None) from ``--ctf`` or ``--defocus``."""
    from mspecies.formats import ctffind, imod

    if (args.ctf is None) == (args.defocus is None):
        raise InputError("--ctf / --defocus: give the defocus as CTFFIND output or an IMOD .defocus (one of them)")
    if args.defocus is not None and _says_ctffind(args.defocus):
        raise InputError(f"--defocus {args.defocus} is CTFFIND output (its first line says so), not an IMOD "
                         f".defocus; pass it as --ctf {args.defocus}")
    if args.ctf is not None:
        try:
            fit = ctffind.read_ctffind(args.ctf)
        except InputError as error:
            if _says_ctffind(args.ctf) or "not a text file" in str(error):
                raise
            raise InputError(f"--ctf {args.ctf} is not CTFFIND output (no '# Output from CTFFIND' header line; an "
                             f"IMOD .defocus goes to --defocus): {error}") from error
        _count(fit.defocus_u_angst, n, "defocus", f"--ctf {args.ctf}")
        log.info(f"defocus: {n} tilts, {fit.defocus_u_angst.min():.0f}–{fit.defocus_u_angst.max():.0f} Å "
                 f"(from --ctf {args.ctf})")
        return fit.defocus_u_angst, fit.defocus_v_angst, fit.defocus_angle_deg, fit.phase_shift_deg, fit
    values = imod.read_imod_defocus(args.defocus)
    _count(values["defocus_u_angst"], n, "defocus", f"--defocus {args.defocus}")
    log.info(f"defocus: {n} tilts, {values['defocus_u_angst'].min():.0f}–{values['defocus_u_angst'].max():.0f} Å "
             f"(from --defocus {args.defocus}, nm in the file)")
    return (values["defocus_u_angst"], values["defocus_v_angst"], values["defocus_angle_deg"],
            values["phase_shift_deg"], None)


def _dose_and_order(args: argparse.Namespace, n: int, mdoc: dict | None, angles: np.ndarray, angle_source: str,
                    log: SourceLog) -> tuple[np.ndarray, np.ndarray]:
    """(accumulated dose including each tilt, 0-based acquisition order), each logged with its source."""
    from mspecies.formats.dose import read_dose_list

    order = None if mdoc is None else np.asarray(mdoc["acquisition_order"])
    order_source = "" if mdoc is None else str(mdoc["order_source"])
    mdoc_dose = None if mdoc is None else mdoc["accumulated_dose_e_per_angst2"]
    if args.dose is not None:
        dose = read_dose_list(args.dose, args.dose_layout, tilt_angles_deg=angles, tilt_source=angle_source,
                              acquisition_order=order, order_source=order_source)
        _count(dose.accumulated_e_per_angst2, n, "dose", f"--dose {args.dose}")
        log.info(f"dose: read --dose {args.dose} as {dose.layout} ({dose.reason})")
        found = [(dose.accumulated_e_per_angst2, f"--dose {args.dose}"), (mdoc_dose, f"--mdoc {args.mdoc}")]
    else:
        found = [(mdoc_dose, str(mdoc["dose_source"]) if mdoc else "--mdoc")]
    accumulated = log.per_tilt("accumulated dose", "e/A^2", found, DOSE_AGREEMENT,
                               "--dose / --mdoc: no dose: pass --dose FILE or an --mdoc with ExposureDose")
    if order is None:
        order = np.argsort(np.argsort(accumulated, kind="stable"), kind="stable")
        log.info("acquisition order: by accumulated dose (no --mdoc)")
        odd = validate.dose_not_growing_outward(angles, accumulated)
        if odd:
            log.warn(f"accumulated dose does not grow away from the first-acquired tilt on each side at image(s) "
                     f"{[i + 1 for i in odd][:10]} (1-based, stack order; tilt angles from {angle_source}), as no "
                     "usual acquisition scheme gives: are the dose rows in stack order? --mdoc checks the dose "
                     "against the acquisition order")
    elif order_source.endswith("section order"):
        log.warn(f"acquisition order: {args.mdoc} has neither DateTime nor PriorRecordDose; taken as its section "
                 "order (ZValue), which is wrong for a stack sorted by tilt angle (the dose is summed in this order)")
    else:
        log.info(f"acquisition order: from {order_source}")
    return accumulated, order


def _tomogram_header(args: argparse.Namespace, pixel_angst: float, log: SourceLog
                     ) -> tuple[tuple[int, int, int] | None, float | None]:
    """(unbinned size (x, y, z) at the tilt-series pixel, tomogram pixel Å) from ``--tomogram``'s header, or Nones."""
    from mspecies.formats.mrc import read_mrc

    if args.tomogram is None:
        return None, None
    volume, tomo_pixel = read_mrc(args.tomogram, mmap=True)
    if volume.ndim != 3:
        raise InputError(f"--tomogram: {args.tomogram} has shape {volume.shape}; expected a 3D tomogram")
    if tomo_pixel in UNSET_MRC_PIXELS:
        if args.tomo_shape is None:
            raise InputError(f"--tomogram: {args.tomogram} has no pixel size in its header ({tomo_pixel:g}); pass "
                             "--tomo-shape X Y Z (unbinned size at the tilt-series pixel) instead")
        log.warn(f"--tomogram {args.tomogram}: no pixel size in its header; size from --tomo-shape only")
        return None, None
    binning = tomo_pixel / pixel_angst
    if abs(binning - round(binning)) > 0.01 * binning:
        log.warn(f"--tomogram {args.tomogram}: pixel {tomo_pixel:g} Å is {binning:.3f}× the tilt-series pixel, "
                 "not a whole binning")
    shape = tuple(int(round(n * binning)) for n in volume.shape[::-1])
    log.info(f"tomogram: {volume.shape[2]} × {volume.shape[1]} × {volume.shape[0]} voxels of {tomo_pixel:g} Å "
             f"(binning {binning:g}) = {shape[0]} × {shape[1]} × {shape[2]} unbinned (from --tomogram "
             f"{args.tomogram})")
    return shape, tomo_pixel  # type: ignore[return-value]


def _tomogram_shape(args: argparse.Namespace, pixel_angst: float, log: SourceLog) -> FileInputs:
    """Unbinned tomogram size (x, y, z) at the tilt-series pixel: ``--tomo-shape``, else ``--tomogram``'s header."""
    from_header, tomo_pixel = _tomogram_header(args, pixel_angst, log)
    if args.tomo_shape is not None:
        shape = tuple(int(v) for v in args.tomo_shape)
        if from_header is not None and shape != from_header:
            log.warn(f"--tomo-shape {shape} disagrees with --tomogram {args.tomogram} ({from_header}); using "
                     "--tomo-shape")
        log.info(f"tomogram size: {shape[0]} × {shape[1]} × {shape[2]} unbinned px (from --tomo-shape)")
    elif from_header is not None:
        shape = from_header
    else:
        raise InputError("--tomogram / --tomo-shape: the tomogram size is needed (to place the particles and write "
                         "rlnCoordinate*); pass the binned tomogram (--tomogram FILE) or --tomo-shape X Y Z")
    if min(shape) < 1:
        raise InputError(f"--tomo-shape: tomogram size must be positive, got {shape}")
    return FileInputs(shape, tomo_pixel)  # type: ignore[arg-type]


def _tilt_angles(args: argparse.Namespace, n: int, aln_angles: np.ndarray | None, mdoc: dict | None,
                 log: SourceLog) -> tuple[np.ndarray, str]:
    from mspecies.formats import imod

    tlt = None if args.tlt is None else imod.read_tlt(args.tlt)
    _count(tlt, n, "tilt angle", f"--tlt {args.tlt}")
    found = [(tlt, f"--tlt {args.tlt}"), (aln_angles, f"--aln {args.aln}"),
             (None if mdoc is None else mdoc["tilt_angles_deg"], f"--mdoc {args.mdoc}")]
    source = next((s for v, s in found if v is not None), "")
    angles = log.per_tilt("tilt angles", "deg", found, TILT_AGREEMENT_DEG,
                          "--tlt / --aln / --mdoc: no tilt angles: pass one of them")
    return validate.check_tilt_angles_deg(angles, source), source


def _optics(args: argparse.Namespace, header_pixel: float | None, mdoc: dict | None, fit, log: SourceLog
            ) -> tuple[float, Microscope]:
    """(tilt-series pixel size Å, microscope): flags, else the stack header, mdoc and CTFFIND header, else defaults."""
    ctf = f"--ctf {args.ctf} header"
    pixel = log.scalar("pixel size", "A", "--pixel-size",
                       _checked(args.pixel_size, validate.check_pixel_size_angst, "--pixel-size"),
                       [(header_pixel, f"--stack {args.stack} header"),
                        (mdoc and mdoc["pixel_size_angst"], f"--mdoc {args.mdoc} PixelSpacing"),
                        (fit and fit.pixel_size_angst, ctf)])
    voltage = log.scalar("voltage", "kV", "--voltage", _checked(args.voltage, validate.check_voltage_kv, "--voltage"),
                         [(mdoc and mdoc["voltage_kv"], f"--mdoc {args.mdoc} Voltage"),
                          (fit and fit.voltage_kv, ctf)], default=300.0)
    cs = log.scalar("spherical aberration", "mm", "--cs", _checked(args.cs, validate.check_cs_mm, "--cs"),
                    [(fit and fit.cs_mm, ctf)], default=2.7)
    contrast = log.scalar("amplitude contrast", "", "--amplitude-contrast",
                          _checked(args.amplitude_contrast, validate.check_amplitude_contrast, "--amplitude-contrast"),
                          [(fit and fit.amplitude_contrast, ctf)], default=0.07)
    return pixel, Microscope(voltage, cs, contrast)


def _checked(value: float | None, check: Callable[[float, str], float], flag: str) -> float | None:
    return None if value is None else check(value, flag)


def tilt_series_from_files(args: argparse.Namespace, log: SourceLog | None = None
                           ) -> tuple[TiltSeriesData, FileInputs]:
    """Assemble the tilt series of ``--stack`` from the side files (module docstring), logging every value."""
    from mspecies.formats.serialem import read_mdoc_tilts

    log = log or SourceLog()
    if args.stack is None:
        raise InputError("--stack: the raw tilt stack (MRC) is needed")
    for flag in FILE_FLAGS:
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise InputError(f"--{flag}: {path} not found")
    shape, header_pixel = _stack_header(args)
    n, image_yx = shape[0], shape[1:]
    mdoc = None
    if args.mdoc is not None:
        mdoc = read_mdoc_tilts(args.mdoc)
        _count(mdoc["tilt_angles_deg"], n, "section", f"--mdoc {args.mdoc}")
    xf, aln_angles, excluded = _alignment(args, n, image_yx, log)
    angles, angle_source = _tilt_angles(args, n, aln_angles, mdoc, log)
    u, v, astig, phase, fit = _defocus(args, n, log)
    dose, order = _dose_and_order(args, n, mdoc, angles, angle_source, log)
    pixel, microscope = _optics(args, header_pixel, mdoc, fit, log)
    files = _tomogram_shape(args, pixel, log)
    ts_id = args.ts_id or Path(args.stack).stem
    log.info(f"tilt series: {ts_id} ({'--ts-id' if args.ts_id else 'the stack file name'}), {n} images of "
             f"{image_yx[1]} × {image_yx[0]} px")
    tilt_series = TiltSeriesData(
        ts_id=ts_id, pixel_size_angst=pixel, image_shape_yx=image_yx, tilt_angles_deg=angles, xf=xf,
        defocus_u_angst=u, defocus_v_angst=v, defocus_angle_deg=astig, dose_e_per_angst2=dose,
        acquisition_order=order, excluded=excluded, microscope=microscope, stack_path=str(args.stack),
        phase_shift_deg=phase)
    return tilt_series, files


# ----------------------------------------------------------------------------------------------- particles


def _is_star(path: Path) -> bool:
    """STAR by extension or by a ``data_`` block line in the first 200 lines."""
    if path.suffix.lower() == ".star":
        return True
    with open(path, encoding="utf-8", errors="replace") as handle:
        return any(line.lstrip().startswith("data_") for _, line in zip(range(200), handle, strict=False))


def _shape_at(shape_xyz: tuple[int, int, int], data_pixel: float, pixel: float) -> tuple[int, int, int]:
    return tuple(int(round(n * data_pixel / pixel)) for n in shape_xyz)  # type: ignore[return-value]


def _star_poses(path: Path, shape_xyz: tuple[int, int, int], data_pixel: float, flag_pixel: float | None,
                fallback: tuple[float, str], log: SourceLog) -> ParticlePoses:
    """Poses of a particle STAR; coordinate pixel: the file's, else ``--coord-pixel-size-angst``, else ``fallback``."""
    from mspecies.formats.star_dialects import read_particle_star

    guess = flag_pixel or fallback[0]
    try:
        table = read_particle_star(path, coord_pixel_size_angst=flag_pixel,
                                   tomo_shape_px=_shape_at(shape_xyz, data_pixel, guess))
        if not len(table.poses):
            return table.poses  # refused by the caller, naming --particles and the file
        found = None if table.coord_pixel_size_angst is None else float(table.coord_pixel_size_angst[0])
    except InputError:
        if flag_pixel is not None:
            raise
        # the file carries no coordinate pixel size (any other error recurs below)
        table = read_particle_star(path, coord_pixel_size_angst=fallback[0],
                                   tomo_shape_px=_shape_at(shape_xyz, data_pixel, fallback[0]))
        log.info(f"particles: coordinate pixel size {fallback[0]:g} A ({fallback[1]}; {path} gives none)")
        return table.poses
    if found is None:
        log.info(f"particles: dialect {table.dialect.value} coordinates are centred Å (no pixel size needed)")
    elif flag_pixel is not None:
        log.info(f"particles: coordinate pixel size {found:g} A (from --coord-pixel-size-angst, as in {path})")
    else:
        if not np.isclose(found, guess):
            table = read_particle_star(path, tomo_shape_px=_shape_at(shape_xyz, data_pixel, found))
        log.info(f"particles: coordinate pixel size {found:g} A (from {path}, dialect {table.dialect.value})")
    return table.poses


def _text_poses(path: Path, ts_id: str, shape_xyz: tuple[int, int, int], data_pixel: float,
                pixel: tuple[float, str], log: SourceLog) -> ParticlePoses:
    from mspecies.core.geometry import corner_px_to_centred_angst
    from mspecies.formats.coordinates import read_coordinates

    coords = read_coordinates(path)
    shape = _shape_at(shape_xyz, data_pixel, pixel[0])
    positions = corner_px_to_centred_angst(coords.coordinates_px, np.array(shape), pixel[0])
    log.info(f"particles: {len(positions)} from text list {path}, pixels of {pixel[0]:g} A ({pixel[1]}) from the "
             f"corner of a {shape[0]} × {shape[1]} × {shape[2]} tomogram, "
             f"{'with' if coords.has_angles else 'without (0, 0, 0)'} angles")
    return ParticlePoses(positions, coords.euler_zyz_deg, np.array([ts_id] * len(positions), dtype=object))


def read_particles(path: str | Path, ts_id: str, tomogram_shape_xyz_px: tuple[int, int, int], data_pixel_angst: float,
                   coords_pixel_angst: float | None, tomogram_pixel_angst: float | None = None,
                   log: SourceLog | None = None) -> ParticlePoses:
    """Particles of one tomogram from a particle STAR (any RELION/Warp/M dialect) or a text list → centred Å poses.

    Parameters
    ----------
    tomogram_shape_xyz_px
        Unbinned tomogram size at ``data_pixel_angst`` (rescaled to the coordinate grid).
    coords_pixel_angst
        ``--coord-pixel-size-angst``: Å/px of the coordinates (a STAR file's own value must agree).
    tomogram_pixel_angst
        The ``--tomogram``'s pixel size: the default coordinate pixel where the file gives none.
    """
    from mspecies.formats.tomo_names import normalise_tomo_name

    log = log or SourceLog()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--particles: {path} not found")
    fallback = (tomogram_pixel_angst, "the --tomogram's pixel size") if tomogram_pixel_angst else \
        (data_pixel_angst, "the tilt-series pixel size")
    if coords_pixel_angst is not None:
        validate.check_pixel_size_angst(coords_pixel_angst, "--coord-pixel-size-angst")
    try:
        if not _is_star(path):
            pixel = (coords_pixel_angst, "--coord-pixel-size-angst") if coords_pixel_angst else fallback
            return _text_poses(path, ts_id, tomogram_shape_xyz_px, data_pixel_angst, pixel, log)
        poses = _star_poses(path, tomogram_shape_xyz_px, data_pixel_angst, coords_pixel_angst, fallback, log)
    except InputError as error:
        if str(error).startswith("--particles"):
            raise
        named = "--particles" if str(path) in str(error) else f"--particles {path}"
        raise InputError(f"{named}: {error}") from error
    if not len(poses):
        raise InputError(f"--particles: {path} holds no particles")
    names = np.array([normalise_tomo_name(str(name)) for name in poses.tomo_names], dtype=object)
    mine = (poses.tomo_names.astype(str) == ts_id) | (names == normalise_tomo_name(ts_id))
    if not np.any(mine):  # as intersect matches names: ignoring case when nothing matches otherwise
        mine = np.array([name.lower() for name in names]) == normalise_tomo_name(ts_id).lower()
        if np.any(mine):
            log.info(f"particles: tomogram name(s) {sorted(set(poses.tomo_names[mine].astype(str)))[:5]} of {path} "
                     f"taken as {ts_id!r} (ignoring case)")
    if not np.any(mine):
        raise InputError(f"--particles: no particle of {path} belongs to tomogram {ts_id!r} "
                         f"(names found: {sorted(set(poses.tomo_names.astype(str)))[:5]}; --ts-id to name it)")
    selected = poses.subset(mine)
    log.info(f"particles: {len(selected)} of {len(poses)} in {path} belong to {ts_id}")
    return ParticlePoses(selected.positions_angst, selected.euler_zyz_deg,
                         np.array([ts_id] * len(selected), dtype=object))
