"""The README quick start as a session fixture (see tests/conftest.py ``demo_run``): the offline demo
generated, extracted and a DMRN trained on it through the CLIs, shared by tests/test_demo_e2e.py
and tests/test_predict.py so that the slow part runs once."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

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


@dataclasses.dataclass
class DemoRun:
    """The README's quick start, done once per session: the demo folder, its trained DMRN run and
    what the commands printed, with their seconds."""

    out: Path
    run_dir: Path
    printed: str
    seconds: tuple[float, float, float]


def make_demo_run(tmp_path: Path) -> DemoRun:
    """demo -> extract -> train dmrn through the CLIs, in ``tmp_path``."""
    out = tmp_path / "demo"
    clock = [time.perf_counter()]
    printed = run_cli("extract.cli", "demo", "--out", str(out), "--videos", str(VIDEOS),
                      "--background-videos", str(BACKGROUND), "--seed", str(SEED), cwd=tmp_path)
    config = out / "pipeline.yaml"
    assert f"avel-extract --config {config} --split all" in printed

    clock.append(time.perf_counter())
    run_cli("extract.cli", "--config", str(config), "--split", "all", cwd=tmp_path)
    clock.append(time.perf_counter())
    printed = run_cli("train.cli", "--config", str(config), "--head", "dmrn", cwd=tmp_path)
    clock.append(time.perf_counter())
    runs = sorted((out / "runs" / "avel-dmrn-supervised").glob("seed0-*"))
    assert len(runs) == 1, runs
    return DemoRun(out, runs[0], printed, tuple(np.diff(clock)))
