"""Where the export command's CPU goes beyond the warm in-memory engine's, function by function (``perf``).

Usage: ``python benchmarks/export/bench_overhead.py --manifest DATA [--box 64] [--diameter 200] [--rounds 3]
[--passes 6] [--frequency 2999] [--top 25] [--scratch DIR] [--json FILE]``

``bench_cli.py`` says how much slower the command is than the engine; this says where the difference goes. Each
process is sampled by ``perf record`` (cpu-clock at ``--frequency`` Hz, every thread, user and kernel time):

* the command, ``python -m mspecies export --manifest … --box … --diameter …``, ``--rounds`` times in new processes
  (as ``bench_cli.py`` runs it: the user's environment, modules from a bytecode cache; sampling slows it, so its
  wall clock is not the command's); the run with the least sampled CPU is compared, and every run's total and
  kernel page zeroing are listed (on a VM whose free memory goes back to the host, the zeroing swings from run
  to run);
* the in-memory engine (``bench_cli.bench_engine``: the setup, then passes over all particles) in a new process,
  once with one pass and once with ``--passes`` k passes. Per function, one warm pass is
  (P_k − P_1)/(k − 1), at least 0: the first pass, the setup and the imports cancel.

Per function, the command's CPU seconds less one warm pass is what the command pays beyond the engine: its
start-up, the stack preparation, the geometry, the writer, and the kernel's work for memory and files the warm
engine no longer touches. Functions are also summed into groups (:data:`GROUPS`) by library. Python functions
are not resolved (Python 3.11 writes no perf maps): the interpreter's own time shows as ``libpython`` symbols.
Exits with 2, saying why, where ``perf`` is missing or may not record (``perf_event_paranoid``, no root).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cli  # noqa: E402 (the benchmark beside this one: its engine, arguments and children's environment)

ROOT = bench_cli.ROOT

GROUPS = (("kernel: page zeroing", re.compile(r"^clear_(page|huge_page|subpage)"), "kernel"),
          ("kernel: other", re.compile(""), "kernel"),
          ("FFT (pocketfft)", re.compile(""), "pypocketfft"),
          ("NumPy", re.compile(""), "_multiarray_umath"),
          ("sparse products (SciPy)", re.compile(""), "_sparsetools"),
          ("Python interpreter", re.compile(""), "libpython"),
          ("C library (copies, malloc)", re.compile(""), "libc.so"))
"""(group, symbol pattern, shared-object prefix): a function belongs to the first group that matches both; the
others to "other"."""

REPORT_LINE = re.compile(r"^\s*(\d+)\s+(\S+)\s+\[(.)\]\s+(.*?)\s*$")
"""One line of ``perf report --sort dso,sym -F period,dso,sym``: period (ns of cpu-clock), shared object, [k] or
[.], symbol."""


def check_perf(scratch: Path) -> None:
    """Exit with 2 and the reason where ``perf`` cannot record a child process here."""
    if shutil.which("perf") is None:
        print("bench_overhead.py: perf is not installed (Debian: apt-get install linux-perf)", file=sys.stderr)
        sys.exit(2)
    probe = scratch / "probe.data"
    result = subprocess.run(["perf", "record", "-q", "-o", str(probe), "--", "true"], capture_output=True, text=True)
    probe.unlink(missing_ok=True)
    if result.returncode != 0:
        print(f"bench_overhead.py: perf cannot record here: {result.stderr.strip()[-500:]}", file=sys.stderr)
        sys.exit(2)


def record(command: list[str], data: Path, frequency: int) -> float:
    """Wall seconds of ``command`` run under ``perf record`` into ``data`` (``bench_cli.run_timed``: from
    :data:`ROOT` with it first on PYTHONPATH, the children's environment of ``bench_cli.py``; a failure raises)."""
    perf = ["perf", "record", "-q", "-F", str(frequency), "-o", str(data), "--", *command]
    wall, _, _, _ = bench_cli.run_timed(perf, ROOT)
    return wall


def cpu_by_function(data: Path) -> dict[str, float]:
    """CPU seconds per function ("symbol [shared object]") in the samples of ``data``. Symbols are cut to 90
    characters: C++ template instances that share those (pocketfft's transforms) are summed as one."""
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso,sym",
                             "-F", "period,dso,sym"], capture_output=True, text=True, check=True).stdout
    seconds: dict[str, float] = collections.defaultdict(float)
    for line in report.splitlines():
        match = REPORT_LINE.match(line)
        if match:
            period_ns, dso, _, symbol = match.groups()
            seconds[f"{symbol[:90]} [{Path(dso).name.strip('[]')}]"] += int(period_ns) * 1e-9
    if not seconds:
        raise RuntimeError(f"perf report found no samples in {data}")
    return dict(seconds)


def group_of(function: str) -> str:
    symbol, _, dso = function.rpartition(" [")
    for name, pattern, prefix in GROUPS:
        if dso.startswith(prefix) and pattern.match(symbol):
            return name
    return "other"


def warm_pass(one: dict[str, float], many: dict[str, float], passes: int) -> dict[str, float]:
    """Per function, the CPU seconds of one warm pass: (many passes − one pass) / (passes − 1), at least 0."""
    return {name: max(0.0, (many.get(name, 0.0) - one.get(name, 0.0)) / (passes - 1))
            for name in set(one) | set(many)}


def beyond(command: dict[str, float], engine: dict[str, float]) -> list[dict[str, float | str]]:
    """Rows (function, group, command s, warm pass s, extra s), the largest extra first."""
    rows = [{"function": name, "group": group_of(name), "command_s": command.get(name, 0.0),
             "warm_pass_s": engine.get(name, 0.0), "extra_s": command.get(name, 0.0) - engine.get(name, 0.0)}
            for name in set(command) | set(engine)]
    return sorted(rows, key=lambda row: -row["extra_s"])


SMALL_S = 0.001
"""Functions under this many CPU seconds, in the command and in a warm pass, are reported as one row."""


def with_small_ones_summed(rows: list[dict[str, float | str]]) -> list[dict[str, float | str]]:
    """``rows`` with those under :data:`SMALL_S` in both profiles replaced by one row that sums them (last)."""
    kept, small = [], []
    for row in rows:
        (small if max(float(row["command_s"]), float(row["warm_pass_s"])) < SMALL_S else kept).append(row)
    if not small:
        return kept
    summed: dict[str, float | str] = {"function": f"({len(small)} functions under {SMALL_S * 1e3:g} ms each)",
                                      "group": "(several)"}
    for key in ("command_s", "warm_pass_s", "extra_s"):
        summed[key] = sum(float(row[key]) for row in small)
    return kept + [summed]


def by_group(rows: list[dict[str, float | str]]) -> dict[str, dict[str, float]]:
    groups: dict[str, dict[str, float]] = {}
    for row in rows:
        group = groups.setdefault(str(row["group"]), {"command_s": 0.0, "warm_pass_s": 0.0, "extra_s": 0.0})
        for key in group:
            group[key] += float(row[key])
    return dict(sorted(groups.items(), key=lambda item: -item[1]["extra_s"]))


def engine_command(manifest: Path, box_px: int, diameter_angst: float, passes: int) -> list[str]:
    """A new process running ``bench_cli.bench_engine`` with ``passes`` passes (its thread settings first)."""
    program = (bench_cli.STARTUP_THREADS + f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
               "from pathlib import Path\nimport bench_cli\n"
               f"bench_cli.bench_engine(Path({str(manifest)!r}), {box_px}, {diameter_angst!r}, passes={passes})\n")
    return [sys.executable, "-c", program]


def profile(args: argparse.Namespace, scratch: Path) -> dict:
    bench_cli.use_bytecode_cache(scratch / "pycache", [ROOT])
    commands = []
    for round_index in range(args.rounds):
        out = Path(tempfile.mkdtemp(dir=scratch))
        wall = record([sys.executable, "-m", "mspecies",
                          *bench_cli.cli_arguments(args.manifest, args.box, args.diameter, out / "export")],
                         scratch / f"command{round_index}.data", args.frequency)
        shutil.rmtree(out)
        seconds = cpu_by_function(scratch / f"command{round_index}.data")
        zeroing = sum(s for name, s in seconds.items() if group_of(name) == "kernel: page zeroing")
        commands.append({"wall_under_perf_s": wall, "cpu_s": sum(seconds.values()), "page_zeroing_s": zeroing,
                         "functions": seconds})
        print(f"command run {round_index + 1}: {wall:.2f} s wall under perf, {sum(seconds.values()):.2f} s CPU "
              f"sampled, kernel page zeroing {zeroing:.2f} s", flush=True)
    engine = {}
    for passes in (1, args.passes):
        record(engine_command(args.manifest, args.box, args.diameter, passes), scratch / f"engine{passes}.data",
               args.frequency)
        engine[passes] = cpu_by_function(scratch / f"engine{passes}.data")
    warm = warm_pass(engine[1], engine[args.passes], args.passes)
    chosen = min(commands, key=lambda run: run["cpu_s"])
    rows = beyond(chosen["functions"], warm)
    groups = by_group(rows)
    return {"manifest": str(args.manifest), "box_px": args.box, "passes": args.passes, "frequency_hz": args.frequency,
            "command_runs": [{key: run[key] for key in ("wall_under_perf_s", "cpu_s", "page_zeroing_s")}
                             for run in commands],
            "command_cpu_s": chosen["cpu_s"], "warm_pass_cpu_s": sum(warm.values()),
            "groups": groups, "functions": with_small_ones_summed(rows)}


def report(result: dict, top: int) -> None:
    print(f"\nthe command (least CPU of {len(result['command_runs'])} runs): {result['command_cpu_s']:.2f} s CPU; "
          f"one warm engine pass: {result['warm_pass_cpu_s']:.2f} s CPU; beyond it: "
          f"{result['command_cpu_s'] - result['warm_pass_cpu_s']:.2f} s")
    print(f"\n{'extra s':>8} {'command':>8} {'warm':>8}  group")
    for name, group in result["groups"].items():
        print(f"{group['extra_s']:8.3f} {group['command_s']:8.3f} {group['warm_pass_s']:8.3f}  {name}")
    print(f"\n{'extra s':>8} {'command':>8} {'warm':>8}  function [shared object]")
    for row in result["functions"][:top]:
        print(f"{row['extra_s']:8.3f} {row['command_s']:8.3f} {row['warm_pass_s']:8.3f}  {row['function']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--box", type=int, default=64)
    parser.add_argument("--diameter", type=float, default=200.0, help="particle diameter, Å")
    parser.add_argument("--rounds", type=int, default=3, help="command runs (the one with the least CPU is used)")
    parser.add_argument("--passes", type=int, default=6, help="engine passes of the long engine profile (≥ 2)")
    parser.add_argument("--frequency", type=int, default=2999, help="samples per second and thread")
    parser.add_argument("--top", type=int, default=25, help="functions listed")
    parser.add_argument("--scratch", type=Path, default=None, help="folder for outputs and perf data")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.passes < 2 or args.rounds < 1:
        parser.error("--passes must be at least 2 and --rounds at least 1")
    args.manifest = args.manifest.resolve()
    scratch = Path(tempfile.mkdtemp(dir=args.scratch))
    try:
        check_perf(scratch)
        result = profile(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    report(result, args.top)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
