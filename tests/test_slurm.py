"""``--scheduler slurm`` against a real SLURM that this module starts (tests/slurm_testutils.py).

The module fixture installs the Debian SLURM packages when they are missing and the tests run as
root (CI), starts munge, slurmctld and slurmd for this machine only, and stops them at the end;
elsewhere the SLURM tests skip with the reason. The reference for "correct" is the single-process
``avel-extract`` of the same demo (bit-identical shard files, equal ids and status), and the
local sweep for the SLURM sweep (equal results.csv / results.md).

Cost (marked ``slurm`` and ``slow``; about 3 minutes on 2 cores): the walltime test alone waits
60 to 90 s, because SLURM's smallest time limit is one minute and slurmctld looks for jobs past
their limit every 30 s; nothing shorter is a real walltime. The other tests take 10 to 40 s each
(Python and the networks start in every job). The demo is small: 15 clips, 2 segments of 1 frame,
32 x 32 VGG-19 inputs, random weights.

The worker jobs of the in-process tests import this folder (``dask.slurm.prologue`` exports
PYTHONPATH): their decode stalls in the first job (:class:`slurm_testutils.StallInFirstJob`), so
that ``scancel`` and the walltime hit a job in the middle of a shard task, deterministically.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from slurm_testutils import DOWN, PARTITION, SHORT, StallInFirstJob, start_slurm, unavailable

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
EXTRACT = [sys.executable, "-m", "extract.cli"]
TRAIN = [sys.executable, "-m", "train.cli"]

#: what makes the demo small (the demo itself: random weights, 1 VGG-19 frame per segment)
SMALL = {"extract": {"image_size": 32, "segments": 2, "decode_workers": 1, "threads": 1, "device": "cpu"},
         "store": {"rows_per_shard": 4}}
#: dask.slurm of the test projects: 2 jobs of 1 CPU on the one node, workers on the loopback (a worker
#: with VGG-19 and VGGish built needs about 1.3 GB: its nanny restarts it at 95 % of the job's memory)
SLURM_CFG = {"interface": "lo", "jobs": 2, "cores": 1, "memory": "3GB", "walltime": "10", "poll_interval": 0.5,
             "start_timeout": 180, "death_timeout": 30}


# ------------------------------------------------------------------------------------------
# no SLURM needed: the job script, the parsers, the missing extra


def test_the_job_script_holds_every_dask_slurm_setting(tmp_path):
    pytest.importorskip("dask_jobqueue")
    from extract.cli import main

    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"dask": {"slurm": {
        "partition": "gpu", "account": "proj7", "cores": 6, "memory": "20GB", "walltime": "2-00:00:00", "gpus": 1,
        "gpu_type": "a100", "prologue": ["module load cuda/12", "source /opt/venv/bin/activate"],
        "directives": ["--qos=high", "constraint=ib"], "python": "/opt/venv/bin/python", "log_directory": "logs"}}}))
    res = CliRunner().invoke(main, ["--config", str(tmp_path / "pipeline.yaml"), "--print-job-script"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    name = next(line.split()[2] for line in lines if line.startswith("#SBATCH -J "))
    assert name.startswith("avel-extract-")
    expected = ["#SBATCH -p gpu", "#SBATCH -A proj7", "#SBATCH -n 1", "#SBATCH --cpus-per-task=6",
                "#SBATCH --mem=19G", "#SBATCH -t 2-00:00:00", "#SBATCH --gres=gpu:a100:1", "#SBATCH --qos=high",
                "#SBATCH --constraint=ib", f"#SBATCH -e {tmp_path}/logs/{name}-%J.err",
                f"#SBATCH -o {tmp_path}/logs/{name}-%J.out", "module load cuda/12", "source /opt/venv/bin/activate"]
    for line in expected:
        assert line in lines, f"{line!r} not in:\n{res.output}"
    # 20 GB = 18.6 GiB -> --mem=19G, as dask-jobqueue rounds; prologue lines before the worker, in order
    worker = lines[-1]
    assert lines.index("source /opt/venv/bin/activate") == len(lines) - 2
    assert worker.startswith("/opt/venv/bin/python -m distributed.cli.dask_worker tcp://SCHEDULER-ADDRESS:PORT")
    # extract.device auto + a GPU per job = cuda: one task thread, the GPU resource the tasks ask for
    assert "--nthreads 1 " in worker and worker.endswith("--resources GPU=1")
    assert not (tmp_path / "logs").exists()  # printing creates nothing


def test_walltime_memory_and_gres_are_read_as_slurm_reads_them():
    from extract.core.slurm import _parse_gres, memory_mib, parse_walltime

    assert [parse_walltime(t) for t in ("90", "30:00", "1:30", "01:00:00", "1:00:01", "2-00:00:00", "1-12", "1-0:30",
                                        "infinite", "UNLIMITED")] == [90, 30, 2, 60, 61, 2880, 2160, 1470, None, None]
    assert [memory_mib(m) for m in ("8GB", "2GiB", "500MB", "1GB")] == [8 * 1024, 2048, 477, 954]  # 1GB = 10**9 bytes < 1 GiB: 954M
    assert _parse_gres("gpu:a100:4(S:0-1),gpu:v100:2") == {"a100": 4, "v100": 2}
    assert _parse_gres("gpu:2") == {"": 2} and _parse_gres("(null)") == {}


def test_without_dask_jobqueue_one_line_names_the_extra(tmp_path, monkeypatch):
    from extract.cli import main

    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # import dask_jobqueue -> ImportError
    res = CliRunner().invoke(main, ["--print-job-script"])
    assert res.exit_code == 2
    assert 'Error: --scheduler slurm needs dask-jobqueue, an optional dependency: pip install -e ".[slurm]"' in res.output


def test_ctrl_c_still_interrupts_once_dask_jobqueue_is_imported():
    """dask-jobqueue 0.9 sets SIGINT to sys.exit() when imported (dask_jobqueue/runner.py:18): avel
    puts Python's own handler back, so that Ctrl-C raises KeyboardInterrupt (exit 130, jobs cancelled)."""
    pytest.importorskip("dask_jobqueue")
    code = ("import signal; from extract.core.slurm import require_jobqueue; require_jobqueue(); "
            "print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert out.stdout.strip() == "True", out.stderr
    code = "import signal, dask_jobqueue; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    raw = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert raw.stdout.strip() == "False", "dask-jobqueue no longer replaces the handler: drop the workaround"


# ------------------------------------------------------------------------------------------
# the SLURM and the projects


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """munge + slurmctld + slurmd for this machine; stopped (every job cancelled) at the end."""
    reason = unavailable()
    try:
        import dask_jobqueue  # noqa: F401
    except ImportError:
        reason = reason or 'the SLURM tests need dask-jobqueue: pip install -e ".[test]" (or ".[slurm]")'
    if reason:
        if os.environ.get("AVEL_REQUIRE_SLURM"):  # CI (.ci/run): these tests must run, not skip
            pytest.fail(f"AVEL_REQUIRE_SLURM is set but {reason}")
        pytest.skip(reason)
    import tempfile

    # a short folder: slurmstepd makes unix sockets in the spool folder (108-character paths)
    cluster = start_slurm(Path(tempfile.mkdtemp(prefix="avel-slurm-")))
    try:
        yield cluster
    finally:
        cluster.stop()


def env_of(slurm, **extra) -> dict[str, str]:
    """The environment of the commands: this checkout importable, 1 thread, the test SLURM."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVEL_", "DASK_", "SLURM_"))}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", SLURM_CONF=str(slurm.conf))
    env.update(extra)
    return env


@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str
    seconds: float

    def tail(self, n: int = 30) -> str:
        return f"exit {self.rc} after {self.seconds:.0f} s:\n" + "\n".join(self.err.splitlines()[-n:])


def run(command: list[str], env, cwd: Path, timeout: float = 300) -> Result:
    started = time.monotonic()
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    result = Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
    print(" ".join(command[2:]), "->", result.tail(6))
    return result


def write_pipeline(path: Path, base: dict, **sections) -> Path:
    """``base`` with each section of ``sections`` merged in (one level deep), as YAML at ``path``."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for name, values in sections.items():
        merged = dict(data.get(name) or {})
        for key, value in values.items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
        data[name] = merged
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def demo(slurm, tmp_path_factory) -> Path:
    """The offline demo (15 clips), its pipeline made small, with a dask.slurm section: demo/slurm.yaml."""
    root = tmp_path_factory.mktemp("slurm_demo")
    r = run([*EXTRACT, "demo", "--out", "demo", "--videos", "15", "--background-videos", "0", "--seed", "3"],
            env_of(slurm), root)
    assert r.rc == 0, r.tail()
    base = yaml.safe_load((root / "demo" / "pipeline.yaml").read_text())
    return write_pipeline(root / "demo" / "slurm.yaml", base, **SMALL, dask={"slurm": SLURM_CFG})


@pytest.fixture(scope="module")
def reference(slurm, demo) -> Path:
    """The single-process store of the demo's splits (no scheduler)."""
    r = run([*EXTRACT, "--config", str(demo), "--split", "all", "--store", "reference.zarr", "--no-progress"],
            env_of(slurm), demo.parent)
    assert r.rc == 0, r.tail()
    return demo.parent / "reference.zarr"


def assert_same_store(reference: Path, path: Path) -> None:
    """Bit-identical array shard files, equal ids and status (all done)."""
    from extract.distributed import shard_files_equal
    from extract.core.store import open_store

    assert shard_files_equal(reference, path) == []
    a, b = open_store(reference), open_store(path)
    assert a.ids.tolist() == b.ids.tolist() and len(a.ids) == 15
    np.testing.assert_array_equal(a.status(), b.status())
    assert set(b.status().tolist()) == {1}


def jobs_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip().startswith("SLURM jobs (")), "")


# ------------------------------------------------------------------------------------------
# the command as a user runs it


@pytest.mark.slurm
@pytest.mark.slow
def test_demo_extraction_through_slurm_equals_the_single_process_store(slurm, demo, reference):
    r = run([*EXTRACT, "--config", str(demo), "--split", "all", "--store", "slurm.zarr", "--no-progress",
             "--scheduler", "slurm"], env_of(slurm), demo.parent)
    assert r.rc == 0, r.tail()
    assert_same_store(reference, demo.parent / "slurm.zarr")
    line = jobs_line(r.err)
    assert f"partition {PARTITION}): started 2, lost 0, replaced 0" in line, r.tail()
    assert "; all cancelled at the end, none left in the queue (checks " in line, line
    assert slurm.jobs() == []
    # the jobs ran where the log folder says, and SLURM cancelled them at the end
    logs = sorted((demo.parent / "data" / "slurm-logs").glob("avel-extract-*.err"))
    assert len(logs) == 2 and all("CANCELLED" in p.read_text() for p in logs), logs


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize("settings, message", [
    (["dask.slurm.partition=gpux"], f"dask.slurm.partition: 'gpux' is not a partition of this SLURM cluster "
                                    f"(sinfo lists: {PARTITION}*, {SHORT}, {DOWN}; * = the default)"),
    ([f"dask.slurm.partition={DOWN}"], f"SLURM partition '{DOWN}' is down, not up (sinfo): jobs would wait forever"),
    ([f"dask.slurm.partition={SHORT}", "dask.slurm.walltime=00:10:00"],
     f"dask.slurm.walltime 00:10:00 is longer than partition '{SHORT}' allows (00:05:00)"),
    (["dask.slurm.cores=64"], f"no node of SLURM partition '{PARTITION}' can hold one worker job of 64 CPUs "
                              "(dask.slurm.cores), 3072 MB (dask.slurm.memory 3GB): its nodes: "),
    # 100000 GB = 10**14 bytes, rounded up to 93133 GiB as dask-jobqueue writes --mem (SLURM's MB are MiB)
    (["dask.slurm.memory=100000GB"], f"no node of SLURM partition '{PARTITION}' can hold one worker job of 1 CPU "
                                     "(dask.slurm.cores), 95368192 MB (dask.slurm.memory 100000GB): its nodes: "),
    (["dask.slurm.directives=[--gres=tpu:1]"], "SLURM refuses the worker job (sbatch --test-only, partition 'debug'): "
                                               "sbatch: error: Invalid generic resource (gres) specification"),
], ids=["no-partition", "partition-down", "walltime", "cores", "memory", "sbatch-test-only"])
def test_a_request_slurm_cannot_run_is_refused_before_a_store_exists(slurm, demo, settings, message):
    before = slurm.jobs(all_states=True)
    r = run([*EXTRACT, "--config", str(demo), "--split", "all", "--store", "refused.zarr", "--no-progress",
             "--scheduler", "slurm", *[a for s in settings for a in ("--set", s)]], env_of(slurm), demo.parent)
    assert r.rc == 2, r.tail()
    assert message in r.err, r.tail()
    assert not (demo.parent / "refused.zarr").exists()
    assert slurm.jobs(all_states=True) == before  # no job was submitted
    assert jobs_line(r.err) == ""


@pytest.mark.slurm
@pytest.mark.slow
def test_jobs_that_die_before_their_worker_connects_stop_the_run_with_their_log(slurm, demo):
    before = {j[0] for j in slurm.jobs(all_states=True)}
    r = run([*EXTRACT, "--config", str(demo), "--split", "all", "--store", "nostart.zarr", "--no-progress",
             "--scheduler", "slurm", "--set", 'dask.slurm.prologue=["echo module avel-env not found >&2", "exit 3"]',
             "--set", "dask.slurm.max_failed_starts=2", "--set", "dask.slurm.jobs=1"], env_of(slurm), demo.parent)
    assert r.rc == 2, r.tail()
    assert "2 SLURM worker jobs in a row ended before their Dask worker connected" in r.err, r.tail()
    assert "module avel-env not found" in r.err, r.tail()
    assert not (demo.parent / "nostart.zarr").exists()
    ended = [j for j in slurm.jobs(all_states=True) if j[0] not in before]
    assert len(ended) >= 2 and {state for _, state, _ in ended} == {"FAILED"}, ended
    assert slurm.jobs() == []


@pytest.mark.slurm
@pytest.mark.slow
def test_ctrl_c_cancels_every_job(slurm, demo, tmp_path):
    err = tmp_path / "stderr.txt"
    with err.open("w") as fh:
        proc = subprocess.Popen([*EXTRACT, "--config", str(demo), "--split", "all", "--store", "ctrlc.zarr",
                                 "--no-progress", "--scheduler", "slurm"], env=env_of(slurm), cwd=demo.parent,
                                stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
        try:
            deadline = time.monotonic() + 180
            while "first worker connected" not in err.read_text():
                assert proc.poll() is None, err.read_text()[-3000:]
                assert time.monotonic() < deadline, err.read_text()[-3000:]
                time.sleep(0.2)
            running = [j for j in slurm.jobs() if j[1] == "RUNNING" and j[2].startswith("avel-extract-")]
            assert running, slurm.jobs()
            os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: SIGINT to the client
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = err.read_text()
    assert rc == 130, text[-3000:]
    assert "avel-extract: interrupted" in text
    assert "; all cancelled at the end, none left in the queue" in jobs_line(text), text[-2000:]
    assert slurm.jobs() == []  # squeue lists nothing, at once


# ------------------------------------------------------------------------------------------
# jobs that end early, in the middle of a shard task (in-process, with a decode that stalls)


def extract_in_process(slurm, demo: Path, store: Path, marker: Path, monkeypatch, **slurm_settings):
    """run_extraction_dask through :class:`SlurmWorkers` (as ``--scheduler slurm`` does), with a
    decode that stalls in the first job (``marker``); returns (summary, stats)."""
    from extract.distributed import run_extraction_dask
    from extract.requests import collect_requests
    from extract.core.settings import load_pipeline
    from extract.core.slurm import stage_workers

    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    prologue = [f"export PYTHONPATH={TESTS}:{REPO}${{PYTHONPATH:+:$PYTHONPATH}}", "export OMP_NUM_THREADS=1"]
    # the stalled decode must not be abandoned by the decode timeout: the job's end stops it
    pipeline = load_pipeline(demo, {"dask": {"slurm": {"jobs": 1, "prologue": prologue, **slurm_settings}},
                                    "extract": {"decode_timeout_s": 0}})
    requests = collect_requests(pipeline, "all")
    workers = stage_workers(pipeline, stage="extract", device="cpu")
    workers.check()
    with workers:
        summary = run_extraction_dask(pipeline, requests, store_path=store, client=workers.client, scheduler="slurm",
                                      progress=False, decode_fn=StallInFirstJob(str(marker)))
    return summary, workers.stats


@pytest.mark.slurm
@pytest.mark.slow
def test_a_worker_job_cancelled_mid_run_still_gives_the_identical_store(slurm, demo, reference, tmp_path, monkeypatch):
    import threading

    marker = tmp_path / "stalled-job"

    def cancel_the_stalled_job():  # as a user would: scancel JOBID, while it runs a shard task
        deadline = time.monotonic() + 240
        while not (marker.is_file() and marker.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        slurm.run("scancel", marker.read_text())

    canceller = threading.Thread(target=cancel_the_stalled_job, daemon=True)
    canceller.start()
    summary, stats = extract_in_process(slurm, demo, tmp_path / "cancelled.zarr", marker, monkeypatch)
    canceller.join(timeout=5)
    assert summary.exit_code == 0, summary.text()
    assert_same_store(reference, tmp_path / "cancelled.zarr")
    job = marker.read_text()
    assert stats.lost == {job: "CANCELLED"} and stats.replaced == 1 and len(stats.started) == 2, stats
    assert stats.started[0] == job and summary.rescheduled >= 1, (stats, summary.text())
    assert stats.text().startswith(f"SLURM jobs ({stats.job_name}, partition {PARTITION}): started 2, lost 1 "
                                   "(1 CANCELLED), replaced 1")
    assert slurm.jobs() == []


@pytest.mark.slurm
@pytest.mark.slow
def test_a_walltime_shorter_than_the_work_gives_the_identical_store(slurm, demo, reference, tmp_path, monkeypatch):
    """The first job's shard task stalls until SLURM ends the job at its walltime (1 minute, the
    smallest: it ends 60 to 90 s after it started, state TIMEOUT); a new job replaces it and the
    shard tasks run again there."""
    marker = tmp_path / "stalled-job"
    summary, stats = extract_in_process(slurm, demo, tmp_path / "walltime.zarr", marker, monkeypatch, walltime="1")
    assert summary.exit_code == 0, summary.text()
    assert_same_store(reference, tmp_path / "walltime.zarr")
    job = marker.read_text()
    assert stats.lost.get(job) == "TIMEOUT" and stats.replaced >= 1, stats
    assert "TIMEOUT" in stats.text() and slurm.jobs() == []


# ------------------------------------------------------------------------------------------
# a sweep


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_through_slurm_gives_the_table_of_the_local_sweep(slurm, tmp_path):
    import csv

    from train_testutils import make_dataset

    ds = make_dataset(tmp_path / "ds", T=10, sizes=(12, 6, 6))
    config = write_pipeline(ds["pipeline"].parent / "slurm.yaml", yaml.safe_load(ds["pipeline"].read_text()),
                            dask={"slurm": SLURM_CFG})
    sweep = ["--config", str(config), "--head", "a,v", "--seeds", "0,1", "--epochs", "2", "--threads", "1",
             "--device", "cpu"]
    local = run([*TRAIN, *sweep], env_of(slurm), tmp_path)
    assert local.rc == 0, local.tail()
    on_slurm = run([*TRAIN, *sweep, "--scheduler", "slurm"], env_of(slurm), tmp_path)
    assert on_slurm.rc == 0, on_slurm.tail()
    assert "sweep: 4 runs (SLURM jobs: 2 at a time)" in on_slurm.err
    assert "started 2, lost 0, replaced 0" in jobs_line(on_slurm.err) and slurm.jobs() == []
    sweeps = sorted((config.parent / "runs").glob("sweep-avel-*"))
    assert len(sweeps) == 2, sweeps
    first, second = sweeps
    # the table (per head: runs, seeds, mean ± std of val/test accuracy, baselines), byte for byte
    assert (first / "results.csv").read_text() == (second / "results.csv").read_text()
    assert (first / "results.md").read_text() == (second / "results.md").read_text()
    assert local.out == on_slurm.out  # the printed table
    # and every run's numbers (not only the means)
    keys = ("head", "setting", "seed", "val_accuracy", "test_accuracy", "selected_epoch", "error")
    rows = [[{k: r[k] for k in keys} for r in csv.DictReader((d / "runs.csv").open())] for d in sweeps]
    assert rows[0] == rows[1] and len(rows[0]) == 4 and not any(r["error"] for r in rows[0])
    with (first / "results.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert [(t["head"], t["runs"], t["seeds"]) for t in table] == [("a", "2", "0 1"), ("v", "2", "0 1")]
