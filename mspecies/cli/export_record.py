"""The export worker's success record: ``export_record.json`` in ``--out``, written as the worker's last act.

A queue system reports a job as gone from its queue whether it succeeded, failed, was cancelled or lost its node,
and some job templates even turn a failed command into exit code 0. The record is therefore the only proof that a
worker finished: whoever runs the worker (the Scipion export protocol, on any executor) checks it and the files it
lists with :func:`record_problems`. It is written atomically (temporary file + ``os.replace``), after every file it
lists, so a worker killed at any moment leaves either no record or a complete one.

Schema (``format`` = :data:`RECORD_FORMAT`)::

    {
      "format": "mspecies-export-record/1",
      "ts_ids": ["TS_01"],                       # tilt series exported, in order
      "n_particles": 51,                          # rows of the STAR file
      "per_tilt_series": {"TS_01": {"n_particles": 51, "padded_box_px": 128, "backend": "numpy",
                                    "seconds": 12.3}},
      "star": "particles.star",                   # relative to the output folder
      "files": {"TS_01/TS_01_0000000_4.00A.mrc": 131328, ...},   # every file written (images, STAR, excluded
                                                                 # particles), relative path: bytes
      "arguments": {"command": "export", "box": 64, ...},         # the parsed command line
      "finished_utc": "2026-12-06T12:00:00+00:00"
    }
"""

from __future__ import annotations

import datetime
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from mspecies.cli.export_files import EXCLUDED_TSV, SERIES_STARS, STAR_NAME
from mspecies.common.types import InputError

if TYPE_CHECKING:
    from mspecies.cli.export_files import ExportSummary

RECORD_JSON = "export_record.json"
RECORD_FORMAT = "mspecies-export-record/1"
IMAGE_COLUMNS = ("rlnImageName", "rlnCtfImage")


def written_files(out_dir: str | Path, particles: pd.DataFrame) -> dict[str, int]:
    """{path relative to ``out_dir``: size in bytes} of every image the STAR rows name, the STAR file and the
    excluded-particle table (when there is one)."""
    out = Path(out_dir)
    names = [str(v) for column in IMAGE_COLUMNS if column in particles for v in particles[column] if str(v)]
    names += [STAR_NAME] + [name for name in (EXCLUDED_TSV, *SERIES_STARS) if (out / name).is_file()]
    return {Path(name).as_posix(): (out / name).stat().st_size for name in names}


def discard_export_record(out_dir: str | Path) -> None:
    """Remove the record of an earlier export of ``out_dir`` (before its files are replaced)."""
    (Path(out_dir) / RECORD_JSON).unlink(missing_ok=True)


def write_export_record(out_dir: str | Path, particles: pd.DataFrame, summaries: Iterable[ExportSummary],
                        arguments: Mapping[str, object]) -> Path:
    """Write ``out_dir/export_record.json`` atomically, after the export's files are in place; return its path.

    Parameters
    ----------
    particles
        The rows of ``out_dir/particles.star`` (image paths relative to ``out_dir``).
    summaries
        One :class:`~mspecies.cli.export_files.ExportSummary` per tilt series, in export order.
    arguments
        The parsed command line (``vars(args)``), so a caller can tell a record made with other settings.
    """
    out = Path(out_dir)
    per_ts = {s.ts_id: {"n_particles": s.n_particles, "padded_box_px": s.padded_box_px, "backend": s.backend,
                        "seconds": round(s.seconds, 3)} for s in summaries}
    record = {"format": RECORD_FORMAT, "ts_ids": list(per_ts), "n_particles": len(particles),
              "per_tilt_series": per_ts, "star": STAR_NAME, "files": written_files(out, particles),
              "arguments": _json_values(arguments),
              "finished_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
    path = out / RECORD_JSON
    partial = path.with_name(f".{RECORD_JSON}.{os.getpid()}.tmp")
    with open(partial, "w") as handle:
        json.dump(record, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)
    return path


WAYS_OF_WRITING = frozenset({"buffered_writes", "threads", "memory_gb", "max_batch"})
"""Arguments that change how the files are written or how the work is shared out (threads, batch sizes), not their
bytes: a record made with other values of them (or before they existed) still proves the export."""


def _json_values(arguments: Mapping[str, object]) -> dict[str, object]:
    """Arguments as they read back from JSON (tuples become lists), so two of them compare equal."""
    return json.loads(json.dumps(dict(arguments), default=str))


def _settings(arguments: Mapping[str, object]) -> dict[str, object]:
    """The arguments that decide the files' contents (:data:`WAYS_OF_WRITING` left out), as JSON reads them."""
    return {key: value for key, value in _json_values(arguments).items() if key not in WAYS_OF_WRITING}


def read_export_record(out_dir: str | Path) -> dict:
    """The record of ``out_dir``; :class:`InputError` when it is missing, unreadable or of another format."""
    path = Path(out_dir) / RECORD_JSON
    if not path.is_file():
        raise InputError(f"{path}: no export record (the worker did not finish)")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: unreadable export record ({error})") from error
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise InputError(f"{path}: not an export record of format {RECORD_FORMAT}")
    return record


def record_problems(out_dir: str | Path, ts_id: str, n_particles: int,
                    arguments: Mapping[str, object] | None = None) -> list[str]:
    """Why the record of ``out_dir`` does not prove that ``ts_id`` was exported (empty list: it does).

    Checks: a record exists and is of this format; it lists exactly ``ts_id`` with ``n_particles`` particles; it
    was made with ``arguments`` (when given; :data:`WAYS_OF_WRITING` aside); every file it lists exists with the
    size it recorded.
    """
    try:
        record = read_export_record(out_dir)
    except InputError as error:
        return [str(error)]
    problems = []
    if record.get("ts_ids") != [ts_id]:
        problems.append(f"the record lists tilt series {record.get('ts_ids')}, expected [{ts_id!r}]")
    if record.get("n_particles") != n_particles:
        problems.append(f"the record lists {record.get('n_particles')} particles, expected {n_particles}")
    recorded, expected = _settings(record.get("arguments", {})), _settings(arguments or {})
    if arguments is not None and recorded != expected:
        changed = sorted(k for k in set(recorded) | set(expected) if recorded.get(k) != expected.get(k))
        problems.append(f"the record was made with other settings ({', '.join(changed)})")
    out = Path(out_dir)
    files = record.get("files", {})
    missing = [name for name in files if not (out / name).is_file()]
    resized = [name for name in files if name not in missing and (out / name).stat().st_size != files[name]]
    if missing:
        problems.append(f"{len(missing)} recorded files are missing (first: {missing[0]})")
    if resized:
        problems.append(f"{len(resized)} recorded files changed size (first: {resized[0]})")
    return problems
