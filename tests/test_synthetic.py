"""extract.factories.synthetic: the one synthetic-store factory. Values are checked against the returned
prototypes and the written manifests: event segments carry their class's prototype in both
modalities, background-only and extra rows carry none, one-modality segments exactly one."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from extract.core.manifest import read_manifest
from extract.core.store import STATUS_DONE, STATUS_FAILED, open_store
from extract.factories.synthetic import PATCH, make_synthetic, write_rows

T = 6
CLASSES = ["dog", "car", "bell", "horn"]
NOISE = 0.01


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("syn"), splits={"train": 7, "val": 3}, background={"train": 2},
                          classes=CLASSES, segments=T, extra_ids=("spare0", "spare1"), visual_shape=(5, 4, 16),
                          audio_dim=8, seed=3, noise=NOISE, one_modality_share=0.5, rows_per_shard=3)


def carriers(written, row: int, cat: int) -> tuple[np.ndarray, np.ndarray]:
    """[T] bool each: the segments whose audio is the prototype of class ``cat`` (up to noise)
    and those whose visual map holds that visual prototype on one PATCH x PATCH patch."""
    store = open_store(written.store)
    audio = store.read("audio", [row])[0]
    visual = store.read("visual", [row])[0].astype(np.float32)
    has_a = np.linalg.norm(audio - written.proto_audio[cat], axis=-1) < 10 * NOISE * np.sqrt(audio.shape[-1])
    # a position carries the prototype when its channels are prototype + |noise|
    near = np.abs(visual - written.proto_visual[cat]).max(axis=-1) < 0.05 + 10 * NOISE  # [T, H, W]
    has_v = near.reshape(T, -1).sum(-1) == PATCH * PATCH
    return has_a, has_v


def test_layout_ids_manifests_and_pipeline(written):
    store = open_store(written.store)
    assert len(store) == 7 + 2 + 3 + 2 and store.num_shards == 5  # 14 rows, 3 per shard
    assert store.array("visual").shape == (14, T, 5, 4, 16) and store.array("audio").shape == (14, T, 8)
    assert (store.status() == STATUS_DONE).all() and store.read("valid").all()
    assert written.ids[-2:] == ["spare0", "spare1"]
    train = read_manifest(written.manifests["train"])
    assert [s.sample_id for s in train.samples] == written.ids[:9]
    assert [s.sample_id for s in read_manifest(written.manifests["val"]).samples] == written.ids[9:12]
    assert [s.category for s in train.samples[7:]] == ["", ""]  # background-only rows close the split
    pipeline = yaml.safe_load(written.pipeline.read_text())
    assert pipeline["store"]["path"] == "store.zarr"
    assert pipeline["data"]["splits"]["val"]["manifest"] == "manifests/val.csv"


def test_event_segments_carry_the_class_prototype_as_the_manifest_labels_say(written):
    rows = {sid: i for i, sid in enumerate(written.ids)}
    for split, path in written.manifests.items():
        manifest = read_manifest(path)
        labels = manifest.segment_labels(T)
        for sample, row_labels in zip(manifest.samples, labels):
            event = row_labels != len(CLASSES)
            if not sample.category:
                assert not event.any() and sample.onset == sample.offset == 0
                continue
            cat = CLASSES.index(sample.category)
            assert np.flatnonzero(event).tolist() == list(range(sample.onset, sample.offset))
            assert 2 <= sample.offset - sample.onset <= T
            has_a, has_v = carriers(written, rows[sample.sample_id], cat)
            # both modalities exactly on the event window; outside it at most one of them
            np.testing.assert_array_equal(has_a & has_v, event)
            assert not (has_a & has_v)[~event].any()


def test_background_and_extra_rows_never_carry_both_modalities(written):
    store = open_store(written.store)
    one_modality = 0
    for row in [7, 8, 12, 13]:  # background-only training rows, then the extra ids
        audio = store.read("audio", [row])[0]
        per_class = [carriers(written, row, k) for k in range(len(CLASSES))]
        assert not any((a & v).any() for a, v in per_class)
        one_modality += sum(int(a.sum() + v.sum()) for a, v in per_class)
        assert np.isfinite(audio).all()
    assert one_modality > 0  # share 0.5: some background segments carry one prototype


def test_same_seed_same_numbers_other_seed_other(tmp_path):
    args = dict(splits={"train": 3}, classes=CLASSES, segments=T, visual_shape=(4, 4, 8), audio_dim=8, rows_per_shard=2)
    a, b = make_synthetic(tmp_path / "a", seed=1, **args), make_synthetic(tmp_path / "b", seed=1, **args)
    c = make_synthetic(tmp_path / "c", seed=2, **args)
    for name in ("visual", "audio"):
        np.testing.assert_array_equal(open_store(a.store).read(name), open_store(b.store).read(name))
    assert not np.array_equal(open_store(a.store).read("audio"), open_store(c.store).read("audio"))
    assert a.manifests["train"].read_text() == b.manifests["train"].read_text()


def test_balanced_cycles_the_classes(tmp_path):
    w = make_synthetic(tmp_path, splits={"train": 6}, classes=CLASSES[:3], segments=T, balanced=True,
                       visual_shape=(4, 4, 8), audio_dim=8, rows_per_shard=4)
    assert [s.category for s in w.samples["train"]] == CLASSES[:3] * 2


def test_write_rows_writes_given_arrays_and_status(tmp_path):
    rng = np.random.default_rng(0)
    visual = rng.standard_normal((5, 2, 7, 7, 512)).astype(np.float16)
    audio = rng.standard_normal((5, 2, 128)).astype(np.float32)
    valid = np.ones((5, 2), bool)
    status = [STATUS_DONE, STATUS_FAILED, STATUS_DONE, STATUS_DONE, STATUS_DONE]
    store = write_rows(tmp_path / "s.zarr", [f"r{i}" for i in range(5)], 2, {"visual": visual, "audio": audio, "valid": valid},
                       status=status, rows_per_shard=2)
    store = open_store(store.path)
    np.testing.assert_array_equal(store.read("visual"), visual)
    np.testing.assert_array_equal(store.read("audio"), audio)
    assert store.status().tolist() == status


def test_mislabelled_rows_carry_another_class_and_scale_sets_the_prototypes(tmp_path):
    """``mislabelled_share``: that share of the event rows carries another class's prototype on its
    event window (the manifest keeps the label); ``prototype_scale`` scales the prototypes."""
    written = make_synthetic(tmp_path, splits={"train": 40}, classes=CLASSES, segments=T, visual_shape=(5, 4, 16),
                             audio_dim=8, seed=5, noise=NOISE, mislabelled_share=0.5, prototype_scale=3.0,
                             rows_per_shard=8)
    shifted = 0
    for row, sample in enumerate(written.samples["train"]):
        label = CLASSES.index(sample.category)
        carried = [cat for cat in range(len(CLASSES)) if carriers(written, row, cat)[0][sample.onset]]
        assert len(carried) == 1  # one class's prototype on the event window
        assert all(carriers(written, row, carried[0])[0][sample.onset:sample.offset])
        shifted += carried[0] != label
    assert 10 < shifted < 30  # about half of 40
    plain = make_synthetic(tmp_path / "plain", splits={"train": 4}, classes=CLASSES, segments=T, visual_shape=(5, 4, 16),
                           audio_dim=8, seed=5, noise=NOISE, rows_per_shard=8)
    scaled = make_synthetic(tmp_path / "scaled", splits={"train": 4}, classes=CLASSES, segments=T, visual_shape=(5, 4, 16),
                            audio_dim=8, seed=5, noise=NOISE, prototype_scale=3.0, rows_per_shard=8)
    np.testing.assert_allclose(scaled.proto_audio, plain.proto_audio * 2.0, rtol=1e-6)  # default scale 1.5


def test_given_events_replace_the_drawn_labels(tmp_path):
    """``events``: per split, (class, onset, offset) of each event row, e.g. AVE's annotations."""
    events = {"train": [(2, 0, 6), (0, 3, 5), (1, 2, 2)], "val": [(3, 1, 4)]}
    written = make_synthetic(tmp_path, splits={"train": 3, "val": 1}, classes=CLASSES, segments=T, visual_shape=(5, 4, 16),
                             audio_dim=8, seed=1, noise=NOISE, events=events, rows_per_shard=4)
    got = {split: [(CLASSES.index(s.category), s.onset, s.offset) for s in samples]
           for split, samples in written.samples.items()}
    assert got == events
    for row, (cat, onset, offset) in enumerate(events["train"]):
        has_a, has_v = carriers(written, row, cat)
        np.testing.assert_array_equal(has_a & has_v, (np.arange(T) >= onset) & (np.arange(T) < offset))
    with pytest.raises(ValueError, match="events\\['train'\\] has 3 rows"):
        make_synthetic(tmp_path / "bad", splits={"train": 2}, classes=CLASSES, segments=T, events={"train": events["train"]})
