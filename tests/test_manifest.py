"""Manifest format and the AVE converter."""
from __future__ import annotations

import numpy as np
import pytest

from extract.ave import convert_ave, read_annotations
from extract.core.manifest import ManifestError, Sample, feature_key, read_manifest, write_manifest



def sample(i, video="v1", category="Dog", onset=2, offset=5, **kw):
    return Sample(f"s{i}", video, f"{video}.mp4", category, onset, offset, "train", **kw)


def test_round_trip_and_labels(tmp_path):
    samples = [sample(0), sample(1, "v2", "", 0, 0), sample(2, "v3", "Cat", 0, 10), sample(3, "v1", "Cat", 7, 9)]
    path = write_manifest(tmp_path / "m.csv", samples, ["Dog", "Cat"])
    m = read_manifest(path)
    assert m.samples == samples
    assert m.classes == ["Dog", "Cat"] and m.background == 2
    labels = m.segment_labels(10)
    expected = np.full((4, 10), 2)
    expected[0, 2:5] = 0
    expected[2, :] = 1
    expected[3, 7:9] = 1
    np.testing.assert_array_equal(labels, expected)
    np.testing.assert_array_equal(m.video_labels(), [0, 2, 1, 1])
    # samples of the same video share one feature row
    assert m.keys() == ["v1", "v2", "v3"]
    assert [s.sample_id for s in m.videos()] == ["s0", "s1", "s2"]


def test_windows_get_their_own_feature_key(tmp_path):
    a = sample(0, start=0.0, duration=None)
    b = sample(1, start=30.0, duration=10.0)
    assert a.key == "v1" and b.key == "v1@30+10" == feature_key("v1", 30, 10)
    m = read_manifest(write_manifest(tmp_path / "m.csv", [a, b], ["Dog"]))
    assert m.samples[1].start == 30.0 and m.samples[1].duration == 10.0
    assert m.keys() == ["v1", "v1@30+10"]


def test_classes_default_to_first_appearance_without_classes_txt(tmp_path):
    path = write_manifest(tmp_path / "m.csv", [sample(0, category="B"), sample(1, category="A"), sample(2, category="B")])
    assert read_manifest(path).classes == ["B", "A"]


@pytest.mark.parametrize(
    "row, message",
    [
        ("s0,v,v.mp4,Dog,5,2,train,,", r"m\.csv:2: need 0 <= onset <= offset"),
        ("s0,v,v.mp4,Dog,1.5,2,train,,", r"m\.csv:2: onset='1\.5' must be whole seconds"),
        ("s0,v,v.mp4,Dog,x,2,train,,", r"m\.csv:2: onset='x' is not a number"),
        ("s0,v,,Dog,1,2,train,,", r"m\.csv:2: empty path"),
        ("s0,v,v.mp4,Dog,1,2,train,0,-3", r"m\.csv:2: need start >= 0 and duration > 0"),
        ("s0,v,v.mp4,Horse,1,2,train,,", r"category 'Horse' is not in classes\.txt"),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path, row, message):
    (tmp_path / "classes.txt").write_text("Dog\n")
    path = tmp_path / "m.csv"
    path.write_text("sample_id,video_id,path,category,onset,offset,split,start,duration\n" + row + "\n")
    with pytest.raises(ManifestError, match=message):
        read_manifest(path)


def test_missing_columns_and_missing_file(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("sample_id,video_id,path\ns,v,p\n")
    with pytest.raises(ManifestError, match=r"missing columns \['category', 'onset', 'offset', 'split'\]"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "nope.csv")


def test_duplicate_sample_ids_are_refused(tmp_path):
    path = write_manifest(tmp_path / "m.csv", [sample(0), sample(0, "v2")], ["Dog"])
    with pytest.raises(ManifestError, match="duplicate sample_id"):
        read_manifest(path)


# --- AVE -------------------------------------------------------------------------------------


def test_ave_converter_reproduces_official_splits(ave_dir, tmp_path):
    counts = convert_ave(ave_dir, tmp_path)
    assert counts == {"train": 3339, "val": 402, "test": 402}
    classes = (tmp_path / "classes.txt").read_text().splitlines()
    assert len(classes) == 28
    assert classes[0] == "Church bell" and classes[27] == "Mandolin"  # the order stated in the foundation issue
    # the class order equals the dataset's own categories.txt (order of first appearance)
    if (ave_dir / "categories.txt").is_file():
        assert classes == [c.strip() for c in (ave_dir / "categories.txt").read_text().splitlines() if c.strip()]
    test = read_manifest(tmp_path / "test.csv")
    assert test.background == 28 and len(test) == 402 and test.segment_labels(10).size == 4020
    annotations = read_annotations(ave_dir / "Annotations.txt")
    assert len(annotations) == 4143
    assert len({a.video_id for a in annotations}) == 4097
    # every sample_id points at its Annotations.txt row (the row of the public h5 features)
    for s in test.samples[:50]:
        line = annotations[int(s.sample_id[3:])]
        assert (line.video_id, line.category, line.start, line.end) == (s.video_id, s.category, s.onset, s.offset)
    # samples over the three splits are exactly the annotation rows, once each
    rows = []
    for split in ("train", "val", "test"):
        rows += [int(s.sample_id[3:]) for s in read_manifest(tmp_path / f"{split}.csv").samples]
    assert sorted(rows) == list(range(4143))


def test_ave_converter_accepts_the_headerless_reference_copy(ave_dir, tmp_path):
    headerless = ave_dir / "AVE-ECCV18" / "Annotations.txt"
    if not headerless.is_file():
        pytest.skip("no headerless copy")
    assert headerless.read_text().splitlines()[0].split("&")[0] == "Church bell"
    with_header = read_annotations(ave_dir / "Annotations.txt")
    without = read_annotations(headerless)
    assert [a.text for a in with_header] == [a.text for a in without]


def test_ave_converter_on_a_hand_made_release(tmp_path):
    src = tmp_path / "AVE"
    src.mkdir()
    (src / "Annotations.txt").write_text(
        "Category&VideoID&Quality&StartTime&EndTime\n"
        "Bark&a&good&0&10\nRooster&b&good&2&6\nBark&c&good&1&3\nRooster&c&good&5&9\n"
    )
    (src / "trainSet.txt").write_text("Rooster&c&good&5&9\nBark&a&good&0&10\n")
    (src / "valSet.txt").write_text("Rooster&b&good&2&6\n")
    (src / "testSet.txt").write_text("Bark&c&good&1&3\n")
    out = tmp_path / "m"
    assert convert_ave(src, out) == {"train": 2, "val": 1, "test": 1}
    train = read_manifest(out / "train.csv")
    assert [s.sample_id for s in train.samples] == ["ave0003", "ave0000"]
    assert train.classes == ["Bark", "Rooster"]
    np.testing.assert_array_equal(train.segment_labels(10)[0], [2, 2, 2, 2, 2, 1, 1, 1, 1, 2])
    (src / "testSet.txt").write_text("Bark&zzz&good&1&3\n")
    with pytest.raises(ManifestError, match=r"testSet\.txt:1: line 'Bark&zzz&good&1&3' is not in Annotations\.txt"):
        convert_ave(src, out)
