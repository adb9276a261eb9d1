"""The export worker's success record: written last by ``python -m mspecies export``, it proves the export of one
tilt series only while it names that tilt series, its particle count and settings, and every file it lists is
there with its recorded size."""

import json
import shutil

import pytest

from mspecies.cli.export_record import RECORD_JSON, read_export_record, record_problems
from mspecies.cli.main import build_parser, main
from mspecies.common.types import InputError
from mspecies.formats.mrc import read_mrc
from mspecies.synth.dataset import generate_dataset

N_PARTICLES = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(output folder, parsed arguments) of one worker run on a tiny synthetic tilt series."""
    root = tmp_path_factory.mktemp("record")
    manifest = generate_dataset(root / "data", seed=3, n_tomograms=1, n_particles=N_PARTICLES, n_tilts=9, box_px=32,
                                image_shape_yx=(192, 192), pixel_size_angst=4.0, thickness_angst=300.0, snr=None)
    argv = ["export", "--manifest", str(manifest), "--ts-id", "TS_01", "--out", str(root / "out"), "--box", "32",
            "--diameter", "100", "--backend", "numpy"]
    assert main(argv) == 0
    return root / "out", vars(build_parser().parse_args(argv))


@pytest.fixture
def copy(exported, tmp_path):
    """A private copy of the exported folder, to damage."""
    out, arguments = exported
    shutil.copytree(out, tmp_path / "out")
    return tmp_path / "out", arguments


def test_worker_record_lists_every_file_it_wrote_and_proves_the_export(exported):
    out, arguments = exported
    record = read_export_record(out)
    assert record["ts_ids"] == ["TS_01"] and record["n_particles"] == N_PARTICLES
    written = {p.relative_to(out).as_posix() for p in out.rglob("*")
               if p.is_file() and p.name != RECORD_JSON and not p.name.startswith(".")}  # not the folder's lock
    assert set(record["files"]) == written
    assert sum(name.endswith(".mrc") for name in written) == 2 * N_PARTICLES
    assert record["per_tilt_series"]["TS_01"]["backend"] == "numpy"
    assert record_problems(out, "TS_01", N_PARTICLES, arguments) == []
    assert not list(out.glob(f".{RECORD_JSON}*"))  # the temporary file was renamed


def test_missing_record_is_not_a_success(copy):
    out, arguments = copy
    (out / RECORD_JSON).unlink()
    with pytest.raises(InputError, match="no export record"):
        read_export_record(out)
    assert "did not finish" in record_problems(out, "TS_01", N_PARTICLES, arguments)[0]


def test_missing_or_resized_file_invalidates_the_record(copy):
    out, arguments = copy
    volumes = sorted((out / "TS_01").glob("*_ctf_*.mrc"))
    volumes[0].unlink()
    volumes[1].write_bytes(volumes[1].read_bytes()[:100])
    problems = " ".join(record_problems(out, "TS_01", N_PARTICLES, arguments))
    assert "1 recorded files are missing" in problems and volumes[0].name in problems
    assert "1 recorded files changed size" in problems


def test_record_of_another_tilt_series_count_or_settings_is_invalid(copy):
    out, arguments = copy
    assert "expected ['TS_02']" in record_problems(out, "TS_02", N_PARTICLES, arguments)[0]
    assert "expected 4" in record_problems(out, "TS_01", N_PARTICLES + 1, arguments)[0]
    assert "other settings (box)" in record_problems(out, "TS_01", N_PARTICLES, {**arguments, "box": 64})[0]


def test_how_the_files_were_written_does_not_invalidate_the_record(copy):
    out, arguments = copy
    assert record_problems(out, "TS_01", N_PARTICLES, {**arguments, "buffered_writes": True}) == []
    record = json.loads((out / RECORD_JSON).read_text())
    del record["arguments"]["buffered_writes"]  # made before the flag existed
    (out / RECORD_JSON).write_text(json.dumps(record))
    assert record_problems(out, "TS_01", N_PARTICLES, arguments) == []
    assert "other settings (box)" in record_problems(out, "TS_01", N_PARTICLES, {**arguments, "box": 64})[0]


def test_how_the_work_was_shared_out_changes_no_byte_and_does_not_invalidate_the_record(exported, tmp_path):
    """One thread, batches of 2 and a small memory budget write the same files as the default run (all cores,
    one batch): so a record made with other such values (Scipion shares the cores and memory out among the steps it
    runs at once) still proves the export."""
    out, arguments = exported
    argv = ["export", "--manifest", arguments["manifest"], "--ts-id", "TS_01", "--out", str(tmp_path / "shared"),
            "--box", "32", "--diameter", "100", "--backend", "numpy", "--threads", "1", "--max-batch", "2",
            "--memory-gb", "0.2"]
    assert main(argv) == 0
    other = tmp_path / "shared"
    files = sorted(path.relative_to(out) for path in out.rglob("*.mrc"))
    assert files and files == sorted(path.relative_to(other) for path in other.rglob("*.mrc"))
    for name in files:
        assert read_mrc(out / name)[0].tobytes() == read_mrc(other / name)[0].tobytes(), name
    assert _without_creation_time(out / "particles.star") == _without_creation_time(other / "particles.star")
    shared = vars(build_parser().parse_args(argv))
    assert record_problems(out, "TS_01", N_PARTICLES, {**shared, "out": arguments["out"]}) == []


def _without_creation_time(star) -> list[str]:
    """The lines of a STAR file but starfile's "# Created by ... at HH:MM:SS" label (the run's clock, not data)."""
    return [line for line in star.read_text().splitlines() if not line.startswith("# Created by the starfile")]


def test_unreadable_or_foreign_record_is_invalid(copy):
    out, arguments = copy
    (out / RECORD_JSON).write_text("{ cut")
    assert "unreadable export record" in record_problems(out, "TS_01", N_PARTICLES, arguments)[0]
    (out / RECORD_JSON).write_text(json.dumps({"ts_ids": ["TS_01"]}))
    assert "not an export record" in record_problems(out, "TS_01", N_PARTICLES, arguments)[0]
