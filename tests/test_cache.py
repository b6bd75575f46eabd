"""The feature cache shared across projects (extract.cache): feature-set identity, content keys
(same file name, other content: no collision), a second project computes nothing, a third only
its new videos, completeness verification and readers refusing incomplete sets, the listing."""
from __future__ import annotations

import functools
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from extract.decode import VideoRequest, decode_video
from extract.media import write_clip
from extract.settings import load_pipeline
from extract.store import STATUS_DONE, STATUS_FAILED, StoreError, open_store

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
    from extract.manifest import Sample, write_manifest

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
