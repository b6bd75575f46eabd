"""The feature cache shared across projects (extract.cache): feature-set identity, content keys
(same file name, other content: no collision), a second project computes nothing, a third only
its new videos, completeness verification and readers refusing incomplete sets, the listing."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from extract.decode import VideoRequest, decode_video
from extract.factories.media import write_clip
from extract.core.settings import load_pipeline
from extract.core.store import STATUS_DONE, STATUS_FAILED, StoreError, open_store

T = 2
SMALL = {"segments": T, "frames_per_segment": 1, "image_size": 32, "batch_frames": 4,
         "visual_weights": "random", "audio_weights": "random", "device": "cpu"}


def make_pipeline(**extract):
    return load_pipeline(None, {"extract": {**SMALL, **extract}, "store": {"rows_per_shard": 2}}, search=False)


def clip(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    frames = np.stack([np.kron(np.roll(base, k, axis=0), np.ones((8, 8, 1), np.uint8)) for k in range(16)])
    wave = (0.2 * np.sin(2 * np.pi * (300 + 50 * seed) * np.arange(2 * 16000) / 16000)).astype(np.float32)
    return write_clip(path, frames, fps=8, audio=wave, sample_rate=16000)


#: keys of the videos decoded by the runs (the cluster runs tasks in threads of this process)
DECODED: list[str] = []
_LOCK = threading.Lock()


def counting_decode(request, grids, segments, audio):
    with _LOCK:
        DECODED.append(request.key)
    return decode_video(request, grids, segments, audio)


@pytest.fixture(scope="module")
def client():
    """An in-process Dask cluster (one worker thread): the runs below use the Dask runner."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("cmedia")
    for name, seed in (("a", 1), ("b", 2), ("c", 3), ("d", 4)):
        clip(root / "one" / f"{name}.mp4", seed)
    # project two: the same three files under other names in another folder
    for old, new in (("a", "x"), ("b", "y"), ("c", "z")):
        (root / "two").mkdir(exist_ok=True)
        shutil.copy(root / "one" / f"{old}.mp4", root / "two" / f"{new}.mp4")
    # project four: a DIFFERENT video that is also called a.mp4
    clip(root / "four" / "a.mp4", 9)
    return root


def requests(folder: Path, names) -> list[VideoRequest]:
    return [VideoRequest(n, str(folder / f"{n}.mp4")) for n in names]


def test_projects_share_the_cache_and_compute_only_what_it_lacks(client, media, tmp_path, monkeypatch):
    from extract.cache import cache_root, extract_with_cache, feature_set_id, format_cache_listing, list_cache
    from extract.distributed import run_extraction_dask

    pipeline = make_pipeline()
    monkeypatch.setenv("AVEL_CACHE", str(tmp_path / "cache"))
    root = cache_root(pipeline)
    assert root == tmp_path / "cache"
    runner = functools.partial(run_extraction_dask, client=client, decode_fn=counting_decode)
    run = functools.partial(extract_with_cache, pipeline, runner=runner, progress=False)

    # project one computes its three videos
    DECODED.clear()
    one = run(requests(media / "one", "abc"), store_path=tmp_path / "one.zarr")
    assert (one.computed, one.reused, one.done) == (3, 0, 3) and len(DECODED) == 3

    # the same numbers as an extraction without the cache
    reference = tmp_path / "plain.zarr"
    run_extraction_dask(pipeline, requests(media / "one", "abc"), store_path=reference, client=client, progress=False)
    plain, first = open_store(reference), open_store(tmp_path / "one.zarr")
    assert first.ids.tolist() == ["a", "b", "c"]
    for name in ("visual", "audio", "valid", "status"):
        np.testing.assert_array_equal(first.read(name), plain.read(name))
    assert first.fingerprint == plain.fingerprint == one.feature_set == feature_set_id(pipeline.extract)
    assert first.attrs["complete"] is True

    # project two: the same files under other names -> nothing computed, same rows
    DECODED.clear()
    two = run(requests(media / "two", "xyz"), store_path=tmp_path / "two.zarr")
    assert (two.computed, two.reused, two.done) == (0, 3, 3) and DECODED == []
    second = open_store(tmp_path / "two.zarr")
    assert second.ids.tolist() == ["x", "y", "z"]
    for name in ("visual", "audio", "valid"):
        np.testing.assert_array_equal(second.read(name), first.read(name))

    # project three adds one video: only it is computed
    DECODED.clear()
    three = run(requests(media / "one", "abd"), store_path=tmp_path / "three.zarr")
    assert (three.computed, three.reused, three.done) == (1, 2, 3) and len(DECODED) == 1
    third = open_store(tmp_path / "three.zarr")
    np.testing.assert_array_equal(third.read("visual", [0, 1]), first.read("visual", [0, 1]))

    # project four: another video that is ALSO named a.mp4 (key "a") -> computed, not confused
    DECODED.clear()
    four = run(requests(media / "four", "a") + [VideoRequest("lost", str(media / "nope.mp4"))],
               store_path=tmp_path / "four.zarr")
    assert (four.computed, four.reused, four.done, four.failed) == (1, 0, 1, 1) and len(DECODED) == 1
    fourth = open_store(tmp_path / "four.zarr")
    assert not np.array_equal(fourth.read("visual", [0]), first.read("visual", [0]))
    assert fourth.status().tolist() == [STATUS_DONE, STATUS_FAILED]
    assert fourth.reasons()[1].startswith("file not found")

    # the cache: one feature set, five distinct contents, all done, complete; the unreadable file is not cached
    entries = list_cache(root)
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["feature_set"], entry["videos"], entry["done"], entry["missing"], entry["complete"]) == (
        one.feature_set, 5, 5, 0, True)
    assert entry["made_with"]["frames_per_segment"] == 1 and set(entry["made_with"]["extractors"]) == {"vgg19", "vggish"}
    assert entry["bytes"] > 0
    cache = open_store(Path(entry["path"]))
    assert all(k.startswith("sha256:") and k.endswith("@0+full") for k in cache.ids.tolist())
    text = format_cache_listing(entries, root)
    assert one.feature_set in text and "5 videos" in text and "complete" in text and "random" in text


def test_feature_set_identity_counts_what_changes_the_numbers_only():
    from extract.cache import feature_set_id

    base = feature_set_id(make_pipeline(precision="fp32").extract)
    # layout/runtime choices: same feature set (the device too, at a fixed precision)
    for same in ({"batch_frames": 64}, {"decode_workers": 7}, {"device": "cuda"}, {"decode_timeout_s": 5.0}):
        assert feature_set_id(make_pipeline(precision="fp32", **same).extract) == base, same
    # precision auto (the default) is resolved on the device: fp32 on a CPU, bf16 on a GPU
    assert feature_set_id(make_pipeline(device="cpu").extract) == base
    assert feature_set_id(make_pipeline(device="cuda").extract) == feature_set_id(make_pipeline(precision="bf16").extract)
    # what changes the numbers: another feature set
    others = {feature_set_id(make_pipeline(**other).extract) for other in (
        {"frames_per_segment": 2}, {"precision": "bf16"}, {"random_seed": 1}, {"image_size": 64},
        {"vggish_relu": False}, {"resize": "crop"})}
    assert len(others) == 6 and base not in others
    rows = load_pipeline(None, {"extract": SMALL, "store": {"rows_per_shard": 64, "compression_level": 9}}, search=False)
    assert feature_set_id(rows.extract) == base


def test_content_key_is_the_file_bytes_and_the_window(media, tmp_path):
    import hashlib

    from extract.cache import content_key

    path = media / "one" / "a.mp4"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert content_key(VideoRequest("a", str(path))) == f"sha256:{digest}@0+full"
    assert content_key(VideoRequest("other-name", str(media / "two" / "x.mp4"))) == f"sha256:{digest}@0+full"
    assert content_key(VideoRequest("a", str(path), 1.5, 10)) == f"sha256:{digest}@1.5+10"
    assert content_key(VideoRequest("a", str(media / "four" / "a.mp4"))) != f"sha256:{digest}@0+full"


def test_incomplete_sets_are_detected_and_refused(tmp_path):
    from extract.cache import mark_complete, require_complete, verify_store
    from train.data import open_checked_store
    from train_testutils import write_store

    rng = np.random.default_rng(0)
    n = 6
    visual = rng.normal(size=(n, T, 7, 7, 512)).astype(np.float16)
    audio = rng.normal(size=(n, T, 128)).astype(np.float32)
    store = write_store(tmp_path / "s.zarr", [f"v{i}" for i in range(n)], visual, audio, np.ones((n, T), bool), T,
                        rows_per_shard=2)
    store = open_store(tmp_path / "s.zarr", mode="r+")
    assert verify_store(store) == [] and mark_complete(store) == []
    assert open_store(tmp_path / "s.zarr").attrs["complete"] is True
    open_checked_store(tmp_path / "s.zarr")  # accepted

    # lost writes are found and the set marked incomplete: a feature shard file (rows 2-3) ...
    (tmp_path / "s.zarr" / "audio" / "c" / "1" / "0" / "0").unlink()
    assert verify_store(open_store(tmp_path / "s.zarr")) == ["shard 1: the shard files of audio are missing"]
    # ... and a status shard (rows 4-5 read as not extracted)
    (tmp_path / "s.zarr" / "status" / "c" / "2").unlink()
    problems = mark_complete(open_store(tmp_path / "s.zarr", mode="r+"))
    assert problems == ["2 of 6 rows are not extracted (status missing)", "shard 1: the shard files of audio are missing"]
    incomplete = open_store(tmp_path / "s.zarr")
    assert incomplete.attrs["complete"] is False
    with pytest.raises(StoreError, match="incomplete.*run the same avel-extract command again"):
        require_complete(incomplete)
    with pytest.raises(StoreError, match="incomplete"):
        open_checked_store(tmp_path / "s.zarr")

    # a damaged feature shard is reported as unreadable
    store = write_store(tmp_path / "t.zarr", ["a", "b"], visual[:2], audio[:2], np.ones((2, T), bool), T, rows_per_shard=2)
    shard = next(p for p in (tmp_path / "t.zarr" / "audio").rglob("*") if p.is_file() and "/c/" in p.as_posix())
    shard.write_bytes(b"garbage" * 10)
    problems = verify_store(open_store(tmp_path / "t.zarr"))
    assert any(p.startswith("array audio, rows 0-1: unreadable") for p in problems)


def test_cli_cache_run_and_listing(client, media, tmp_path, monkeypatch):
    """``avel-extract --cache`` on videos the cache holds computes nothing; ``list-cache`` shows the set."""
    import yaml
    from click.testing import CliRunner

    from extract.cache import extract_with_cache
    from extract.cli import main
    from extract.distributed import run_extraction_dask
    from extract.core.manifest import Sample, write_manifest

    monkeypatch.setenv("AVEL_CACHE", str(tmp_path / "cache"))
    pipeline = make_pipeline()
    runner = functools.partial(run_extraction_dask, client=client)
    extract_with_cache(pipeline, requests(media / "one", "ab"), store_path=tmp_path / "first.zarr", runner=runner,
                       progress=False)
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"extract": SMALL, "store": {"rows_per_shard": 2}}))
    write_manifest(tmp_path / "m.csv", [Sample(f"s{n}", n, str(media / "two" / f"{n}.mp4"), "", 0, 0, "test")
                                        for n in "xy"], classes=["dog"])
    res = CliRunner().invoke(main, ["--config", str(tmp_path / "pipeline.yaml"), "--manifest", str(tmp_path / "m.csv"),
                                    "--store", str(tmp_path / "cli.zarr"), "--cache", "--no-progress"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "2 videos: 2 reused from the cache, 0 computed now" in res.output
    np.testing.assert_array_equal(open_store(tmp_path / "cli.zarr").read("visual"),
                                  open_store(tmp_path / "first.zarr").read("visual"))
    listing = CliRunner().invoke(main, ["--config", str(tmp_path / "pipeline.yaml"), "list-cache"])
    assert listing.exit_code == 0, listing.output
    assert "1 feature sets" in listing.output and "2 videos (done 2, failed 0, missing 0)" in listing.output


# ------------------------------------------------------------------------------------------
# the cache holds successes only (issue 19, bugs 1 and 2)


def failing_decode(request, grids, segments, audio):
    from extract.decode import DecodeError

    raise DecodeError("decode timed out after 0.01 s (worker killed)")


def test_a_transient_failure_is_never_handed_to_another_project(media, tmp_path):
    import json

    pipeline, root = make_pipeline(), tmp_path / "cache"
    from extract.cache import extract_with_cache
    from extract.run import run_extraction

    runner_a = functools.partial(run_extraction, decode_fn=failing_decode)
    a = extract_with_cache(pipeline, requests(media / "one", ["a"]), store_path=tmp_path / "A.zarr", root=root,
                           progress=False, runner=runner_a)
    assert (a.computed, a.failed, a.exit_code) == (1, 1, 1)
    # project A's failure is A's record: its store and its failures.jsonl, with A's own path
    logged = [json.loads(line) for line in (tmp_path / "A.zarr" / "logs" / "failures.jsonl").read_text().splitlines()]
    assert [(r["key"], r["path"]) for r in logged] == [("a", str(media / "one" / "a.mp4"))]
    # project B: the same file under another name, a working decoder -> computed, not reused
    b = extract_with_cache(pipeline, requests(media / "two", ["x"]), store_path=tmp_path / "B.zarr", root=root,
                           progress=False)
    assert (b.reused, b.computed, b.done, b.failed, b.exit_code) == (0, 1, 1, 0, 0)
    assert "0 reused from the cache, 1 computed now" in b.text()
    assert open_store(tmp_path / "B.zarr").status().tolist() == [STATUS_DONE]
    # A still has its failed row; --retry-failed now takes the good row from the cache
    again = extract_with_cache(pipeline, requests(media / "one", ["a"]), store_path=tmp_path / "A.zarr", root=root,
                               progress=False)
    assert (again.skipped_failed, again.exit_code) == (1, 1)
    retry = extract_with_cache(pipeline, requests(media / "one", ["a"]), store_path=tmp_path / "A.zarr", root=root,
                               progress=False, retry_failed=True)
    assert (retry.reused, retry.computed, retry.retried, retry.retried_ok, retry.exit_code) == (1, 0, 1, 1, 0)
    np.testing.assert_array_equal(open_store(tmp_path / "A.zarr").read("visual"), open_store(tmp_path / "B.zarr").read("visual"))


def test_a_fixed_file_reaches_the_project_store_through_the_cache(media, tmp_path):
    from extract.cache import extract_with_cache

    pipeline, root = make_pipeline(), tmp_path / "cache"
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "c.mp4").write_bytes(b"\x00\x01garbage" * 500)
    first = extract_with_cache(pipeline, requests(tmp_path / "v", ["c"]), store_path=tmp_path / "P.zarr", root=root,
                               progress=False)
    assert (first.failed, first.exit_code) == (1, 1)
    shutil.copy(media / "one" / "c.mp4", tmp_path / "v" / "c.mp4")
    fixed = extract_with_cache(pipeline, requests(tmp_path / "v", ["c"]), store_path=tmp_path / "P.zarr", root=root,
                               progress=False)
    assert (fixed.changed, fixed.done, fixed.failed_total, fixed.exit_code) == (1, 1, 0, 0)
    store = open_store(tmp_path / "P.zarr")
    assert store.status().tolist() == [STATUS_DONE] and store.reasons().tolist() == [""]


def test_a_settings_change_is_refused_before_any_feature_is_computed(media, tmp_path):
    from extract.cache import extract_with_cache

    root = tmp_path / "cache"
    ok = extract_with_cache(make_pipeline(), requests(media / "one", ["a"]), store_path=tmp_path / "P.zarr", root=root,
                            progress=False)
    assert ok.exit_code == 0
    called = []

    def runner(*args, **kwargs):
        called.append(1)
        raise AssertionError("nothing may be computed")

    with pytest.raises(StoreError, match="image_size"):
        extract_with_cache(make_pipeline(image_size=64), requests(media / "one", ["a", "b"]),
                           store_path=tmp_path / "P.zarr", root=root, progress=False, runner=runner)
    assert not called and len(list(root.iterdir())) == 1  # no second feature set was started


# ------------------------------------------------------------------------------------------
# several projects at once (issue 28): claims on rows, not a lock on whole extractions


def rendezvous_decode(request, grids, segments, audio, me, other):
    """decode_video once the other project has started decoding too. Decoding runs in worker
    processes, so the signals are files; gives up after 60 s (under a lock held for a whole
    extraction the other project never starts)."""
    from extract.decode import DecodeError

    Path(me).touch()
    deadline = time.monotonic() + 60
    while not Path(other).exists():
        if time.monotonic() > deadline:
            raise DecodeError("the other project never started computing")
        time.sleep(0.05)
    return decode_video(request, grids, segments, audio)


def gated_decode(request, grids, segments, audio, gate):
    """decode_video once the file ``gate`` exists (at most 120 s)."""
    deadline = time.monotonic() + 120
    while not Path(gate).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return decode_video(request, grids, segments, audio)


class _OnLog(logging.Handler):
    def __init__(self, text, action):
        super().__init__(logging.DEBUG)
        self.text, self.action, self.seen = text, action, []

    def emit(self, record):
        message = record.getMessage()
        if self.text in message:
            self.seen.append(message)
            self.action()


@contextlib.contextmanager
def on_log(logger: str, text: str, action=lambda: None):
    """Call ``action`` when ``logger`` logs a message containing ``text`` (the code logs it right
    before it blocks: a deterministic hook); yields the handler (``seen``: those messages)."""
    handler, log = _OnLog(text, action), logging.getLogger(logger)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def shard4_pipeline():
    """Four rows per shard: the cache rows of two small projects share a shard."""
    return load_pipeline(None, {"extract": {**SMALL, "decode_workers": 1}, "store": {"rows_per_shard": 4}},
                         search=False)


def test_two_projects_extract_disjoint_videos_of_one_feature_set_at_the_same_time(media, tmp_path):
    """Each project's decoder waits until the other project has started computing: both runs must
    be inside their extraction at once (before, the cache's lock was held for a whole extraction and
    the second project waited for the first). Their cache rows share one shard."""
    from extract.cache import extract_with_cache, feature_set_path
    from extract.run import run_extraction

    from extract.extractors import build_extractors

    pipeline, root, signals = shard4_pipeline(), tmp_path / "cache", tmp_path / "signals"
    signals.mkdir()
    results, errors = {}, []
    # built here, once: random weights are drawn from torch's global generator, which two threads
    # building at the same moment would share (separate processes, as real projects are, do not)
    extractors = build_extractors(pipeline.extract, "cpu")

    def project(name, names, other):
        decode = functools.partial(rendezvous_decode, me=str(signals / name), other=str(signals / other))
        try:
            results[name] = extract_with_cache(pipeline, requests(media / "one", names), root=root, progress=False,
                                               store_path=tmp_path / f"{name}.zarr",
                                               runner=functools.partial(run_extraction, decode_fn=decode,
                                                                        extractors=extractors))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=project, args=("A", "ab", "B")),
               threading.Thread(target=project, args=("B", "cd", "A"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors, errors
    for name in "AB":
        assert (results[name].computed, results[name].done, results[name].failed, results[name].exit_code) == (2, 2, 0, 0)
    # both stores and the cache hold the numbers of a plain extraction
    reference = tmp_path / "plain.zarr"
    run_extraction(pipeline, requests(media / "one", "abcd"), store_path=reference, progress=False)
    plain = open_store(reference)
    for name, rows in (("A", [0, 1]), ("B", [2, 3])):
        store = open_store(tmp_path / f"{name}.zarr")
        assert store.attrs["complete"] is True
        for array in ("visual", "audio", "valid"):
            np.testing.assert_array_equal(store.read(array), plain.read(array, rows))
    cache = open_store(feature_set_path(root, results["A"].feature_set))
    assert len(cache) == 4 and cache.num_shards == 1 and cache.status().tolist() == [STATUS_DONE] * 4
    assert cache.attrs["complete"] is True and cache.attrs["unverified_shards"] == []
    assert list((cache.path / "logs" / "claims").iterdir()) == []  # both claims ended


def test_rows_another_project_computes_are_refused_or_waited_for_then_copied(media, tmp_path, monkeypatch):
    """Project A is computing video a (its decoder held at a gate). Project B wants the same content:
    without --wait it is refused (exit 2) naming A's host, PID and command, nothing computed; with
    --wait it says whom it waits for, and then copies A's row instead of computing it again."""
    import yaml
    from click.testing import CliRunner

    from extract.cache import extract_with_cache
    from extract.cli import main
    from extract.core.manifest import Sample, write_manifest
    from extract.run import run_extraction

    pipeline, root, gate = shard4_pipeline(), tmp_path / "cache", tmp_path / "gate"
    claimed, results = threading.Event(), {}
    runner = functools.partial(run_extraction, decode_fn=functools.partial(gated_decode, gate=str(gate)))
    project_a = threading.Thread(target=lambda: results.update(A=extract_with_cache(
        pipeline, requests(media / "one", "a"), store_path=tmp_path / "A.zarr", root=root, progress=False,
        runner=runner)))
    with on_log("extract.cache", "1 to compute now", claimed.set):
        project_a.start()
        assert claimed.wait(300)
    # B through the CLI, without --wait: refused, naming A
    monkeypatch.setenv("AVEL_CACHE", str(root))
    (tmp_path / "pipeline.yaml").write_text(yaml.safe_dump({"extract": {**SMALL, "decode_workers": 1},
                                                            "store": {"rows_per_shard": 4}}))
    write_manifest(tmp_path / "m.csv", [Sample("sx", "x", str(media / "two" / "x.mp4"), "", 0, 0, "test")],
                   classes=["dog"])
    cli = ["--config", str(tmp_path / "pipeline.yaml"), "--manifest", str(tmp_path / "m.csv"), "--store",
           str(tmp_path / "B.zarr"), "--cache", "--no-progress", "--no-preflight"]
    refused = CliRunner().invoke(main, cli, catch_exceptions=False)
    assert refused.exit_code == 2, refused.output
    who = f"pid {os.getpid()} on host {socket.gethostname()}, command "
    assert "being computed into the shared feature cache" in refused.output and who in refused.output
    assert "--wait" in refused.output and "nothing was computed" in refused.output
    # with --wait: B says whom it waits for; A is let go; B copies A's row
    with on_log("extract.cache", "waiting for 1 videos", gate.touch) as waiting:
        b = extract_with_cache(pipeline, requests(media / "two", "x"), store_path=tmp_path / "B.zarr", root=root,
                               progress=False, wait=True)
    project_a.join(300)
    assert len(waiting.seen) == 1 and who in waiting.seen[0]
    assert (results["A"].computed, results["A"].done) == (1, 1)
    assert (b.computed, b.reused, b.done, b.exit_code) == (0, 1, 1, 0)
    np.testing.assert_array_equal(open_store(tmp_path / "B.zarr").read("visual"),
                                  open_store(tmp_path / "A.zarr").read("visual"))


def test_the_claim_of_a_process_that_died_does_not_block(media, tmp_path):
    """A process claimed a row of the cache and was killed (kill -9) before computing it: the OS
    released its claim; a project waiting for it computes the row itself."""
    import signal
    import subprocess
    import sys

    from extract.cache import content_key, extract_with_cache, feature_set_attrs, feature_set_path, store_specs
    from extract.core.lock import StoreLocked
    from extract.prepare import ensure_store

    pipeline, root = shard4_pipeline(), tmp_path / "cache"
    cfg, request = pipeline.extract, requests(media / "one", "a")[0]
    attrs = feature_set_attrs(cfg)
    cache_path, key = feature_set_path(root, attrs["fingerprint"]), content_key(request)
    ensure_store(cache_path, [key], cfg.segments, store_specs(cfg), {**attrs, "complete": False}, pipeline.store)
    script = ("import sys; from extract.core.lock import RowClaim, StoreLock\n"
              "with StoreLock(sys.argv[1]):\n    claim = RowClaim(sys.argv[1], [sys.argv[2]]).acquire()\n"
              "print('claimed', flush=True); sys.stdin.read()")
    holder = subprocess.Popen([sys.executable, "-c", script, str(cache_path), key], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "claimed"
        with pytest.raises(StoreLocked, match=re.escape(f"pid {holder.pid} on host {socket.gethostname()}, "
                                                        f"command '-c {cache_path} {key}'")):
            extract_with_cache(pipeline, [request], store_path=tmp_path / "P.zarr", root=root, progress=False)
        with on_log("extract.cache", "waiting for 1 videos", lambda: os.kill(holder.pid, signal.SIGKILL)):
            summary = extract_with_cache(pipeline, [request], store_path=tmp_path / "P.zarr", root=root,
                                         progress=False, wait=True)
    finally:
        holder.kill()
        holder.wait(30)
    assert (summary.computed, summary.done, summary.exit_code) == (1, 1, 0)
    cache = open_store(cache_path)
    assert cache.status().tolist() == [STATUS_DONE] and cache.attrs["complete"] is True
    assert list((cache_path / "logs" / "claims").iterdir()) == []  # the dead claim was removed


def test_the_copy_out_of_the_cache_holds_the_cache_shards_lock(media, tmp_path):
    """While a writer holds a cache shard (rewriting it), a project copying rows of that shard waits."""
    from extract.cache import extract_with_cache, feature_set_path
    from extract.core.lock import shard_lock

    pipeline, root = shard4_pipeline(), tmp_path / "cache"
    first = extract_with_cache(pipeline, requests(media / "one", "a"), store_path=tmp_path / "A.zarr", root=root,
                               progress=False)
    cache_path = feature_set_path(root, first.feature_set)
    taken, release = threading.Event(), threading.Event()

    def writer():
        with shard_lock(cache_path, 0):
            taken.set()
            assert release.wait(300)

    holder = threading.Thread(target=writer)
    holder.start()
    assert taken.wait(60)
    with on_log("extract.core.lock", f"shard 0 of {cache_path}: waiting for its lock", release.set) as waited:
        second = extract_with_cache(pipeline, requests(media / "two", "x"), store_path=tmp_path / "B.zarr", root=root,
                                    progress=False)
    release.set()
    holder.join(60)
    assert len(waited.seen) == 1 and (second.reused, second.computed, second.done) == (1, 0, 1)
    np.testing.assert_array_equal(open_store(tmp_path / "B.zarr").read("visual"),
                                  open_store(tmp_path / "A.zarr").read("visual"))


def test_avel_predict_waits_for_rows_another_project_computes(tmp_path, monkeypatch):
    """avel-predict cannot pass --wait itself: its in-process extraction through the cache waits
    (saying for whom) rather than failing the prediction because another project is computing the
    same video; the windows go to stage 1 as requests of the predict store, in this process."""
    import types

    import extract.cache
    import train.predict.run as predict
    from extract.cache import CacheSummary
    from extract.run import VideoOutcome

    calls = []

    def recording(pipeline, requests, **kwargs):
        calls.append((pipeline, list(requests), kwargs))
        return CacheSummary(store=tmp_path / "s.zarr", requested=len(requests), done=len(requests),
                            outcomes={r.key: VideoOutcome(r.key, r.path, "done") for r in requests})

    monkeypatch.setattr(extract.cache, "extract_with_cache", recording)
    run = types.SimpleNamespace(segments=T, class_names=["dog", "background"], features={"extractor": dict(SMALL)},
                                checkpoint=tmp_path / "nowhere" / "checkpoint.safetensors")
    plan = predict._Plan("v", tmp_path / "v.mp4", 4.0, [0, 2])
    outcomes = predict.extract_features(run, [plan], tmp_path / "work", tmp_path / "s.zarr", cache=True,
                                        cache_root=tmp_path / "cache")
    (pipeline, sent, kwargs), = calls
    assert kwargs["wait"] is True and kwargs["root"] == tmp_path / "cache" and kwargs["store_path"] == tmp_path / "s.zarr"
    assert [(r.key, r.start, r.duration) for r in sent] == [(predict.window_key("v", s, T), float(s), float(T)) for s in (0, 2)]
    assert pipeline.extract.segments == T and pipeline.store.path == str(tmp_path / "s.zarr")
    assert sorted(outcomes) == sorted(r.key for r in sent) and all(o.ok for o in outcomes.values())


def test_a_claim_is_alive_for_its_own_process_whatever_the_file_system(tmp_path, monkeypatch):
    """On NFS, flock is emulated with POSIX record locks, which never conflict within one process:
    asking its own claim's lock would succeed and call the claim dead. The claimant's own writers
    and threads know it holds the claim; other processes ask the lock."""
    import extract.core.lock as lock

    create = functools.partial(lock.RowClaim, tmp_path / "s.zarr")
    (tmp_path / "s.zarr" / "logs").mkdir(parents=True)
    claim = create(["k1", "k2"]).acquire()
    monkeypatch.setattr(lock, "_flock", lambda fh, exclusive=True, block=False: True)  # every lock "succeeds"
    assert lock.fence_holds(tmp_path / "s.zarr", claim.fence)
    assert [c["keys"] for c in lock.live_claims(tmp_path / "s.zarr")] == [["k1", "k2"]]
    monkeypatch.undo()
    claim.release()
    assert not lock.fence_holds(tmp_path / "s.zarr", claim.fence) and lock.live_claims(tmp_path / "s.zarr") == []


def test_a_long_holder_of_the_cache_lock_is_refused_without_wait(media, tmp_path, monkeypatch):
    """The cache's lock is only held for moments by avel-extract --cache; one that holds it longer
    (a plain avel-extract --store <cache>, an older avel) is waited for a while, then refused,
    naming it, as for any store - unless --wait."""
    import extract.cache as cache_module
    from extract.cache import content_key, extract_with_cache, feature_set_attrs, feature_set_path, store_specs
    from extract.core.lock import StoreLock, StoreLocked
    from extract.prepare import ensure_store

    pipeline, root = shard4_pipeline(), tmp_path / "cache"
    cfg, request = pipeline.extract, requests(media / "one", "a")[0]
    attrs = feature_set_attrs(cfg)
    cache_path = feature_set_path(root, attrs["fingerprint"])
    ensure_store(cache_path, [content_key(request)], cfg.segments, store_specs(cfg), {**attrs, "complete": False},
                 pipeline.store)
    monkeypatch.setattr(cache_module, "CACHE_LOCK_PATIENCE_S", 0.5)
    taken, release = threading.Event(), threading.Event()

    def holder():
        with StoreLock(cache_path):
            taken.set()
            release.wait(300)

    thread = threading.Thread(target=holder)
    thread.start()
    try:
        assert taken.wait(60)
        with pytest.raises(StoreLocked, match=re.escape(f"(pid {os.getpid()} on host {socket.gethostname()}, command '")
                           + ".*--wait"):
            extract_with_cache(pipeline, [request], store_path=tmp_path / "P.zarr", root=root, progress=False)
        with on_log("extract.core.lock", "waiting for the store's lock", release.set):
            summary = extract_with_cache(pipeline, [request], store_path=tmp_path / "P.zarr", root=root,
                                         progress=False, wait=True)
    finally:
        release.set()
        thread.join(60)
    assert (summary.computed, summary.done, summary.exit_code) == (1, 1, 0)


def test_one_cache_root_precedence_everywhere(tmp_path, monkeypatch):
    """explicit > $AVEL_CACHE > store.cache_root (relative to pipeline.yaml), the one rule of
    extract.core.settings.cache_root, as avel-extract (config, --cache, list-cache) and avel-predict use it."""
    from extract.cache import cache_root as extract_cache_root
    from extract.core.clitools import resolve
    from extract.core.settings import cache_root, load_pipeline
    from extract.core.store import StoreError
    from train.predict.run import LoadedRun, feature_cache_root

    (tmp_path / "project").mkdir()
    config = tmp_path / "project" / "pipeline.yaml"
    config.write_text("store:\n  cache_root: shared/cache\n")
    pipeline = load_pipeline(config)
    monkeypatch.delenv("AVEL_CACHE", raising=False)
    configured = tmp_path / "project" / "shared" / "cache"
    assert cache_root() is None and cache_root(pipeline) == configured
    assert cache_root(pipeline, tmp_path / "opt") == tmp_path / "opt"
    assert extract_cache_root(pipeline) == configured and resolve(str(config), ()).store.cache_root == "shared/cache"
    run = LoadedRun(None, {}, tmp_path / "nowhere" / "checkpoint.safetensors", [], {"cache_root": "/recorded"})
    assert feature_cache_root(run, None, tmp_path / "work") == Path("/recorded")  # no run folder: its record
    assert feature_cache_root(LoadedRun(None, {}, run.checkpoint, [], {}), None, tmp_path / "w") == tmp_path / "w" / "cache"
    monkeypatch.setenv("AVEL_CACHE", str(tmp_path / "env"))
    assert cache_root() == cache_root(pipeline) == extract_cache_root(pipeline) == tmp_path / "env"
    assert resolve(str(config), ()).store.cache_root == str(tmp_path / "env")  # what the commands print and use
    assert feature_cache_root(run, None, tmp_path / "work") == tmp_path / "env"
    assert cache_root(pipeline, "~/x") == Path.home() / "x"  # explicit wins, ~ expanded
    assert feature_cache_root(run, tmp_path / "opt", tmp_path / "work") == tmp_path / "opt"
    monkeypatch.delenv("AVEL_CACHE")
    pipeline.store.cache_root = ""
    with pytest.raises(StoreError, match="no feature cache configured"):
        extract_cache_root(pipeline)
