"""End to end on the offline demo, exactly as the README's quick start runs it, through the CLIs:

    avel-extract demo  ->  avel-extract --config <demo>/pipeline.yaml --split all
                       ->  avel-train --config <demo>/pipeline.yaml --head dmrn

with random VGG-19/VGGish weights and 1 frame per segment (the demo's pipeline.yaml). The test
accuracy that avel-train prints must clearly beat the majority-class baseline of the test split,
computed here from the test manifest: the events are learnable from the extracted features."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from extract.manifest import read_manifest

REPO = Path(__file__).resolve().parents[1]
#: a smaller demo than the default (50 clips) to keep extraction within the test's budget
VIDEOS = 30
BACKGROUND = 5  # background-only clips (3 train / 1 val / 1 test)
SEED = 11


def run_cli(module: str, *args: str, cwd: Path) -> str:
    """``python -m <module> args`` with the checkout importable; stdout+stderr; fails on rc != 0.
    (No timeout of its own: pytest-timeout bounds the whole test.)"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "2")
    proc = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{module} {' '.join(args)} exited {proc.returncode}:\n{output[-4000:]}"
    return output


@pytest.mark.slow
def test_demo_extract_train_dmrn_beats_majority_baseline(tmp_path):
    out = tmp_path / "demo"
    clock = [time.perf_counter()]
    printed = run_cli("extract.cli", "demo", "--out", str(out), "--videos", str(VIDEOS),
                      "--background-videos", str(BACKGROUND), "--seed", str(SEED), cwd=tmp_path)
    config = out / "pipeline.yaml"
    assert f"avel-extract --config {config} --split all" in printed

    clock.append(time.perf_counter())
    run_cli("extract.cli", "--config", str(config), "--split", "all", cwd=tmp_path)
    clock.append(time.perf_counter())
    import zarr

    store = zarr.open_group(str(out / "store.zarr"), mode="r")
    assert store["visual"].shape == (VIDEOS + BACKGROUND, 10, 7, 7, 512)
    assert np.asarray(store["status"][:]).tolist() == [1] * (VIDEOS + BACKGROUND)  # every clip done
    assert bool(np.asarray(store["valid"][:]).all())
    # the store says, per network, that its weights are random (the demo's explicit choice)
    identities = [net for nets in store.attrs["weights"].values() for net in nets.values() if net]
    assert len(identities) >= 2 and all(net["sha256"] == "random" for net in identities), store.attrs["weights"]

    printed = run_cli("train.cli", "--config", str(config), "--head", "dmrn", cwd=tmp_path)
    clock.append(time.perf_counter())
    found = re.findall(r"test accuracy: ([0-9.]+)", printed)
    assert found, printed[-3000:]
    accuracy = float(found[-1])

    test = read_manifest(out / "manifests" / "test.csv")
    labels = test.segment_labels(10).ravel()
    majority = np.bincount(labels).max() / labels.size
    generate_s, extract_s, train_s = np.diff(clock)
    print(f"demo e2e ({VIDEOS} clips): dmrn test accuracy {accuracy:.4f}, majority baseline {majority:.4f}; "
          f"generate {generate_s:.0f} s, extract {extract_s:.0f} s, train {train_s:.0f} s")
    # the baseline is the background share (about 0.45); an informed head reaches far above it
    assert majority < 0.7
    assert accuracy >= majority + 0.15, f"dmrn test accuracy {accuracy:.4f} vs majority baseline {majority:.4f}"
