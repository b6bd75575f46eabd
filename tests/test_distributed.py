"""Extraction over Dask (extract.distributed): one writer per shard (and why: a negative test on
zarr 3), the task plan, a worker killed in the middle of a run on a real LocalCluster with worker
processes (the store still ends bit-identical to a single-process run), networks loaded once per
worker, loopback-only embedded clusters and TLS."""
from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from extract.decode import VideoRequest, decode_video
from extract.factories.media import write_clip
from extract.core.settings import ConfigError, load_pipeline
from extract.core.store import STATUS_DONE, STATUS_FAILED, create_store, open_store

T = 2
SMALL = {"segments": T, "frames_per_segment": 1, "image_size": 32, "batch_frames": 4,
         "visual_weights": "random", "audio_weights": "random", "device": "cpu", "decode_workers": 1,
         "decode_timeout_s": 60.0}


def make_pipeline(**dask):
    return load_pipeline(None, {"extract": SMALL, "store": {"rows_per_shard": 2},
                                "dask": {"n_workers": 2, "threads_per_worker": 1, **dask}}, search=False)


def clip(path: Path, seconds: float, seed: int) -> Path:
    """A tiny real H.264/AAC clip whose pixels and tone depend on ``seed``."""
    rng = np.random.default_rng(seed)
    fps = 8
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    frames = np.stack([np.kron(np.roll(base, k, axis=1), np.ones((8, 8, 1), np.uint8)) for k in range(int(seconds * fps))])
    wave = (0.2 * np.sin(2 * np.pi * (250 + 40 * seed) * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)
    return write_clip(path, frames, fps=fps, audio=wave, sample_rate=16000)


def slow_decode(request, grids, segments, audio, delay=0.0):
    """decode_video after a pause (keeps tasks running long enough to kill a worker mid-task)."""
    time.sleep(delay)
    return decode_video(request, grids, segments, audio)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("dvideos")
    requests = [VideoRequest(f"k{i}", str(clip(root / f"v{i}.mp4", 2.0, seed=i))) for i in range(9)]
    requests.insert(4, VideoRequest("gone", str(root / "gone.mp4")))  # missing file: failed row
    return requests


@pytest.fixture(scope="module")
def client():
    """A real LocalCluster with 2 worker processes, made by extract.distributed (loopback only)."""
    from extract.distributed import dask_client

    with dask_client(make_pipeline().dask, "local") as c:
        yield c


# ------------------------------------------------------------------------------------------
# one writer per shard


def _write_rows(path: str, rows: list[int], value_of_row: int, barrier) -> None:
    import zarr

    arr = zarr.open_array(path, mode="r+")
    barrier.wait(60)  # both writers start together (process start-up times differ)
    for row in rows:
        arr[row] = np.full(arr.shape[1:], row + value_of_row, arr.dtype)


def _surviving_rows(shards: int) -> int:
    """Two processes write 32 rows each into a 64-row array with ``shards`` shards, one row at a
    time, concurrently; returns how many of the 64 rows hold what was written."""
    import tempfile

    import zarr

    path = tempfile.mkdtemp() + "/a.zarr"
    zarr.create_array(path, shape=(64, 64, 64), dtype="float32", chunks=(1, 64, 64), shards=(64 // shards, 64, 64),
                      fill_value=0)
    if shards == 1:
        parts = [list(range(0, 64, 2)), list(range(1, 64, 2))]  # interleaved rows of one shard
    else:
        parts = [list(range(0, 32)), list(range(32, 64))]  # writer k owns shard k
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(parts))
    procs = [ctx.Process(target=_write_rows, args=(path, part, 1, barrier)) for part in parts]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    data = zarr.open_array(path, mode="r")[:]
    return int(sum(np.all(data[r] == r + 1) for r in range(64)))


def test_two_writers_on_one_shard_lose_rows_but_one_writer_per_shard_never_does():
    # negative: zarr 3 rewrites the whole shard on every write, so concurrent writers on ONE shard
    # overwrite each other's rows (retried a few times: the race is timing dependent)
    lost = 0
    for _ in range(3):
        lost = 64 - _surviving_rows(shards=1)
        if lost:
            break
    assert lost > 0, "two writers on one shard lost nothing in 3 tries"
    # positive: the same writes, each writer owning its own shard, keep every row
    assert _surviving_rows(shards=2) == 64


def test_the_task_plan_gives_every_shard_to_one_task(tmp_path, videos):
    from extract.distributed import ShardJob, check_one_writer_per_shard, plan_jobs
    from extract.prepare import grow_store
    from extract.cache import store_specs

    pipeline = make_pipeline()
    keys = ["x0", "x1", "x2", "x3", "x4"]
    store = create_store(tmp_path / "p.zarr", keys, T, store_specs(pipeline.extract), {"fingerprint": "t"},
                         rows_per_shard=2)
    # rows 2 and 3 (shard 1) are already finished: that shard is skipped
    store.write_shard(1, {n: np.zeros((2,) + store.array(n).shape[1:], store.array(n).dtype)
                          for n in ("valid", "visual", "audio")}, np.array([1, 2]), ["", "bad"])
    grow_store(store, ["x5"])
    requests = [VideoRequest(k, f"/nowhere/{k}.mp4") for k in ["x4", "x0", "x2", "x3", "x5", "x1"]]
    jobs, plan = plan_jobs(store, requests, pipeline.extract, "cpu")
    skipped = plan.skipped
    assert skipped == 2
    assert [job.shard for job in jobs] == [0, 2]
    assert [[(row, r.key) for row, r in job.members] for job in jobs] == [[(0, "x0"), (1, "x1")], [(4, "x4"), (5, "x5")]]
    # a plan that hands a shard (or a row) to two tasks, or a row to the wrong shard, is refused
    dup = [ShardJob("s", 0, ((0, requests[1]),), None, "cpu"), ShardJob("s", 0, ((1, requests[5]),), None, "cpu")]
    with pytest.raises(RuntimeError, match="more than one task"):
        check_one_writer_per_shard(dup, 2)
    with pytest.raises(RuntimeError, match="other shards"):
        check_one_writer_per_shard([ShardJob("s", 0, ((2, requests[2]),), None, "cpu")], 2)


# ------------------------------------------------------------------------------------------
# a real cluster


def test_embedded_cluster_listens_on_loopback_only(client):
    info = client.scheduler_info()
    assert info["address"].startswith("tcp://127.0.0.1:")
    assert info["workers"] and all(addr.startswith("tcp://127.0.0.1:") for addr in info["workers"])
    assert all(w["nthreads"] == 1 for w in info["workers"].values())
    # every listening socket of this process and its children (scheduler, dashboard/HTTP, nannies,
    # workers) is bound to the loopback interface
    import psutil

    me = psutil.Process()
    pids = {me.pid} | {child.pid for child in me.children(recursive=True)}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len(listening) >= 5  # scheduler, its HTTP server, 2 nannies, 2 workers (+ their HTTP servers)
    assert {c.laddr.ip for c in listening} == {"127.0.0.1"}


@pytest.fixture(scope="module")
def reference(videos, tmp_path_factory):
    """The store of the single-machine path (extract.run), networks in this process, 1 thread like a worker."""
    import torch

    from extract.extractors import build_extractors
    from extract.run import run_extraction

    torch.set_num_threads(1)
    pipeline = make_pipeline()
    path = tmp_path_factory.mktemp("dref") / "single.zarr"
    summary = run_extraction(pipeline, videos, store_path=path, progress=False,
                             extractors=build_extractors(pipeline.extract, "cpu"))
    assert (summary.done, summary.failed) == (9, 1)
    return path


def test_a_worker_killed_mid_task_still_gives_the_single_process_store(client, videos, reference, tmp_path):
    from extract.distributed import run_extraction_dask, shard_files_equal

    pipeline = make_pipeline(retries=0)  # a worker death must not need task retries
    shard_keys: list[str] = []
    killed: list[tuple[int, str]] = []

    def kill_a_busy_worker(result, c):
        """Near the end (so the survivor, not the cold replacement, finishes), SIGKILL a worker
        that is processing one of our shard tasks."""
        if killed:
            return
        processing = c.processing()
        pids = c.run(os.getpid)
        for addr, keys in processing.items():
            ours = [k for k in keys if str(k).startswith("avel-shard-")]
            if ours and addr in pids:
                os.kill(pids[addr], signal.SIGKILL)
                killed.append((pids[addr], ours[0]))
                return

    done: list[int] = []

    def on_result(result, c):
        done.append(result.shard)
        if len(done) == 3:  # of 5 shard tasks: the last two are running, one on each worker
            kill_a_busy_worker(result, c)

    decode = functools.partial(slow_decode, delay=0.4)
    summary = run_extraction_dask(pipeline, videos, store_path=tmp_path / "dask.zarr", client=client, progress=False,
                                  decode_fn=decode, on_result=on_result)
    assert killed, "no worker was processing a shard task when one was to be killed"
    assert (summary.done, summary.failed, summary.lost) == (9, 1, 0)
    assert summary.exit_code == 1  # the missing file

    # bit-identical: every shard file of every array, and the arrays as read back
    assert shard_files_equal(reference, tmp_path / "dask.zarr") == []
    a, b = open_store(reference), open_store(tmp_path / "dask.zarr")
    assert a.ids.tolist() == b.ids.tolist() == [r.key for r in videos]
    for name in a.array_names():
        np.testing.assert_array_equal(a.read(name), b.read(name))
    assert a.fingerprint == b.fingerprint
    status = b.status()
    assert status[4] == STATUS_FAILED and (np.delete(status, 4) == STATUS_DONE).all()
    assert b.read("visual").any(axis=(1, 2, 3, 4)).sum() == 9

    # networks were built once per worker process, not once per task
    assert summary.workers and set(summary.workers.values()) == {1}
    assert len(summary.workers) <= 3  # 5 shard tasks; 2 workers + at most the killed one's replacement

    # resume marker: a second run finds everything finished and computes nothing
    again = run_extraction_dask(pipeline, videos, store_path=tmp_path / "dask.zarr", client=client, progress=False)
    assert (again.done, again.failed, again.skipped) == (0, 0, 10)


def test_a_finished_shard_task_returns_without_computing(client, videos, reference, tmp_path):
    """A re-run task (its first attempt wrote the shard, then the worker died) returns at once."""
    import shutil

    from extract.distributed import ShardJob, extract_shard

    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    store = open_store(path)
    members = tuple((store.row_of(r.key), r) for r in videos[2:4])
    job = ShardJob(str(path), 1, members, make_pipeline().extract, "cpu", decode_fn=_must_not_decode)
    result = client.submit(extract_shard, job, pure=False).result()
    assert result.already and (result.done, result.failed) == (2, 0)


def _must_not_decode(*args):
    raise AssertionError("a finished shard was decoded again")


def test_a_hung_or_failing_decode_fails_the_video_not_the_task(videos):
    from extract.decode import Failure
    from extract.distributed import _decode_one

    started = time.monotonic()
    hung = _decode_one(functools.partial(slow_decode, delay=5.0), videos[0], [], T, True, timeout_s=0.3)
    assert isinstance(hung, Failure) and hung.reason.startswith("decode timed out after 0.3 s")
    assert time.monotonic() - started < 3.0
    missing = _decode_one(decode_video, videos[4], [], T, True, timeout_s=30)
    assert isinstance(missing, Failure) and missing.reason == f"file not found: {videos[4].path}"
    broken = _decode_one(_must_not_decode, videos[0], [], T, True)
    assert isinstance(broken, Failure) and broken.reason == "AssertionError: a finished shard was decoded again"


# ------------------------------------------------------------------------------------------
# TLS


def test_tls_scheduler_with_certificates_from_the_config(tmp_path):
    pytest.importorskip("cryptography")  # Security.temporary() makes the test certificates with it
    from distributed import LocalCluster
    from distributed.security import Security

    from extract.distributed import dask_client

    temp = Security.temporary()
    files = {}
    for name in ("tls_ca_file", "tls_client_cert", "tls_client_key"):
        files[name] = tmp_path / f"{name}.pem"
        files[name].write_text(getattr(temp, name))
    with LocalCluster(n_workers=1, processes=False, protocol="tls://", host="127.0.0.1", security=temp,
                      dashboard_address="127.0.0.1:0") as cluster:
        assert cluster.scheduler_address.startswith("tls://127.0.0.1:")
        pipeline = load_pipeline(None, {"dask": {k: str(v) for k, v in files.items()}}, search=False)
        with dask_client(pipeline.dask, cluster.scheduler_address) as c:
            assert c.submit(lambda x: x * 7, 6).result() == 42
        # a tls:// scheduler without certificates is refused with the keys to set
        bare = load_pipeline(None, {}, search=False)
        with pytest.raises(ConfigError, match="dask.tls_ca_file"):
            with dask_client(bare.dask, cluster.scheduler_address):
                pass
        missing = load_pipeline(None, {"dask": {"tls_ca_file": str(tmp_path / "nope.pem")}}, search=False)
        with pytest.raises(ConfigError, match="nope.pem does not exist"):
            with dask_client(missing.dask, cluster.scheduler_address):
                pass


def test_a_shard_whose_result_was_lost_and_recomputed_is_counted(client, videos, tmp_path):
    """A worker that dies holding a FINISHED shard's result makes the scheduler run that task again;
    the rerun finds the rows final and returns at once. Its rows were written by this run, so the
    summary counts them (deterministic replay: the first attempt runs here, then the Dask run)."""
    from extract.cache import store_specs
    from extract.distributed import _run_jobs, extract_shard, plan_jobs
    from extract.extractors import extractor_identity
    from extract.prepare import open_run_store
    from extract.provenance import store_attrs

    pipeline = make_pipeline(retries=0)
    cfg = pipeline.extract
    attrs = store_attrs(cfg, extractor_identity(cfg))
    with open_run_store(tmp_path / "lost.zarr", [r.key for r in videos], cfg.segments, store_specs(cfg), attrs,
                        pipeline.store) as store:
        jobs, plan = plan_jobs(store, videos, cfg, "cpu", decode_video, 1, False, store.lease)
        first = extract_shard(jobs[0])  # the attempt whose result the driver never received
        assert not first.already and first.done == len(jobs[0].members)
        summary = _run_jobs(client, store, jobs, plan, videos, pipeline.dask, False, None)
    assert (summary.done, summary.failed) == (9, 1)


def test_a_worker_with_several_threads_builds_the_networks_once(monkeypatch):
    """Issue 28: two tasks that start together in a worker with ``threads_per_worker`` > 1 each
    built the networks. The second must wait for the first build and reuse it (deterministic: the
    first build holds until the second thread has asked for the networks)."""
    import threading
    import types

    import torch

    import extract.distributed as dist
    import extract.extractors as extractors_module

    monkeypatch.setattr(dist, "_EXTRACTORS", {})
    started, second_in, builds = threading.Event(), threading.Event(), []

    def build(cfg, device):
        builds.append(threading.current_thread().name)
        if len(builds) == 1:
            started.set()
            assert second_in.wait(60)
        else:
            second_in.set()  # (the old code) the second thread builds its own
        return [types.SimpleNamespace(name="fake")]

    class SpyLock:
        """The build lock, noting when the second thread asks for it (it then blocks)."""

        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            if threading.current_thread().name == "second":
                second_in.set()
            return self.lock.__enter__()

        def __exit__(self, *exc):
            return self.lock.__exit__(*exc)

    monkeypatch.setattr(extractors_module, "build_extractors", build)
    if hasattr(dist, "_BUILD_LOCK"):
        monkeypatch.setattr(dist, "_BUILD_LOCK", SpyLock(dist._BUILD_LOCK))
    cfg, got = make_pipeline().extract, {}
    threads_before = torch.get_num_threads()
    try:
        first = threading.Thread(target=lambda: got.update(first=dist.worker_extractors(cfg, "cpu")), name="first")
        second = threading.Thread(target=lambda: got.update(second=dist.worker_extractors(cfg, "cpu")), name="second")
        first.start()
        assert started.wait(60)
        second.start()
        first.join(60)
        second.join(60)
    finally:
        torch.set_num_threads(threads_before)
    assert builds == ["first"] and got["first"] is got["second"]
