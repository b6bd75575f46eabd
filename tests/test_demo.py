"""The offline demo dataset (`avel-extract demo`): determinism, decodable media, labels that are
really in the media (colour in the frames, energy in the class band of the audio), and a pipeline.yaml
that resolves against its own folder.

One small demo (15 clips, the minimum) is generated once per module through the CLI."""
from __future__ import annotations

import filecmp
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from extract.factories import demo
from extract.cli import main
from extract.core.manifest import read_manifest

VIDEOS = 15
BACKGROUND = 3  # one background-only clip per split
SEED = 5


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--videos", str(VIDEOS),
                                       "--background-videos", str(BACKGROUND), "--seed", str(SEED)])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def plan() -> list[demo.DemoVideo]:
    return demo.plan_demo(VIDEOS, SEED, BACKGROUND)


@pytest.fixture(scope="module")
def decoded(demo_dir, plan) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """video_id -> (frames uint8 [N, H, W, 3], mono 16-kHz samples [S]) decoded with decord."""
    decord = pytest.importorskip("decord")
    out = {}
    for v in plan:
        path = str(demo_dir / "videos" / v.path)
        frames = decord.VideoReader(path).get_batch(list(range(demo.SECONDS * demo.FPS))).asnumpy()
        audio = decord.AudioReader(path, sample_rate=demo.SAMPLE_RATE, mono=True)[:].asnumpy().reshape(-1)
        out[v.video_id] = (frames, audio)
    return out


# -------------------------------------------------------------------------------------------------
# plan, files, determinism


def test_split_counts_keep_every_class_in_every_split():
    counts = demo.split_counts(50)
    assert counts == {"train": [6] * 5, "val": [2] * 5, "test": [2] * 5}
    counts = demo.split_counts(17)  # 4, 4, 3, 3, 3 videos per class
    assert [sum(x) for x in zip(*counts.values())] == [4, 4, 3, 3, 3]
    assert min(counts["val"]) == min(counts["test"]) == 1
    with pytest.raises(demo.DemoError, match="at least 15"):
        demo.split_counts(14)


def test_same_seed_gives_byte_identical_files(demo_dir, plan, tmp_path):
    again = tmp_path / "again"
    demo.write_metadata(again, demo.plan_demo(VIDEOS, SEED, BACKGROUND), VIDEOS, SEED, BACKGROUND)
    names = ["manifests/train.csv", "manifests/val.csv", "manifests/test.csv", "manifests/classes.txt",
             "segments.csv", "pipeline.yaml", "README.txt"]
    for name in names:
        assert (again / name).read_bytes() == (demo_dir / name).read_bytes(), name
    # the encoded clip itself is reproducible too (x264/AAC are deterministic for equal input)
    demo.write_video(plan[1], tmp_path, SEED)
    assert filecmp.cmp(tmp_path / plan[1].path, demo_dir / "videos" / plan[1].path, shallow=False)
    # ...and the seed matters
    other = tmp_path / "other"
    demo.write_metadata(other, demo.plan_demo(VIDEOS, SEED + 1, BACKGROUND), VIDEOS, SEED + 1, BACKGROUND)
    assert (other / "segments.csv").read_bytes() != (demo_dir / "segments.csv").read_bytes()


def test_manifest_labels_agree_with_the_per_second_cues(demo_dir):
    segments = demo.read_segments(demo_dir / "segments.csv")
    classes = (demo_dir / "manifests" / "classes.txt").read_text().split()
    assert classes == [c.name for c in demo.CLASSES]
    seen_splits = {}
    for split in ("train", "val", "test"):
        manifest = read_manifest(demo_dir / "manifests" / f"{split}.csv")
        assert manifest.classes == classes
        labels = manifest.segment_labels(demo.SECONDS)
        seen_splits[split] = {s.category for s in manifest.samples if s.category}
        assert sum(not s.category for s in manifest.samples) == 1  # the background-only clip
        for sample, row_labels in zip(manifest.samples, labels):
            assert sample.split == split and sample.path == f"{sample.video_id}.mp4"
            assert (demo_dir / "videos" / sample.path).is_file()
            rows = segments[sample.video_id]
            assert [int(r["second"]) for r in rows] == list(range(demo.SECONDS))
            if sample.category:
                assert demo.EVENT_SECONDS[0] <= sample.offset - sample.onset <= demo.EVENT_SECONDS[1]
                cue = sample.category
            else:  # background only: no event second, one class's cues in one modality at a time
                assert sample.onset == sample.offset == 0
                cue = next(c for r in rows for c in (r["visual"], r["audio"]) if c and c != demo.DISTRACTOR)
            for t, r in enumerate(rows):
                both = r["visual"] == r["audio"] == sample.category != ""
                # an event second is exactly one where the object is seen AND its sound heard
                assert both == (sample.onset <= t < sample.offset)
                assert r["label"] == (sample.category if both else "")
                assert row_labels[t] == (classes.index(sample.category) if both else len(classes))
                # only the video's own class or the neutral distractor ever appears
                assert {r["visual"], r["audio"]} <= {"", demo.DISTRACTOR, cue}
            # every clip has a second showing the object without its sound, and every clip with
            # two or more background seconds one playing the sound without the object
            background = sum(not r["label"] for r in rows)
            assert any(r["visual"] == cue and r["audio"] != cue for r in rows)
            assert any(r["audio"] == cue and r["visual"] != cue for r in rows) == (background >= 2)
    assert all(cats == set(classes) for cats in seen_splits.values())


def test_pipeline_yaml_resolves_against_its_folder(demo_dir):
    from extract.core.settings import load_pipeline

    pipeline = load_pipeline(demo_dir / "pipeline.yaml")
    for split in ("train", "val", "test"):
        cfg = pipeline.split(split)
        assert pipeline.path(cfg.manifest) == (demo_dir / "manifests" / f"{split}.csv").resolve()
        assert pipeline.path(cfg.video_root) == (demo_dir / "videos").resolve()
    assert pipeline.path(pipeline.store.path) == (demo_dir / "store.zarr").resolve()
    assert pipeline.path(pipeline.train.runs_root) == (demo_dir / "runs").resolve()
    assert pipeline.extract.visual_weights == pipeline.extract.audio_weights == "random"
    assert pipeline.extract.frames_per_segment == demo.DEMO_FRAMES_PER_SEGMENT < 16
    assert pipeline.train.epochs == demo.DEMO_EPOCHS and pipeline.train.batch_size == demo.DEMO_BATCH_SIZE
    assert pipeline.heads == {"*": {"loss": "ce"}}
    from train.runs import head_class_and_config

    for head in ("dmrn", "a+v-att", "gmu-decision"):  # every Tian et al. head trains with CE on the demo
        assert head_class_and_config(pipeline, head, "avel")[1].loss == "ce"
    assert "instead of AVE's 16" in (demo_dir / "pipeline.yaml").read_text()
    # the sounding-object task: random ResNet-152, fewer frames, the demo's own boxes
    assert pipeline.extract.sol_visual_weights == "random"
    assert pipeline.extract.sol_frames_per_segment == demo.DEMO_SOL_FRAMES_PER_SEGMENT < 4
    assert pipeline.path(pipeline.sol.boxes_root) == (demo_dir / "boxes").resolve()
    assert pipeline.sol.eval_size == demo.FRAME_SIZE[0]


def test_cli_reuses_the_demo_and_prints_the_next_commands(demo_dir, plan):
    before = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, ["demo", "--out", str(demo_dir), "--videos", str(VIDEOS),
                                       "--background-videos", str(BACKGROUND), "--seed", str(SEED)])
    assert result.exit_code == 0, result.output
    assert "already present" in result.output
    assert {p: p.stat().st_mtime_ns for p in demo_dir.rglob("*") if p.is_file()} == before
    assert f"avel-extract --config {demo_dir / 'pipeline.yaml'} --split all" in result.output
    assert f"avel-train --config {demo_dir / 'pipeline.yaml'} --head dmrn" in result.output
    assert "--task sol --head stm" in result.output and "extract.extractors=[resnet152_maps,vggish_maps]" in result.output
    assert "RANDOM" in result.output and "instead of AVE's 16" in result.output
    test_labels = [v.label(t) for v in plan if v.split == "test" for t in range(demo.SECONDS)]
    share = max(test_labels.count(x) for x in set(test_labels)) / len(test_labels)
    assert f"majority-class baseline on the test seconds: {share:.3f}" in result.output


def test_cli_refuses_a_foreign_folder_and_too_few_videos(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path), "--videos", "15"])
    assert result.exit_code == 2 and "not an avel demo folder" in result.output
    result = CliRunner().invoke(main, ["demo", "--out", str(tmp_path / "x"), "--videos", "10"])
    assert result.exit_code == 2 and "10" in result.output
    assert not (tmp_path / "x").exists()
    assert demo.DEFAULT_VIDEOS == 50 and "[default: 50" in CliRunner().invoke(main, ["demo", "--help"]).output


# -------------------------------------------------------------------------------------------------
# the media


def test_clips_decode_to_ten_seconds_at_the_planned_rate(demo_dir, plan, decoded):
    decord = pytest.importorskip("decord")
    for v in plan:
        frames, audio = decoded[v.video_id]
        reader = decord.VideoReader(str(demo_dir / "videos" / v.path))
        assert len(reader) == demo.SECONDS * demo.FPS
        assert reader.get_avg_fps() == pytest.approx(demo.FPS)
        stamps = reader.get_frame_timestamp(list(range(len(reader))))[:, 0]
        np.testing.assert_allclose(stamps, np.arange(len(reader)) / demo.FPS, atol=1e-3)
        assert frames.shape == (demo.SECONDS * demo.FPS, *demo.FRAME_SIZE, 3)
        # audio covers all 10 s (the encoder pads at most two AAC frames)
        assert demo.SECONDS * demo.SAMPLE_RATE <= audio.size <= demo.SECONDS * demo.SAMPLE_RATE + 2048
    # decoded audio is aligned with the rendered track: best lag 0 and near-identical waveform
    v = plan[0]
    audio = decoded[v.video_id][1]
    ref = demo.render_audio(v, SEED)
    lo, n = 8000, 64000
    lags = np.arange(-1500, 1501)
    scores = [float(np.dot(audio[lo + k : lo + k + n], ref[lo : lo + n])) for k in lags]
    assert lags[int(np.argmax(scores))] == 0
    assert np.corrcoef(audio[lo : lo + n], ref[lo : lo + n])[0, 1] > 0.99


def band_powers(x: np.ndarray, sample_rate: int, bands) -> np.ndarray:
    """Mean |FFT|^2 per Hz inside each (low, high) band and the total power, via numpy's rfft."""
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size))) ** 2
    freqs = np.fft.rfftfreq(x.size, 1.0 / sample_rate)
    return np.array([spec[(freqs >= lo) & (freqs <= hi)].sum() for lo, hi in bands]), spec.sum()


def test_audio_energy_is_in_the_class_band_exactly_when_audible(plan, decoded):
    sr = demo.SAMPLE_RATE
    bands = [c.band for c in demo.CLASSES] + [(f - 40, f + 40) for f in demo.DISTRACTOR_TONES]
    margin = int(0.03 * sr)  # ramps are 10 ms; AAC smears transients over ~2 frames of 1024
    power = {}  # (video, second) -> (band powers, total)
    for v in plan:
        audio = decoded[v.video_id][1]
        for t in range(demo.SECONDS):
            lo = t * sr + max(margin, demo.AAC_PRIMING_SAMPLES + margin if t == 0 else 0)
            power[v.video_id, t] = band_powers(audio[lo : (t + 1) * sr - margin], sr, bands)
    for c, cls in enumerate(demo.CLASSES):
        audible = [power[v.video_id, t][0][c] for v in plan for t in range(demo.SECONDS) if v.audio[t] == cls.name]
        quiet = [power[v.video_id, t][0][c] for v in plan for t in range(demo.SECONDS) if v.audio[t] != cls.name]
        assert len(audible) >= 6 and len(quiet) >= 60
        # >= 30 dB between the quietest audible second and the loudest inaudible one (the noise
        # floor sits ~40 dB below the class sounds)
        assert max(quiet) < 1e-3 * min(audible), cls.name
    for v in plan:
        c = [x.name for x in demo.CLASSES].index(v.cue_class)
        for t in range(demo.SECONDS):
            bp, total = power[v.video_id, t]
            if v.audio[t] == v.cue_class:
                assert bp[c] > 0.95 * total, (v.video_id, t)  # the class band holds the energy
            if v.audio[t] == demo.DISTRACTOR:
                assert bp[-2:].sum() > 0.9 * total, (v.video_id, t)  # the chime, outside all bands
            if not v.audio[t]:  # only the noise floor, >= 26 dB below any class sound in total
                assert total < 1e-2 * power[v.video_id, next(s for s in range(10) if v.audio[s] == v.cue_class)][1]


def colour_share(frames: np.ndarray, colour) -> np.ndarray:
    """[N] share of pixels within 60 (max-abs RGB) of ``colour``."""
    diff = np.abs(frames.astype(np.int16) - np.asarray(colour, np.int16)).max(axis=-1)
    return (diff < 60).mean(axis=(1, 2))


def test_object_is_visible_exactly_in_the_planned_seconds(plan, decoded):
    for v in plan:
        cls = demo.class_by_name(v.cue_class)
        share = colour_share(decoded[v.video_id][0], cls.colour).reshape(demo.SECONDS, demo.FPS)
        for t in range(demo.SECONDS):
            if v.visual[t] == v.cue_class:
                assert share[t].min() > 0.08, (v.video_id, t, share[t])
            else:
                assert share[t].max() < 0.01, (v.video_id, t, share[t])


# -------------------------------------------------------------------------------------------------
# learnability from cheap hand features


def hand_features(frames: np.ndarray, audio: np.ndarray) -> np.ndarray:
    """[T, 3 + 1 + 7] per second: mean RGB, mean saturation (max - min channel), log band energies."""
    sr = demo.SAMPLE_RATE
    f = frames.reshape(demo.SECONDS, demo.FPS, *frames.shape[1:]).astype(np.float32)
    rgb = f.mean(axis=(1, 2, 3)) / 255.0
    sat = (f.max(axis=-1) - f.min(axis=-1)).mean(axis=(1, 2, 3))[:, None] / 255.0
    bands = [c.band for c in demo.CLASSES] + [(f0 - 40, f0 + 40) for f0 in demo.DISTRACTOR_TONES]
    energy = np.stack([np.log(band_powers(audio[t * sr : (t + 1) * sr], sr, bands)[0] + 1e-6) for t in range(demo.SECONDS)])
    return np.concatenate([rgb, sat, energy / 10.0], axis=1)


def test_cheap_hand_features_beat_the_majority_baseline(demo_dir, plan, decoded):
    """k-NN on per-second colour means + band energies, trained on train+val, scored on test."""
    def split_xy(splits):
        x, y = [], []
        for split in splits:
            m = read_manifest(demo_dir / "manifests" / f"{split}.csv")
            for sample, labels in zip(m.samples, m.segment_labels(demo.SECONDS)):
                x.append(hand_features(*decoded[sample.video_id]))
                y.append(labels)
        return np.concatenate(x), np.concatenate(y)

    x_train, y_train = split_xy(["train", "val"])
    x_test, y_test = split_xy(["test"])
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    dist = ((b[:, None, :] - a[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(dist, axis=1)[:, :3]
    votes = y_train[nearest]
    pred = np.array([np.bincount(row, minlength=len(demo.CLASSES) + 1).argmax() for row in votes])
    accuracy = float((pred == y_test).mean())
    majority = np.bincount(y_test).max() / y_test.size
    assert majority == pytest.approx(demo.majority_baseline(plan, "test")[1])
    assert accuracy > majority + 0.2, (accuracy, majority)


def test_out_folder_reuse_rules(tmp_path):
    """Reuse only a complete demo of the same parameters; another demo's store is removed."""
    plan = demo.plan_demo(VIDEOS, SEED)
    params = demo._params(VIDEOS, SEED)
    out = tmp_path / "d"
    for path in demo._demo_files(out, plan):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    (out / "demo.json").write_text(__import__("json").dumps(params))
    (out / "store.zarr").mkdir()
    (out / "sol.zarr").mkdir()
    assert any("boxes" in str(p) for p in demo._demo_files(out, plan))
    assert demo._check_out_folder(out, plan, params, force=False) is True
    assert demo._check_out_folder(out, plan, params, force=True) is False
    (out / "videos" / plan[3].path).unlink()  # incomplete -> regenerate, the store stays
    assert demo._check_out_folder(out, plan, params, force=False) is False
    assert (out / "store.zarr").is_dir()
    other = demo._params(VIDEOS + 1, SEED)  # another demo -> its store goes
    assert demo._check_out_folder(out, demo.plan_demo(VIDEOS + 1, SEED), other, force=False) is False
    assert not (out / "store.zarr").exists() and not (out / "sol.zarr").exists()


# -------------------------------------------------------------------------------------------------
# sounding-object boxes


def _read_boxes(demo_dir):
    """The demo's box files through the train-side CVAT reader (the reader the sol task uses)."""
    try:
        from train.sol_metrics import find_box_files, read_cvat_xml
    except ImportError:  # before train/ moved it
        from train.sol import find_box_files, read_cvat_xml
    files = find_box_files(demo_dir / "boxes")
    return {vid: read_cvat_xml(path, vid) for vid, path in files.items()}


def test_box_files_parse_with_the_train_reader_and_mark_the_event_frames(demo_dir, plan):
    boxes = _read_boxes(demo_dir)
    expected = [v for v in plan if v.split == "test" and v.category]
    assert sorted(boxes) == sorted(v.video_id for v in expected) and expected
    frames_total = demo.SECONDS * demo.FPS
    for v in expected:
        vb = boxes[v.video_id]
        assert (vb.width, vb.height, vb.num_frames) == (demo.FRAME_SIZE[1], demo.FRAME_SIZE[0], frames_total)
        # annotated = every frame of the event seconds (object drawn AND its sound playing), no other
        event_frames = [k for k in range(frames_total) if v.onset <= k // demo.FPS < v.offset]
        assert vb.annotated_frames() == event_frames, v.video_id
        assert all(v.visual[k // demo.FPS] == v.audio[k // demo.FPS] == v.category for k in event_frames)
        for k in event_frames:
            (box,) = vb.frames[k]
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= vb.width and 0 <= y0 < y1 <= vb.height, (v.video_id, k, box)
    # the same boxes as the generator's geometry
    v = expected[0]
    geometry = demo.sounding_object_boxes(v, SEED)
    assert {k: tuple(b[0]) for k, b in boxes[v.video_id].frames.items()} == {k: tuple(map(float, b)) for k, b in geometry.items()}


def test_boxes_hold_the_drawn_object_in_the_decoded_frames(demo_dir, plan, decoded):
    """In the decoded frames, the pixels of the class colour lie inside the box and fill much of
    it; outside the box there are (almost) none. Checked on every 3rd annotated frame."""
    boxes = _read_boxes(demo_dir)
    for v in plan:
        if v.video_id not in boxes:
            continue
        cls = demo.class_by_name(v.category)
        frames = decoded[v.video_id][0]
        for k in boxes[v.video_id].annotated_frames()[::3]:
            x0, y0, x1, y1 = (int(round(c)) for c in boxes[v.video_id].frames[k][0])
            coloured = np.abs(frames[k].astype(np.int16) - np.asarray(cls.colour, np.int16)).max(axis=-1) < 60
            inside = np.zeros_like(coloured)
            inside[y0:y1, x0:x1] = True
            total = coloured.sum()
            assert total > 0.05 * coloured.size, (v.video_id, k)
            assert coloured[inside].sum() >= 0.97 * total, (v.video_id, k, (x0, y0, x1, y1))
            assert coloured[inside].mean() > 0.25, (v.video_id, k)  # a ring or cross leaves holes, not a void
            # the box is tight: the coloured pixels reach each of its four sides, within 3 px (H.264
            # halves the chroma resolution and blurs thin tips, e.g. a triangle's apex)
            ys, xs = np.nonzero(coloured & inside)
            assert xs.min() - x0 <= 3 and x1 - 1 - xs.max() <= 3 and ys.min() - y0 <= 3 and y1 - 1 - ys.max() <= 3, (
                v.video_id, k, (x0, y0, x1, y1), (xs.min(), ys.min(), xs.max(), ys.max()))


def test_box_xml_layout_matches_cvat(tmp_path):
    """The layout of the AVE box files: <annotations><version>1.1, meta/task/{size, mode
    interpolation, original_size}, one track labelled "sounding object" of <box> elements with
    frame/outside/occluded/keyframe/xtl/ytl/xbr/ybr; runs end with an outside="1" box."""
    import xml.etree.ElementTree as ET

    v = demo.DemoVideo(3, "demo003", "test", "bell", 2, 4, ("",) * 10, ("",) * 10)
    xml = demo.boxes_xml(v, {20: (1, 2, 30, 40), 21: (2, 2, 31, 40), 25: (5, 6, 7, 8)})
    root = ET.fromstring(xml)
    assert root.tag == "annotations" and root.findtext("version") == "1.1"
    assert root.findtext("meta/task/size") == "100" and root.findtext("meta/task/mode") == "interpolation"
    assert root.findtext("meta/task/original_size/width") == "128"
    assert root.findtext("meta/task/labels/label/name") == "sounding object"
    (track,) = root.findall("track")
    assert track.get("label") == "sounding object"
    got = [(b.get("frame"), b.get("outside"), b.get("xtl"), b.get("ybr")) for b in track.findall("box")]
    assert got == [("20", "0", "1.00", "40.00"), ("21", "0", "2.00", "40.00"), ("22", "1", "2.00", "40.00"),
                   ("25", "0", "5.00", "8.00"), ("26", "1", "5.00", "8.00")]
    assert set(track.find("box").attrib) == {"frame", "outside", "occluded", "keyframe", "xtl", "ytl", "xbr", "ybr"}
    assert "<track" not in demo.boxes_xml(v, {})  # no box: no track (as AVE's empty files)
    assert demo.sounding_object_boxes(dataclasses_replace(v, category="", onset=0, offset=0), 0) == {}


def dataclasses_replace(obj, **changes):
    import dataclasses

    return dataclasses.replace(obj, **changes)
