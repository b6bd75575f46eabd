"""tests/conftest.py stretches the time budget of slow tests by the machine's load (issue 28: the
demo fixture ran past pytest-timeout's 600 s at 4x load and every test using it errored)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

INNER = '''
import time
import pytest

@pytest.mark.slow
def test_slow_end_to_end():
    time.sleep(2.5)

def test_quick_one():
    time.sleep(2.5)
'''


def run_inner(tmp_path: Path, load: str) -> subprocess.CompletedProcess:
    shutil.copy(HERE / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntimeout = 1\nmarkers =\n    slow: slow\n")
    env = dict(os.environ, AVEL_TEST_LOAD=load)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs os.sched_getaffinity")
def test_slow_tests_get_a_budget_scaled_by_the_load(tmp_path):
    cores = len(os.sched_getaffinity(0))
    busy = run_inner(tmp_path, str(4 * cores))  # 4x load: the slow test gets 4 s, the quick one keeps 1 s
    assert "1 failed, 1 passed" in busy.stdout, busy.stdout[-2000:]
    assert "test_quick_one" in busy.stdout and "Timeout" in busy.stdout
    assert "stretched by up to 4.0x" in busy.stdout
    idle = run_inner(tmp_path, "0")  # idle: both keep the configured 1 s
    assert "2 failed" in idle.stdout, idle.stdout[-2000:]
