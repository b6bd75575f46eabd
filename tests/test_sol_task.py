"""The ``sol`` task end to end on a tiny generated store: training through ``avel-train``, the
frame bookkeeping of the localization evaluation, the run directory, and ``render-sol``."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from extract.core.manifest import Sample, write_manifest
from extract.core.store import ArraySpec, StoreError, create_store
from train import sol_metrics as sol

torch.set_num_threads(1)

T, F, CV, CA, FPS = 3, 2, 16, 8, 10
CLASSES = ["dog", "guitar"]


def frame_number(t: int, f: int) -> int:
    """The decoded frame the store says was used for (second t, slot f): 10 fps, times t + (f + 0.5) / 2."""
    return int(round((t + (f + 0.5) / F) * FPS))


def _video(rng, cls: int, onset: int, offset: int):
    """One video: a sounding 3x3-cell object of class ``cls`` and a silent one of the other class.
    Returns (frame_maps [T, F, 8, 8, CV], audio_maps [T, 6, 4, CA], boxes {frame: [x0, y0, x1, y1]} on 64x64)."""
    pv = np.random.default_rng(100).normal(0, 1, (2, CV))
    pa = np.random.default_rng(101).normal(0, 1, (2, CA))
    maps = rng.normal(0, 0.5, (T, F, 8, 8, CV))
    audio = rng.normal(0, 1.0, (T, 6, 4, CA))
    p1, p2 = np.array([0, 0]) + rng.integers(0, 2, 2), np.array([5, 5]) - rng.integers(0, 2, 2)
    boxes = {}
    for t in range(T):
        for f in range(F):
            maps[t, f, p1[1]:p1[1] + 3, p1[0]:p1[0] + 3] += pv[cls]
            maps[t, f, p2[1]:p2[1] + 3, p2[0]:p2[0] + 3] += pv[1 - cls]
        if onset <= t < offset:
            audio[t] += pa[cls]
            for f in range(F):
                boxes[frame_number(t, f)] = [p1[0] * 8, p1[1] * 8, p1[0] * 8 + 24, p1[1] * 8 + 24]
    return maps.astype(np.float16), audio.astype(np.float16), boxes


def _cvat(path: Path, boxes: dict[int, list[float]], extra_frame: int | None = None) -> None:
    items = dict(boxes)
    if extra_frame is not None:
        items[extra_frame] = [1, 1, 5, 5]  # annotated but never sampled: must not be scored
    body = "".join(
        f'<box frame="{k}" outside="0" occluded="0" keyframe="1" xtl="{b[0]}" ytl="{b[1]}" xbr="{b[2]}" ybr="{b[3]}"></box>'
        for k, b in sorted(items.items())
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        '<?xml version="1.0" encoding="utf-8"?><annotations><version>1.1</version><meta><task><size>30</size>'
        "<original_size><width>64</width><height>64</height></original_size></task></meta>"
        f'<track id="0" label="sounding object">{body}</track></annotations>'
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("sol")
    rng = np.random.default_rng(0)
    ids, rows, samples, all_boxes = [], [], {"train": [], "val": [], "test": []}, {}
    plan = [("train", 24), ("val", 4), ("test", 4)]
    for split, count in plan:
        for i in range(count):
            vid = f"{split}{i:02d}"
            cls = i % 2
            onset, offset = (0, T) if i % 3 else (1, T)
            maps, audio, boxes = _video(rng, cls, onset, offset)
            ids.append(vid)
            index = np.array([[frame_number(t, f) for f in range(F)] for t in range(T)], np.int32)
            valid = np.ones(T, bool)
            if split == "test" and i == 3:
                valid[2] = False  # an invalid second: its frames are not scored
            rows.append({"frame_maps": maps, "audio_maps": audio, "frame_index": index,
                         "frame_times": (index / FPS).astype(np.float32), "valid": valid})
            samples[split].append(Sample(vid, vid, f"{vid}.mp4", CLASSES[cls], onset, offset, split))
            if split == "test":
                all_boxes[vid] = boxes
                if i != 2:  # test02 has no box file
                    _cvat(root / "boxes" / vid / "annotations.xml", boxes, extra_frame=29)
    specs = [ArraySpec("valid", (T,), "bool"), ArraySpec("frame_maps", (T, F, 8, 8, CV), "float16"),
             ArraySpec("frame_times", (T, F), "float32"), ArraySpec("frame_index", (T, F), "int32"),
             ArraySpec("audio_maps", (T, 6, 4, CA), "float16")]
    store = create_store(root / "maps.zarr", ids, T, specs, {"extractor": {}, "fingerprint": "test"}, rows_per_shard=len(ids))
    values = {name: np.stack([r[name] for r in rows]) for name in rows[0]}
    store.write_shard(0, values, np.ones(len(ids), np.int8), [""] * len(ids))
    splits = {}
    for split, items in samples.items():
        write_manifest(root / "manifests" / f"{split}.csv", items, CLASSES)
        splits[split] = {"manifest": str(root / "manifests" / f"{split}.csv"), "video_root": str(root / "videos")}
    config = {
        "data": {"splits": splits},
        "store": {"path": str(root / "maps.zarr")},
        "train": {"task": "sol", "head": "stm", "epochs": 3, "batch_size": 8, "lr": 3e-3, "device": "cpu",
                  "runs_root": str(root / "runs"), "seeds": [0]},
        "heads": {"stm": {"visual_channels": CV, "audio_channels": CA, "dim": 16, "hidden": 16}},
        # test02 has no box file on purpose: only the annotated test videos are scored
        "sol": {"boxes_root": str(root / "boxes"), "eval_size": 0, "allow_missing_boxes": True},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "boxes": all_boxes, "values": values, "ids": ids}


@pytest.fixture(scope="module")
def trained(project):
    from click.testing import CliRunner

    from train.cli import main

    result = CliRunner().invoke(main, ["--config", str(project["root"] / "pipeline.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    project["output"] = result.output
    run_dirs = sorted((project["root"] / "runs").glob("sol-stm-supervised/seed0-*"))
    assert len(run_dirs) == 1
    return run_dirs[0]


def _expected_frames(project) -> list[tuple[str, int, int]]:
    """(video, second, slot) of every sampled frame that is annotated, valid and has a box file."""
    out = []
    for vid, boxes in project["boxes"].items():
        if vid == "test02":
            continue
        for t in range(T):
            if vid == "test03" and t == 2:
                continue
            out += [(vid, t, f) for f in range(F) if frame_number(t, f) in boxes]
    return out


def test_run_directory_and_metrics(project, trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for name in ("config.yaml", "epochs.csv", "checkpoint.safetensors", "learning_curves.png", "localization_test.csv"):
        assert (trained / name).is_file(), name
    assert metrics["task"] == "sol" and metrics["head"] == "stm" and metrics["epochs"] == 3
    assert metrics["samples"] == {"train": 24, "test": 4, "val": 4}
    assert metrics["test_videos_with_boxes"] == 3
    expected = _expected_frames(project)
    assert metrics["test_frames"] == len(expected) == 12  # test00: 4, test01: 6, test02: no boxes, test03: 2
    with (trained / "localization_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted((r["key"], int(r["second"]), int(r["slot"])) for r in rows) == sorted(expected)
    assert all(int(r["frame"]) == frame_number(int(r["second"]), int(r["slot"])) for r in rows)
    cious = [float(r["ciou"]) for r in rows]
    ious = [float(r["iou"]) for r in rows]
    assert metrics["test_ciou@0.5"] == pytest.approx(np.mean(np.array(cious) >= 0.5), abs=1e-3)
    assert metrics["test_iou@0.5"] == pytest.approx(np.mean(np.array(ious) >= 0.5), abs=1e-3)
    assert metrics["test_mean_ciou"] == pytest.approx(np.mean(cious), abs=1e-3)
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and metrics["val_accuracy"] is not None


def _centre_box_by_hand(gt) -> tuple[float, float]:
    """cIoU and IoU of the centre box of a 64 x 64 frame (x, y in 16..48: half the width and
    height) against one ground-truth box, by hand: A = the box's 32 x 32 pixels."""
    x0, y0, x1, y1 = gt
    inter = max(0, min(48, x1) - max(16, x0)) * max(0, min(48, y1) - max(16, y0))
    area_gt, area_box = (x1 - x0) * (y1 - y0), 32 * 32
    return inter / (area_gt + area_box - inter), inter / (area_gt + area_box - inter)


def test_centre_box_baseline_beside_the_head(project, trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    scores = [_centre_box_by_hand(project["boxes"][vid][frame_number(t, f)]) for vid, t, f in _expected_frames(project)]
    cious, ious = np.array([c for c, _ in scores]), np.array([i for _, i in scores])
    base = metrics["baseline"]
    assert base["test_ciou@0.5"]["value"] == pytest.approx(np.mean(cious >= 0.5))
    assert base["test_iou@0.5"]["value"] == pytest.approx(np.mean(ious >= 0.5))
    assert base["test_mean_ciou"]["value"] == pytest.approx(cious.mean())
    assert base["test_mean_iou"]["value"] == pytest.approx(ious.mean())
    assert "centre box" in base["test_ciou@0.5"]["method"]
    # classification: the majority class of the valid test seconds (test03's last second is invalid)
    labels = []
    for i in range(4):
        onset = 0 if i % 3 else 1
        labels += [i % 2 if t >= onset else 2 for t in range(T) if not (i == 3 and t == 2)]
    assert base["test_accuracy"]["value"] == pytest.approx(np.bincount(labels).max() / len(labels))
    with (trained / "localization_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert np.mean([float(r["centre_ciou"]) for r in rows]) == pytest.approx(cious.mean(), abs=1e-3)
    # the closing summary prints the head's cIoU / IoU beside the centre box's
    out = project["output"]
    assert (f"test cIoU@0.5 {metrics['test_ciou@0.5']:.4f}, IoU@0.5 {metrics['test_iou@0.5']:.4f} "
            f"(centre-box baseline: cIoU@0.5 {np.mean(cious >= 0.5):.4f}, IoU@0.5 {np.mean(ious >= 0.5):.4f}; "
            f"12 annotated frames of 3 test videos)") in out
    assert f"baseline {base['test_accuracy']['value']:.4f} (majority class" in out


def test_scores_recomputed_from_the_checkpoint(project, trained):
    from train.checkpoint import build_head

    head, meta = build_head(trained / "checkpoint.safetensors")
    assert meta["task"] == "sol" and meta["num_classes"] == 3
    values, ids = project["values"], project["ids"]
    with (trained / "localization_test.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    for vid in ("test00", "test03"):
        r = ids.index(vid)
        # the whole video as one sequence: frames in (second, slot) order, each with its second's audio
        visual = torch.from_numpy(values["frame_maps"][r].astype(np.float32)).reshape(1, T * F, 8, 8, CV)
        audio = torch.from_numpy(values["audio_maps"][r].astype(np.float32)).repeat_interleave(F, 0)[None]
        with torch.no_grad():
            att = head(audio, visual).spatial[0].numpy()
        for row in (x for x in rows if x["key"] == vid):
            t, f = int(row["second"]), int(row["slot"])
            gt = np.array([project["boxes"][vid][frame_number(t, f)]], float)
            norm = sol.normalize_map(sol.resize_map(att[t * F + f], (64, 64)))
            expected = sol.ciou(norm, sol.boxes_mask(gt, (64, 64)), 0.5)
            assert float(row["ciou"]) == pytest.approx(expected, abs=1e-4)


def test_store_without_maps_is_refused(tmp_path):
    from train.tasks.sol_task import open_map_store

    create_store(tmp_path / "s.zarr", ["a"], T, [ArraySpec("valid", (T,), "bool")], {"fingerprint": "x"})
    with pytest.raises(StoreError, match=r"resnet152_maps,vggish_maps"):
        open_map_store(tmp_path / "s.zarr")


def test_render_sol_draws_frames(project, trained, tmp_path):
    from click.testing import CliRunner

    from extract.factories.media import write_clip
    from train.predict.render import command

    pytest.importorskip("decord")
    clip = np.full((T * FPS, 64, 64, 3), 90, np.uint8)
    write_clip(project["root"] / "videos" / "test00.mp4", clip, fps=FPS)
    out = tmp_path / "png"
    result = CliRunner().invoke(command, ["--run", str(trained), "--video", "test00", "--out", str(out)],
                                obj={"config": str(project["root"] / "pipeline.yaml"), "sets": (), "verbose": 0},
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pngs = sorted((out / "test00").glob("*.png"))
    assert len(pngs) == T * F
    from matplotlib import image as mpimg

    t, f = 1, 0
    k = frame_number(t, f)
    image = np.rint(mpimg.imread(out / "test00" / f"t{t:02d}_f{f}_frame{k:05d}.png")[..., :3] * 255).astype(int)
    # a 64 x 64 video is drawn readably: at least 256 px each way, with its title, legend and colour bar
    assert image.shape[0] >= 256 and image.shape[1] >= 256
    # the ground-truth outline (red) and the prediction (green) are drawn
    red = (image[..., 0] > 200) & (image[..., 1] < 80) & (image[..., 2] < 80)
    assert red.sum() > 100


def test_render_sol_takes_everything_from_the_run_from_any_folder(project, trained, tmp_path, monkeypatch):
    """``render-sol --run RUN`` in an empty folder, for a run whose configuration names its store,
    manifests, videos and boxes RELATIVE to the folder its training started from (metrics.json
    ``project_dir``): no --config, no --store; the frames drawn are stage 1's decoded frames."""
    import json
    import shutil

    import yaml
    from click.testing import CliRunner

    from extract.decode import picture_frames
    from extract.factories.media import write_clip
    from train.predict.render import command

    pytest.importorskip("decord")
    root = project["root"]
    frames = np.stack([np.full((64, 64, 3), 10 + 6 * (k % 40), np.uint8) for k in range(T * FPS)])
    write_clip(root / "videos" / "test01.mp4", frames, fps=FPS)
    run = tmp_path / "runs" / "sol-stm-supervised" / trained.name
    shutil.copytree(trained, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["store"]["path"] = "maps.zarr"
    config["sol"]["boxes_root"] = "boxes"
    config["train"]["runs_root"] = str(tmp_path / "runs")
    for name, split in config["data"]["splits"].items():
        split["manifest"], split["video_root"] = f"manifests/{name}.csv", "videos"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = json.loads((run / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps({**metrics, "project_dir": str(root)}))
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    monkeypatch.chdir(empty)
    result = CliRunner().invoke(command, ["--run", str(run), "--video", "test01", "--out", "png", "--annotated-only"])
    assert result.exit_code == 0, (result.output, result.exception)
    drawn = sorted((empty / "png" / "test01").glob("*.png"))
    expected = [(t, f) for t in range(T) for f in range(F) if frame_number(t, f) in project["boxes"]["test01"]]
    assert [p.name for p in drawn] == sorted(f"t{t:02d}_f{f}_frame{frame_number(t, f):05d}.png" for t, f in expected)
    # the picture is the decoded frame the store's frame_index names (grey level 10 + 6 (k mod 40))
    k = frame_number(*expected[0])
    frame = picture_frames(str(root / "videos" / "test01.mp4"), indices=[k])[0]
    assert abs(float(frame.mean()) - (10 + 6 * (k % 40))) < 3
    # a run of a task without per-frame maps (avel: a DMRN head) is refused in one line, through the registry
    from train.checkpoint import save_checkpoint
    from train.registry import get_head

    head = get_head("dmrn")(num_classes=3, setting="supervised", config=get_head("dmrn").make_config({}))
    save_checkpoint(run / "checkpoint.safetensors", head.state_dict(),
                    {"head": "dmrn", "task": "avel", "setting": "supervised", "num_classes": 3})
    result = CliRunner().invoke(command, ["--run", str(run), "--video", "test01", "--out", "png2"])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "task 'avel'" in result.output and "Traceback" not in result.output and not (empty / "png2").exists()


def test_frame_title_names_video_second_class_and_score():
    title = sol.frame_title("test00", 1, 15, "dog", "guitar", 0.734, 0.61, 0.5)
    assert title.splitlines() == ["test00  second 1  (frame 15)",
                                  "class: dog  |  predicted: guitar (score 0.73)  |  cIoU 0.61, IoU 0.50"]
    assert "cIoU" not in sol.frame_title("v", 0, 0, "background", "dog", 0.5)
    fig = sol.frame_figure(np.zeros((64, 48, 3), np.uint8), np.array([[1, 1, 9, 9]]), None, "t")
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts[0].startswith("prediction") and texts[1].startswith("ground truth")
    assert len(fig.axes) == 2  # the frame and the map's colour bar


def test_incomplete_store_is_refused_as_by_the_other_tasks(project, tmp_path):
    """``--task sol`` checks completeness (``require_complete``) like avel and cml."""
    import shutil

    from extract.core.settings import load_pipeline
    from extract.core.store import open_store
    from train.registry import get_task

    shutil.copytree(project["root"] / "maps.zarr", tmp_path / "maps.zarr")
    open_store(tmp_path / "maps.zarr", mode="r+").set_attrs(complete=False)
    pipeline = load_pipeline(project["root"] / "pipeline.yaml", {"store": {"path": str(tmp_path / "maps.zarr")}})
    with pytest.raises(StoreError, match="incomplete"):
        get_task("sol").prepare(pipeline, torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# checks before training and non-finite maps (issue 20): one line, exit 2, no run folder


def _invoke(project, *args):
    from click.testing import CliRunner

    from train.cli import main

    return CliRunner().invoke(main, ["--config", str(project["root"] / "pipeline.yaml"), *[str(a) for a in args]],
                              catch_exceptions=False)


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output[-2000:]
    assert "Traceback" not in result.output
    (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
    return line


def test_missing_box_folder_is_refused_before_training(project, tmp_path):
    result = _invoke(project, "--set", f"sol.boxes_root={tmp_path / 'none'}", "--set", f"train.runs_root={tmp_path / 'runs'}")
    line = _one_error_line(result)
    assert "sol.boxes_root" in line and "no box annotation folder" in line
    assert not (tmp_path / "runs").exists()


def test_every_test_video_with_an_event_needs_a_box_file(project, tmp_path):
    result = _invoke(project, "--set", "sol.allow_missing_boxes=false", "--set", f"train.runs_root={tmp_path / 'runs'}")
    line = _one_error_line(result)
    assert "1 of 4 test videos with an event have no box file" in line and "test02" in line
    assert "sol.allow_missing_boxes=true" in line
    assert not (tmp_path / "runs").exists()


def test_non_finite_frame_maps_stop_training_at_their_batch(project, tmp_path):
    import shutil

    import zarr

    shutil.copytree(project["root"] / "maps.zarr", tmp_path / "maps.zarr")
    ids = project["ids"]
    # the order of epoch 1: a permutation of the 24 training samples from numpy's generator seeded with the seed
    order = np.random.default_rng(0).permutation(24)
    position = 13  # batch 1 (batch size 8)
    row = int(order[position])  # training samples are the store's first rows
    maps = zarr.open_group(str(tmp_path / "maps.zarr"), mode="r+")["frame_maps"]
    values = np.asarray(maps[row])
    values[:, 0, 2, 2, 0] = np.inf  # every second of that video: whichever second is drawn
    maps[row] = values
    result = _invoke(project, "--store", tmp_path / "maps.zarr", "--set", f"train.runs_root={tmp_path / 'runs'}")
    line = _one_error_line(result)
    assert line.startswith("Error: epoch 1, batch 1 (videos ")
    assert "input 'visual' (store array 'frame_maps') holds inf in 1 of 8 rows" in line
    assert f"(videos {ids[row]} (second " in line
    assert not list((tmp_path / "runs").rglob("seed*"))


def test_map_rows_are_read_with_their_recorded_scale(tmp_path):
    """A row whose maps exceeded the float16 range is stored divided by a power of two."""
    from extract.core.store import ArraySpec, create_store, open_store
    from train.tasks.sol_task import read_seconds

    specs = [ArraySpec("frame_maps", (2, 1, 2, 2, 3), "float16"), ArraySpec("frame_maps_scale", (), "float32"),
             ArraySpec("audio_maps", (2, 6, 4, 2), "float16"), ArraySpec("audio_maps_scale", (), "float32")]
    create_store(tmp_path / "s.zarr", ["a", "b"], 2, specs, {"fingerprint": "x"}, rows_per_shard=2)
    store = open_store(tmp_path / "s.zarr", mode="r+")
    maps = np.full((2, 2, 1, 2, 2, 3), 3.0, np.float16)
    store.write_shard(0, {"frame_maps": maps, "frame_maps_scale": np.array([1.0, 4096.0], np.float32),
                          "audio_maps": np.ones((2, 2, 6, 4, 2), np.float16),
                          "audio_maps_scale": np.array([1.0, 1.0], np.float32)}, np.array([1, 1]), ["", ""])
    visual, audio = read_seconds(store, np.array([0, 1]), np.array([1, 0]))
    assert visual[0].max() == 3.0 and visual[1].max() == 3.0 * 4096  # 12288 * 4096 would be inf in float16
    assert np.isfinite(visual).all() and audio.max() == 1.0
