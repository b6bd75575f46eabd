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

from extract.manifest import Sample, write_manifest
from extract.store import ArraySpec, StoreError, create_store
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
        "sol": {"boxes_root": str(root / "boxes"), "eval_size": 0},
    }
    (root / "pipeline.yaml").write_text(yaml.safe_dump(config))
    return {"root": root, "boxes": all_boxes, "values": values, "ids": ids}


@pytest.fixture(scope="module")
def trained(project):
    from click.testing import CliRunner

    from train.cli import main

    result = CliRunner().invoke(main, ["--config", str(project["root"] / "pipeline.yaml")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
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
            att = head(audio, visual).extras["attention"][0].numpy()
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

    from extract.media import write_clip
    from train.cli import main

    pytest.importorskip("decord")
    clip = np.full((T * FPS, 64, 64, 3), 90, np.uint8)
    write_clip(project["root"] / "videos" / "test00.mp4", clip, fps=FPS)
    out = tmp_path / "png"
    result = CliRunner().invoke(main, ["--config", str(project["root"] / "pipeline.yaml"), "render-sol", "--run", str(trained),
                                       "--video", "test00", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pngs = sorted((out / "test00").glob("*.png"))
    assert len(pngs) == T * F
    from matplotlib import image as mpimg

    t, f = 1, 0
    k = frame_number(t, f)
    image = np.rint(mpimg.imread(out / "test00" / f"t{t:02d}_f{f}_frame{k:05d}.png")[..., :3] * 255).astype(int)
    assert image.shape == (64, 64, 3)
    x0, y0, x1, y1 = project["boxes"]["test00"][k]
    # the ground-truth outline is drawn last, in red
    assert (image[y0, x0:x1] == [255, 0, 0]).all() and (image[y0:y1, x1 - 1] == [255, 0, 0]).all()


def test_incomplete_store_is_refused_as_by_the_other_tasks(project, tmp_path):
    """``--task sol`` checks completeness (``require_complete``) like avel and cml."""
    import shutil

    from extract.settings import load_pipeline
    from extract.store import open_store
    from train.registry import get_task

    shutil.copytree(project["root"] / "maps.zarr", tmp_path / "maps.zarr")
    open_store(tmp_path / "maps.zarr", mode="r+").set_attrs(complete=False)
    pipeline = load_pipeline(project["root"] / "pipeline.yaml", {"store": {"path": str(tmp_path / "maps.zarr")}})
    with pytest.raises(StoreError, match="incomplete"):
        get_task("sol").prepare(pipeline, torch.device("cpu"))
