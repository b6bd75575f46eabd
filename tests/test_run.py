"""The extraction runner (extract.run): store contents, failures, resume/skip, growth, identity,
the store lock (two processes) and the decode timeout inside a real run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from extract.decode import VideoRequest, decode_video
from extract.core.lock import StoreLock, StoreLocked
from extract.core.manifest import Sample, write_manifest
from extract.factories.media import write_clip
from extract.core.settings import ConfigError, load_pipeline
from extract.core.store import STATUS_DONE, STATUS_FAILED, StoreError, open_store

REPO = Path(__file__).resolve().parents[1]
T, F = 3, 2
SMALL = {"segments": T, "frames_per_segment": F, "image_size": 32, "batch_frames": 4,
         "visual_weights": "random", "audio_weights": "random", "device": "cpu", "decode_workers": 2,
         "decode_timeout_s": 60.0}


def make_pipeline(tmp_path, **extract):
    return load_pipeline(None, {"extract": {**SMALL, **extract}, "store": {"rows_per_shard": 2},
                                "data": {"root": str(tmp_path)}}, search=False)


def clip(path, seconds, fps=10, audio=True, seed=0):
    rng = np.random.default_rng(seed)
    n = int(round(seconds * fps))
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    frames = np.stack([np.kron(np.roll(base, k, axis=0), np.ones((8, 8, 1), np.uint8)) for k in range(n)])
    wave = (0.2 * np.sin(2 * np.pi * (300 + 50 * seed) * np.arange(int(seconds * 16000)) / 16000)).astype(np.float32)
    return write_clip(path, frames, fps=fps, audio=wave if audio else None, sample_rate=16000)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("runner")
    clip(root / "a.mp4", 3.0, seed=1)
    clip(root / "b.mp4", 2.5, seed=2)  # shorter than T: last second invalid (audio does not cover it)
    clip(root / "c.mp4", 3.0, audio=False, seed=3)  # no audio: done, nothing valid
    (root / "e.mp4").write_bytes(b"")  # zero bytes: failed
    clip(root / "f.mp4", 3.2, seed=4)
    clip(root / "g.mp4", 3.0, seed=5)
    names = ["a", "b", "c", "d", "e", "f"]  # d.mp4 does not exist: failed
    samples = [Sample(f"s_{n}", n, f"{n}.mp4", "", 0, 0, "test") for n in names]
    samples.append(Sample("s_a2", "a", "a.mp4", "", 0, 0, "test"))  # same key twice: one row
    write_manifest(root / "first.csv", samples, classes=["dog"])
    more = samples + [Sample("s_g", "g", "g.mp4", "", 0, 0, "test")]
    write_manifest(root / "more.csv", more, classes=["dog"])
    return root


@pytest.fixture(scope="module")
def extractors(data):
    import torch

    from extract.extractors import build_extractors

    torch.set_num_threads(1)  # the runner keeps it (OMP_NUM_THREADS is set by conftest)
    return build_extractors(make_pipeline(data).extract, "cpu")


def requests_of(data, manifest):
    from extract.requests import requests_from_manifest

    return requests_from_manifest(data / manifest, None)


def read_all(store):
    return {name: store.read(name) for name in store.array_names()}


def test_run_writes_rows_failures_and_skips_on_rerun(data, extractors, tmp_path):
    from extract.run import run_extraction

    pipeline = make_pipeline(data)
    path = tmp_path / "s.zarr"
    requests = requests_of(data, "first.csv")
    summary = run_extraction(pipeline, requests, store_path=path, progress=False, extractors=extractors)
    assert (summary.requested, summary.done, summary.failed, summary.skipped) == (6, 4, 2, 0)
    assert summary.exit_code == 1

    store = open_store(path)
    assert store.ids.tolist() == ["a", "b", "c", "d", "e", "f"]
    np.testing.assert_array_equal(store.status(), [1, 1, 1, 2, 2, 1])
    reasons = store.reasons()
    assert reasons[2] == "no audio stream"
    assert reasons[3].startswith("file not found") and "d.mp4" in reasons[3]
    assert reasons[4].startswith("empty file (0 bytes)")
    logged = [json.loads(line) for line in (path / "logs" / "failures.jsonl").read_text().splitlines()]
    assert [(r["key"], r["reason"]) for r in logged] == [("d", reasons[3]), ("e", reasons[4])]

    # valid = video AND audio per segment, from the clips' lengths: b is 2.5 s long (its audio,
    # 2.56 s with the AAC priming, ends before the third second's patch); c has no audio
    np.testing.assert_array_equal(store.read("valid"), [
        [True, True, True], [True, True, False], [False, False, False],
        [False, False, False], [False, False, False], [True, True, True]])

    # rows equal the extractors applied directly to the decoded videos, shard by shard
    grids = [e.frame_grid for e in extractors if e.frame_grid is not None]
    for rows in ([0, 1], [2], [5]):
        videos = [decode_video(requests[r], grids, T, True) for r in rows]
        outs = [e.compute(videos) for e in extractors]
        for i, row in enumerate(rows):
            np.testing.assert_array_equal(store.read("visual", [row])[0], outs[0][i]["visual"])
            np.testing.assert_array_equal(store.read("audio", [row])[0], outs[1][i]["audio"])
    assert not store.read("visual", [3, 4]).any() and not store.read("audio", [3, 4]).any()
    assert not store.read("audio", [2]).any() and store.read("visual", [2]).any()

    attrs = store.attrs
    assert attrs["weights"]["vgg19"]["vgg19"]["sha256"] == "random"
    assert attrs["extractor"]["frames_per_segment"] == F and attrs["fingerprint_fields"]["segments"] == T
    assert {"python", "torch", "decord", "zarr", "numpy"} <= set(attrs["versions"])

    # a second run finds every shard finished and changes nothing
    before = read_all(store)
    again = run_extraction(pipeline, requests, store_path=path, progress=False, extractors=extractors)
    assert (again.done, again.failed, again.skipped, again.failed_total) == (0, 0, 6, 2)
    after = read_all(open_store(path))
    for name in before:
        np.testing.assert_array_equal(before[name], after[name])

    # new keys grow the store; old rows stay as they were
    grown = run_extraction(pipeline, requests_of(data, "more.csv"), store_path=path, progress=False, extractors=extractors)
    assert (grown.done, grown.skipped) == (1, 6)
    store = open_store(path)
    assert store.ids.tolist()[-1] == "g" and store.status()[-1] == STATUS_DONE
    assert store.read("valid", [6]).all()
    for name in before:
        np.testing.assert_array_equal(store.read(name, slice(0, 6)), before[name])


def test_refuses_a_store_made_with_other_settings(data, extractors, tmp_path):
    from extract.run import run_extraction

    path = tmp_path / "s.zarr"
    requests = requests_of(data, "first.csv")[:1]
    run_extraction(make_pipeline(data), requests, store_path=path, progress=False, extractors=extractors)
    other = make_pipeline(data, image_size=64)
    with pytest.raises(StoreError, match=r"s\.zarr.*refusing.*image_size: 32 -> 64"):
        run_extraction(other, requests, store_path=path, progress=False)


def test_fingerprint_ignores_layout_and_runtime_settings(data):
    from extract.extractors import extractor_identity
    from extract.provenance import store_attrs

    base = make_pipeline(data, precision="fp32").extract
    same = make_pipeline(data, precision="fp32", batch_frames=64, decode_workers=7, device="cuda", decode_timeout_s=5.0).extract
    changed = make_pipeline(data, precision="bf16").extract
    fp = lambda cfg: store_attrs(cfg, extractor_identity(cfg))["fingerprint"]  # noqa: E731
    assert fp(base) == fp(same)
    assert fp(base) != fp(changed)
    # precision auto: what runs depends on the device (bf16 on a GPU, fp32 on a CPU), and so does the fingerprint
    auto = {device: make_pipeline(data, device=device).extract for device in ("cpu", "cuda")}
    assert fp(auto["cpu"]) == fp(base) and fp(auto["cuda"]) == fp(changed)


LOCK_HOLDER = """
import sys, time
from extract.core.lock import StoreLock
lock = StoreLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_while_the_first_holds_the_lock(data, extractors, tmp_path):
    from extract.run import run_extraction

    path = tmp_path / "s.zarr"
    requests = requests_of(data, "first.csv")[:1]
    run_extraction(make_pipeline(data), requests, store_path=path, progress=False, extractors=extractors)
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        import re
        import socket

        # the holder's host, PID and command (issue 28: the command was not said)
        who = re.escape(f"(pid {holder.pid} on host {socket.gethostname()}, command '-c {path}', started ")
        with pytest.raises(StoreLocked, match="another avel-extract is writing this store " + who):
            run_extraction(make_pipeline(data), requests, store_path=path, progress=False, extractors=extractors)
    finally:
        holder.kill()
        holder.wait()
    # the OS released the killed holder's lock: the store can be locked again
    with StoreLock(path):
        pass


def hang_on_b(request, grids, segments, audio):
    """decode_video, except that video "b" hangs forever (as decord can on broken files)."""
    if request.key == "b":
        time.sleep(3600)
    return decode_video(request, grids, segments, audio)


def test_a_hung_decode_is_killed_and_the_run_goes_on(data, extractors, tmp_path):
    from extract.run import run_extraction

    requests = [r for r in requests_of(data, "first.csv") if r.key in ("a", "b", "f")]
    pipeline = make_pipeline(data, decode_timeout_s=8.0)
    summary = run_extraction(pipeline, requests, store_path=tmp_path / "s.zarr", progress=False,
                             extractors=extractors, decode_fn=hang_on_b)
    assert (summary.done, summary.failed) == (2, 1)
    store = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(store.status(), [STATUS_DONE, STATUS_FAILED, STATUS_DONE])
    assert store.reasons()[1] == "decode timed out after 8 s (worker killed)"


def audio_io_error_once(request, grids, segments, audio):
    """decode_video, except that reading the audio packets of video "a" fails once with an I/O
    error (EIO, as a flaky network disk gives: file a.mp4, whatever its key); a marker file beside the clip remembers that it
    happened, since the run's decode workers are processes."""
    import errno

    import extract.sources as sources

    marker = Path(request.path + ".io-error-once")
    if Path(request.path).name != "a.mp4" or marker.exists():
        return decode_video(request, grids, segments, audio)
    marker.touch()
    sources.SOURCES.clear()
    original = sources.AudioStream.__init__

    def failing_init(self, path):
        original(self, path)

        def packets():
            raise OSError(errno.EIO, "Input/output error")
            yield  # a generator

        self._packets = packets()

    sources.AudioStream.__init__ = failing_init
    try:
        return decode_video(request, grids, segments, audio)
    finally:
        sources.AudioStream.__init__ = original


def test_an_audio_read_error_fails_the_row_and_retry_failed_makes_it_done(data, extractors, tmp_path):
    """An audio stream that exists but cannot be read is a failed row with its reason (not a done
    row without audio), skipped by a plain rerun, computed again by --retry-failed; through the
    cache it is never served: the next run computes it again."""
    import functools
    import shutil

    from extract.cache import extract_with_cache
    from extract.run import run_extraction

    for name in ("a", "f"):
        shutil.copy(data / f"{name}.mp4", tmp_path / f"{name}.mp4")
    requests = [VideoRequest(name, str(tmp_path / f"{name}.mp4")) for name in ("a", "f")]
    pipeline = make_pipeline(data)
    path = tmp_path / "s.zarr"
    run = functools.partial(run_extraction, pipeline, requests, store_path=path, progress=False, extractors=extractors,
                            decode_fn=audio_io_error_once)
    first = run()
    assert (first.done, first.failed) == (1, 1)
    store = open_store(path)
    reason = store.reasons()[0]
    assert reason == ("the audio stream cannot be decoded: reading audio packets failed after 0 samples: "
                      "OSError: [Errno 5] Input/output error"), reason
    assert store.status().tolist() == [STATUS_FAILED, STATUS_DONE]
    assert run().skipped_failed == 1 and open_store(path).status()[0] == STATUS_FAILED
    retried = run(retry_failed=True)
    assert (retried.done, retried.retried_ok, retried.failed) == (1, 1, 0)
    store = open_store(path)
    assert store.status().tolist() == [STATUS_DONE, STATUS_DONE] and store.reasons()[0] == ""
    grids = [e.frame_grid for e in extractors if e.frame_grid is not None]
    video = decode_video(requests[0], grids, T, True)
    np.testing.assert_array_equal(store.read("audio", [0])[0], extractors[1].compute([video])[0]["audio"])

    # through the shared cache: the failed row is the project's record, the cache never serves it
    (tmp_path / "a.mp4.io-error-once").unlink()
    runner = functools.partial(run_extraction, extractors=extractors, decode_fn=audio_io_error_once)
    cached = functools.partial(extract_with_cache, pipeline, requests, root=tmp_path / "cache", progress=False,
                               runner=runner)
    one = cached(store_path=tmp_path / "p1.zarr")
    assert (one.done, one.failed, one.computed) == (1, 1, 2)
    assert open_store(tmp_path / "p1.zarr").reasons()[0].startswith("the audio stream cannot be decoded")
    two = cached(store_path=tmp_path / "p2.zarr")  # another project: "a" is computed again, "f" reused
    assert (two.done, two.failed, two.computed, two.reused) == (2, 0, 1, 1)
    assert open_store(tmp_path / "p2.zarr").status().tolist() == [STATUS_DONE, STATUS_DONE]


def test_split_names_comma_lists_and_all(tmp_path):
    from extract.requests import collect_requests, resolve_splits

    for name in ("one", "two"):
        write_manifest(tmp_path / f"{name}.csv", [Sample(f"s{name}", f"v{name}", f"{name}.mp4", "", 0, 0, name)])
    pipeline = load_pipeline(None, {"data": {"splits": {
        "one": {"manifest": str(tmp_path / "one.csv"), "video_root": str(tmp_path / "videos")},
        "two": {"manifest": str(tmp_path / "two.csv")}}}}, search=False)
    assert resolve_splits(pipeline, "all") == ["one", "two"]
    assert resolve_splits(pipeline, "two, one") == ["two", "one"]
    with pytest.raises(ConfigError, match="unknown split.*configured: one, two"):
        resolve_splits(pipeline, "one,three")
    requests = collect_requests(pipeline, "all")
    assert requests == [VideoRequest("vone", str(tmp_path / "videos" / "one.mp4")),
                        VideoRequest("vtwo", str(tmp_path / "two.mp4"))]
