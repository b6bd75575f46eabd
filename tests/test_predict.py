"""avel-predict (train/predict.py) on the README's demo run (the session fixture ``demo_run``), run as
a user runs it: the CLI on the demo's test videos plus clips generated here, in one call.

* consistency: on the test videos it gives exactly the labels of the run's predictions_test.csv;
* a generated clip (in no split) with a known event interval is predicted with that interval;
* a 35-s clip gives a 35-s timeline (4 windows of 10 s); a clip without audio, a corrupt file and a
  missing file each give a per-video error naming the file while the others are predicted; exit 1;
* attention.npy holds the head's own attention (a forward of the head on the stored features);
* a second prediction of the same videos decodes nothing (the shared feature cache);
* features that cannot be made as in training are refused, saying why.
"""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from demo_testutils import REPO
from predict_testutils import expected_labels, plan, write_plans

pytestmark = pytest.mark.slow

INTERVAL = plan(900, "siren", 3, 8, video_id="interval")
LONG = [plan(901, "drum", 4, 9), plan(902, "bell", 2, 6), plan(903, "rain", 0, 3), plan(904, "buzzer", 1, 4)]


def predict_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "train.predict.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def predicted(demo_run, tmp_path_factory):
    """One avel-predict call: the demo's test videos (its manifest), four generated clips, a
    missing file; with the plots and the overlay video."""
    clips = tmp_path_factory.mktemp("clips")
    write_plans(clips / "interval.mp4", [INTERVAL])
    write_plans(clips / "long35.mp4", LONG, seconds=35)
    write_plans(clips / "silent.mp4", [plan(905, "bell", 2, 6)], audio=False)
    (clips / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 300)
    out = tmp_path_factory.mktemp("predict") / "out"
    demo = demo_run.out
    proc = predict_cli("--run", str(demo_run.run_dir), "--manifest", str(demo / "manifests" / "test.csv"),
                       "--video-root", str(demo / "videos"), str(clips), str(clips / "missing.mp4"),
                       "--out", str(out), "--overlay-video", "--no-progress", cwd=demo)
    return {"proc": proc, "out": out, "clips": clips, "demo": demo_run}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_exit_code_and_summary_report_every_video(predicted):
    proc, out = predicted["proc"], predicted["out"]
    assert proc.returncode == 1, proc.stderr[-3000:]  # some videos failed, the others were predicted
    summary = {row["video_id"]: row for row in read_csv(out / "summary.csv")}
    errors = {vid: row["error"] for vid, row in summary.items() if row["status"] == "error"}
    assert set(errors) == {"silent", "corrupt", "missing"}, summary
    assert "silent.mp4" in errors["silent"] and "no audio" in errors["silent"]
    assert "corrupt.mp4" in errors["corrupt"] and "cannot be read as a video" in errors["corrupt"]
    assert "missing.mp4" in errors["missing"] and "not found" in errors["missing"]
    ok = [vid for vid, row in summary.items() if row["status"] == "ok"]
    assert "interval" in ok and "long35" in ok and len(ok) >= 5
    for vid in ("silent", "corrupt", "missing"):  # failed videos leave no outputs
        assert not (out / vid / "predictions.csv").exists()
    assert "ERROR" in proc.stdout and "videos predicted" in proc.stdout


def test_the_runs_test_videos_get_exactly_the_runs_test_labels(predicted):
    run_dir, out = predicted["demo"].run_dir, predicted["out"]
    expected = {(r["video_id"], int(r["second"])): r["label"] for r in read_csv(run_dir / "predictions_test.csv")}
    videos = sorted({vid for vid, _ in expected})
    got = {}
    for vid in videos:
        for row in read_csv(out / vid / "predictions.csv"):
            got[(row["video_id"], int(row["second"]))] = row["label"]
            assert row["valid"] == "1"
    assert got == expected


def test_a_new_clip_is_predicted_with_its_event_interval(predicted):
    doc = json.loads((predicted["out"] / "interval" / "predictions.json").read_text())
    assert doc["seconds"] == 10 and doc["windows"] == 1
    truth = expected_labels([INTERVAL], 10)
    wrong = [t for t in range(10) if doc["labels"][t] != truth[t]]
    # the event seconds 3..7 with both cues: one event of that class, edges within a second
    events = [e for e in doc["events"] if e["label"] == "siren"]
    assert len(doc["events"]) == 1 and len(events) == 1, doc["events"]
    assert abs(events[0]["onset"] - 3) <= 1 and abs(events[0]["offset"] - 8) <= 1, events
    assert len(wrong) <= 1, (doc["labels"], truth)
    probs = np.asarray(doc["probabilities"])
    assert probs.shape == (10, len(doc["class_names"])) and np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    # the event's mean probability is the mean of its seconds' probabilities of that class
    k = doc["class_names"].index("siren")
    assert events[0]["mean_probability"] == pytest.approx(probs[events[0]["onset"]:events[0]["offset"], k].mean(), abs=1e-5)


def test_a_35_second_clip_gives_a_35_second_timeline(predicted):
    out = predicted["out"] / "long35"
    rows = read_csv(out / "predictions.csv")
    assert [int(r["second"]) for r in rows] == list(range(35))
    doc = json.loads((out / "predictions.json").read_text())
    assert doc["windows"] == 4 and doc["seconds"] == 35 and all(doc["valid"])
    truth = expected_labels(LONG, 35)
    hits = sum(a == b for a, b in zip(doc["labels"], truth))
    assert hits >= 28, list(zip(doc["labels"], truth))  # the events of all four windows are found
    for name in ("timeline.png", "attention.png", "overlay.mp4", "attention.npy"):
        assert (out / name).stat().st_size > 1000, name
    import av

    with av.open(str(out / "overlay.mp4")) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert abs(frames - 350) <= 2  # 35 s at the clip's 10 fps


def test_attention_values_are_the_heads_own(predicted):
    import torch

    from train.data import read_rows
    from train.predict.run import check_features, load_run, window_key

    run = load_run(predicted["demo"].run_dir)
    store = check_features(predicted["out"] / "features.zarr", run)
    ids = [str(k) for k in store.ids.tolist()]
    rows = np.array(sorted(ids.index(window_key("long35", s, 10)) for s in (0, 10, 20, 30)))
    audio = torch.from_numpy(read_rows(store, "audio", rows).astype(np.float32))
    visual = torch.from_numpy(read_rows(store, "visual", rows).astype(np.float32))
    with torch.no_grad():
        att = run.head.eval()(audio, visual).spatial.numpy()  # [4, 10, 7, 7], windows in store order
    order = np.argsort([int(ids[r].split("@")[1].split("+")[0]) for r in rows])
    saved = np.load(predicted["out"] / "long35" / "attention.npy")
    np.testing.assert_allclose(saved, att[order].reshape(40, 7, 7)[:35], rtol=1e-5, atol=1e-7)


def test_a_second_prediction_decodes_nothing_and_bad_features_are_refused(predicted, tmp_path):
    demo = predicted["demo"]
    proc = predict_cli("--run", str(demo.run_dir), str(predicted["clips"] / "interval.mp4"), "--out",
                       str(tmp_path / "again"), "--no-plots", "--no-progress", cwd=demo.out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 reused from the cache, 0 computed now" in proc.stderr
    first = read_csv(predicted["out"] / "interval" / "predictions.csv")
    again = read_csv(tmp_path / "again" / "interval" / "predictions.csv")
    assert [r["label"] for r in again] == [r["label"] for r in first]

    from train.predict.run import PredictError, check_features, load_run

    run = load_run(demo.run_dir)
    run.features = {**run.features, "fingerprint": "0" * 64,
                    "fingerprint_fields": {**run.features["fingerprint_fields"], "segments": 12}}
    with pytest.raises(PredictError, match=r"not the ones the head was trained on.*segments: 12 -> 10"):
        check_features(predicted["out"] / "features.zarr", run)


def test_missing_pretrained_weights_stop_before_any_prediction(predicted, tmp_path):
    from train.predict.run import PredictError, _Plan, extract_features, load_run

    run = load_run(predicted["demo"].run_dir)
    run.features = {**run.features, "extractor": {**run.features["extractor"],
                                                  "visual_weights": str(tmp_path / "vgg19-absent.pth")}}
    clip = predicted["clips"] / "interval.mp4"
    with pytest.raises(PredictError, match="vgg19-absent.pth"):
        extract_features(run, [_Plan("interval", clip, 10.0, [0])], tmp_path / "work", tmp_path / "store.zarr",
                         progress=False)
    assert not (tmp_path / "store.zarr").exists()
