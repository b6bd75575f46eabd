"""`avel-extract` as a cluster user runs it: a real `dask scheduler` and two `dask worker`
processes (with nannies) started as subprocesses on 127.0.0.1, in a working directory that is
NOT the project folder, and `avel-extract` driven through its command line from a project folder.

The reference for "correct" is a single-process run (`avel-extract` without --scheduler) of the
same manifest into another store: equal shard files (``shard_files_equal``) and equal ``status``
and ``reason`` arrays.

Covered: relative video paths on a real cluster; a transient failure (decode timeout) or a missing
file never poisons the shared cache; a fixed file reaches the store (with and without --cache);
--retry-failed; a settings change is refused before any work; bad scheduler addresses; a worker
SIGKILLed in the middle of a run; the client SIGKILLed and run again at once; two clients on one
store (--wait queues, without it the second is refused); `avel-extract config` with $AVEL_CACHE.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

pytestmark = pytest.mark.slow

psutil = pytest.importorskip("psutil")
pytest.importorskip("distributed")

BIN = Path(sys.executable).parent
_DASK = BIN / "dask" if (BIN / "dask").exists() else shutil.which("dask")
if not _DASK:
    pytest.skip("the `dask` command line is not installed", allow_module_level=True)
DASK_CLI = str(_DASK)
AVEL_CMD = [str(BIN / "avel-extract")] if (BIN / "avel-extract").exists() else [sys.executable, "-m", "extract.cli"]

#: what every extraction in this module uses (tiny clips: 2 segments, 1 frame per segment)
COMMON = ["--weights", "random", "--no-progress", "--set", "store.rows_per_shard=2",
          "--set", "extract.frames_per_segment=1", "--set", "extract.segments=2"]
#: the project's pipeline.yaml: small network inputs, CPU, one decode worker for the single-process runs
PIPELINE_YAML = "extract:\n  image_size: 32\n  device: cpu\n  decode_workers: 1\n"
#: rows of the 8-clip manifest (4 shards of 2 rows = 4 shard tasks)
MAIN = [f"v{i}" for i in range(8)]
#: per-row bookkeeping arrays (not features)
BOOKKEEPING = {"ids", "status", "reason", "source", "ran"}


# ------------------------------------------------------------------------------------------
# processes


def base_env(**extra: str) -> dict[str, str]:
    """The environment of every process started here: no AVEL_*/DASK_* of the caller, 1 thread."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AVEL_", "DASK_"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _alive(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _family(pid: int) -> list:
    """psutil handles of ``pid`` and all its descendants (empty if it is gone)."""
    try:
        top = psutil.Process(pid)
        return [top] + top.children(recursive=True)
    except psutil.Error:
        return []


def stop(procs: list[subprocess.Popen], grace: float = 20.0) -> list[int]:
    """Terminate ``procs`` (SIGTERM), wait up to ``grace`` s, then SIGKILL what is left of them and
    of their descendants, each by its pid. Returns the pids that were still alive after SIGTERM."""
    family = [q for p in procs if p.poll() is None for q in _family(p.pid)]
    for p in procs:
        if p.poll() is None:
            try:
                p.terminate()
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    left = [q for q in family if _alive(q)]
    if left:
        _, left = psutil.wait_procs(left, timeout=max(0.1, deadline - time.monotonic()))
        left = [q for q in left if _alive(q)]
    for q in left:
        try:
            q.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    for p in procs:
        if p.poll() is None:
            p.kill()
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    return [q.pid for q in left]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Result:
    args: list[str]
    rc: int
    stdout: str
    stderr: str
    seconds: float

    def tail(self, lines: int = 25) -> str:
        text = "\n".join(self.stderr.strip().splitlines()[-lines:])
        return f"avel-extract {' '.join(self.args)} -> exit {self.rc} in {self.seconds:.1f} s; stderr tail:\n{text}"


def avel(args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 240) -> Result:
    """Run ``avel-extract ARGS`` in ``cwd`` and wait for it (killed, and the test failed, after ``timeout`` s)."""
    started = time.monotonic()
    proc = subprocess.Popen(AVEL_CMD + list(args), cwd=cwd, env=env or base_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop([proc], grace=5)
        out, err = proc.communicate()
        pytest.fail(f"avel-extract {' '.join(args)} did not end within {timeout} s; stderr tail:\n{err[-3000:]}")
    result = Result(list(args), proc.returncode, out, err, time.monotonic() - started)
    print(result.tail(8))
    return result


class Background:
    """``avel-extract`` started and left running; stdout/stderr go to files (read while it runs)."""

    def __init__(self, args: list[str], cwd: Path, logs: Path, env: dict[str, str] | None = None):
        self.args = list(args)
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = logs / "stdout.txt", logs / "stderr.txt"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(AVEL_CMD + self.args, cwd=cwd, env=env or base_env(), stdout=self._out,
                                     stderr=self._err, text=True, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stderr(self) -> str:
        return self.err_path.read_text()

    def wait(self, timeout: float = 240) -> Result:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.close()
            pytest.fail(f"avel-extract {' '.join(self.args)} did not end within {timeout} s; stderr tail:\n"
                        f"{self.stderr()[-3000:]}")
        self.close()
        result = Result(self.args, self.proc.returncode, self.out_path.read_text(), self.stderr(),
                        time.monotonic() - self.started)
        print(result.tail(8))
        return result

    def close(self) -> None:
        """Stop it if it still runs (SIGCONT first, in case it was stopped), close the log files."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            stop([self.proc], grace=10)
        for fh in (self._out, self._err):
            if not fh.closed:
                fh.close()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05, alive: Background | None = None):
    """Poll ``predicate`` until it is truthy (returned); fail after ``timeout`` s, or when ``alive`` ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if alive is not None and alive.proc.poll() is not None:
            pytest.fail(f"{what}: avel-extract ended first (exit {alive.proc.returncode}); stderr tail:\n"
                        f"{alive.stderr()[-3000:]}")
        time.sleep(interval)
    pytest.fail(f"{what}: not within {timeout} s")


# ------------------------------------------------------------------------------------------
# the cluster


@dataclasses.dataclass
class Cluster:
    address: str
    client: object  # distributed.Client of the test process (scheduler_info, processing, run)
    procs: list[subprocess.Popen]
    workdir: Path

    def wait_workers(self, n: int = 2, timeout: float = 120) -> None:
        self.client.wait_for_workers(n, timeout=timeout)

    def worker_pids(self) -> dict[str, int]:
        return self.client.run(os.getpid)

    def logs(self, lines: int = 15) -> str:
        out = []
        for path in sorted(self.workdir.glob("*.log")):
            text = path.read_text(errors="replace").strip().splitlines()[-lines:]
            out.append(f"--- {path.name}\n" + "\n".join(text))
        return "\n".join(out)


def _wait_port(port: int, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dask scheduler exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket() as s:
            s.settimeout(1)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"dask scheduler did not listen on 127.0.0.1:{port} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`dask scheduler` + 2 x `dask worker --nworkers 1 --nthreads 1` (nanny kept) on 127.0.0.1,
    all started in a working directory of their own; every process is stopped at the end."""
    from distributed import Client

    workdir = tmp_path_factory.mktemp("cluster_cwd")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = base_env()
    procs: list[subprocess.Popen] = []
    seen: list = []  # every process of the cluster ever observed (checked for leaks at the end)
    logs = []
    client = None

    def spawn(args: list[str], name: str) -> subprocess.Popen:
        log = open(workdir / f"{name}.log", "w")
        logs.append(log)
        proc = subprocess.Popen([DASK_CLI] + args, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    try:
        scheduler = spawn(["scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard",
                           "--idle-timeout", "900s"], "scheduler")
        _wait_port(port, 60, scheduler, workdir / "scheduler.log")
        for i in range(2):
            spawn(["worker", address, "--host", "127.0.0.1", "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
                   "--name", f"w{i}", "--local-directory", str(workdir / f"w{i}"), "--death-timeout", "60"], f"worker{i}")
        client = Client(address, timeout="30s")
        client.wait_for_workers(2, timeout=120)
        info = client.scheduler_info()
        assert all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"]), info["workers"].keys()
        yield Cluster(address, client, procs, workdir)
    finally:
        for p in procs:
            if p.poll() is None:  # (a reaped pid may belong to another process by now)
                seen.extend(_family(p.pid))
        if client is not None:
            try:
                client.close(timeout=10)
            except Exception:  # noqa: BLE001 - the cluster may be half dead already
                pass
        leftover = stop(procs[1:], grace=25)  # workers (and their nanny children) first
        leftover += stop(procs[:1], grace=15)  # then the scheduler
        for log in logs:
            log.close()
        alive = [q.pid for q in seen if _alive(q)]
        assert not alive, f"cluster processes still alive after the teardown: {alive}"
        if leftover:
            print(f"cluster processes that needed SIGKILL: {leftover}")


# ------------------------------------------------------------------------------------------
# clips, projects, stores


def small_clip(path: Path, seed: int) -> Path:
    """A 2-s H.264/AAC clip (64x64, 8 fps, 16 kHz tone) whose pixels and tone depend on ``seed``."""
    from extract.factories.media import write_clip

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    frames = np.stack([np.kron(np.roll(base, k, axis=1), np.ones((8, 8, 1), np.uint8)) for k in range(16)])
    wave = (0.2 * np.sin(2 * np.pi * (250 + 40 * seed) * np.arange(2 * 16000) / 16000)).astype(np.float32)
    return write_clip(path, frames, fps=8, audio=wave, sample_rate=16000)


def heavy_clip(path: Path, seed: int) -> Path:
    """A 2-s clip that takes ~0.15 s to decode (320x240 noise at 25 fps, 44.1 kHz stereo noise), far
    above the 0.01-s --timeout of the tests, also in a warm worker (a small clip decodes in ~5 ms)."""
    from extract.factories.media import write_clip

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (50, 240, 320, 3), dtype=np.uint8)
    wave = (0.2 * rng.standard_normal((2, 2 * 44100))).astype(np.float32)
    return write_clip(path, frames, fps=25, audio=wave, sample_rate=44100)


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster_media")
    for i, name in enumerate(MAIN):
        small_clip(root / f"{name}.mp4", seed=i)
    for name, seed in (("good", 11), ("y", 12), ("z", 13)):
        small_clip(root / f"{name}.mp4", seed=seed)
    for name, seed in (("heavy_x", 21), ("heavy_t", 22)):
        heavy_clip(root / f"{name}.mp4", seed=seed)
    return root


def make_project(root: Path, names: list[str], files: dict[str, Path]) -> Path:
    """A project folder: pipeline.yaml, m.csv (rows ``names``, paths ``<name>.mp4`` relative to
    videos/), and videos/<name>.mp4 copied (with their times) from ``files`` (others are absent)."""
    from extract.core.manifest import Sample, write_manifest

    (root / "videos").mkdir(parents=True, exist_ok=True)
    (root / "pipeline.yaml").write_text(PIPELINE_YAML)
    for name, src in files.items():
        shutil.copy2(src, root / "videos" / f"{name}.mp4")
    write_manifest(root / "m.csv", [Sample(f"s_{n}", n, f"{n}.mp4", "", 0, 0, "test") for n in names], classes=["dog"])
    return root


def extract_args(store: str, *more: str, scheduler: str | None = None) -> list[str]:
    """The command line of a project run: relative manifest, video root and store."""
    args = ["--manifest", "m.csv", "--video-root", "videos", "--store", store, *COMMON]
    if scheduler:
        args += ["--scheduler", scheduler]
    return args + list(more)


def open_(path: Path):
    from extract.core.store import open_store

    return open_store(path)


def statuses(path: Path) -> dict[str, int]:
    """{row id: status} ({} when there is no store)."""
    if not path.exists():
        return {}
    store = open_(path)
    return dict(zip(store.ids.tolist(), store.status().tolist()))


def reasons(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    store = open_(path)
    return dict(zip(store.ids.tolist(), [str(r) for r in store.reasons()]))


def assert_same_store(reference: Path, path: Path) -> None:
    """Bit-identical array shard files, and equal ids, status and reason."""
    from extract.distributed import shard_files_equal

    assert shard_files_equal(reference, path) == []
    a, b = open_(reference), open_(path)
    assert a.ids.tolist() == b.ids.tolist()
    np.testing.assert_array_equal(a.status(), b.status())
    assert [str(r) for r in a.reasons()] == [str(r) for r in b.reasons()]


def assert_same_features(reference: Path, path: Path) -> None:
    """Equal rows (by id) in every feature array and in status."""
    a, b = open_(reference), open_(path)
    assert sorted(a.ids.tolist()) == sorted(b.ids.tolist())
    names = sorted(set(a.array_names()) - BOOKKEEPING)
    assert names == sorted(set(b.array_names()) - BOOKKEEPING)
    rows_a = [a.row_of(k) for k in a.ids.tolist()]
    rows_b = [b.row_of(k) for k in a.ids.tolist()]
    np.testing.assert_array_equal(a.status()[rows_a], b.status()[rows_b])
    for name in names:
        np.testing.assert_array_equal(a.read(name, rows_a), b.read(name, rows_b), err_msg=name)


def shard_written(store: Path) -> bool:
    """Whether some shard of the store's status array was written (a shard task finished)."""
    folder = store / "status" / "c"
    return folder.is_dir() and any(folder.iterdir())


def cache_counts(text: str) -> tuple[int, int]:
    """(reused, computed) of the --cache summary line 'N videos: R reused from the cache, C computed now'."""
    m = re.search(r"(\d+) reused from the cache, (\d+) computed now", text)
    assert m, f"no 'reused from the cache, computed now' line in:\n{text}"
    return int(m.group(1)), int(m.group(2))


def assert_summary_agrees(result: Result) -> None:
    """The summary's failure counts agree with the exit code: exit 0 mentions no failed video;
    a line 'N requested videos failed' comes with a non-zero 'failed M' count."""
    counts = [int(n) for n in re.findall(r"\bfailed:? (\d+)", result.stderr)]
    total = re.search(r"(\d+) requested videos? failed", result.stderr)
    if result.rc == 0:
        assert not any(counts) and total is None, result.tail()
    elif result.rc == 1:
        assert any(counts) or total, result.tail()
        if total:
            assert any(counts), f"'failed 0' but {total.group(0)}: {result.tail()}"


# ------------------------------------------------------------------------------------------
# module-wide project and reference


@pytest.fixture(scope="module")
def main_project(media, tmp_path_factory) -> Path:
    """The 8-clip project used by the cluster runs that compare with the single-process store."""
    return make_project(tmp_path_factory.mktemp("cluster_main"), MAIN, {n: media / f"{n}.mp4" for n in MAIN})


@pytest.fixture(scope="module")
def reference(main_project) -> Path:
    """The single-process store of the 8-clip manifest (no scheduler, no cache)."""
    r = avel(extract_args("reference.zarr"), cwd=main_project)
    assert r.rc == 0, r.tail()
    assert set(statuses(main_project / "reference.zarr").values()) == {1}
    return main_project / "reference.zarr"


@pytest.fixture(scope="module")
def good_reference(media, tmp_path_factory) -> Path:
    """The single-process store of a one-row manifest [c] holding the good clip."""
    project = make_project(tmp_path_factory.mktemp("cluster_goodref"), ["c"], {"c": media / "good.mp4"})
    r = avel(extract_args("reference.zarr"), cwd=project)
    assert r.rc == 0, r.tail()
    return project / "reference.zarr"


# ------------------------------------------------------------------------------------------
# no cluster needed


def test_config_prints_the_cache_root_of_AVEL_CACHE(media, tmp_path):
    project = make_project(tmp_path / "p", ["z"], {"z": media / "z.mp4"})
    shared = tmp_path / "shared-cache"
    r = avel(["config"], cwd=project, env=base_env(AVEL_CACHE=str(shared)), timeout=60)
    assert r.rc == 0, r.tail()
    printed = yaml.safe_load(r.stdout)
    assert Path(printed["store"]["cache_root"]) == shared, r.stdout
    assert "data/cache" not in r.stdout


@pytest.fixture()
def small_project(media, tmp_path) -> Path:
    return make_project(tmp_path / "p", ["z"], {"z": media / "z.mp4"})


def test_a_scheduler_address_that_is_not_one_is_refused_before_the_store_is_made(small_project):
    r = avel(extract_args("s.zarr", scheduler="garbage"), cwd=small_project, timeout=60)
    assert r.rc == 2, r.tail()
    assert "garbage" in r.stderr and "error" in r.stderr.lower(), r.tail()
    assert not (small_project / "s.zarr").exists(), "the store was created for a run that could not start"


def test_a_scheduler_nobody_listens_on_is_refused_quickly_before_the_store_is_made(small_project):
    port = free_port()
    r = avel(extract_args("s.zarr", scheduler=f"tcp://127.0.0.1:{port}"), cwd=small_project, timeout=90)
    assert r.rc == 2, r.tail()
    assert f"127.0.0.1:{port}" in r.stderr, r.tail()
    assert r.seconds < 15, f"took {r.seconds:.1f} s to give up on a closed port; {r.tail()}"
    assert not (small_project / "s.zarr").exists(), "the store was created for a run that could not start"


def test_a_tls_scheduler_without_certificates_is_refused_naming_the_keys(small_project):
    r = avel(extract_args("s.zarr", scheduler=f"tls://127.0.0.1:{free_port()}"), cwd=small_project, timeout=60)
    assert r.rc == 2, r.tail()
    assert "dask.tls_ca_file" in r.stderr, r.tail()
    assert not (small_project / "s.zarr").exists(), "the store was created for a run that could not start"


# ------------------------------------------------------------------------------------------
# on the cluster


def test_relative_video_root_on_a_real_cluster_gives_the_single_process_store(cluster, main_project, reference):
    # the workers run in another working directory: 'videos/v0.mp4' means nothing there
    assert Path(cluster.workdir).resolve() != main_project.resolve()
    cluster.wait_workers()
    r = avel(extract_args("s1.zarr", scheduler=cluster.address), cwd=main_project)
    got = statuses(main_project / "s1.zarr")
    assert r.rc == 0, f"{r.tail()}\nreasons: {reasons(main_project / 's1.zarr')}"
    assert set(got.values()) == {1}, got
    assert_same_store(reference, main_project / "s1.zarr")


def test_a_timeout_or_a_missing_file_never_poisons_the_shared_cache(cluster, media, tmp_path):
    cluster.wait_workers()
    cache = tmp_path / "cache"
    env = base_env(AVEL_CACHE=str(cache))
    # project A: x decodes too slowly for --timeout 0.01, y does not exist
    a = make_project(tmp_path / "A", ["x", "y"], {"x": media / "heavy_x.mp4"})
    ra = avel(extract_args("s.zarr", "--cache", "--timeout", "0.01", scheduler=cluster.address), cwd=a, env=env)
    assert ra.rc == 1, ra.tail()
    assert statuses(a / "s.zarr") == {"x": 2, "y": 2}, ra.tail()
    why = reasons(a / "s.zarr")
    assert "timed out" in why["x"] and "not found" in why["y"], why
    # project B: the same bytes as x under another name, and a real y; default timeout
    b = make_project(tmp_path / "B", ["x_copy", "y"], {"x_copy": media / "heavy_x.mp4", "y": media / "y.mp4"})
    rb = avel(extract_args("s.zarr", "--cache", scheduler=cluster.address), cwd=b, env=env)
    assert statuses(b / "s.zarr") == {"x_copy": 1, "y": 1}, f"{rb.tail()}\nreasons: {reasons(b / 's.zarr')}"
    assert rb.rc == 0, rb.tail()
    reused, computed = cache_counts(rb.stderr)
    assert (reused, computed) == (0, 2), rb.tail()


@pytest.mark.parametrize("cache", [False, True], ids=["plain", "cache"])
def test_a_fixed_file_reaches_the_store(cluster, media, good_reference, tmp_path, cache):
    cluster.wait_workers()
    env = base_env(AVEL_CACHE=str(tmp_path / "cache"))
    project = make_project(tmp_path / "p", ["c"], {})
    bad = np.random.default_rng(7).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    (project / "videos" / "c.mp4").write_bytes(bad)
    args = extract_args("s.zarr", *(["--cache"] if cache else []), scheduler=cluster.address)

    first = avel(args, cwd=project, env=env)
    assert first.rc == 1, first.tail()
    assert statuses(project / "s.zarr") == {"c": 2}, first.tail()
    assert_summary_agrees(first)

    # the file is replaced by a good clip under the same name; the SAME command again
    (project / "videos" / "c.mp4").unlink()
    shutil.copy2(media / "good.mp4", project / "videos" / "c.mp4")
    again = avel(args, cwd=project, env=env)
    assert_summary_agrees(again)
    assert statuses(project / "s.zarr") == {"c": 1}, f"{again.tail()}\nreasons: {reasons(project / 's.zarr')}"
    assert again.rc == 0, again.tail()
    assert_same_features(good_reference, project / "s.zarr")


def test_retry_failed_re_extracts_a_row_that_failed_for_a_timeout(cluster, media, tmp_path):
    cluster.wait_workers()
    project = make_project(tmp_path / "p", ["t"], {"t": media / "heavy_t.mp4"})
    first = avel(extract_args("s.zarr", "--timeout", "0.01", scheduler=cluster.address), cwd=project)
    assert first.rc == 1, first.tail()
    assert statuses(project / "s.zarr") == {"t": 2}
    assert "timed out" in reasons(project / "s.zarr")["t"]

    # the file is unchanged: without --retry-failed the failed row is kept (skipped)
    kept = avel(extract_args("s.zarr", scheduler=cluster.address), cwd=project)
    assert kept.rc == 1, kept.tail()
    assert statuses(project / "s.zarr") == {"t": 2}
    assert "skipped" in kept.stderr, kept.tail()

    retried = avel(extract_args("s.zarr", "--retry-failed", scheduler=cluster.address), cwd=project)
    assert retried.rc == 0, retried.tail()
    assert statuses(project / "s.zarr") == {"t": 1}
    assert re.search(r"(?i)\b1\b[^\n]{0,40}\bretried\b|\bretried\b[^\n]{0,40}\b1\b", retried.stderr), retried.tail()


def test_a_settings_change_is_refused_before_any_work(cluster, media, tmp_path):
    cluster.wait_workers()
    cache = tmp_path / "cache"
    env = base_env(AVEL_CACHE=str(cache))
    project = make_project(tmp_path / "p", ["y", "z"], {"y": media / "y.mp4", "z": media / "z.mp4"})
    first = avel(extract_args("s.zarr", "--cache", scheduler=cluster.address), cwd=project, env=env)
    assert first.rc == 0, first.tail()
    sets_before = sorted(p.name for p in cache.iterdir())

    changed = avel(extract_args("s.zarr", "--cache", "--set", "extract.frames_per_segment=2",
                                scheduler=cluster.address), cwd=project, env=env, timeout=120)
    assert changed.rc == 2, changed.tail()
    assert changed.seconds < 20, f"refused only after {changed.seconds:.1f} s; {changed.tail()}"
    assert "frames_per_segment" in changed.stderr, changed.tail()
    assert sorted(p.name for p in cache.iterdir()) == sets_before, "a new feature set was made in the cache"
    assert statuses(project / "s.zarr") == {"y": 1, "z": 1}


# ------------------------------------------------------------------------------------------
# processes killed in the middle of a run


def test_a_worker_killed_mid_run_still_gives_the_single_process_store(cluster, main_project, reference, tmp_path):
    cluster.wait_workers()
    store = main_project / "s7.zarr"
    run = Background(extract_args(store.name, scheduler=cluster.address), main_project, tmp_path / "run")
    try:
        wait_until(lambda: shard_written(store), 180, "first shard in the store", alive=run)
        processing = cluster.client.processing()
        pids = cluster.worker_pids()
        busy = [addr for addr, keys in processing.items()
                if addr in pids and any(str(k).startswith("avel-shard-") for k in keys)]
        victim = busy[0] if busy else sorted(pids)[0]
        during_run = run.proc.poll() is None
        os.kill(pids[victim], signal.SIGKILL)
        print(f"SIGKILLed worker {victim} (pid {pids[victim]}); it was "
              f"{'processing ' + str(list(processing[victim])) if busy else 'idle'}; client still running: {during_run}")
        r = run.wait(timeout=300)
    finally:
        run.close()
    print("summary of the run whose worker was killed:\n" + r.stderr[-600:])
    assert r.rc == 0, r.tail()
    assert_same_store(reference, store)
    if busy and during_run:  # soft: only when one of the run's tasks was on the killed worker
        assert re.search(r"rescheduled|workers? left", r.stderr), f"the summary says nothing of the lost worker; {r.tail()}"
    # the nanny brings the worker back
    wait_until(lambda: victim not in cluster.client.scheduler_info()["workers"], 60, "killed worker removed")
    cluster.wait_workers(2, timeout=120)


def test_a_killed_client_run_again_at_once_gives_the_single_process_store(cluster, main_project, reference, tmp_path):
    cluster.wait_workers()
    store = main_project / "s8.zarr"
    args = extract_args(store.name, scheduler=cluster.address)
    first = Background(args, main_project, tmp_path / "first")
    try:
        wait_until(lambda: shard_written(store), 180, "first shard in the store", alive=first)
        running = first.proc.poll() is None
        if running:
            os.kill(first.pid, signal.SIGKILL)
        first.proc.wait(timeout=30)
        print(f"client SIGKILLed {'while running' if running else 'after it had ended'}; "
              f"statuses at the kill: {statuses(store)}")
    finally:
        first.close()
    again = avel(args, cwd=main_project)  # at once: the killed client's tasks may still run on the workers
    assert again.rc == 0, again.tail()
    assert set(statuses(store).values()) == {1}
    assert_same_store(reference, store)


def _lock_holder_pid(store: Path) -> int | None:
    try:
        return json.loads((store / "logs" / "extract.lock").read_text()).get("pid")
    except (OSError, ValueError):
        return None


def _waiting_line(text: str) -> str | None:
    """The line where a --wait client says that it waits for the store's lock."""
    for line in text.splitlines():
        if re.search(r"(?i)\bwait(s|ing)\b", line) and re.search(r"(?i)\block\b", line):
            return line
    return None


def test_two_clients_on_one_store_the_second_waits_with_wait_or_is_refused(cluster, main_project, reference, tmp_path):
    cluster.wait_workers()
    store = main_project / "s9.zarr"
    args = extract_args(store.name, scheduler=cluster.address)
    first = Background(args, main_project, tmp_path / "first")
    second = None
    try:
        # the first client holds the store's lock; it is paused there so that the others meet it
        wait_until(lambda: _lock_holder_pid(store) == first.pid, 120, "lock taken by the first client", alive=first)
        if first.proc.poll() is not None:
            pytest.fail(f"the first client ended (exit {first.proc.returncode}) before it could be paused: "
                        f"{first.stderr()[-2000:]}")
        os.kill(first.pid, signal.SIGSTOP)
        try:
            refused = avel(args, cwd=main_project, timeout=120)
            assert refused.rc == 2, refused.tail()
            assert f"pid {first.pid}" in refused.stderr, refused.tail()

            second = Background(args + ["--wait"], main_project, tmp_path / "second")
            line = wait_until(lambda: _waiting_line(second.stderr()), 120, "the --wait client says it waits",
                              interval=0.2, alive=second)
            print(f"--wait client: {line.strip()}")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        r1 = first.wait(timeout=300)
        r2 = second.wait(timeout=300)
    finally:
        first.close()
        if second is not None:
            second.close()
    assert r1.rc == 0, r1.tail()
    assert r2.rc == 0, r2.tail()
    assert_same_store(reference, store)
