"""The sounding-object path end to end on a tiny offline demo, through the CLIs:

    avel-extract demo --videos 15 --background-videos 0
    avel-extract --config <demo>/pipeline.yaml --split all --weights random
                 --set 'extract.extractors=[resnet152_maps,vggish_maps]' --set store.path=sol.zarr
    avel-train   --config <demo>/pipeline.yaml --task sol --head stm --set store.path=sol.zarr --epochs 2
    avel-train   render-sol --run <run> --video <a test clip> --out <png>

The demo's pipeline.yaml already keeps extraction small (random ResNet-152 / VGGish weights, 1
ResNet-152 frame per second, ``sol.boxes_root: boxes``, ``sol.eval_size`` = the demo frame). The
test checks that the maps and the training losses are finite, and that cIoU / IoU and the
centre-box baseline are reported on stdout and in metrics.json."""
from __future__ import annotations

import csv
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
VIDEOS = 15
SEED = 3


def run_cli(module: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} {' '.join(args)} exited {proc.returncode}:\n{output[-4000:]}"
    return proc.stdout, output


def demo_has_boxes() -> bool:
    from extract.factories import demo

    return hasattr(demo, "sounding_object_boxes") and "boxes_root" in demo.pipeline_yaml()


@pytest.mark.slow
@pytest.mark.skipif(not demo_has_boxes(), reason="the demo (extract/demo.py) writes no box annotations yet: "
                    "the sol task has no ground truth to score on it")
def test_sol_on_the_demo_end_to_end(tmp_path):
    import zarr

    out = tmp_path / "demo"
    run_cli("extract.cli", "demo", "--out", str(out), "--videos", str(VIDEOS), "--background-videos", "0",
            "--seed", str(SEED), cwd=tmp_path)
    config = out / "pipeline.yaml"
    boxes = sorted((out / "boxes").glob("*/annotations.xml"))
    assert boxes, "the demo wrote no box files"

    run_cli("extract.cli", "--config", str(config), "--split", "all", "--weights", "random",
            "--set", "extract.extractors=[resnet152_maps,vggish_maps]", "--set", "store.path=sol.zarr", cwd=tmp_path)
    store = zarr.open_group(str(out / "sol.zarr"), mode="r")
    assert store["frame_maps"].shape[:2] == (VIDEOS, 10)
    for name in ("frame_maps", "audio_maps"):
        values = np.asarray(store[name][:], dtype=np.float32)
        assert np.isfinite(values).all(), f"{name} holds non-finite values"

    stdout, printed = run_cli("train.cli", "--config", str(config), "--task", "sol", "--head", "stm",
                              "--set", "store.path=sol.zarr", "--epochs", "2", "--threads", "2", cwd=tmp_path)
    (run,) = sorted((out / "runs" / "sol-stm-supervised").glob("seed0-*"))
    metrics = json.loads((run / "metrics.json").read_text())
    with (run / "epochs.csv").open() as fh:
        losses = [float(row["train_loss"]) for row in csv.DictReader(fh)]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert metrics["test_frames"] > 0 and metrics["test_videos_with_boxes"] == len(boxes)
    for key in ("test_ciou@0.5", "test_iou@0.5"):
        assert 0.0 <= metrics[key] <= 1.0
        assert 0.0 <= metrics["baseline"][key]["value"] <= 1.0 and "centre box" in metrics["baseline"][key]["method"]
    found = re.search(r"test cIoU@0\.5 ([0-9.]+), IoU@0\.5 ([0-9.]+) \(centre-box baseline: cIoU@0\.5 ([0-9.]+), "
                      r"IoU@0\.5 ([0-9.]+);", stdout)
    assert found, stdout[-2000:]
    assert float(found.group(1)) == pytest.approx(metrics["test_ciou@0.5"], abs=1e-4)
    assert float(found.group(3)) == pytest.approx(metrics["baseline"]["test_ciou@0.5"]["value"], abs=1e-4)

    video = boxes[0].parent.name
    pngs = tmp_path / "png"
    # render-sol (avel-train's plugin command, train.predict.render) takes store, splits and boxes from the
    # run: started in another folder than the demo's, with no pipeline.yaml there
    run_cli("train.cli", "render-sol", "--run", str(run), f"--video={video}", "--out", str(pngs), "--annotated-only",
            cwd=tmp_path)
    drawn = sorted((pngs / video).glob("*.png"))
    assert drawn
    from matplotlib import image as mpimg

    assert min(mpimg.imread(drawn[0]).shape[:2]) >= 256

    # avel-predict with the stm run on a test clip: the features are made again with the map store's
    # recipe, and the sounding-object maps are those of the head on the training store's row
    test_clip = out / "videos" / f"{video}.mp4"
    stdout, printed = run_cli("train.predict.cli", "--run", str(run), str(test_clip), "--out", str(tmp_path / "pred"),
                              "--no-progress", cwd=tmp_path)
    assert "1 of 1 videos predicted" in stdout, printed[-3000:]
    doc = json.loads((tmp_path / "pred" / video / "predictions.json").read_text())
    assert doc["task"] == "sol" and doc["seconds"] == 10 and len(doc["sounding_object_boxes"]) == 10
    saved = np.load(tmp_path / "pred" / video / "sounding_object.npy")
    assert (tmp_path / "pred" / video / "sounding_object.png").stat().st_size > 1000

    from extract.core.store import open_store
    from train.predict.run import load_run
    from train.tasks.sol_task import video_outputs

    loaded = load_run(run)
    train_store = open_store(out / "sol.zarr")
    row = [str(k) for k in train_store.ids.tolist()].index(video)
    ((_, logits, maps),) = list(video_outputs(loaded.head, train_store, [row], 1, "cpu"))
    np.testing.assert_allclose(saved, maps.mean(axis=1), rtol=1e-3, atol=1e-5)
    probs = np.asarray(doc["probabilities"])
    import torch

    expected = torch.from_numpy(logits).softmax(-1).numpy().mean(axis=1)
    np.testing.assert_allclose(probs, expected, atol=1e-4)
    assert doc["labels"] == [loaded.class_names[i] for i in expected.argmax(-1)]
