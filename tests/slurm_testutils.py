"""A real single-node SLURM for the tests (tests/test_slurm.py), started and stopped here.

What it does, as a site administrator would on one machine without systemd:

- the Debian packages ``slurm-wlm slurmctld slurmd munge`` are installed with apt-get when a daemon
  is missing and this process runs as root (else :func:`unavailable` says why, and the tests skip);
- munge is started when ``munge -n | unmunge`` fails (its key is made by the munge package);
- a ``slurm.conf`` for this machine only (the node line of ``slurmd -C``, address 127.0.0.1, free
  ports, a unique ``ClusterName``, state, spool, pid and log files under one temporary folder),
  then ``slurmctld -f CONF`` and ``slurmd -f CONF``; clients use ``SLURM_CONF=CONF``;
- :meth:`Slurm.stop` cancels every job left, then stops the daemons by the PIDs in their pid files
  (SIGTERM, then SIGKILL), munge too when it was started here.

Settings that matter for the tests (see :func:`write_conf`): ``KillWait=2`` (a job past its
walltime, or cancelled, gets SIGTERM and 2 s later SIGKILL, instead of 30 s), ``MinJobAge=600``
(ended jobs stay visible to ``squeue -t all`` with their final state, which avel reports).
SLURM's walltime resolution is one minute and slurmctld looks for jobs past their limit every
30 s, so a job with ``--time=1`` ends 60 to 90 s after it started: the walltime test waits that long.

Run as a script to keep one running by hand: ``python tests/slurm_testutils.py /tmp/slurm-dir``
(prints the ``export SLURM_CONF=...`` line; ``--stop /tmp/slurm-dir`` stops it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurmctld", "slurmd", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged")
CLIENTS = ("sinfo", "squeue", "sbatch", "scancel", "scontrol")
#: the default partition of the test cluster; one whose time limit is 5 minutes; one that is down
PARTITION = "debug"
SHORT = "short"
DOWN = "closed"


def _find(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for p in (Path("/usr/sbin") / name, Path("/usr/bin") / name)
                                       if p.exists()), None)


def missing_programs() -> list[str]:
    return [name for name in DAEMONS + CLIENTS if _find(name) is None]


def install_packages() -> str | None:
    """apt-get install the SLURM packages when a program is missing; None when all are there,
    else the reason they are not (not root, no apt-get, the install failed)."""
    missing = missing_programs()
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"SLURM is not installed ({', '.join(missing)} missing) and the tests do not run as root to install it"
    if not shutil.which("apt-get"):
        return f"SLURM is not installed ({', '.join(missing)} missing) and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    command = ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:  # a fresh machine may need the package lists first
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return f"`{' '.join(command)}` failed: {proc.stderr.strip()[-500:]}"
    missing = missing_programs()
    return f"installed {' '.join(PACKAGES)} but {', '.join(missing)} still missing" if missing else None


def unavailable() -> str | None:
    """Why a SLURM cannot be started here (None: it can): programs missing and not installable,
    or not root (slurmd runs jobs as their users and needs root)."""
    reason = install_packages()
    if reason:
        return reason
    if os.geteuid() != 0:
        return "slurmd must run as root to start jobs; the tests do not run as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _munge_works() -> bool:
    munge, unmunge = _find("munge"), _find("unmunge")
    if not munge or not unmunge:
        return False
    cred = subprocess.run([munge, "-n"], capture_output=True)
    if cred.returncode != 0:
        return False
    return subprocess.run([unmunge], input=cred.stdout, capture_output=True).returncode == 0


def start_munge(timeout: float = 20) -> int | None:
    """Start munged unless munge already works; returns the PID of the munged started here."""
    if _munge_works():
        return None
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
    subprocess.run(["runuser", "-u", "munge", "--", _find("munged")], check=True, capture_output=True)
    deadline = time.monotonic() + timeout
    while not _munge_works():
        if time.monotonic() > deadline:
            raise RuntimeError("munged was started but `munge -n | unmunge` still fails")
        time.sleep(0.2)
    pid_file = Path("/run/munge/munged.pid")
    return int(pid_file.read_text().split()[0]) if pid_file.is_file() else None


def node_line() -> str:
    """``NodeName=... CPUs=... RealMemory=...`` of this machine (``slurmd -C``), at 127.0.0.1."""
    out = subprocess.run([_find("slurmd"), "-C"], capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if line.startswith("NodeName="))
    return " ".join(word for word in line.split() if not word.startswith("UpTime=")) + " NodeAddr=127.0.0.1"


def write_conf(root: Path, cluster: str) -> Path:
    """slurm.conf of a one-node cluster with everything under ``root``."""
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(f"""# one-node SLURM for the avel tests (tests/slurm_testutils.py)
ClusterName={cluster}
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
ReturnToService=2
MpiDefault=none
KillWait=2
MinJobAge=600
InactiveLimit=0
{node_line()} State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName={SHORT} Nodes=ALL MaxTime=5 State=UP
PartitionName={DOWN} Nodes=ALL MaxTime=INFINITE State=DOWN
""")
    return conf


@dataclasses.dataclass
class Slurm:
    """A running test SLURM: ``env`` = os.environ with ``SLURM_CONF`` (give it to every client)."""

    root: Path
    conf: Path
    munged_pid: int | None = None

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def run(self, *args: str, check: bool = True) -> str:
        """A SLURM client command (``sinfo``, ``squeue``, ...); its stdout."""
        proc = subprocess.run([_find(args[0]) or args[0], *args[1:]], env=self.env, capture_output=True, text=True)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def jobs(self, all_states: bool = False) -> list[tuple[str, str, str]]:
        """(job id, state, name) of the jobs in the queue (``squeue``: pending, running,
        completing...); with ``all_states`` also those that ended recently."""
        args = ["squeue", "-h", "-o", "%i|%T|%j"] + (["-t", "all"] if all_states else [])
        return [tuple(line.split("|", 2)) for line in self.run(*args).splitlines() if line.strip()]  # type: ignore[misc]

    def wait_jobs_gone(self, timeout: float = 60) -> list[tuple[str, str, str]]:
        """Wait until ``squeue`` lists no job; returns what is still listed after ``timeout``."""
        deadline = time.monotonic() + timeout
        while (left := self.jobs()) and time.monotonic() < deadline:
            time.sleep(0.5)
        return left

    def log_tail(self, lines: int = 30) -> str:
        out = []
        for path in sorted((self.root / "log").glob("*.log")):
            out.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                states = self.run("sinfo", "-h", "-o", "%t").split()
            except RuntimeError:
                states = []
            if states and all(s in ("idle", "mix", "alloc") for s in states):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the SLURM node is not idle after {timeout} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Cancel every job, stop slurmd then slurmctld (and munged if started here) by their PIDs."""
        if (self.root / "slurmctld.pid").is_file():
            self.run("scancel", "--user", str(os.geteuid()), check=False)
            self.wait_jobs_gone(timeout=20)
        for name in ("slurmd", "slurmctld"):
            _stop_pid_file(self.root / f"{name}.pid")
        if self.munged_pid:
            _stop_pid(self.munged_pid)


def _stop_pid(pid: int, grace: float = 15) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _stop_pid_file(path: Path) -> None:
    try:
        pid = int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    _stop_pid(pid)


def start_slurm(root: Path, cluster: str | None = None) -> Slurm:
    """munge, slurmctld and slurmd for a one-node cluster under ``root``; the node is idle on return.
    Everything started is stopped again when the start fails."""
    root.mkdir(parents=True, exist_ok=True)
    # the name is kept in the state folder: one name per folder, so that a folder can be started again
    slurm = Slurm(root, write_conf(root, cluster or f"avel{hashlib.sha1(str(root).encode()).hexdigest()[:6]}"))
    try:
        slurm.munged_pid = start_munge()
        for daemon in ("slurmctld", "slurmd"):
            proc = subprocess.run([_find(daemon), "-f", str(slurm.conf)], env=slurm.env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{daemon} -f {slurm.conf} exited {proc.returncode}: {proc.stderr}\n{slurm.log_tail()}")
        slurm.wait_idle()
    except BaseException:
        slurm.stop()
        raise
    return slurm


@dataclasses.dataclass(frozen=True)
class StallInFirstJob:
    """A decode function for the shard tasks (``run_extraction_dask(decode_fn=...)``): the first
    SLURM job that calls it writes its job id into ``marker`` and then never returns (until SLURM
    ends the job: ``scancel``, walltime); in every other job it is
    :func:`extract.decode.decode_video`. So a job dies in the middle of a shard task, always."""

    marker: str

    def __call__(self, request, grids, segments, audio):
        from extract.decode import decode_video

        job = os.environ.get("SLURM_JOB_ID", "")
        try:  # the first caller anywhere wins (the claim file is never removed)
            os.close(os.open(self.marker + ".claim", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            scratch = f"{self.marker}.{os.getpid()}"
            Path(scratch).write_text(job)
            os.replace(scratch, self.marker)  # the marker appears with its content
        while not os.path.exists(self.marker):  # another task of this job is writing it
            time.sleep(0.05)
        if job and Path(self.marker).read_text() == job:
            while True:
                time.sleep(1)
        return decode_video(request, grids, segments, audio)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--stop":
        folder = Path(sys.argv[2])
        Slurm(folder, folder / "slurm.conf").stop()
        print(f"stopped the SLURM daemons of {folder}")
    elif len(sys.argv) == 2:
        reason = unavailable()
        if reason:
            sys.exit(reason)
        started = start_slurm(Path(sys.argv[1]).resolve())
        print(f"export SLURM_CONF={started.conf}")
    else:
        sys.exit(__doc__)
