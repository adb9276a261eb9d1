"""A SLURM cluster for the queue tests: skip with a printed reason where there is none, fail in CI.

:func:`slurm_cluster` uses the cluster named by ``SLURM_CONF`` when it answers, else starts a private single-node
cluster with ``scripts/slurm_cluster.sh`` (root, Debian packages ``slurm-wlm`` and ``munge``) and stops it after.
CI sets ``MSPECIES_REQUIRE_SLURM=1`` (``.ci/run`` installs the packages), so a missing cluster there is an error
and the queue tests can never silently vanish. Facts: ``../shared/reference/slurm.md``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_cluster.sh"
QUEUE = "debug"  # the partition of scripts/slurm_cluster.sh

# A usual Scipion SLURM template (its last line makes a job's exit code 0 whatever the command did).
# MSPECIES_TEST_JOB_DELAY_S keeps a job running before its command, so that a test can cancel it while it runs.
# "|| exit": scancel's SIGTERM may reach the sleep before the script's shell (proctrack/linuxproc), and the shell
# would then go on to run the command, which may finish (and prove its work) within KillWait.
HOSTS_CONF = f"""[localhost]
PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d %_(COMMAND)s
NAME = SLURM
MANDATORY = 0
SUBMIT_COMMAND = sbatch %_(JOB_SCRIPT)s
CANCEL_COMMAND = scancel %_(JOB_ID)s
CHECK_COMMAND = squeue -h -j %_(JOB_ID)s
SUBMIT_TEMPLATE = #!/bin/bash
    #SBATCH -J %_(JOB_NAME)s
    #SBATCH -o %_(JOB_LOGS)s.out
    #SBATCH -e %_(JOB_LOGS)s.err
    #SBATCH -p %_(JOB_QUEUE)s
    #SBATCH --ntasks=%_(JOB_NODES)d --cpus-per-task=%_(JOB_THREADS)d
    #SBATCH --mem=%_(JOB_MEMORY)sM
    sleep ${{MSPECIES_TEST_JOB_DELAY_S:-0}} || exit $?
    %_(JOB_COMMAND)s
    echo "Finished at $(date)"
QUEUES = {{"{QUEUE}": [["JOB_MEMORY", "1000", "Memory (MB)", "RAM per job"]]}}
"""


@dataclass(frozen=True)
class SlurmJob:
    """One job as ``scontrol show job`` describes it."""

    job_id: int
    state: str
    cpus: int
    stdout: str
    stderr: str


def _answers() -> bool:
    try:
        run = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0 and bool(run.stdout.strip())


def _unavailable(reason: str) -> None:
    if os.environ.get("MSPECIES_REQUIRE_SLURM") == "1":
        pytest.fail(reason + " — required because MSPECIES_REQUIRE_SLURM=1")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[str]:
    """SLURM_CONF of a running cluster (exported to this process and its children)."""
    if os.environ.get("SLURM_CONF") and _answers():
        yield os.environ["SLURM_CONF"]
        return
    missing = [name for name in ("sbatch", "slurmctld", "slurmd", "munged") if not shutil.which(name)
               and not Path("/usr/sbin", name).is_file()]
    if missing:
        _unavailable(f"SLURM not installed ({', '.join(missing)} missing; as root: {SCRIPT} install)")
    if os.geteuid() != 0:
        _unavailable("no SLURM cluster answers (SLURM_CONF) and a private one needs root")
    folder = tempfile.mkdtemp(prefix="mspecies-slurm-")
    start = subprocess.run(["bash", str(SCRIPT), "start", folder], capture_output=True, text=True, timeout=120)
    if start.returncode != 0:
        subprocess.run(["bash", str(SCRIPT), "stop", folder], timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
        _unavailable(f"the private SLURM cluster did not start: {start.stderr.strip()[-500:]}")
    conf = str(Path(folder) / "etc" / "slurm.conf")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", conf)
        try:
            yield conf
        finally:
            subprocess.run(["bash", str(SCRIPT), "stop", folder], timeout=60)
    shutil.rmtree(folder, ignore_errors=True)


def slurm_jobs(stdout_prefix: str) -> list[SlurmJob]:
    """Jobs the controller still knows (finished ones for MinJobAge) whose output file starts with a prefix."""
    run = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, check=True, timeout=30)
    jobs = []
    for line in run.stdout.splitlines():
        fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
        if fields.get("StdOut", "").startswith(stdout_prefix):
            jobs.append(SlurmJob(int(fields["JobId"]), fields["JobState"], int(fields["NumCPUs"]), fields["StdOut"],
                                 fields.get("StdErr", "")))
    return sorted(jobs, key=lambda job: job.job_id)
