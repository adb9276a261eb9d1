"""The export command end to end against the in-memory engine, in the same run.

Usage: ``python benchmarks/export/bench_cli.py [--n-tomograms 2] [--particles 96] [--box 64] [--rounds 3]
[--before SRC] [--serial-too] [--prepared-too] [--pause S] [--profile] [--no-bytecode-cache] [--json FILE]``

* Data: ``mspecies.synth.dataset.generate_dataset`` (``--n-tomograms`` tilt series sharing ``--particles``, 41 tilts
  of 1024² px at 4 Å/px, box ``--box``), or an existing ``--manifest``.
* Engine, in memory: for each tilt series the engine is built from the memory-mapped stack (its setup, the stack
  read and filtering included, is timed apart) and its particles reconstructed three times without checks or
  files; the rate is all particles over the sum of each tilt series' fastest warm pass (as ``bench_export.py``),
  and also over setup + first pass. This process makes the export worker's thread settings before NumPy loads
  (:mod:`mspecies.worker_threads`: one OpenBLAS thread), so the engine runs as the command does; the CLI children
  get the user's environment and make their own.
* CLI: ``python -m mspecies export --manifest … --box … --diameter …`` (default options: direct 3D CTF, NumPy, the
  cores it may run on) as a new process, wall clock from start to exit, into a new folder each time; its start-up (the
  interpreter and the modules the export imports, nothing else) is timed apart, and the CLI rate is given with
  and without it. ``--before SRC`` also times the CLI of another source tree (e.g. a checkout of ``main``),
  interleaved with this one.
* Rounds alternate engine, CLI (and ``--before``) and start-up; the fastest of each is reported, and the CPU
  seconds (user + system, all threads) of each CLI run. The trees take turns at running first after the engine:
  the command run right after the in-memory engine is slower (the same tree twice at box 128: 8.6 s first, 7.2 s
  second), so a fixed order favoured ``--before``.
* Bytecode: the children import mspecies from a bytecode cache filled before the rounds, as an installed
  mspecies does (:func:`use_bytecode_cache`); ``--no-bytecode-cache`` leaves them the environment's setting.
* ``--serial-too``: this tree's CLI also with its overlap switched off (:data:`SERIAL`), in the same rounds.
* ``--prepared-too``: this tree's CLI also without its stack preparation (:data:`PREPARED`): each tilt series'
  prepared images are made once before the rounds (untimed) and saved, and the command maps them from the page
  cache instead of preparing the stack. Not a way to run the export: what the command would take if its stack
  preparation cost nothing, so the most that a cheaper preparation could give.
* ``--pause S``: S seconds idle before each command, each run's system time reported. On a VM whose balloon
  reports free memory to its host, memory freed by the previous command is still the guest's for about 2 s, then
  the host's: without a pause each command reuses what the one before it freed; with one, it gets memory anew, as
  a command run on its own does (:mod:`mspecies.worker_threads`).
* ``--profile``: one more CLI run, in a new process (as cold as the command), with every phase timed (wall
  seconds on the thread that runs it; the writer and the stack preparation of the next tilt series run beside the
  reconstruction), the time to the first particle and from the last one to the end.
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHILD_ENVIRON = dict(os.environ)
"""The environment the CLI children get: as the user's, so that each tree makes its own thread settings (and, unless
``--no-bytecode-cache``, with a bytecode cache: :func:`use_bytecode_cache`)."""
STARTUP_THREADS = ("import os, sys\ntry:\n    from mspecies.worker_threads import prepare_worker\n"
                   "except ImportError:\n    try:\n        from mspecies.worker_threads import limit_blas_threads as "
                   "prepare_worker\n    except ImportError:\n        prepare_worker = lambda argv, environ: None\n"
                   "prepare_worker(['export'], os.environ)\n")
"""Start of the start-up child: the thread and memory settings that ``python -m mspecies export`` makes (where the
tree has them) before its imports."""
STARTUP_IMPORTS = ("mspecies.cli.main", "mspecies.cli.export", "mspecies.cli.export_checks")
"""What ``python -m mspecies export --manifest`` imports before its first step (measured as start-up), with the
manifest's reader: :data:`MANIFEST_READERS`. Since the twelfth pass the command imports its writers (pandas,
starfile: ``export_files``, ``export_record``, ``relion_subtomo``) after it has started building the first engine,
beside that build, so they are not start-up; until the thirteenth pass they were counted here. A tree that imports
them with ``mspecies.cli.export`` still counts them."""
MANIFEST_READERS = ("mspecies.synth.manifest", "mspecies.synth.dataset")
"""Where a tree reads a manifest: the first of these it has (trees before the tenth pass read it with the dataset
generator, so a ``--before`` tree's start-up is timed with what its command imports)."""


def make_dataset(folder: Path, n_tomograms: int, n_particles: int, box_px: int) -> Path:
    from mspecies.synth.dataset import generate_dataset

    return generate_dataset(folder, n_tomograms=n_tomograms, n_particles=n_particles // n_tomograms, n_tilts=41,
                            box_px=box_px, image_shape_yx=(1024, 1024), snr=0.05)


def cli_arguments(manifest: Path, box_px: int, diameter_angst: float, out: Path) -> list[str]:
    return ["export", "--manifest", str(manifest), "--box", str(box_px), "--diameter", f"{diameter_angst:g}",
            "--out", str(out)]


def manifest_tilt_series_inputs(manifest: Path, box_px: int, diameter_angst: float) -> Iterator[tuple]:
    """(tilt series, its memory-mapped stack, the export options the CLI builds by default, its particles) for every
    tilt series of ``manifest``."""
    from mspecies.cli.export import export_options
    from mspecies.cli.main import build_parser
    from mspecies.formats.mrc import read_mrc
    from mspecies.synth.manifest import load_manifest, manifest_particles, manifest_tilt_series

    args = build_parser().parse_args(cli_arguments(manifest, box_px, diameter_angst, Path("unused")))
    data = load_manifest(manifest)
    particles = manifest_particles(data)
    for entry in data["tilt_series"]:
        tilt_series = manifest_tilt_series(data, entry["ts_id"])
        own = particles.subset(particles.tomo_names == entry["ts_id"])
        yield (tilt_series, read_mrc(tilt_series.stack_path, mmap=True)[0],
               export_options(args, tilt_series.pixel_size_angst), own)


def bench_engine(manifest: Path, box_px: int, diameter_angst: float, passes: int = 3) -> dict[str, float]:
    """In-memory engine on every tilt series of ``manifest`` with the options the CLI builds by default."""
    from mspecies.core.reconstruct import TiltSeriesEngine

    setup = first = warm = warm_cpu = setup_cpu = 0.0
    count = 0
    for tilt_series, stack, options, own in manifest_tilt_series_inputs(manifest, box_px, diameter_angst):
        started, cpu = time.perf_counter(), process_cpu_s()
        engine = TiltSeriesEngine.create(tilt_series, stack, options)
        setup, setup_cpu = setup + time.perf_counter() - started, setup_cpu + process_cpu_s() - cpu
        times = []
        for _ in range(passes):
            started, cpu = time.perf_counter(), process_cpu_s()
            done = sum(1 for _ in engine.reconstruct(own))
            times.append((time.perf_counter() - started, process_cpu_s() - cpu))
        fastest = min(times[1:] or times)
        first, warm, warm_cpu, count = first + times[0][0], warm + fastest[0], warm_cpu + fastest[1], count + done
    return {"particles": count, "setup_s": setup, "setup_cpu_s": setup_cpu, "first_pass_s": first, "warm_s": warm,
            "warm_cpu_s": warm_cpu, "warm_particles_per_s": count / warm,
            "with_setup_particles_per_s": count / (setup + first)}


def process_cpu_s() -> float:
    """CPU seconds (user + system) of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_timed(command: list[str], source: Path) -> tuple[float, float, float, subprocess.CompletedProcess]:
    """(wall s, CPU s of the child: user + system, all threads, its system s, the process) of ``command`` run in
    ``source`` with ``source`` first on PYTHONPATH (``python -m``/``-c`` put the working folder before PYTHONPATH
    on sys.path: run from another folder, ``--before`` timed this tree again)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, env={**CHILD_ENVIRON, "PYTHONPATH": str(source)}, capture_output=True, text=True,
                            cwd=source)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr[-2000:]}")
    system = after.ru_stime - before.ru_stime
    return wall, (after.ru_utime - before.ru_utime) + system, system, result


SERIAL = STARTUP_THREADS + (
    "import mspecies.cli.export_checks as checks; checks.overlap_fits = lambda job, next_job: False; "
    "from mspecies.cli.main import main; sys.exit(main(sys.argv[1:]))")
"""``python -c`` program: the export with its overlap switched off (no writer thread, no engine built ahead), with
the thread settings of ``python -m mspecies export``."""


PREPARED_FOLDER = "MSPECIES_BENCH_PREPARED"
"""Environment variable naming the folder of :func:`save_prepared_stacks` for a :data:`PREPARED` child."""
PREPARED_MARK = "bench: prepared images mapped for"
"""What a :data:`PREPARED` child prints for each tilt series whose prepared images it maps (counted per run)."""

PREPARED = STARTUP_THREADS + (
    "import numpy as np\n"
    "from mspecies.core import extract, reconstruct\n"
    "def mapped(tilt_series, stack, options, **kwargs):\n"
    "    folder = os.environ['" + PREPARED_FOLDER + "'] + '/' + tilt_series.ts_id\n"
    "    print('" + PREPARED_MARK + "', tilt_series.ts_id, flush=True)\n"
    "    return extract.PreparedStack(np.load(folder + '_images.npy', mmap_mode='r'), "
    "np.load(folder + '_scale.npy'))\n"
    "reconstruct.prepare_engine_stack = mapped\n"
    "from mspecies.cli.main import main\n"
    "code = main(sys.argv[1:]); sys.stdout.flush(); sys.stderr.flush(); os._exit(code)\n")
"""``python -c`` program: the export with each tilt series' prepared images mapped from the files of
:func:`save_prepared_stacks` instead of prepared (``reconstruct.prepare_engine_stack`` replaced), with the thread
settings and the quick exit of ``python -m mspecies export``."""


def save_prepared_stacks(manifest: Path, box_px: int, diameter_angst: float, folder: Path) -> Path:
    """Prepare each tilt series' stack of ``manifest`` as the command would and save the images and their scale
    (``<ts_id>_images.npy``, ``<ts_id>_scale.npy``) in ``folder``, for :data:`PREPARED` children."""
    import numpy as np

    from mspecies.core.reconstruct import prepare_engine_stack

    folder.mkdir(parents=True, exist_ok=True)
    for tilt_series, stack, options, _ in manifest_tilt_series_inputs(manifest, box_px, diameter_angst):
        prepared = prepare_engine_stack(tilt_series, stack, options)
        np.save(folder / f"{tilt_series.ts_id}_images.npy", prepared.images)
        np.save(folder / f"{tilt_series.ts_id}_scale.npy", prepared.scale_xy)
    return folder


def bench_cli(source: Path, manifest: Path, box_px: int, diameter_angst: float, scratch: Path,
              mode: str | None = None, pause_s: float = 0.0) -> dict[str, float]:
    """One CLI run of ``source``'s tree: as ``python -m mspecies``, or with ``mode`` ``"serial"`` (:data:`SERIAL`)
    or ``"prepared"`` (:data:`PREPARED`); ``pause_s`` seconds idle before it (``--pause``)."""
    out = Path(tempfile.mkdtemp(dir=scratch))
    program = {None: ["-m", "mspecies"], "serial": ["-c", SERIAL], "prepared": ["-c", PREPARED]}[mode]
    time.sleep(pause_s)
    command = [sys.executable, *program, *cli_arguments(manifest, box_px, diameter_angst, out / "export")]
    wall, cpu, system, result = run_timed(command, source)
    shutil.rmtree(out)
    lines = [line for line in result.stdout.splitlines() if "particles/s" in line]
    written = re.search(r"^wrote (\d+) particles", result.stdout, re.MULTILINE)
    if written is None:
        raise RuntimeError(f"the export did not say how many particles it wrote: {result.stdout[-2000:]}")
    mapped = sum(line.startswith(PREPARED_MARK) for line in result.stdout.splitlines())
    return {"wall_s": wall, "cpu_s": cpu, "system_s": system, "particles": int(written.group(1)), "log": lines,
            "prepared_stacks_mapped": mapped}


def use_bytecode_cache(folder: Path, sources: list[Path]) -> None:
    """Give the children a bytecode cache in ``folder`` and fill it for each tree, untimed.

    An installed mspecies imports its modules from bytecode (``pip install`` compiles it, an editable install
    writes it at the first run). Without a cache, every child compiles the ~40 modules the export imports from
    source (0.1 s here): where ``PYTHONDONTWRITEBYTECODE`` is set, as on the machine these figures come from, the
    command was timed slower than a user runs it. ``PYTHONPYCACHEPREFIX`` keeps the source trees unwritten.
    """
    CHILD_ENVIRON.pop("PYTHONDONTWRITEBYTECODE", None)
    CHILD_ENVIRON["PYTHONPYCACHEPREFIX"] = str(folder)
    for source in sources:
        bench_startup(source)


def file_create_ms(folder: Path, count: int = 400) -> float:
    """Milliseconds to create (and close) one empty file in a new folder below ``folder``: the export makes two
    files per particle, and where the file system is slow to allocate inodes the command slows, not the engine.
    On this VM the figure ranged from 0.02 to 0.9 ms per file on one disk (the highest just after many files
    were deleted there)."""
    where = Path(tempfile.mkdtemp(dir=folder))
    started = time.perf_counter()
    for k in range(count):
        os.close(os.open(where / f"f{k}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    elapsed = time.perf_counter() - started
    shutil.rmtree(where)
    return 1e3 * elapsed / count


def bench_startup(source: Path) -> float:
    """Wall seconds of a new interpreter importing :data:`STARTUP_IMPORTS`."""
    reader = next(name for name in MANIFEST_READERS
                  if (source / (name.replace(".", "/") + ".py")).is_file())
    imports = STARTUP_THREADS + "import " + ", ".join(STARTUP_IMPORTS + (reader,))
    wall, _, _, _ = run_timed([sys.executable, "-c", imports], source)
    return wall


def profile_cli(manifest: Path, box_px: int, diameter_angst: float, scratch: Path) -> dict[str, float]:
    """Wall seconds per phase of one CLI run in a new process (:func:`profile_here` there): as cold as the
    command itself (its first touches of memory, its first transforms), not warmed by the engine's rounds."""
    arguments = json.dumps([str(manifest), box_px, diameter_angst, str(scratch)])
    _, _, _, result = run_timed([sys.executable, str(Path(__file__).resolve()), "--profile-child", arguments], ROOT)
    return json.loads(result.stdout.splitlines()[-1])


def profile_here(manifest: Path, box_px: int, diameter_angst: float, scratch: Path) -> dict[str, float]:
    """Wall seconds per phase of one CLI run in this process (each phase timed on the thread that runs it),
    including the imports of :data:`STARTUP_IMPORTS` when this process has not made them yet."""
    started_imports = time.perf_counter()
    import mspecies.cli.atomic as atomic
    import mspecies.cli.export as export
    import mspecies.cli.export_checks as checks
    import mspecies.cli.export_files as files
    import mspecies.cli.export_record as record
    import mspecies.core.extract as extract
    import mspecies.formats.relion_subtomo as relion_subtomo
    from mspecies.cli.main import main
    from mspecies.core.reconstruct import TiltSeriesEngine

    for name in STARTUP_IMPORTS + MANIFEST_READERS[:1]:
        importlib.import_module(name)
    phases: dict[str, float] = collections.defaultdict(float)
    phases["imports (start-up, less the interpreter's own)"] = time.perf_counter() - started_imports
    marks: dict[str, float] = {}

    def timed(owner: object, name: str, label: str) -> Callable[[], None]:
        original, stored = getattr(owner, name), vars(owner)[name]  # stored: a class's classmethod as such

        @functools.wraps(original)
        def wrapper(*args, **kwargs):  # noqa: ANN202 (any signature)
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                phases[label] += time.perf_counter() - started

        setattr(owner, name, wrapper)
        return lambda: setattr(owner, name, stored)

    original_reconstruct = TiltSeriesEngine.reconstruct

    def reconstruct(self, particles):  # noqa: ANN001, ANN202 (the engine's own signature)
        results = original_reconstruct(self, particles)
        while True:
            started = time.perf_counter()
            result = next(results, None)
            phases["reconstruction (engine batches)"] += time.perf_counter() - started
            if result is None:
                marks["last particle"] = time.perf_counter()
                return
            marks.setdefault("first particle", time.perf_counter())
            yield result

    restore = [timed(export, "load_inputs", "inputs (manifest, particles)"),
               timed(checks, "plan_job", "checks and memory plans"),
               timed(extract, "prepare_stack", "stack read + preparation (all threads)"),
               timed(TiltSeriesEngine, "create", "engine setup incl. its own stack preparation"),
               timed(files, "check_volume", "volume checks (writer thread)"),
               timed(files, "write_mrc_stream", "MRC writes through the page cache (writer thread)"),
               timed(files, "write_mrc_direct", "MRC writes, direct (writer thread)"),
               timed(relion_subtomo, "write_subtomo_star", "STAR writing"),
               timed(record, "write_export_record", "success record"),
               timed(atomic, "publish", "publishing (renames)")]
    TiltSeriesEngine.reconstruct = reconstruct
    out = Path(tempfile.mkdtemp(dir=scratch)) / "export"
    try:
        started = time.perf_counter()
        code = main(cli_arguments(manifest, box_px, diameter_angst, out))
        ended = time.perf_counter()
        phases["total (in process, no start-up)"] = ended - started
        phases["from the start to the first particle (no start-up)"] = marks["first particle"] - started
        phases["from the last particle to the end"] = ended - marks["last particle"]
    finally:
        TiltSeriesEngine.reconstruct = original_reconstruct
        for undo in restore:
            undo()
        shutil.rmtree(out.parent, ignore_errors=True)
    if code != 0:
        raise RuntimeError(f"the profiled export failed with exit code {code}")
    return dict(phases)


def main() -> None:
    from mspecies.worker_threads import prepare_worker

    prepare_worker(["export"], os.environ)  # before NumPy loads: the engine runs as the export worker does
    if sys.argv[1:2] == ["--profile-child"]:  # profile_cli's new process: the phases as JSON on the last line
        manifest, box_px, diameter_angst, scratch = json.loads(sys.argv[2])
        phases = profile_here(Path(manifest), box_px, diameter_angst, Path(scratch))
        sys.stdout.flush()
        print(json.dumps(phases))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, help="an existing synthetic dataset (default: generate one)")
    parser.add_argument("--n-tomograms", type=int, default=2)
    parser.add_argument("--particles", type=int, default=96, help="particles in all")
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--diameter", type=float, default=150.0, help="particle diameter (Å)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", type=Path, help="source tree whose CLI is timed too (its mspecies on PYTHONPATH)")
    parser.add_argument("--serial-too", action="store_true",
                        help="also time this tree's CLI with its overlap switched off (writer thread, engine ahead)")
    parser.add_argument("--prepared-too", action="store_true",
                        help="also time this tree's CLI with the prepared stacks mapped from files instead of "
                             "prepared (what the command would take if its stack preparation cost nothing)")
    parser.add_argument("--profile", action="store_true", help="also time the CLI's phases in this process")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="seconds idle before each command (a VM whose host takes free memory back has done so "
                             "after about 2 s: each command then touches memory the host must give again, as a "
                             "command run on its own does)")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    parser.add_argument("--scratch", type=Path,
                        help="folder to hold the outputs, the bytecode cache and a generated dataset (default: the "
                             "system's temporary folder); the report gives the cost of a new file there")
    parser.add_argument("--no-bytecode-cache", action="store_true",
                        help="children import as this environment says (compiling every module where "
                             "PYTHONDONTWRITEBYTECODE is set) instead of from a bytecode cache")
    args = parser.parse_args()
    from mspecies.core.memory import retain_freed_memory

    retain_freed_memory()  # as the export worker does
    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        scratch = Path(folder)
        args.create_ms = file_create_ms(scratch)
        manifest = (args.manifest.resolve() if args.manifest
                    else make_dataset(scratch / "data", args.n_tomograms, args.particles, args.box))
        sources = ({"this tree": (ROOT, None)}
                   | ({"this tree, overlap off": (ROOT, "serial")} if args.serial_too else {})
                   | ({"this tree, no stack preparation": (ROOT, "prepared")} if args.prepared_too else {})
                   | ({"before": (args.before.resolve(), None)} if args.before else {}))
        if args.prepared_too:
            CHILD_ENVIRON[PREPARED_FOLDER] = str(save_prepared_stacks(manifest, args.box, args.diameter,
                                                                      scratch / "prepared"))
        if not args.no_bytecode_cache:
            use_bytecode_cache(scratch / "bytecode", [source for source, _ in sources.values()])
        engine, cli, startup = [], {name: [] for name in sources}, {name: [] for name in sources}
        load = [os.getloadavg()[0]]
        for round_ in range(args.rounds):
            engine.append(bench_engine(manifest, args.box, args.diameter))
            names = list(sources)
            for name in names[round_ % len(names):] + names[:round_ % len(names)]:  # each first in turn
                source, mode = sources[name]
                cli[name].append(bench_cli(source, manifest, args.box, args.diameter, scratch, mode, args.pause))
                startup[name].append(bench_startup(source))
            load.append(os.getloadavg()[0])
            print(f"round {round_ + 1}: engine warm {engine[-1]['warm_particles_per_s']:.1f} particles/s; "
                  + "; ".join(f"CLI ({name}) {cli[name][-1]['wall_s']:.2f} s wall, {cli[name][-1]['cpu_s']:.2f} s CPU "
                              f"({cli[name][-1]['system_s']:.2f} s system), start-up {startup[name][-1]:.2f} s"
                              for name in sources), flush=True)
        profile = profile_cli(manifest, args.box, args.diameter, scratch) if args.profile else None
    report(engine, cli, startup, load, profile, args)


def report(engine: list[dict], cli: dict[str, list[dict]], startup: dict[str, list[float]], load: list[float],
           profile: dict[str, float] | None, args: argparse.Namespace) -> None:
    best_engine = max(engine, key=lambda e: e["warm_particles_per_s"])
    n = best_engine["particles"]
    bytecode = ("from a bytecode cache" if not args.no_bytecode_cache
                else "compiled at every start (PYTHONDONTWRITEBYTECODE)" if os.environ.get("PYTHONDONTWRITEBYTECODE")
                else "as the environment says")
    print(f"\n{n} particles, box {args.box}, {args.n_tomograms if not args.manifest else 'given'} tilt series; load "
          f"average {min(load):.1f}-{max(load):.1f} on {os.cpu_count()} cores; children's modules {bytecode}; "
          f"outputs in {args.scratch or tempfile.gettempdir()} (a new file there: {args.create_ms:.3f} ms)"
          + (f"; {args.pause:g} s idle before each command" if args.pause else ""))
    print(f"engine in memory: warm {best_engine['warm_particles_per_s']:.1f} particles/s (best of {len(engine)} "
          f"rounds; {best_engine['warm_s']:.2f} s, CPU {best_engine['warm_cpu_s']:.2f} s), with setup + first pass "
          f"{max(e['with_setup_particles_per_s'] for e in engine):.1f} particles/s "
          f"(setup {best_engine['setup_s']:.2f} s, CPU {best_engine['setup_cpu_s']:.2f} s)")
    figures = {"particles": n, "box": args.box, "load_average": [min(load), max(load)], "bytecode": bytecode,
               "pause_s": args.pause,
               "scratch": str(args.scratch or tempfile.gettempdir()), "file_create_ms": args.create_ms,
               "engine": engine,
               "cli": {}, "profile": profile}
    for name, runs in cli.items():
        wall = min(run["wall_s"] for run in runs)
        median = sorted(run["wall_s"] for run in runs)[len(runs) // 2]
        start = min(startup[name])
        written = min(run["particles"] for run in runs)  # the export skips particles outside the images
        rate, rate_without = written / wall, written / (wall - start)
        figures["cli"][name] = {"runs": runs, "startup_s": startup[name], "particles_per_s": rate,
                                "particles_per_s_without_startup": rate_without,
                                "ratio": rate / best_engine["warm_particles_per_s"],
                                "ratio_without_startup": rate_without / best_engine["warm_particles_per_s"]}
        cpu = min(run["cpu_s"] for run in runs)
        system = sorted(run["system_s"] for run in runs)
        figures["cli"][name]["cpu_ratio"] = best_engine["warm_cpu_s"] / cpu
        figures["cli"][name]["median_wall_s"] = median
        print(f"CLI ({name}): {written} particles written, {wall:.2f} s wall (fastest of {len(runs)}; median "
              f"{median:.2f} s), {rate:.1f} particles/s = "
              f"{figures['cli'][name]['ratio']:.2f} × the warm engine; start-up {start:.2f} s excluded: "
              f"{rate_without:.1f} particles/s = {figures['cli'][name]['ratio_without_startup']:.2f} ×; "
              f"CPU {cpu:.2f} s (least of {len(runs)}): warm engine CPU / CLI CPU = "
              f"{figures['cli'][name]['cpu_ratio']:.2f}; system {system[0]:.2f}-{system[-1]:.2f} s")
    if profile:
        print("CLI phases (one run in a new process, wall s on the thread that runs each):")
        for label, seconds in sorted(profile.items(), key=lambda item: -item[1]):
            print(f"  {label:52s} {seconds:6.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))


if __name__ == "__main__":
    main()
