"""Import of the public AVE feature h5 files (layout of visual_feature.h5 / audio_feature.h5)."""
from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from extract.import_h5 import WEIGHTS_IDENTITY, import_ave_h5
from extract.core.store import STATUS_DONE, StoreError
from train.data import open_checked_store

ANNOTATIONS = """Category&VideoID&Quality&StartTime&EndTime
Church bell&vidA&good&0&10
Dog&vidB&good&2&5
Dog&vidA&good&3&4
Car&vidC&good&0&10
Church bell&vidD&bad&1&9
"""
N, T = 5, 10


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("h5")
    rng = np.random.default_rng(0)
    visual = (rng.random((N, T, 7, 7, 512), dtype=np.float32) * 8).astype(np.float32)
    audio = rng.normal(size=(N, T, 128)).astype(np.float32)
    with h5py.File(root / "visual_feature.h5", "w") as f:
        f.create_dataset("avadataset", data=visual)
    with h5py.File(root / "audio_feature.h5", "w") as f:
        f.create_dataset("avadataset", data=audio)
    (root / "Annotations.txt").write_text(ANNOTATIONS)
    return {"root": root, "visual": visual, "audio": audio}


def test_import_one_row_per_video_first_annotation_row(files, tmp_path):
    r = files["root"]
    store = import_ave_h5(r / "visual_feature.h5", r / "audio_feature.h5", r / "Annotations.txt", tmp_path / "ave.zarr", rows_per_shard=2)
    store = open_checked_store(tmp_path / "ave.zarr", segments=10)  # passes the contract checks
    assert store.ids.tolist() == ["vidA", "vidB", "vidC", "vidD"]
    first_rows = [0, 1, 3, 4]  # vidA's second annotation (row 2) is not a new row
    np.testing.assert_array_equal(store.read("visual"), files["visual"][first_rows].astype(np.float16))
    np.testing.assert_array_equal(store.read("audio"), files["audio"][first_rows])
    assert store.read("valid").all()
    assert (store.status() == STATUS_DONE).all()
    attrs = store.attrs
    sha = hashlib.sha256((r / "visual_feature.h5").read_bytes()).hexdigest()
    assert attrs["sources"]["visual"]["sha256"] == sha
    assert WEIGHTS_IDENTITY in attrs["imported"]["description"] and attrs["imported"]["annotation_rows"] == 5
    # what made the files, as an extraction records it: the ave2018 recipe, Keras VGG-19 imagenet and
    # AudioSet VGGish (logical identities: no weights file needed), the fingerprint of that extraction
    assert attrs["extractor"]["recipe"] == "ave2018" and attrs["extractor"]["frame_rule"] == "index"
    assert attrs["weights"]["vgg19"] == {"vgg19": {"name": "vgg19-keras-imagenet", "sha256": None, "seed": None}}
    assert attrs["weights"]["vggish"]["vggish"] == {"name": "vggish-audioset", "sha256": None, "seed": None}
    assert attrs["fingerprint_fields"]["recipe"] == "ave2018" and len(attrs["fingerprint"]) == 16


def test_import_refuses_wrong_layout(files, tmp_path):
    r = files["root"]
    with h5py.File(tmp_path / "wrongkey.h5", "w") as f:
        f.create_dataset("features", data=np.zeros((N, T, 128), np.float32))
    with pytest.raises(StoreError, match="no dataset 'avadataset'"):
        import_ave_h5(r / "visual_feature.h5", tmp_path / "wrongkey.h5", r / "Annotations.txt", tmp_path / "a.zarr")
    with h5py.File(tmp_path / "short.h5", "w") as f:
        f.create_dataset("avadataset", data=np.zeros((N - 1, T, 128), np.float32))
    with pytest.raises(StoreError, match="4 rows, but .*Annotations.txt has 5 annotation lines"):
        import_ave_h5(r / "visual_feature.h5", tmp_path / "short.h5", r / "Annotations.txt", tmp_path / "b.zarr")
    with pytest.raises(StoreError, match=r"expected \[N, T, 7, 7, 512\]"):
        import_ave_h5(r / "audio_feature.h5", r / "audio_feature.h5", r / "Annotations.txt", tmp_path / "c.zarr")


def extract_cli_with_import_h5():
    """``avel-extract``'s click group (stage 1 writes stores; the command moved there from ``avel-train``)."""
    from extract.cli import main

    return main


def test_import_h5_subcommand(files, tmp_path):
    main = extract_cli_with_import_h5()
    r = files["root"]
    out = tmp_path / "cli.zarr"
    args = ["import-h5", "--visual", r / "visual_feature.h5", "--audio", r / "audio_feature.h5",
            "--annotations", r / "Annotations.txt", "--store", out]
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "imported 4 videos" in res.output and "recipe ave2018" in res.output
    np.testing.assert_array_equal(open_checked_store(out).read("audio")[2], files["audio"][3])
    res = CliRunner().invoke(main, [str(a) for a in args])
    assert res.exit_code == 2 and "exists already" in res.output  # avel-extract: 2 = could not start
