"""train.data: store checks, sample -> row mapping, in-memory bank and batches."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import zarr

from extract.core.manifest import Sample, write_manifest
from extract.core.store import StoreError, create_store, core_specs, ArraySpec
from train.data import (BatchOrder, DataError, epoch_order, iterate_batches, load_task_data, make_batch, open_checked_store,
                        read_rows)
from train_testutils import CLASSES, make_dataset, write_store

torch.set_num_threads(1)
T = 10


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), T=T, sizes=(6, 3, 3), extra_ids=("unused1", "unused2"))


def test_bank_holds_store_rows_and_labels(ds):
    data = load_task_data(ds["store"], ds["manifests"])
    # only rows the manifests use are loaded
    assert len(data.bank.keys) == 12 and "unused1" not in data.bank.keys
    assert data.bank.visual.dtype == torch.float16 and data.bank.audio.dtype == torch.float32
    assert data.classes == CLASSES and data.num_classes == 4
    test = data.splits["test"]
    for i, sample in enumerate(ds["samples"]["test"]):
        store_row = ds["ids"].index(sample.key)
        bank_row = int(test.rows[i])
        assert data.bank.keys[bank_row] == sample.key
        np.testing.assert_array_equal(data.bank.visual[bank_row].numpy(), ds["visual"][store_row])
        np.testing.assert_array_equal(data.bank.audio[bank_row].numpy(), ds["audio"][store_row])
        expected = np.full(T, 3)
        expected[sample.onset : sample.offset] = CLASSES.index(sample.category)
        np.testing.assert_array_equal(test.labels[i].numpy(), expected)
        assert int(test.video_labels[i]) == CLASSES.index(sample.category)


def test_batches_cast_visual_and_follow_the_index(ds):
    data = load_task_data(ds["store"], ds["manifests"])
    split = data.splits["train"]
    batch = make_batch(data.bank, split, torch.tensor([4, 1]))
    assert batch["visual"].dtype == torch.float32
    for j, i in enumerate([4, 1]):
        row = ds["ids"].index(ds["samples"]["train"][i].key)
        np.testing.assert_array_equal(batch["visual"][j].numpy(), ds["visual"][row].astype(np.float32))
        np.testing.assert_array_equal(batch["labels"][j].numpy(), split.labels[i].numpy())
    # a shuffled epoch visits every sample exactly once; the last batch is partial
    seen = [int(x) for b in iterate_batches(data.bank, split, 4, shuffle=True, generator=torch.Generator().manual_seed(0)) for x in b["index"]]
    assert sorted(seen) == list(range(len(split)))
    in_order = [b["index"].tolist() for b in iterate_batches(data.bank, split, 4)]
    assert in_order == [[0, 1, 2, 3], [4, 5]]
    # the CPU staging buffers (gather as int16, cast into float32) hold the right rows, also in
    # the partial last batch
    for b in iterate_batches(data.bank, split, 4, shuffle=True, generator=torch.Generator().manual_seed(1)):
        for j, i in enumerate(b["index"].tolist()):
            row = ds["ids"].index(ds["samples"]["train"][i].key)
            np.testing.assert_array_equal(b["visual"][j].numpy(), ds["visual"][row].astype(np.float32))
            np.testing.assert_array_equal(b["audio"][j].numpy(), ds["audio"][row])


def test_batch_orders_fixed_shuffled_and_without_the_partial_batch(ds):
    """``train.shuffle`` / the protocols' orders: the split's order every epoch (the same batches
    each epoch), a new permutation per epoch drawn from the generator, and ``drop_last`` (n // bs
    batches; the samples of the partial batch are not trained on that epoch)."""
    data = load_task_data(ds["store"], ds["manifests"])
    split = data.splits["train"]  # 6 samples
    fixed = [[b["index"].tolist() for b in iterate_batches(data.bank, split, 4, drop_last=True)] for _ in range(2)]
    assert fixed == [[[0, 1, 2, 3]], [[0, 1, 2, 3]]]
    generator = torch.Generator().manual_seed(0)
    epochs = [epoch_order(len(split), 4, BatchOrder(shuffle=True, drop_last=True), generator) for _ in range(3)]
    reference = torch.Generator().manual_seed(0)
    for batches in epochs:  # one torch.randperm per epoch, cut after n // bs * bs samples
        assert [b.tolist() for b in batches] == [torch.randperm(len(split), generator=reference)[:4].tolist()]
    assert len({tuple(b[0].tolist()) for b in epochs}) > 1
    kept = epoch_order(len(split), 4, BatchOrder(shuffle=False, drop_last=False))
    assert [b.tolist() for b in kept] == [[0, 1, 2, 3], [4, 5]]
    with pytest.raises(ValueError, match="batch_size"):
        epoch_order(3, 0, BatchOrder())


def test_samples_of_one_video_share_a_row(tmp_path):
    rng = np.random.default_rng(0)
    ids = ["vidA", "vidB"]
    visual = rng.normal(size=(2, T, 7, 7, 512)).astype(np.float16)
    audio = rng.normal(size=(2, T, 128)).astype(np.float32)
    write_store(tmp_path / "s.zarr", ids, visual, audio, np.ones((2, T), bool), T)
    samples = [
        Sample("a0", "vidA", "vidA.mp4", "dog", 0, 3, "test"),
        Sample("a1", "vidA", "vidA.mp4", "car", 5, 8, "test"),
        Sample("b0", "vidB", "vidB.mp4", "", 0, 0, "test"),
    ]
    m = write_manifest(tmp_path / "test.csv", samples, CLASSES)
    data = load_task_data(tmp_path / "s.zarr", {"test": m})
    split = data.splits["test"]
    assert data.bank.visual.shape[0] == 2  # no duplication
    assert split.rows.tolist() == [0, 0, 1]
    np.testing.assert_array_equal(split.labels[0].numpy(), [0, 0, 0] + [3] * 7)
    np.testing.assert_array_equal(split.labels[1].numpy(), [3] * 5 + [1, 1, 1, 3, 3])
    np.testing.assert_array_equal(split.labels[2].numpy(), [3] * 10)
    assert split.video_labels.tolist() == [0, 1, 3]


def test_missing_keys_are_listed(ds, tmp_path):
    samples = ds["samples"]["test"] + [Sample("x1", "nope1", "nope1.mp4", "dog", 0, 1, "test"),
                                       Sample("x2", "nope2", "nope2.mp4", "dog", 0, 1, "test")]
    m = write_manifest(tmp_path / "test.csv", samples, CLASSES)
    with pytest.raises(DataError) as err:
        load_task_data(ds["store"], {"test": m})
    msg = str(err.value)
    assert "2 of 5 samples" in msg and "nope1" in msg and "nope2" in msg
    assert str(m) in msg and str(ds["store"]) in msg


def test_incomplete_rows_error_or_skip(tmp_path, caplog):
    rng = np.random.default_rng(0)
    ids = ["v0", "v1", "v2"]
    visual = rng.normal(size=(3, T, 7, 7, 512)).astype(np.float16)
    audio = rng.normal(size=(3, T, 128)).astype(np.float32)
    write_store(tmp_path / "s.zarr", ids, visual, audio, np.ones((3, T), bool), T, status=[1, 2, 0])
    samples = [Sample(f"s{i}", v, f"{v}.mp4", "dog", 0, 2, "train") for i, v in enumerate(ids)]
    m = write_manifest(tmp_path / "train.csv", samples, CLASSES)
    with pytest.raises(DataError) as err:
        load_task_data(tmp_path / "s.zarr", {"train": m})
    msg = str(err.value)
    assert "2 samples are not extracted" in msg and "v1 (failed: decode error)" in msg and "v2 (missing)" in msg
    assert "skip_incomplete" in msg
    with caplog.at_level(logging.WARNING, logger="train.data"):
        data = load_task_data(tmp_path / "s.zarr", {"train": m}, skip_incomplete=True)
    split = data.splits["train"]
    assert split.sample_ids == ["s0"] and split.skipped == ["s1", "s2"]
    np.testing.assert_array_equal(data.bank.audio[int(split.rows[0])].numpy(), audio[0])
    assert "skipping 2 of 3 samples" in caplog.text


def test_wrong_schema_version_is_refused_naming_the_file(ds, tmp_path):
    import shutil

    copy = tmp_path / "old.zarr"
    shutil.copytree(ds["store"], copy)
    group = zarr.open_group(str(copy), mode="r+")
    group.attrs["schema_version"] = 99
    with pytest.raises(StoreError) as err:
        load_task_data(copy, ds["manifests"])
    assert str(copy) in str(err.value) and "version 99" in str(err.value)


def test_wrong_shapes_are_refused_before_loading(tmp_path):
    specs = [ArraySpec("visual", (T, 7, 7, 256), "float16"), ArraySpec("audio", (T, 128), "float32"), ArraySpec("valid", (T,), "bool")]
    create_store(tmp_path / "bad.zarr", ["a"], T, specs, {"fingerprint": "x"})
    with pytest.raises(StoreError) as err:
        open_checked_store(tmp_path / "bad.zarr")
    msg = str(err.value)
    assert str(tmp_path / "bad.zarr") in msg and "visual has shape (1, 10, 7, 7, 256), expected (1, 10, 7, 7, 512)" in msg
    create_store(tmp_path / "t5.zarr", ["a"], 5, core_specs(5), {"fingerprint": "x"})
    with pytest.raises(StoreError, match="T=5 segments per video, expected 10"):
        open_checked_store(tmp_path / "t5.zarr", segments=10)


def test_read_rows_in_blocks_equals_fancy_indexing(ds):
    store = open_checked_store(ds["store"])
    rows = np.array([0, 3, 4, 9, 13])
    for block in (1, 2, 5, 256):
        got = read_rows(store, "audio", rows, block=block)
        np.testing.assert_array_equal(got, ds["audio"][rows])


def test_rewritten_row_is_read_again_by_the_next_load(tmp_path):
    """A long-lived process (a sweep worker) keeps the last bank in memory; re-extracting a row
    in place (same fingerprint, no zarr.json touched) must make the next load read it again."""
    from extract.core.settings import load_pipeline
    from extract.core.store import open_store
    from train.data import load_from_pipeline, store_token

    d = make_dataset(tmp_path, T=T, sizes=(4, 2, 2))
    pipeline = load_pipeline(d["pipeline"])
    first = load_from_pipeline(pipeline, ["train"])
    key = d["samples"]["train"][0].key
    row = d["ids"].index(key)
    metadata = {p: p.stat().st_mtime_ns for p in d["store"].rglob("zarr.json")}
    token = store_token(d["store"])

    store = open_store(d["store"], mode="r+")
    shard = store.shard_of(row)
    rows = store.shard_rows(shard)
    audio = d["audio"][rows.start:rows.stop].copy()
    audio[row - rows.start] += 10.0
    store.write_shard(shard, {"visual": d["visual"][rows.start:rows.stop], "audio": audio,
                              "valid": np.ones((len(rows), T), bool)}, store.status()[rows.start:rows.stop],
                      [""] * len(rows))
    assert open_store(d["store"]).fingerprint == "test"
    assert {p: p.stat().st_mtime_ns for p in d["store"].rglob("zarr.json")} == metadata
    assert store_token(d["store"]) != token

    second = load_from_pipeline(pipeline, ["train"])
    assert second is not first
    bank_row = second.bank.keys.index(key)
    np.testing.assert_array_equal(second.bank.audio[bank_row].numpy(), audio[row - rows.start])
    assert load_from_pipeline(pipeline, ["train"]) is second  # unchanged store: served from memory
