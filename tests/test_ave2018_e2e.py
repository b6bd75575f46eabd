"""A head trained on a store imported from public-layout AVE h5 files predicts a new video, end to end.

As a user whose features came from the public files would do it, with weights files written here
in the real layouts (random VGG-19 in the legacy Keras HDF5 layout, a random VGGish state dict)
standing for the Keras / AudioSet files the public features were made with:

1. ``avel-extract import-h5 ... --visual-weights FILE --audio-weights FILE``: the store records
   the ``ave2018`` recipe and those weights, i.e. the fingerprint an ``ave2018`` extraction with
   them has;
2. ``avel-train`` on the imported store;
3. ``avel-extract --recipe ave2018`` adds a new video to the imported store (same fingerprint);
4. ``avel-predict`` on that video: its features are computed with the recipe (a child
   ``avel-extract``), equal the row added in 3, and the predicted probabilities are the head's
   softmax on them;
5. with the VGG-19 weights file gone, avel-predict refuses before any work, naming the file.

Slow: the recipe's VGG-19 runs at 224 x 224 on 16 frames of the new 1-s clip, twice.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from ave2018_testutils import random_vgg19_convs, write_keras_vgg19
from train_testutils import CLASSES, TEST_HEAD, make_dataset, registered_test_head

pytestmark = pytest.mark.slow


def write_public_files(ds: dict, root: Path) -> dict[str, Path]:
    """The dataset's features in the public files' layout: ``avadataset`` [N, T, 7, 7, 512] /
    [N, T, 128] float32, row i = line i of Annotations.txt (Category&VideoID&Quality&Start&End)."""
    with h5py.File(root / "visual_feature.h5", "w") as f:
        f.create_dataset("avadataset", data=ds["visual"].astype(np.float32))
    with h5py.File(root / "audio_feature.h5", "w") as f:
        f.create_dataset("avadataset", data=ds["audio"].astype(np.float32))
    category = {s.video_id: s.category or "Background" for samples in ds["samples"].values() for s in samples}
    lines = ["Category&VideoID&Quality&StartTime&EndTime"]
    lines += [f"{category[vid]}&{vid}&good&0&10" for vid in ds["ids"]]
    (root / "Annotations.txt").write_text("\n".join(lines) + "\n")
    return {"visual": root / "visual_feature.h5", "audio": root / "audio_feature.h5", "annotations": root / "Annotations.txt"}


def new_clip(path: Path) -> Path:
    """A new 1-s video (30 fps 320x240 moving pattern, a 440 Hz tone at 16 kHz)."""
    from extract.factories.media import write_clip

    yy, xx = np.mgrid[0:240, 0:320]
    frames = np.stack([np.stack([(xx + 7 * k) % 256, (yy * 2 + 3 * k) % 256, (xx + yy) % 256], -1)
                       for k in range(30)]).astype(np.uint8)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.float32)
    return write_clip(path, frames, fps=30, audio=tone, sample_rate=16000)


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    import torch

    from extract.cli import main as extract_main
    from extract.nets import build_vggish
    from train.cli import main as train_main

    root = tmp_path_factory.mktemp("ave2018_e2e")
    weights = root / "weights"
    weights.mkdir()
    visual_weights = write_keras_vgg19(weights / "vgg19_random_keras.h5", random_vgg19_convs(seed=5), "keras1")
    audio_weights = weights / "vggish_random.pth"
    torch.save(build_vggish("random", seed=2).state_dict(), audio_weights)

    ds = make_dataset(root / "data", sizes=(18, 6, 6))
    files = write_public_files(ds, root)
    imported = root / "imported.zarr"
    runner = CliRunner()
    res = runner.invoke(extract_main, ["--set", "extract.batch_frames=16", "import-h5", "--visual", str(files["visual"]),
                                       "--audio", str(files["audio"]), "--annotations", str(files["annotations"]),
                                       "--store", str(imported), "--visual-weights", str(visual_weights),
                                       "--audio-weights", str(audio_weights)], catch_exceptions=False)
    assert res.exit_code == 0, res.output

    pipeline = yaml.safe_load(ds["pipeline"].read_text())
    pipeline["store"]["path"] = str(imported)
    ds["pipeline"].write_text(yaml.safe_dump(pipeline))

    clip = new_clip(root / "clips" / "new.mp4")
    with registered_test_head():
        res = runner.invoke(train_main, ["--config", str(ds["pipeline"]), "--head", TEST_HEAD, "--epochs", "2",
                                         "--seeds", "0", "--device", "cpu"], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        run_dir = next((root / "data" / "runs").glob(f"*{TEST_HEAD}*/seed0-*"))

        # 3. the imported store grows by the new video, extracted with the recipe
        (root / "grow.csv").write_text("sample_id,video_id,path,category,onset,offset,split,start,duration\n"
                                       f"new,new,{clip},,0,0,test,0,10\n")
        (root / "grow.yaml").write_text("store: {rows_per_shard: 4}\n")
        grow = runner.invoke(extract_main, ["--config", str(root / "grow.yaml"), "--recipe", "ave2018",
                                            "--set", f"extract.visual_weights={visual_weights}",
                                            "--set", f"extract.audio_weights={audio_weights}",
                                            "--set", "extract.batch_frames=16", "--device", "cpu", "--workers", "1",
                                            "--manifest", str(root / "grow.csv"), "--store", str(imported),
                                            "--no-progress"], catch_exceptions=False)

        # 4. predict the new video with the head trained on the imported store
        from train.predict.run import predict_videos

        results = predict_videos([clip], run=run_dir, out=root / "predict", device="cpu", extract_device="cpu",
                                 plots=False, progress=False)
        # 5. the VGG-19 weights file is gone: refused before any work
        from train.predict.run import PredictError

        moved = weights / "elsewhere.h5"
        shutil.move(visual_weights, moved)
        with pytest.raises(PredictError) as refused:
            predict_videos([clip], run=run_dir, out=root / "predict-refused", device="cpu", progress=False)
        shutil.move(moved, visual_weights)
        from train.predict.run import load_run

        loaded = load_run(run_dir)
    return {"root": root, "ds": ds, "imported": imported, "run_dir": run_dir, "clip": clip, "grow": grow,
            "results": results, "refused": str(refused.value), "visual_weights": visual_weights,
            "audio_weights": audio_weights, "loaded": loaded}


def test_the_imported_store_has_the_fingerprint_of_an_ave2018_extraction(flow):
    from extract.extractors import extractor_identity
    from extract.provenance import store_attrs
    from extract.core.settings import load_pipeline
    from extract.core.store import open_store

    cfg = load_pipeline(None, {"extract": {"recipe": "ave2018", "visual_weights": str(flow["visual_weights"]),
                                           "audio_weights": str(flow["audio_weights"])}}, search=False).extract
    attrs = store_attrs(cfg, extractor_identity(cfg))  # what an extraction with these files records
    store = open_store(flow["imported"])
    assert store.fingerprint == attrs["fingerprint"]
    assert store.attrs["weights"]["vgg19"]["vgg19"]["name"] == "vgg19_random_keras.h5"
    assert flow["loaded"].features["fingerprint"] == store.fingerprint  # the head was trained on it


def test_an_ave2018_extraction_grows_the_imported_store(flow):
    from extract.core.store import STATUS_DONE, open_store

    assert flow["grow"].exit_code == 0, flow["grow"].output
    store = open_store(flow["imported"])
    row = store.row_of("new@0+10")
    assert len(store) == len(flow["ds"]["ids"]) + 1 and store.status()[row] == STATUS_DONE
    valid = store.read("valid", [row])[0]
    assert valid[0] and not valid[1:].any()  # a 1-s video: one valid second, the rest of the window invalid
    visual = store.read("visual", [row])[0]
    assert np.abs(visual[0]).max() > 0 and not visual[1:].any()
    # the imported rows are untouched
    np.testing.assert_array_equal(store.read("visual", [0])[0], flow["ds"]["visual"][0].astype(np.float16))


def test_a_new_video_is_predicted_with_features_of_the_recipe(flow):
    import torch

    from extract.core.store import open_store

    (result,) = flow["results"]
    assert result.ok, result.error
    assert len(result.labels) == 1 and result.labels[0] in CLASSES + ["background"]
    doc = json.loads((flow["root"] / "predict" / "new" / "predictions.json").read_text())
    imported = open_store(flow["imported"])
    predicted = open_store(flow["root"] / "predict" / "features.zarr")
    assert predicted.fingerprint == imported.fingerprint
    assert predicted.attrs["extractor"]["recipe"] == "ave2018"
    key = "new@0+10"
    # the child extraction computed exactly what avel-extract --recipe ave2018 added to the imported store
    for name in ("visual", "audio", "valid"):
        np.testing.assert_array_equal(predicted.read(name, [predicted.row_of(key)]), imported.read(name, [imported.row_of(key)]))
    # and the probabilities are the head's softmax on those features
    head = flow["loaded"].head.eval()
    audio = torch.from_numpy(predicted.read("audio", [predicted.row_of(key)]).astype(np.float32))
    visual = torch.from_numpy(predicted.read("visual", [predicted.row_of(key)]).astype(np.float32))
    with torch.no_grad():
        probs = head(audio, visual).scores.softmax(dim=-1)[0, :1].numpy()
    np.testing.assert_allclose(np.asarray(doc["probabilities"]), probs, rtol=1e-5, atol=1e-6)


def test_missing_weights_are_refused_before_any_work_naming_the_file(flow):
    message = flow["refused"]
    assert str(flow["visual_weights"]) in message and "does not exist" in message
    assert not (flow["root"] / "predict-refused").exists()
