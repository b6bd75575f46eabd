"""The pure parts of train/predict.py: windows, events, ids, video lists, attention layouts."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from train.predict.run import (MIN_LAST_SECOND, PredictError, collect_videos, merge_events, read_video_list,
                           video_ids, window_key, window_starts)


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
    monkeypatch.setattr(P, "extract_features", lambda *a, **k: {})
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


# ------------------------------------------------------------------------------------------
# stage 1 in-process: exit codes that mean one thing


def recipe_run(tmp_path):
    """A DMRN checkpoint (random weights) whose recorded features are those of a real stage-1
    configuration with random VGG-19 / VGGish weights, fingerprint included (computed by stage 1),
    so that avel-predict's recipe check passes and its extraction really runs."""
    from extract.cache import feature_set_attrs
    from extract.core.settings import load_pipeline
    from extract.provenance import effective_config
    from train.checkpoint import save_checkpoint
    from train.registry import get_head

    cfg = load_pipeline(None, {"extract": {"visual_weights": "random", "audio_weights": "random", "device": "cpu",
                                           "decode_workers": 1}}, search=False).extract
    attrs = feature_set_attrs(effective_config(cfg, "cpu"))
    cls = get_head("dmrn")
    head = cls(num_classes=len(CLASSES), setting="supervised", config=cls.make_config({}))
    features = {"extractor": attrs["extractor"], "fingerprint": attrs["fingerprint"],
                "fingerprint_fields": attrs["fingerprint_fields"], "segments": 10}
    meta = {"head": "dmrn", "task": "avel", "setting": "supervised", "num_classes": len(CLASSES), "class_names": CLASSES,
            "features": features}
    save_checkpoint(tmp_path / "run" / "checkpoint.safetensors", head.state_dict(), meta)
    return tmp_path / "run"


def no_child_processes(monkeypatch):
    """Starting a program (a child avel-extract) fails the test."""
    import subprocess

    def refuse(*args, **kwargs):
        raise AssertionError(f"avel-predict started a child process: {args[:1]}")

    monkeypatch.setattr(subprocess, "Popen", refuse)


def test_predict_imports_no_subprocess():
    import ast
    from pathlib import Path

    import train.predict.run as P

    tree = ast.parse(Path(P.__file__).read_text())
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
             for alias in node.names} | {node.module.split(".")[0] for node in ast.walk(tree)
                                         if isinstance(node, ast.ImportFrom) and node.module}
    assert "subprocess" not in names and "extract" in names  # stage 1 is imported, in-process


def test_a_video_that_cannot_be_decoded_fails_alone_with_exit_1(tmp_path, monkeypatch):
    """Stage 1 runs in this process (no child): a file that probes but does not decode is a failed
    video named with stage 1's reason, exit 1."""
    from click.testing import CliRunner

    import train.predict.run as P
    from train.predict.cli import main

    run_dir = recipe_run(tmp_path)
    monkeypatch.setenv("AVEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "probe_duration", lambda path: 10.0)  # the header "probes"; the frames do not decode
    no_child_processes(monkeypatch)
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 300)
    result = CliRunner().invoke(main, [str(bad), "--run", str(run_dir), "--out", str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 1, (result.output, result.exception)
    assert "0 of 1 videos predicted, 1 failed" in result.output
    error = [line for line in result.output.splitlines() if "ERROR:" in line]
    assert len(error) == 1 and "bad.mp4: feature extraction failed: cannot open video" in error[0], result.output
    from extract.core.store import STATUS_FAILED, open_store

    store = open_store(tmp_path / "out" / "features.zarr")  # stage 1 recorded it as the failed row
    assert store.status().tolist() == [STATUS_FAILED]


def test_a_crash_inside_the_extraction_is_not_some_videos_failed(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import extract.cache
    import train.predict.run as P
    from train.predict.cli import EXIT_CRASH, main

    run_dir = recipe_run(tmp_path)
    monkeypatch.setenv("AVEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "probe_duration", lambda path: 10.0)
    no_child_processes(monkeypatch)

    def crash(*args, **kwargs):
        raise RuntimeError("stage 1 crashed")

    monkeypatch.setattr(extract.cache, "extract_with_cache", crash)
    (tmp_path / "a.mp4").write_bytes(b"x")
    with pytest.raises(RuntimeError, match="stage 1 crashed"):  # the library lets it raise
        P.predict_videos([tmp_path / "a.mp4"], run=run_dir, out=tmp_path / "lib", progress=False)
    result = CliRunner().invoke(main, [str(tmp_path / "a.mp4"), "--run", str(run_dir), "--out", str(tmp_path / "out"),
                                       "--no-progress"])
    assert result.exit_code == EXIT_CRASH == 3, (result.output, result.exception)
    assert "videos predicted" not in result.output  # never reported as a per-video result
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_an_environment_error_that_stops_stage_1_is_exit_2(tmp_path, monkeypatch):
    """A systemic error (stage 1's summary says the environment stopped the run) is not a
    per-video failure either: exit 2 with stage 1's reason."""
    from click.testing import CliRunner

    import extract.cache
    import train.predict.run as P
    from extract.cache import CacheSummary
    from train.predict.cli import main

    run_dir = recipe_run(tmp_path)
    monkeypatch.setenv("AVEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(P, "probe_duration", lambda path: 10.0)
    monkeypatch.setattr(extract.cache, "extract_with_cache",
                        lambda *a, **k: CacheSummary(store=tmp_path, requested=1, missing=1,
                                                     systemic="CUDA out of memory on every video"))
    (tmp_path / "a.mp4").write_bytes(b"x")
    result = CliRunner().invoke(main, [str(tmp_path / "a.mp4"), "--run", str(run_dir), "--out", str(tmp_path / "out"),
                                       "--no-progress"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "environment error stopped the feature extraction" in result.output
    assert "CUDA out of memory on every video" in result.output


# ------------------------------------------------------------------------------------------
# the tasks' prediction hooks


def test_the_tasks_that_can_be_predicted_come_from_the_registry(monkeypatch):
    from train.predict.run import predict_tasks
    from train.registry import TASKS, discover, register_task
    from train.tasks.base import Task

    discover()
    assert predict_tasks() == ["avel", "sol"]  # cml provides no prediction hooks
    assert TASKS["sol"].can_render_frames() and not TASKS["avel"].can_render_frames()
    monkeypatch.setattr("train.registry.TASKS", dict(TASKS))

    @register_task("probe-task")
    class Probe(Task):
        @classmethod
        def open_prediction_store(cls, path, segments):
            return path

        @classmethod
        def predict_windows(cls, model, store, rows, device="cpu"):
            return None

    assert "probe-task" in predict_tasks()


def test_avel_predict_windows_is_the_heads_forward_in_the_rows_order(tmp_path):
    """AvelTask.predict_windows on store rows in any order and in batches: the head's own
    prediction, softmax and attention on those rows' features, row for row."""
    from extract.core.store import mark_complete
    from extract.factories.synthetic import write_rows
    from train.registry import get_head, get_task

    rng = np.random.default_rng(3)
    n, T = 5, 10
    values = {"visual": rng.random((n, T, 7, 7, 512)).astype(np.float16),
              "audio": rng.standard_normal((n, T, 128)).astype(np.float32), "valid": np.ones((n, T), bool)}
    store = write_rows(tmp_path / "s.zarr", [f"v{i}" for i in range(n)], T, values, rows_per_shard=2)
    mark_complete(store)
    cls = get_head("dmrn")
    torch.manual_seed(0)
    head = cls(num_classes=len(CLASSES), setting="supervised", config=cls.make_config({})).eval()
    task = get_task("avel")
    store = task.open_prediction_store(tmp_path / "s.zarr", T)
    rows = np.array([3, 0, 4, 1])
    labels, probs, maps = task.predict_windows(head, store, rows, "cpu", batch=3)
    with torch.no_grad():
        out = head(torch.from_numpy(values["audio"][rows]), torch.from_numpy(values["visual"][rows].astype(np.float32)))
    np.testing.assert_array_equal(labels, head.predict(out).numpy())
    np.testing.assert_allclose(probs, out.scores.softmax(-1).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps, out.spatial.numpy(), rtol=1e-5, atol=1e-7)
    # a map of the wrong shape is refused by name
    monkey = type(head).forward
    try:
        type(head).forward = lambda self, a, v: dataclasses.replace(monkey(self, a, v), spatial=monkey(self, a, v).spatial.flatten(2))
        with pytest.raises(ValueError, match=r"spatial must be \[B, T, H, W\]"):
            task.predict_windows(head, store, rows, "cpu")
    finally:
        type(head).forward = monkey
