"""End to end on the offline demo, exactly as the README's quick start runs it, through the CLIs:

    avel-extract demo  ->  avel-extract --config <demo>/pipeline.yaml --split all
                       ->  avel-train --config <demo>/pipeline.yaml --head dmrn

with random VGG-19/VGGish weights and 1 frame per segment (the demo's pipeline.yaml). The test
accuracy that avel-train prints must clearly beat the majority-class baseline of the test split,
computed here from the test manifest: the events are learnable from the extracted features."""
from __future__ import annotations

import re

import numpy as np
import pytest

from extract.core.manifest import read_manifest

from demo_testutils import BACKGROUND, VIDEOS


@pytest.mark.slow
def test_demo_extract_train_dmrn_beats_majority_baseline(demo_run):
    out, printed = demo_run.out, demo_run.printed
    import zarr

    store = zarr.open_group(str(out / "store.zarr"), mode="r")
    assert store["visual"].shape == (VIDEOS + BACKGROUND, 10, 7, 7, 512)
    assert np.asarray(store["status"][:]).tolist() == [1] * (VIDEOS + BACKGROUND)  # every clip done
    assert bool(np.asarray(store["valid"][:]).all())
    # the store says, per network, that its weights are random (the demo's explicit choice)
    identities = [net for nets in store.attrs["weights"].values() for net in nets.values() if net]
    assert len(identities) >= 2 and all(net["sha256"] == "random" for net in identities), store.attrs["weights"]

    found = re.findall(r"test accuracy: ([0-9.]+)", printed)
    assert found, printed[-3000:]
    accuracy = float(found[-1])

    test = read_manifest(out / "manifests" / "test.csv")
    labels = test.segment_labels(10).ravel()
    majority = np.bincount(labels).max() / labels.size
    generate_s, extract_s, train_s = demo_run.seconds
    print(f"demo e2e ({VIDEOS} clips): dmrn test accuracy {accuracy:.4f}, majority baseline {majority:.4f}; "
          f"generate {generate_s:.0f} s, extract {extract_s:.0f} s, train {train_s:.0f} s")
    # the baseline is the background share (about 0.45); an informed head reaches far above it
    assert majority < 0.7
    assert accuracy >= majority + 0.15, f"dmrn test accuracy {accuracy:.4f} vs majority baseline {majority:.4f}"
