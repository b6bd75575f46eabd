"""Crash safety and provenance of a store (issue 13, section 4) and what a rerun recomputes (issue 19):
empty manifests, interrupted growth, what the fingerprint covers, what each row records, failed
rows and changed files, environment errors, the lock's --wait and re-entrancy, fencing of orphaned
shard writers."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time

import numpy as np
import pytest
from test_run import clip, make_pipeline

from extract.decode import VideoRequest, decode_video
from extract.core.lock import StoreLock, StoreLocked, lease_token, new_lease, shard_lock
from extract.prepare import open_run_store
from extract.provenance import file_identity, store_attrs
from extract.requests import requests_from_manifest
from extract.run import SYSTEMIC_LIMIT, plan_shards, run_extraction
from extract.core.store import STATUS_DONE, STATUS_FAILED, STATUS_MISSING, StoreError, core_specs, create_store, open_store


def _attrs():
    return {"fingerprint": "f", "fingerprint_fields": {}, "extractor": {}}


def _specs(T=2):
    return core_specs(T)


def read_all(store):
    return {name: store.read(name) for name in store.array_names()}


# ------------------------------------------------------------------------------------------
# empty manifests and interrupted growth


def test_an_empty_store_opens_and_grows(tmp_path):
    path = tmp_path / "empty.zarr"
    create_store(path, [], 2, _specs(), _attrs(), rows_per_shard=2)
    store = open_store(path, mode="r+")
    assert len(store) == 0 and all(store.array(n).shape[0] == 0 for n in store.array_names())
    from extract.core.store import check_arrays

    check_arrays(store, _specs())  # the old code allocated max(n, 1) feature rows: refused here
    store.grow(["a", "b", "c"])
    again = open_store(path)
    assert again.ids.tolist() == ["a", "b", "c"] and again.status().tolist() == [0, 0, 0]
    check_arrays(again, _specs())


def test_a_run_on_an_empty_manifest_makes_a_store_that_later_runs_fill(tmp_path):
    pipeline = make_pipeline(tmp_path)
    summary = run_extraction(pipeline, [], store_path=tmp_path / "s.zarr", progress=False)
    assert summary.requested == 0 and summary.exit_code == 0
    clip(tmp_path / "a.mp4", 3.0, seed=1)
    later = run_extraction(pipeline, [VideoRequest("a", str(tmp_path / "a.mp4"))], store_path=tmp_path / "s.zarr",
                           progress=False)
    assert (later.done, later.exit_code) == (1, 0)
    assert open_store(tmp_path / "s.zarr").status().tolist() == [STATUS_DONE]


class Killed(Exception):
    pass


@pytest.mark.parametrize("kill_after", ["valid", "status", "reason", "source", "ids"])
def test_growth_killed_at_any_step_then_the_same_command_gives_the_uninterrupted_store(tmp_path, kill_after):
    keys, more = ["a", "b", "c"], ["d", "e"]
    specs, attrs = _specs(), _attrs()

    def build(path, interrupt):
        create_store(path, keys, 2, specs, attrs, rows_per_shard=2)
        store = open_store(path, mode="r+")
        store.write_shard(0, {"valid": np.ones((2, 2), bool)}, np.array([1, 2]), ["", "bad"])

        def hook(name):
            if interrupt and name == kill_after:
                raise Killed(name)

        try:
            store.grow(more, _after_step=hook)
        except Killed:
            pass
        # the same command again: open under the lock, repair, grow what is still absent
        with open_run_store(path, keys + more, 2, specs, attrs, type("S", (), {"rows_per_shard": 2,
                                                                              "compression_level": 3})) as again:
            return read_all(again), again.attrs["num_rows"]

    clean, clean_rows = build(tmp_path / "clean.zarr", False)
    resumed, resumed_rows = build(tmp_path / "resumed.zarr", True)
    assert clean_rows == resumed_rows == 5
    assert sorted(clean) == sorted(resumed)
    for name in clean:
        np.testing.assert_array_equal(np.asarray(clean[name]), np.asarray(resumed[name]), err_msg=name)


def test_an_old_store_without_row_records_gets_them_when_opened_for_writing(tmp_path):
    import zarr

    path = tmp_path / "old.zarr"
    create_store(path, ["a"], 2, _specs(), _attrs(), rows_per_shard=2)
    group = zarr.open_group(str(path), mode="r+")
    del group["source"], group["ran"]
    store = open_store(path, mode="r+")
    assert store.records("source").tolist() == [""]  # readable as unknown
    assert "added the source record" in "; ".join(store.repair_growth())
    assert open_store(path).array("ran").shape == (1,)


# ------------------------------------------------------------------------------------------
# provenance: what the fingerprint covers, what each row records


def test_fp16_asked_on_a_cpu_is_recorded_as_the_fp32_that_ran(tmp_path):
    clip(tmp_path / "a.mp4", 3.0, seed=1)
    requests = [VideoRequest("a", str(tmp_path / "a.mp4"))]
    fp16 = run_extraction(make_pipeline(tmp_path, precision="fp16"), requests, store_path=tmp_path / "h.zarr",
                          progress=False)
    assert fp16.exit_code == 0
    store = open_store(tmp_path / "h.zarr")
    assert store.attrs["extractor"]["precision"] == "fp32"
    assert store.attrs["extractors"]["vgg19"]["precision"] == "fp32"
    assert store.records("ran").tolist() == ["vgg19=cpu/fp32,vggish=cpu/fp32"]
    # the same numbers as an fp32 run: the same fingerprint, so an fp32 run reuses the store
    fp32 = run_extraction(make_pipeline(tmp_path, precision="fp32"), requests, store_path=tmp_path / "h.zarr",
                          progress=False)
    assert (fp32.done, fp32.skipped) == (0, 1)
    # bf16 really runs on a CPU: other numbers, refused on this store
    with pytest.raises(StoreError, match="precision"):
        run_extraction(make_pipeline(tmp_path, precision="bf16"), requests, store_path=tmp_path / "h.zarr",
                       progress=False)


def test_precision_auto_runs_fp32_on_a_cpu_and_keeps_the_fingerprint_of_stores_made_before(tmp_path):
    """The default ``auto`` resolves on a CPU to fp32 before anything is fingerprinted: a store
    made with the former default (fp32, e.g. the demo's) accepts an auto run as its own."""
    from extract.extractor_base import auto_precision, effective_precision
    from extract.extractors import extractor_identity

    assert make_pipeline(tmp_path).extract.precision == "auto"  # the default
    assert effective_precision("auto", "cpu") == auto_precision("cpu") == "fp32"
    auto_cfg, fp32_cfg = make_pipeline(tmp_path).extract, make_pipeline(tmp_path, precision="fp32").extract
    auto_cfg = dataclasses.replace(auto_cfg, device="cpu")
    assert extractor_identity(auto_cfg) == extractor_identity(fp32_cfg)  # described unresolved: auto -> fp32 too
    clip(tmp_path / "a.mp4", 3.0, seed=1)
    clip(tmp_path / "b.mp4", 3.0, seed=2)
    a, b = VideoRequest("a", str(tmp_path / "a.mp4")), VideoRequest("b", str(tmp_path / "b.mp4"))
    made = run_extraction(make_pipeline(tmp_path, precision="fp32", device="cpu"), [a], store_path=tmp_path / "s.zarr",
                          progress=False)
    assert made.exit_code == 0
    before = open_store(tmp_path / "s.zarr").fingerprint
    more = run_extraction(make_pipeline(tmp_path, device="cpu"), [a, b], store_path=tmp_path / "s.zarr", progress=False)
    assert (more.done, more.skipped, more.exit_code) == (1, 1, 0)
    store = open_store(tmp_path / "s.zarr")
    assert store.fingerprint == before and store.attrs["extractor"]["precision"] == "fp32"
    assert store.records("ran").tolist() == ["vgg19=cpu/fp32,vggish=cpu/fp32"] * 2


def test_precision_auto_on_a_gpu_is_bf16_or_fp16_by_its_generation(monkeypatch):
    import torch

    from extract.extractor_base import effective_precision

    for capability, expected in (((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 0), "fp16")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert effective_precision("auto", "cuda:0") == expected
    # asked explicitly: as asked on a GPU
    assert effective_precision("fp32", "cuda") == "fp32" and effective_precision("fp16", "cuda") == "fp16"


def test_the_fingerprint_covers_only_the_stores_own_extractors(tmp_path):
    from extract.extractors import extractor_identity

    def fp(**extract):
        cfg = make_pipeline(tmp_path, extractors=["vggish"], **extract).extract
        return store_attrs(cfg, extractor_identity(cfg))["fingerprint"]

    # VGG-19 settings do not change an audio-only store (the old fingerprint hashed them all)
    assert fp() == fp(frames_per_segment=5) == fp(image_size=64) == fp(resize="crop")
    assert fp() != fp(vggish_relu=False)
    assert fp() != fp(segments=4)


# ------------------------------------------------------------------------------------------
# reruns: failed rows, changed files, --retry-failed


@pytest.fixture()
def videos(tmp_path):
    clip(tmp_path / "a.mp4", 3.0, seed=1)
    clip(tmp_path / "b.mp4", 3.0, seed=2)
    (tmp_path / "c.mp4").write_bytes(b"not a video at all" * 100)
    return [VideoRequest(k, str(tmp_path / f"{k}.mp4")) for k in "abc"]


def test_a_fixed_file_reaches_the_store_and_the_summary_agrees_with_the_exit_code(tmp_path, videos):
    pipeline, path = make_pipeline(tmp_path), tmp_path / "s.zarr"
    first = run_extraction(pipeline, videos, store_path=path, progress=False)
    assert (first.done, first.failed, first.failed_total, first.exit_code) == (2, 1, 1, 1)
    again = run_extraction(pipeline, videos, store_path=path, progress=False)
    assert (again.done, again.failed, again.skipped_done, again.skipped_failed, again.failed_total) == (0, 0, 2, 1, 1)
    assert "skipped 3 (already in the store) = 2 done + 1 failed" in again.text() and again.exit_code == 1
    clip(tmp_path / "c.mp4", 3.0, seed=3)  # the user replaces the broken file
    fixed = run_extraction(pipeline, videos, store_path=path, progress=False)
    assert (fixed.changed, fixed.done, fixed.failed_total, fixed.exit_code) == (1, 1, 0, 0)
    assert "re-extracted 1 videos whose file changed" in fixed.text()
    store = open_store(path)
    assert store.status().tolist() == [STATUS_DONE] * 3 and store.reasons()[2] == ""
    assert store.attrs["complete"] is True and store.attrs["verified"]  # also without --cache
    assert store.records("source")[2] == file_identity(str(tmp_path / "c.mp4"))
    reference = run_extraction(pipeline, videos[2:], store_path=tmp_path / "ref.zarr", progress=False)
    assert reference.done == 1
    np.testing.assert_array_equal(store.read("visual", [2])[0], open_store(tmp_path / "ref.zarr").read("visual", [0])[0])


def test_a_missing_file_that_appears_is_extracted_by_the_same_command(tmp_path, videos):
    pipeline, path = make_pipeline(tmp_path), tmp_path / "s.zarr"
    gone = [VideoRequest("d", str(tmp_path / "d.mp4"))]
    assert run_extraction(pipeline, gone, store_path=path, progress=False).failed == 1
    clip(tmp_path / "d.mp4", 3.0, seed=4)
    later = run_extraction(pipeline, gone, store_path=path, progress=False)
    assert (later.changed, later.done, later.exit_code) == (1, 1, 0)


def slow_decode(request, grids, segments, audio):
    time.sleep(0.5)
    return decode_video(request, grids, segments, audio)


def test_retry_failed_extracts_failed_rows_again_and_only_those(tmp_path, videos):
    pipeline, path = make_pipeline(tmp_path, decode_timeout_s=0.2), tmp_path / "s.zarr"
    first = run_extraction(pipeline, videos[:2], store_path=path, progress=False, decode_fn=slow_decode)
    assert first.failed == 2 and "timed out" in open_store(path).reasons()[0]
    pipeline = make_pipeline(tmp_path)
    plain = run_extraction(pipeline, videos, store_path=path, progress=False)
    assert (plain.done, plain.failed, plain.skipped_failed, plain.retried) == (0, 1, 2, 0)  # c is new: computed
    plan = plan_shards(open_store(path), videos, retry_failed=True)
    assert plan.retried == {"a", "b", "c"} and plan.skipped_done == 0
    retry = run_extraction(pipeline, videos, store_path=path, progress=False, retry_failed=True)
    assert (retry.retried, retry.retried_ok, retry.done, retry.failed, retry.exit_code) == (3, 2, 2, 1, 1)
    assert "retried 3 failed videos: 2 now done" in retry.text()
    assert open_store(path).status().tolist() == [STATUS_DONE, STATUS_DONE, STATUS_FAILED]


# ------------------------------------------------------------------------------------------
# an environment error is not a bad video


def broken_library(request, grids, segments, audio):
    raise OSError("Could not load this library: /venv/lib/libtorchaudio.so: undefined symbol: x")


def test_the_same_environment_error_in_a_row_stops_the_run_and_fails_no_row(tmp_path):
    names = [f"v{i}" for i in range(SYSTEMIC_LIMIT + 2)]
    for i, name in enumerate(names):
        clip(tmp_path / f"{name}.mp4", 2.0, seed=i)
    requests = [VideoRequest(n, str(tmp_path / f"{n}.mp4")) for n in names]
    pipeline, path = make_pipeline(tmp_path, segments=2), tmp_path / "s.zarr"
    summary = run_extraction(pipeline, requests, store_path=path, progress=False, decode_fn=broken_library)
    assert summary.exit_code == 2 and "libtorchaudio" in summary.systemic and "doctor" in summary.systemic
    assert summary.failed == 0
    store = open_store(path)
    assert (store.status() == STATUS_MISSING).all()  # nothing recorded as failed: a rerun computes them
    fixed = run_extraction(pipeline, requests, store_path=path, progress=False)
    assert (fixed.done, fixed.exit_code) == (len(names), 0)


def test_input_errors_keep_the_per_video_behaviour(tmp_path):
    requests = [VideoRequest(f"m{i}", str(tmp_path / f"missing{i}.mp4")) for i in range(SYSTEMIC_LIMIT + 1)]
    summary = run_extraction(make_pipeline(tmp_path), requests, store_path=tmp_path / "s.zarr", progress=False)
    assert (summary.failed, summary.systemic, summary.exit_code) == (len(requests), "", 1)


# ------------------------------------------------------------------------------------------
# the lock: --wait, re-entrancy; fencing orphaned shard writers


def test_wait_in_a_second_process(tmp_path):
    import subprocess
    import sys

    create_store(tmp_path / "s.zarr", ["a"], 2, _specs(), _attrs())
    code = ("import sys, time; from extract.core.lock import StoreLock; "
            "l = StoreLock(sys.argv[1], wait=True).acquire(); print('got', time.time(), flush=True)")
    refuse = "import sys; from extract.core.lock import StoreLock; StoreLock(sys.argv[1]).acquire()"
    with StoreLock(tmp_path / "s.zarr"):
        refused = subprocess.run([sys.executable, "-c", refuse, str(tmp_path / "s.zarr")], capture_output=True,
                                 text=True, timeout=60)
        assert refused.returncode != 0 and "StoreLocked" in refused.stderr and "--wait" in refused.stderr
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "s.zarr")], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(1.5)
        assert proc.poll() is None  # still queued
        released = time.time()
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and float(out.split()[1]) >= released
    assert "waiting for the store's lock" in err
    # it says whom it waits for: host, PID and command of the holder (this process)
    import socket

    assert f"held by pid {os.getpid()} on host {socket.gethostname()}, command '" in err


def test_the_lock_is_reentrant_in_one_process(tmp_path):
    create_store(tmp_path / "s.zarr", ["a"], 2, _specs(), _attrs())
    with StoreLock(tmp_path / "s.zarr"):
        with StoreLock(tmp_path / "s.zarr"):  # the old lock refused its own holder here
            pass
        # still held after the inner release: another open file cannot take it
        import fcntl

        with open(tmp_path / "s.zarr" / "logs" / "extract.lock", "a+") as fh:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    StoreLock(tmp_path / "s.zarr").acquire().release()


def test_an_orphaned_task_of_an_earlier_run_writes_nothing(tmp_path, videos):
    """A task carries its run's lease; after a newer run took the store it drops its results."""
    from extract.distributed import extract_shard, plan_jobs

    pipeline, path = make_pipeline(tmp_path), tmp_path / "s.zarr"
    cfg = pipeline.extract
    from extract.cache import store_specs
    from extract.extractors import extractor_identity

    attrs = store_attrs(cfg, extractor_identity(cfg))
    with open_run_store(path, [r.key for r in videos], cfg.segments, store_specs(cfg), attrs, pipeline.store) as store:
        old_jobs, _ = plan_jobs(store, videos, cfg, "cpu", lease=store.lease)
    newer = new_lease(path)  # the next run starts (e.g. the client was killed and started again)
    assert lease_token(path) == newer != old_jobs[0].lease
    result = extract_shard(old_jobs[0])
    assert result.written is None and result.done == 0
    assert (open_store(path).status() == STATUS_MISSING).all()
    current = dataclasses.replace(old_jobs[0], lease=newer)
    assert extract_shard(current).done == 2
    with shard_lock(path, 0):  # the shard lock is a plain exclusive lock
        pass


class _OnLog(logging.Handler):
    """Calls ``action`` when a record of ``logger`` contains ``text`` (a deterministic hook: the
    code under test logs it right before it blocks)."""

    def __init__(self, text: str, action):
        super().__init__(logging.DEBUG)
        self.text, self.action = text, action

    def emit(self, record):
        if self.text in record.getMessage():
            self.action()


@contextlib.contextmanager
def on_log(logger: str, text: str, action):
    handler, log = _OnLog(text, action), logging.getLogger(logger)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_an_orphaned_task_interleaved_with_a_local_run_on_one_shard_loses_no_row(tmp_path, monkeypatch):
    """Issue 28: a Dask task of an earlier run passed its lease check (it holds the shard's lock and
    is in the middle of writing the shard) just before a new single-machine run starts and writes
    other rows of the same shard. The local run must wait for the shard's lock and read the shard
    only then; before, it wrote without the lock and the orphan's stale shard overwrote its rows."""
    from extract.cache import store_specs
    from extract.distributed import extract_shard, plan_jobs
    from extract.extractors import extractor_identity
    from extract.core.settings import load_pipeline
    from extract.core.store import FeatureStore
    from test_run import SMALL

    for i, name in enumerate("abcd"):
        clip(tmp_path / f"{name}.mp4", 2.0, seed=i + 1)
    videos = [VideoRequest(k, str(tmp_path / f"{k}.mp4")) for k in "abcd"]
    pipeline = load_pipeline(None, {"extract": {**SMALL, "segments": 2, "decode_workers": 1},
                                    "store": {"rows_per_shard": 4}}, search=False)  # one shard holds all four
    cfg, path = pipeline.extract, tmp_path / "s.zarr"
    attrs = store_attrs(cfg, extractor_identity(cfg))
    with open_run_store(path, [r.key for r in videos], cfg.segments, store_specs(cfg), attrs, pipeline.store) as store:
        (orphan_job,), _ = plan_jobs(store, videos[:2], cfg, "cpu", lease=store.lease)  # run 1: rows a, b
    # run 1's client is gone; its task goes on. It stops inside its write of the shard until `go`.
    orphan_writing, go = threading.Event(), threading.Event()
    real_write = FeatureStore.write_shard

    def write_shard(self, *args, **kwargs):
        if threading.current_thread().name == "orphan":
            orphan_writing.set()
            assert go.wait(300)
        real_write(self, *args, **kwargs)
        go.set()  # a local write that did not wait for the orphan (the old code): let the orphan finish now

    monkeypatch.setattr(FeatureStore, "write_shard", write_shard)
    result = {}
    orphan = threading.Thread(target=lambda: result.update(r=extract_shard(orphan_job)), name="orphan")
    orphan.start()
    assert orphan_writing.wait(300)
    # run 2, on this machine, for rows c and d of the same shard; it waits for the orphan's shard lock
    # (and the orphan then finishes), or, unfenced, writes at once
    with on_log("extract.core.lock", "waiting for its lock", go.set):
        summary = run_extraction(pipeline, videos[2:], store_path=path, progress=False)
    orphan.join(300)
    assert result["r"].done == 2 and summary.done == 2
    store = open_store(path)
    assert store.status().tolist() == [STATUS_DONE] * 4  # no row lost
    reference = tmp_path / "ref.zarr"
    run_extraction(pipeline, videos, store_path=reference, progress=False)
    for name in ("visual", "audio", "valid"):
        np.testing.assert_array_equal(store.read(name), open_store(reference).read(name))
    assert store.attrs["complete"] is True


def test_a_shard_writer_without_its_fence_writes_nothing(tmp_path):
    """Every writer is fenced: a ShardBlock with a stale lease or none is refused under the lock."""
    from extract.run import FenceLost, ShardBlock

    create_store(tmp_path / "s.zarr", ["a", "b"], 2, _specs(), _attrs(), rows_per_shard=2)
    store = open_store(tmp_path / "s.zarr", mode="r+")
    old = new_lease(tmp_path / "s.zarr")
    new_lease(tmp_path / "s.zarr")
    for fence in (None, old):
        with pytest.raises(FenceLost, match="newer run owns the store"):
            with ShardBlock(store, 0, fence):
                pass
    store.lease = lease_token(tmp_path / "s.zarr")
    with ShardBlock(store, 0) as block:
        block.set_failed(0, VideoRequest("a", "/x/a.mp4"), "broken", source="")
        assert block.commit() == {"a": STATUS_FAILED}
    assert open_store(tmp_path / "s.zarr").status().tolist() == [STATUS_FAILED, STATUS_MISSING]


def test_out_of_memory_errors_with_other_byte_counts_are_the_same_error():
    """Issue 28: the three-in-a-row stop compared whole reason texts; CUDA out-of-memory messages
    carry byte counts, so it rarely fired."""
    from extract.run import SystemFailure, SystemicError, SystemicGuard

    def oom(mib, free):
        return SystemFailure(f"compute failed: OutOfMemoryError: CUDA out of memory. Tried to allocate {mib} MiB "
                             f"(GPU 0; 7.79 GiB total capacity; {free} GiB already allocated; process 0x7f3a{mib} "
                             f"has 5.1 GiB in use; /opt/venv/lib/python3.11/site-packages/torch/nn/functional.py:{mib})")

    guard = SystemicGuard()
    guard.observe("v0", oom("20.00", "6.41"))
    guard.observe("v1", oom("126.50", "6.52"))
    with pytest.raises(SystemicError, match="3 videos in a row"):
        guard.observe("v2", oom("2.00", "7.10"))
    # the class of the error is kept: other errors, or other classes, do not add up
    guard = SystemicGuard()
    guard.observe("v0", oom("20.00", "6.41"))
    guard.observe("v1", SystemFailure("compute failed: RuntimeError: CUDA error: an illegal memory access at 0x7f00"))
    guard.observe("v2", oom("2.00", "7.10"))
    assert guard.count == 1
    from extract.run import error_kind

    assert error_kind("ImportError: /a/b/libx.so.1: undefined symbol: y") == error_kind(
        "ImportError: /c/libx.so.2: undefined symbol: y")
    assert error_kind("OSError: No space left on device") != error_kind("MemoryError: No space left on device")


def test_a_run_on_a_complete_store_reads_back_only_the_shards_it_wrote(tmp_path, monkeypatch):
    """Issue 28: every write run verified the whole store; a predict store only grows, so each call
    re-read every earlier video. Now: the shards written, when the store was complete before (the
    status of every row is still checked); everything when it was not."""
    import extract.core.store as store_module

    for i, name in enumerate("abcde"):
        clip(tmp_path / f"{name}.mp4", 2.0, seed=i + 1)
    videos = [VideoRequest(k, str(tmp_path / f"{k}.mp4")) for k in "abcde"]
    pipeline, path = make_pipeline(tmp_path, segments=2), tmp_path / "s.zarr"
    verified = []
    real = store_module.verify_store

    def spy(store, shards=None):
        verified.append(None if shards is None else sorted(shards))
        return real(store, shards)

    monkeypatch.setattr(store_module, "verify_store", spy)
    assert run_extraction(pipeline, videos[:3], store_path=path, progress=False).done == 3
    assert verified == [None]  # a new store: read whole
    assert run_extraction(pipeline, videos, store_path=path, progress=False).done == 2  # rows d, e
    assert verified[1:] == [[1, 2]]  # row c's shard 1 (c, d) and shard 2 (e); shard 0 not re-read
    assert open_store(path).attrs["complete"] is True
    # a store that was not complete (a run stopped) is read whole by the next run
    open_store(path, mode="r+").set_attrs(complete=False)
    clip(tmp_path / "f.mp4", 2.0, seed=9)
    run_extraction(pipeline, videos + [VideoRequest("f", str(tmp_path / "f.mp4"))], store_path=path, progress=False)
    assert verified[2:] == [None]
    # the status of every row is checked all the same: a row that lost its status is found
    store = open_store(path, mode="r+")
    (path / "status" / "c" / "0").unlink()  # rows a, b read as missing
    clip(tmp_path / "g.mp4", 2.0, seed=10)
    summary = run_extraction(pipeline, [VideoRequest("g", str(tmp_path / "g.mp4"))], store_path=path, progress=False)
    assert summary.done == 1 and verified[3:] == [[3]]
    assert open_store(path).attrs["complete"] is False


def test_requests_have_absolute_paths_whatever_the_working_directory(tmp_path, monkeypatch):
    from extract.core.manifest import Sample, write_manifest

    (tmp_path / "proj" / "videos").mkdir(parents=True)
    write_manifest(tmp_path / "proj" / "m.csv", [Sample("s", "v", "v.mp4", "", 0, 0, "test")], classes=["x"])
    monkeypatch.chdir(tmp_path / "proj")
    requests = requests_from_manifest("m.csv", "videos")
    assert requests[0].path == str(tmp_path / "proj" / "videos" / "v.mp4")
    assert os.path.isabs(requests_from_manifest("m.csv", None)[0].path)


def test_aborting_with_a_full_prefetch_queue_does_not_stall(tmp_path):
    """The old thread put its end marker with a blocking put on a full queue: close() waited 30 s."""
    from extract.decode import DecodePool
    from extract.run import _Prefetch

    clip(tmp_path / "a.mp4", 1.0, seed=1)
    request = VideoRequest("a", str(tmp_path / "a.mp4"))
    with DecodePool(1, 60.0, ahead=4) as pool:
        pool.start()
        pool.wait_ready()
        prefetch = _Prefetch(pool, decode_video, [(request, [], 1, False)], maxsize=1)
        deadline = time.monotonic() + 60
        while not prefetch.queue.full() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # the pool has finished its tasks; the thread now holds the end marker
        assert prefetch.queue.full()
        started = time.monotonic()
        prefetch.close(pool)
        assert time.monotonic() - started < 5 and not prefetch.thread.is_alive()


# ------------------------------------------------------------------------------------------
# the command line: checks before any store exists


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("address", ["garbage", "tcp://127.0.0.1", "http://127.0.0.1:8786", "refused"])
def test_a_bad_scheduler_stops_before_the_store_exists(tmp_path, address):
    from click.testing import CliRunner

    from extract.cli import main

    clip(tmp_path / "a.mp4", 1.0, seed=1)
    (tmp_path / "m.csv").write_text("sample_id,video_id,path,category,onset,offset,split\ns,a,a.mp4,,0,0,test\n")
    if address == "refused":
        address = f"tcp://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    result = CliRunner().invoke(main, ["--manifest", str(tmp_path / "m.csv"), "--weights", "random", "--no-progress",
                                       "--store", str(tmp_path / "s.zarr"), "--scheduler", address])
    assert result.exit_code == 2, result.output
    assert "scheduler" in result.output and not (tmp_path / "s.zarr").exists()
    assert time.monotonic() - started < 15  # a refused port is known at once (the old client retried 30 s)


def test_weights_random_means_every_network(tmp_path):
    from click.testing import CliRunner

    from extract.cli import main

    out = CliRunner().invoke(main, ["--weights", "random", "--print-config"]).output
    for key in ("visual_weights", "audio_weights", "sol_visual_weights"):
        assert f"{key}: random" in out, key


def test_config_shows_the_cache_root_that_applies(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from extract.cli import main

    monkeypatch.setenv("AVEL_CACHE", str(tmp_path / "shared-cache"))
    assert f"cache_root: {tmp_path / 'shared-cache'}" in CliRunner().invoke(main, ["config"]).output


def test_dask_logs_are_quiet_unless_verbose(monkeypatch):
    import logging

    from extract.core.clitools import setup_logging

    monkeypatch.delenv("DASK_LOGGING__DISTRIBUTED", raising=False)
    setup_logging(0)
    assert os.environ["DASK_LOGGING__DISTRIBUTED"] == "warning"  # read by the worker processes too
    assert logging.getLogger("distributed.scheduler").getEffectiveLevel() == logging.WARNING


def test_threads_bound_the_networks_on_a_cpu(tmp_path):
    import torch

    from click.testing import CliRunner

    from extract.cli import main

    before = torch.get_num_threads()
    try:
        run_extraction(make_pipeline(tmp_path, threads=1), [], store_path=tmp_path / "s.zarr", progress=False)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert "threads: 3" in CliRunner().invoke(main, ["--threads", "3", "--print-config"]).output


def test_the_worker_weights_check_names_a_missing_file(tmp_path):
    from extract.cli import _weights_problem

    assert _weights_problem(make_pipeline(tmp_path).extract) == ""  # random weights: nothing to find
    problem = _weights_problem(make_pipeline(tmp_path, visual_weights=str(tmp_path / "vgg19.pth")).extract)
    assert "vgg19.pth" in problem


def test_one_device_resolver_for_both_stages():
    import torch

    from extract.core.devices import count_parameters, resolve_device
    from train.data import resolve_device as train_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == resolve_device(None) == expected and train_device("auto") == torch.device(expected)
    assert resolve_device("cpu") == "cpu" and resolve_device("cuda:1") == "cuda:1"  # extraction's preflight reports it
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cpu"):
            train_device("cuda")
    layer = torch.nn.Linear(3, 2)
    layer.bias.requires_grad_(False)
    assert count_parameters(layer) == 8 and count_parameters(layer, trainable_only=True) == 6


def test_the_store_option_is_relative_to_the_working_directory(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from extract.cli import main

    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "pipeline.yaml").write_text("store: {path: inside.zarr}\n")
    monkeypatch.chdir(tmp_path)
    config = ["--config", "project/pipeline.yaml"]
    assert "path: inside.zarr" in CliRunner().invoke(main, config + ["config"]).output  # resolved against the yaml
    out = CliRunner().invoke(main, config + ["--store", "here/s.zarr", "--print-config"]).output
    assert f"path: {tmp_path / 'here' / 's.zarr'}" in out
