"""The pure parts of train/predict.py: windows, events, ids, video lists, attention layouts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from train.predict.run import (MIN_LAST_SECOND, PredictError, collect_videos, merge_events, read_video_list,
                           spatial_attention, video_ids, window_key, window_starts)


def test_windows_cover_the_video_in_T_second_steps():
    assert window_starts(10.0, 10) == [0]
    assert window_starts(10.064, 10) == [0]  # a few ms of trailing audio are no second
    assert window_starts(35.0, 10) == [0, 10, 20, 30]
    assert window_starts(30.0 + MIN_LAST_SECOND + 0.01, 10) == [0, 10, 20, 30]
    assert window_starts(0.4, 10) == [0]
    assert window_key("clip", 20, 10) == "clip@20+10"


def test_events_merge_runs_of_valid_event_seconds():
    names = ["dog", "car", "background"]
    labels = ["background", "dog", "dog", "car", "car", "car", "background", "dog", "dog"]
    probs = np.full((9, 3), 0.1)
    probs[1:3, 0] = [0.6, 0.8]
    probs[3:6, 1] = [0.5, 0.7, 0.9]
    probs[7:9, 0] = [0.9, 0.9]
    valid = np.ones(9, bool)
    valid[8] = False  # an invalid second ends an event
    events = merge_events(labels, probs, valid, names, "background")
    assert [(e.onset, e.offset, e.label) for e in events] == [(1, 3, "dog"), (3, 6, "car"), (7, 8, "dog")]
    assert events[0].mean_probability == pytest.approx(0.7)
    assert events[1].mean_probability == pytest.approx(0.7)


def test_ids_are_unique_and_lists_resolve_relative_paths(tmp_path):
    from pathlib import Path

    assert video_ids([Path("a/x.mp4"), Path("b/x.mp4"), Path("c/y.mkv"), Path("d/x.avi")]) == ["x", "x-2", "y", "x-3"]
    (tmp_path / "vids").mkdir()
    for name in ("b.mp4", "a.mov", "notes.txt"):
        (tmp_path / "vids" / name).write_bytes(b"x")
    assert [p.name for p in collect_videos([tmp_path / "vids"])] == ["a.mov", "b.mp4"]
    (tmp_path / "list.txt").write_text("# my clips\nvids/a.mov\n/abs/c.mp4\n")
    assert read_video_list(tmp_path / "list.txt") == [tmp_path / "vids" / "a.mov", Path("/abs/c.mp4")]
    (tmp_path / "m.csv").write_text("sample_id,path,video_id\ns1,b.mp4,b\n")
    assert read_video_list(tmp_path / "m.csv", tmp_path / "vids") == [tmp_path / "vids" / "b.mp4"]
    with pytest.raises(PredictError, match="no videos"):
        collect_videos([])


def test_spatial_attention_is_the_heads_typed_map():
    from train.heads.base import HeadOutput

    maps = torch.arange(2 * 3 * 49, dtype=torch.float32).reshape(2, 3, 7, 7)
    assert torch.equal(spatial_attention(HeadOutput(torch.zeros(2, 3, 4), spatial=maps)), maps)
    # a map left in extras is not probed: HeadOutput.spatial is the one place
    assert spatial_attention(HeadOutput(torch.zeros(2, 3, 4), {"attention": maps})) is None
    with pytest.raises(ValueError, match=r"\[B, T, H, W\]"):
        spatial_attention(HeadOutput(torch.zeros(2, 3, 4), spatial=maps.reshape(2, 3, 49)))


# ------------------------------------------------------------------------------------------
# outputs of a prediction (no extraction: the stages around them are replaced)


CLASSES = ["dog", "car", "background"]


def small_run(tmp_path):
    """A DMRN checkpoint with random weights and a recorded feature recipe (nothing is extracted)."""
    from train.checkpoint import save_checkpoint
    from train.predict.run import load_run
    from train.registry import get_head

    cls = get_head("dmrn")
    head = cls(num_classes=len(CLASSES), setting="supervised", config=cls.make_config({}))
    meta = {"head": "dmrn", "task": "avel", "setting": "supervised", "num_classes": len(CLASSES), "class_names": CLASSES,
            "features": {"extractor": {"segments": 10}, "fingerprint": "f" * 64, "segments": 10}}
    save_checkpoint(tmp_path / "run" / "checkpoint.safetensors", head.state_dict(), meta)
    return tmp_path / "run", load_run(tmp_path / "run")


def fake_stages(monkeypatch, seconds: int = 12, attention: bool = False, map_kind: str = "attention"):
    """predict_videos without probing, extraction or store: every video gets ``seconds`` of
    labels (and 7x7 attention maps when asked)."""
    import train.predict.run as P

    def results(run, store, plans, device):
        out = []
        for plan in plans:
            rng = np.random.default_rng(len(out))
            probs = rng.dirichlet(np.ones(len(CLASSES)), seconds)
            labels = [CLASSES[i] for i in probs.argmax(1)]
            out.append(P.VideoResult(plan.video_id, str(plan.path), seconds=seconds, labels=labels, probabilities=probs,
                                     valid=np.ones(seconds, bool), duration=float(seconds), windows=len(plan.starts),
                                     class_names=CLASSES,
                                     attention=rng.random((seconds, 7, 7)).astype(np.float32) if attention else None,
                                     map_kind=map_kind))
        return out

    monkeypatch.setattr(P, "probe_duration", lambda path: float(seconds))
    monkeypatch.setattr(P, "extract_features", lambda *a, **k: 0)
    monkeypatch.setattr(P, "check_features", lambda *a, **k: None)
    monkeypatch.setattr(P, "check_features_recipe", lambda *a, **k: None)  # weights files of the recorded recipe
    monkeypatch.setattr(P, "predict_from_store", results)


def test_predictions_that_cannot_be_written_fail_the_video(tmp_path, monkeypatch):
    """A video whose predictions.csv/.json cannot be written is an error (exit 1), not "predicted"."""
    from click.testing import CliRunner

    from train.predict.cli import main

    run_dir, _ = small_run(tmp_path)
    fake_stages(monkeypatch)
    for name in ("a.mp4", "b.mp4"):
        (tmp_path / name).write_bytes(b"not probed")
    out = tmp_path / "out"
    (out / "b" / "predictions.json").mkdir(parents=True)  # a folder where the file must go
    result = CliRunner().invoke(main, [str(tmp_path / "a.mp4"), str(tmp_path / "b.mp4"), "--run", str(run_dir),
                                       "--out", str(out), "--no-plots", "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "1 of 2 videos predicted, 1 failed" in result.output
    assert "ERROR:" in result.output and "the predictions could not be written" in result.output
    rows = (out / "summary.csv").read_text().splitlines()
    assert rows[1].startswith("a,ok,12,") and rows[2].startswith("b,error,")
    assert (out / "a" / "predictions.json").is_file()
    assert not list((out / "b").glob("*.tmp"))  # nothing half-written left behind


def test_a_picture_that_fails_is_only_a_warning(tmp_path, monkeypatch):
    import train.predict.plots as pp
    from train.predict.run import predict_videos

    run_dir, _ = small_run(tmp_path)
    fake_stages(monkeypatch)
    (tmp_path / "a.mp4").write_bytes(b"x")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pp, "plot_timeline", broken)
    (res,) = predict_videos([tmp_path / "a.mp4"], run=run_dir, out=tmp_path / "out", progress=False)
    assert res.ok and "No space left" in res.outputs["warning"] and (tmp_path / "out" / "a" / "predictions.csv").is_file()


def test_device_cuda_without_cuda_is_a_one_line_error(tmp_path):
    from click.testing import CliRunner

    from train.predict.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    run_dir, _ = small_run(tmp_path)
    (tmp_path / "a.mp4").write_bytes(b"x")
    for option in (["--device", "cuda"], ["--extract-device", "cuda:0"], ["--device", "gpu"]):
        result = CliRunner().invoke(main, [str(tmp_path / "a.mp4"), "--run", str(run_dir), "--out", str(tmp_path / "o"),
                                           *option])
        assert result.exit_code == 2, (option, result.output, result.exception)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("avel-predict: error: device "), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()  # nothing was started


# ------------------------------------------------------------------------------------------
# the strips of a long video come in pages


def test_long_videos_get_one_strip_picture_per_minute(tmp_path, monkeypatch):
    """150 s: three pages (60, 60, 30 panels), each reading only its own frames; panel titles
    count from the page's first second; never more than 60 axes in one figure."""
    import train.predict.plots as pp
    from train.predict.run import predict_videos

    run_dir, _ = small_run(tmp_path)
    fake_stages(monkeypatch, seconds=150, attention=True)
    (tmp_path / "long.mp4").write_bytes(b"x")
    reads, figures, titles = [], [], []
    monkeypatch.setattr(pp, "read_frames", lambda path, times, **kw: (reads.append(list(times)),
                                                                      np.full((len(times), 32, 32, 3), 90, np.uint8))[1])
    real_figure, real_title = pp._strip_figure, pp._panel_title
    monkeypatch.setattr(pp, "_strip_figure", lambda count, columns, title: (figures.append(count),
                                                                            real_figure(count, columns, title))[1])
    monkeypatch.setattr(pp, "_panel_title", lambda t, label, conf: (titles.append(t), real_title(t, label, conf))[1])
    (res,) = predict_videos([tmp_path / "long.mp4"], run=run_dir, out=tmp_path / "out", progress=False)
    assert res.ok, res.error
    folder = tmp_path / "out" / "long"
    pages = sorted(p.name for p in folder.glob("attention*.png"))
    assert pages == ["attention-000m.png", "attention-001m.png", "attention-002m.png"]
    assert figures == [60, 60, 30]
    assert [(r[0], r[-1], len(r)) for r in reads] == [(0.5, 59.5, 60), (60.5, 119.5, 60), (120.5, 149.5, 30)]
    assert titles == list(range(150))
    assert res.outputs["attention"] == str(folder / "attention-000m.png")
    assert res.outputs["attention_pages"] == str(folder / "attention-*.png")
    # a short video keeps its single attention.png
    assert pp.strip_pages(40) == [(0, 40)] and pp.strip_pages(0) == [(0, 0)]
    assert pp.strip_pages(121) == [(0, 60), (60, 120), (120, 121)]
    with pytest.raises(ValueError, match="too large for one figure"):
        pp._strip_figure(pp.MAX_STRIP_PANELS + 1, 10, "")


def test_sounding_object_strips_come_in_pages_and_every_second_keeps_its_box(tmp_path, monkeypatch):
    import json

    import train.predict.plots as pp
    from train.predict.run import predict_videos

    run_dir, _ = small_run(tmp_path)
    fake_stages(monkeypatch, seconds=70, attention=True, map_kind="sounding_object")
    (tmp_path / "sol.mp4").write_bytes(b"x")
    monkeypatch.setattr(pp, "read_frames", lambda path, times, **kw: np.full((len(times), 32, 32, 3), 90, np.uint8))
    (res,) = predict_videos([tmp_path / "sol.mp4"], run=run_dir, out=tmp_path / "out", progress=False)
    assert res.ok, res.error
    folder = tmp_path / "out" / "sol"
    assert sorted(p.name for p in folder.glob("sounding_object*.png")) == ["sounding_object-000m.png",
                                                                           "sounding_object-001m.png"]
    boxes = json.loads((folder / "predictions.json").read_text())["sounding_object_boxes"]
    assert len(boxes) == 70
    # the boxes of the second page are those of its maps (drawn from second 60 on)
    want = pp.plot_sol_strip(np.full((10, 32, 32, 3), 90, np.uint8), res.attention[60:70], res.labels[60:70],
                             res.confidence()[60:70], tmp_path / "check.png")["boxes"]
    assert boxes[60:] == [None if np.isnan(b).any() else [round(float(x), 1) for x in b] for b in want]
