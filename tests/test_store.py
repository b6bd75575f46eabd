"""The feature store contract: layout, identity, shard-wise writes, refusal of foreign stores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from extract.core.store import (
    SCHEMA,
    STATUS_DONE,
    STATUS_FAILED,
    ArraySpec,
    StoreError,
    check_arrays,
    core_specs,
    create_store,
    open_store,
)


def make(tmp_path, n=5, T=3, S=2, **kw):
    ids = [f"vid{i}" for i in range(n)]
    attrs = {"extractor": {"segments": T}, "fingerprint": "abc123", "weights": {"vgg19": "random"}, "versions": {"zarr": "3"}}
    return create_store(tmp_path / "s.zarr", ids, T, core_specs(T), attrs, rows_per_shard=S, **kw)


def test_created_store_matches_the_contract(tmp_path):
    import zarr

    store = make(tmp_path)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert g.attrs["schema"] == SCHEMA and g.attrs["schema_version"] == 1 and g.attrs["segments"] == 3
    assert g.attrs["fingerprint"] == "abc123" and g.attrs["layout"]["rows_per_shard"] == 2
    assert g["visual"].shape == (5, 3, 7, 7, 512) and g["visual"].dtype == np.float16
    assert g["audio"].shape == (5, 3, 128) and g["audio"].dtype == np.float32
    assert g["valid"].shape == (5, 3) and g["valid"].dtype == bool
    assert g["visual"].chunks == (1, 3, 7, 7, 512) and g["visual"].shards == (2, 3, 7, 7, 512)
    assert list(g["ids"][:]) == [f"vid{i}" for i in range(5)]
    assert store.summary() == {"missing": 5, "done": 0, "failed": 0}
    assert [list(store.shard_rows(k)) for k in range(store.num_shards)] == [[0, 1], [2, 3], [4]]


def test_shard_writes_and_reads_in_any_row_order(tmp_path):
    store = make(tmp_path)
    rng = np.random.default_rng(0)
    visual = rng.standard_normal((2, 3, 7, 7, 512)).astype(np.float16)
    audio = rng.standard_normal((2, 3, 128)).astype(np.float32)
    valid = np.array([[1, 1, 0], [1, 1, 1]], bool)
    store.write_shard(1, {"visual": visual, "audio": audio, "valid": valid}, [STATUS_DONE, STATUS_FAILED], ["", "decode: boom"])
    again = open_store(tmp_path / "s.zarr")
    np.testing.assert_array_equal(again.read("visual", [3, 2]), visual[::-1])
    np.testing.assert_array_equal(again.read("audio", slice(2, 4)), audio)
    np.testing.assert_array_equal(again.read("valid", [2]), valid[:1])
    assert again.read("visual", [0]).sum() == 0  # untouched rows keep the fill value
    assert again.status().tolist() == [0, 0, 1, 2, 0]
    assert again.reasons().tolist() == ["", "", "", "decode: boom", ""]
    assert again.row_of("vid3") == 3
    with pytest.raises(KeyError, match="'nope' is not a row of the store"):
        again.row_of("nope")
    with pytest.raises(StoreError, match=r"shard 2 expects \(1, 3, 128\)"):
        store.write_shard(2, {"audio": audio}, [STATUS_DONE], [""])


def test_refuses_foreign_or_wrong_version_stores(tmp_path):
    import zarr

    with pytest.raises(StoreError, match="no feature store there"):
        open_store(tmp_path / "missing.zarr")
    g = zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    g.attrs["schema"] = "something-else"
    with pytest.raises(StoreError, match=r"other\.zarr: not an avel feature store"):
        open_store(tmp_path / "other.zarr")
    make(tmp_path)
    g = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    g.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match=r"s\.zarr: store schema version 99, this avel reads version 1"):
        open_store(tmp_path / "s.zarr")


def test_check_arrays_names_each_mismatch(tmp_path):
    store = make(tmp_path, T=3)
    check_arrays(store, core_specs(3))
    with pytest.raises(StoreError) as err:
        check_arrays(store, core_specs(10) + [ArraySpec("frame_maps", (3, 4), "float16")])
    text = str(err.value)
    assert "s.zarr" in text
    assert "visual has shape (5, 3, 7, 7, 512), expected (5, 10, 7, 7, 512)" in text
    assert "array 'frame_maps' is missing" in text


def test_duplicate_ids_and_existing_path_are_refused(tmp_path):
    with pytest.raises(StoreError, match=r"duplicate row ids \['a'\]"):
        create_store(tmp_path / "d.zarr", ["a", "b", "a"], 2, core_specs(2), {})
    make(tmp_path)
    with pytest.raises(StoreError, match="exists already"):
        make(tmp_path)


def test_store_is_readable_with_plain_zarr_as_documented(tmp_path):
    """The README's example of reading a store without avel."""
    store = make(tmp_path, n=2, S=2)
    audio = np.arange(2 * 3 * 128, dtype=np.float32).reshape(2, 3, 128)
    store.write_shard(0, {"audio": audio, "valid": np.ones((2, 3), bool)}, [1, 1], ["", ""])
    import zarr

    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    ids = list(root["ids"][:])
    row = ids.index("vid1")
    np.testing.assert_array_equal(root["audio"][row], audio[1])
    assert json.loads(json.dumps(dict(root.attrs)))["weights"] == {"vgg19": "random"}


def test_scaled_maps_are_stored_values_times_their_rows_scale(tmp_path):
    """The one rule of the scaled map arrays (FeatureStore.scaled, used by read_scaled in stage 1
    and by the sol task's partial reads in stage 2): stored float16 x the row's ``<name>_scale``,
    a scale of 0 (row never written) counting as 1; float16 returned as is when every scale is 1."""
    specs = [ArraySpec("maps", (2, 3), "float16"), ArraySpec("maps_scale", (), "float32")]
    store = create_store(tmp_path / "s.zarr", ["a", "b", "c"], 2, specs, {"fingerprint": "x"}, rows_per_shard=3)
    stored = np.array([[[1.5, -2.0, 0.25], [4.0, 8.0, -0.5]],
                       [[3.0, 3.0, 3.0], [0.0, 1.0, 2.0]],
                       [[6.0, 5.0, 4.0], [3.0, 2.0, 1.0]]], np.float16)
    store.write_shard(0, {"maps": stored, "maps_scale": np.array([4096.0, 0.0, 0.5], np.float32)},
                      np.ones(3, np.int8), ["", "", ""])
    store = open_store(tmp_path / "s.zarr")
    expected = [[[6144.0, -8192.0, 1024.0], [16384.0, 32768.0, -2048.0]],  # x 4096 (beyond float16: 65504)
                [[3.0, 3.0, 3.0], [0.0, 1.0, 2.0]],                       # scale 0 -> 1
                [[3.0, 2.5, 2.0], [1.5, 1.0, 0.5]]]                       # x 0.5
    whole = store.read_scaled("maps")
    assert whole.dtype == np.float32 and whole.tolist() == expected
    # parts of rows (one second each; row 0 twice), as the sol task reads them
    seconds = np.stack([stored[0, 1], stored[2, 0], stored[0, 0]])
    parts = store.scaled("maps", seconds, [0, 2, 0])
    assert parts.tolist() == [expected[0][1], expected[2][0], expected[0][0]]
    row1 = stored[1]
    assert store.scaled("maps", row1, [1, 1]) is row1  # every scale 1 (here: 0): the stored values themselves
    assert store.read_scaled("maps", [1]).dtype == np.float16
