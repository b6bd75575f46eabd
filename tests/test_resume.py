"""Resumability: `avel-extract` killed with SIGKILL after its first shard, then run again, ends with a
store equal (bit for bit, every array) to an uninterrupted run's."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from extract.core.manifest import Sample, write_manifest
from extract.factories.media import write_clip
from extract.core.store import STATUS_DONE, open_store

REPO = Path(__file__).resolve().parents[1]


def make_videos(root: Path, count: int = 6) -> Path:
    rng = np.random.default_rng(7)
    samples = []
    for k in range(count):
        frames = rng.integers(0, 256, (30, 64, 64, 3), dtype=np.uint8)
        wave = (0.2 * np.sin(2 * np.pi * (200 + 60 * k) * np.arange(48000) / 16000)).astype(np.float32)
        write_clip(root / f"v{k}.mp4", frames, fps=10, audio=wave, sample_rate=16000)
        samples.append(Sample(f"s{k}", f"v{k}", f"v{k}.mp4", "", 0, 0, "test"))
    return write_manifest(root / "m.csv", samples)


def command(manifest: Path, store: Path) -> list[str]:
    sets = ["extract.segments=3", "extract.frames_per_segment=4", "extract.image_size=64",
            "extract.batch_frames=8", "store.rows_per_shard=2"]
    return [sys.executable, "-m", "extract.cli", "--manifest", str(manifest), "--store", str(store),
            "--weights", "random", "--device", "cpu", "--workers", "1", "--no-progress"] + [
        arg for item in sets for arg in ("--set", item)]


def environment() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("AVEL_PIPELINE", None)
    return env


def done_rows(store: Path) -> int:
    try:
        return int((open_store(store).status() == STATUS_DONE).sum())
    except Exception:  # noqa: BLE001 - not created yet, or a shard being rewritten right now
        return 0


def read_arrays(store: Path) -> dict[str, np.ndarray]:
    opened = open_store(store)
    return {name: opened.read(name) for name in opened.array_names()}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_store(tmp_path):
    manifest = make_videos(tmp_path)
    full, resumed = tmp_path / "full.zarr", tmp_path / "resumed.zarr"

    subprocess.run(command(manifest, full), cwd=tmp_path, env=environment(), check=True, capture_output=True)

    process = subprocess.Popen(command(manifest, resumed), cwd=tmp_path, env=environment(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while done_rows(resumed) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the runner, its decode workers and the forkserver
        process.wait()
    killed_at = done_rows(resumed)
    assert 2 <= killed_at < 6, f"the kill should land after the first shard and before the end ({killed_at} rows done)"

    again = subprocess.run(command(manifest, resumed), cwd=tmp_path, env=environment(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"skipped {killed_at} (already in the store)" in again.stderr

    want, got = read_arrays(full), read_arrays(resumed)
    assert sorted(want) == sorted(got) == ["audio", "ids", "ran", "reason", "source", "status", "valid", "visual"]
    for name in want:
        assert want[name].dtype == got[name].dtype
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert (got["status"] == STATUS_DONE).all() and got["visual"].any() and got["audio"].any()
