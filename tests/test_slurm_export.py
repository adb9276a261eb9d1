"""The export protocol through Scipion's queue on a real single-node SLURM, one job per tilt series
(``QUEUE_FOR_JOBS = Y``): outputs equal a local run's; a failed job fails its step (no marker, no output, the error
names the tilt series and quotes the job's error) and "continue" redoes only that tilt series; a cancelled job is a
failure, and so are a node that goes down mid-job and a worker killed inside its job. The cluster comes from
:func:`_slurm.slurm_cluster` (skipped where absent, required in CI)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from _slurm import HOSTS_CONF, QUEUE, slurm_cluster, slurm_jobs  # noqa: F401 (slurm_cluster is a fixture)

pytestmark = [pytest.mark.scipion, pytest.mark.slow]

SYNTH = dict(seed=17, n_tomograms=2, n_particles=4, n_tilts=11, box_px=32, image_shape_yx=(256, 256),
             pixel_size_angst=4.0, thickness_angst=400.0, snr=None)
TS_IDS = ("TS_01", "TS_02")
PROTOCOL_TIMEOUT_S = 240


class TestSlurmExport:
    """Namespace of the module's Scipion project (``setupTestProject`` names the project after a class)."""


@pytest.fixture(scope="module")
def project(slurm_cluster, tmp_path_factory):  # noqa: F811 (pytest fixture argument)
    """The synthetic project, a hosts.conf with the SLURM queue, and a local (not queued) reference export."""
    import pyworkflow as pw

    from mspecies.tests.checks import setup_synthetic_project

    hosts = tmp_path_factory.mktemp("slurm-hosts") / "hosts.conf"
    hosts.write_text(HOSTS_CONF)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SCIPION_HOSTS", str(hosts))  # the protocol processes read it at import
        patch.setattr(pw.Config, "SCIPION_HOSTS", str(hosts))  # this process read it already
        setup_synthetic_project(TestSlurmExport, "mspecies-slurm-data-", **SYNTH)
        try:
            reference = _launch(_new_export("local reference", queued=False, threads=3))
            assert reference.isFinished(), reference.getErrorMessage()
            yield TestSlurmExport, reference
        finally:
            shutil.rmtree(TestSlurmExport.tmp, ignore_errors=True)


def _new_export(label: str, queued: bool, threads: int):
    from pyworkflow.constants import QUEUE_FOR_JOBS

    from mspecies.protocols import ProtMSpeciesExportSubtomograms

    ns = TestSlurmExport
    prot = ns.proj.newProtocol(ProtMSpeciesExportSubtomograms, objLabel=label,
                               inputParticles=ns.imported["coordinates"], inputTiltSeries=ns.imported["tilt_series"],
                               inputCtf=ns.imported["ctfs"], boxSize=32, particleDiameter=100.0, backend=1,
                               numberOfThreads=threads)
    if queued:
        prot._useQueue.set(True)
        prot.setQueueParams([QUEUE, {"JOB_MEMORY": "1000", QUEUE_FOR_JOBS: "Y"}])
    return prot


def _launch(prot, wait: bool = True):
    from mspecies.cli.workflow import inside_project

    with inside_project(TestSlurmExport.proj):
        TestSlurmExport.proj.launchProtocol(prot, wait=wait)
    return prot


def _extra(prot, *parts: str) -> Path:
    return Path(TestSlurmExport.proj.getPath()) / prot._getExtraPath(*parts)


def _logs_prefix(prot) -> str:
    return str(Path(TestSlurmExport.proj.getPath()) / prot._getLogsPath()) + "/"


def _run_log(prot) -> str:
    return "\n".join((Path(TestSlurmExport.proj.getPath()) / path).read_text() for path in prot.getLogPaths()[:2])


def _exported_files(prot) -> dict[str, Path]:
    folder = _extra(prot)
    return {p.relative_to(folder).as_posix(): p for ts in TS_IDS for p in sorted((folder / ts / ts).glob("*.mrc"))}


def _assert_outputs_equal(prot, reference) -> None:
    """Same MRC files with equal voxels, same merged STAR rows, same registered set size."""
    from mspecies.formats.mrc import read_mrc
    from mspecies.formats.star import read_star_blocks
    from mspecies.tests.checks import registered_outputs

    files, expected = _exported_files(prot), _exported_files(reference)
    assert sorted(files) == sorted(expected) and len(files) == 2 * SYNTH["n_tomograms"] * SYNTH["n_particles"]
    for name, path in files.items():
        np.testing.assert_array_equal(read_mrc(path)[0], read_mrc(expected[name])[0], err_msg=name)
    star, star_ref = (read_star_blocks(_extra(p, "particles.star")) for p in (prot, reference))
    assert sorted(star) == sorted(star_ref)
    for block in star:
        assert star[block].equals(star_ref[block]), block
    assert registered_outputs(prot) == ["SubTomograms"]
    assert prot.SubTomograms.getSize() == reference.SubTomograms.getSize()


def _mtimes(prot, ts_id: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in sorted(_extra(prot, ts_id).rglob("*")) if p.is_file()}


def test_per_step_queue_runs_one_job_per_tilt_series_with_the_local_outputs(project):
    from mspecies.protocols.protocol_export_subtomograms import DONE_JSON

    _, reference = project
    prot = _launch(_new_export("queued per step", queued=True, threads=3))
    assert prot.isFinished(), f"{prot.getStatus()}: {prot.getErrorMessage()}"
    jobs = slurm_jobs(_logs_prefix(prot))
    assert len(jobs) == len(TS_IDS), jobs
    assert all(job.state == "COMPLETED" for job in jobs), jobs
    assert all(job.cpus == 1 for job in jobs), "a per-step job asks for the protocol's 3 threads"
    assert all(_extra(prot, ts, DONE_JSON).is_file() for ts in TS_IDS)
    _assert_outputs_equal(prot, reference)
    log = _run_log(prot)
    for ts in TS_IDS:  # the worker's lines, relayed from the job's .out into the protocol's log
        assert f"{ts} | {ts}: {SYNTH['n_particles']} particles in" in log


def test_failed_job_fails_its_step_and_continue_redoes_only_that_tilt_series(project):
    from mspecies.protocols.protocol_export_subtomograms import DONE_JSON
    from mspecies.tests.checks import registered_outputs

    ns, reference = project
    stack = ns.tmp / "data" / "TS_02" / "TS_02.mrc"
    content = stack.read_bytes()
    stack.write_bytes(content[:len(content) // 2])  # an unfinished copy: the header reads, the data is short
    try:
        prot = _launch(_new_export("queued, TS_02 fails", queued=True, threads=3))
    finally:
        stack.write_bytes(content)
    assert prot.isFailed(), prot.getStatus()
    message = prot.getErrorMessage()
    failed_job = [job for job in slurm_jobs(_logs_prefix(prot)) if "TS_02" in Path(job.stderr).read_text()]
    assert len(failed_job) == 1
    assert failed_job[0].state == "COMPLETED"  # the usual template's last line: SLURM saw no failure, the step did
    job_error = [line for line in Path(failed_job[0].stderr).read_text().splitlines() if "error" in line][-1]
    assert "TS_02" in message and job_error.strip() in message, message
    assert not _extra(prot, "TS_02", DONE_JSON).exists()
    assert _extra(prot, "TS_01", DONE_JSON).is_file()
    assert registered_outputs(prot) == []
    assert not _extra(prot, "particles.star").exists()

    _assert_continue_redoes_only_ts_02(prot, reference)


def _assert_continue_redoes_only_ts_02(prot, reference) -> None:
    """"Continue" of a run whose TS_02 failed: one new job, TS_01's files untouched, outputs equal a clean run's."""
    from pyworkflow.protocol.constants import MODE_RESUME

    first = _mtimes(prot, "TS_01")
    jobs_before = {job.job_id for job in slurm_jobs(_logs_prefix(prot))}
    prot.runMode.set(MODE_RESUME)
    _launch(prot)
    assert prot.isFinished(), f"{prot.getStatus()}: {prot.getErrorMessage()}"
    assert _mtimes(prot, "TS_01") == first
    new_jobs = [job for job in slurm_jobs(_logs_prefix(prot)) if job.job_id not in jobs_before]
    assert len(new_jobs) == 1 and new_jobs[0].state == "COMPLETED", new_jobs
    _assert_outputs_equal(prot, reference)


def test_cancelled_job_is_a_failure(project):
    from mspecies.protocols.protocol_export_subtomograms import DONE_JSON
    from mspecies.tests.checks import registered_outputs

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MSPECIES_TEST_JOB_DELAY_S", "120")  # the job script sleeps before the worker starts
        prot = _launch(_new_export("queued, job cancelled", queued=True, threads=1), wait=False)
    running = _wait_for(lambda: [j for j in slurm_jobs(_logs_prefix(prot)) if j.state == "RUNNING"], 60)
    subprocess.run(["scancel", str(running[0].job_id)], check=True, timeout=30)
    _wait_for(lambda: _ended(prot), PROTOCOL_TIMEOUT_S)
    assert prot.isFailed(), prot.getStatus()
    assert slurm_jobs(_logs_prefix(prot))[0].state == "CANCELLED"
    message = prot.getErrorMessage()
    assert "TS_01" in message and "CANCELLED" in message, message
    assert not any(_extra(prot, ts, DONE_JSON).exists() for ts in TS_IDS)
    assert registered_outputs(prot) == []


def test_worker_killed_inside_its_job_is_a_failure_that_quotes_the_kill(project):
    """SIGKILL to the job's Python worker (not to the job): the job script goes on to its last line, so SLURM says
    COMPLETED; the step fails anyway, because the worker left no record, and quotes the shell's "Killed" line."""
    from mspecies.protocols.protocol_export_subtomograms import DONE_JSON
    from mspecies.tests.checks import registered_outputs

    prot = _launch(_new_export("queued, worker killed", queued=True, threads=1), wait=False)
    worker = _wait_for(lambda: _worker_pid(prot._getExtraPath("TS_01", "")), 120, poll_s=0.05)
    os.kill(worker, signal.SIGKILL)
    _wait_for(lambda: _ended(prot), PROTOCOL_TIMEOUT_S)
    assert prot.isFailed(), prot.getStatus()
    assert [job.state for job in slurm_jobs(_logs_prefix(prot))] == ["COMPLETED"]
    message = prot.getErrorMessage()
    assert "TS_01" in message and "did not finish" in message and f"{worker} Killed" in message, message
    assert not any(_extra(prot, ts, DONE_JSON).exists() for ts in TS_IDS)
    assert registered_outputs(prot) == []


def _worker_pid(folder: str) -> int | None:
    """The process id of a running ``python -m mspecies export`` whose arguments name ``folder``, if any."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, or one that just ended
            continue
        if entry.name.isdigit() and argv[1:4] == ["-m", "mspecies", "export"] and any(folder in a for a in argv):
            return int(entry.name)
    return None


def test_node_failure_mid_job_is_a_failure_and_continue_redoes_only_that_tilt_series(project):
    """One step at a time: TS_01's job finishes, then the node goes down while TS_02's job runs. SLURM ends that job
    NODE_FAIL and kills its processes (no record); the node comes back and "continue" redoes only TS_02."""
    from mspecies.protocols.protocol_export_subtomograms import DONE_JSON
    from mspecies.tests.checks import registered_outputs

    _, reference = project
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MSPECIES_TEST_JOB_DELAY_S", "20")  # TS_02's job is still starting when the node goes down
        patch.setenv("SBATCH_NO_REQUEUE", "1")  # else SLURM requeues it, and pyworkflow waits for the rerun
        prot = _launch(_new_export("queued, node fails", queued=True, threads=1), wait=False)
    node = subprocess.run(["sinfo", "-h", "-o", "%N"], capture_output=True, text=True, check=True,
                          timeout=30).stdout.strip()
    try:
        _wait_for(lambda: [j for j in slurm_jobs(_logs_prefix(prot))[1:] if j.state == "RUNNING"], PROTOCOL_TIMEOUT_S)
        _set_node_state(node, "down", check=True)
        _wait_for(lambda: _ended(prot), PROTOCOL_TIMEOUT_S)
    finally:
        _set_node_state(node, "resume", check=False)  # ReturnToService=2 may have brought it back already
        _wait_for(lambda: _node_state() == "idle", 60)
    assert prot.isFailed(), prot.getStatus()
    assert [job.state for job in slurm_jobs(_logs_prefix(prot))] == ["COMPLETED", "NODE_FAIL"]
    message = prot.getErrorMessage()
    assert "TS_02" in message and "NODE FAILURE" in message, message
    assert not _extra(prot, "TS_02", DONE_JSON).exists()
    assert _extra(prot, "TS_01", DONE_JSON).is_file()
    assert registered_outputs(prot) == []
    _assert_continue_redoes_only_ts_02(prot, reference)


def _set_node_state(node: str, state: str, check: bool) -> None:
    subprocess.run(["scontrol", "update", f"nodename={node}", f"state={state}", "reason=mspecies test"],
                   check=check, timeout=30)


def _node_state() -> str:
    return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30).stdout.strip()


def _ended(prot) -> bool:
    """Whether a protocol launched without waiting has ended (its state re-read from its run database)."""
    TestSlurmExport.proj._updateProtocol(prot)
    return not prot.isActive()


def _wait_for(condition, timeout_s: float, poll_s: float = 1.0):
    """The first truthy value of ``condition()``, polled every ``poll_s``; fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {condition}")
