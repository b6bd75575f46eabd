"""`avel-train gpucheck` (issue 27): the one command that measures the GPU path. Here, without a
GPU, its reduced mode runs every part on tiny sizes; a part that fails or overruns is recorded and
the next one runs; the resident-vs-CPU check runs its code on the CPU."""
from __future__ import annotations

import dataclasses
import json
import os
import time

import pytest
import torch
from click.testing import CliRunner

from train.predict import gpucheck
from train.cli import main

torch.set_num_threads(1)


def test_reduced_mode_runs_every_part_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("AVEL_SHARED", str(tmp_path / "no-shared"))  # the media check skips (kept fast)
    out = tmp_path / "gpucheck.json"
    args = ["gpucheck", "--out", out, "--workdir", tmp_path / "work", "--reduced", "--clips", 1, "--videos", 2,
            "--clip-size", "128x72", "--image-size", 32, "--rows", 100, "--heads", "a+v-att"]
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "mode: reduced" in res.output and "reduced mode" in res.output
    report = json.loads(out.read_text())
    assert report["reduced"] is True and report["mode"].startswith("reduced")
    machine = report["machine"]
    assert machine["cpu_count"] == os.cpu_count() and machine["torch"] == torch.__version__
    assert (machine["gpu"] is None) == (not torch.cuda.is_available())
    sections = report["sections"]
    assert all(sections[name]["ok"] for name in ("clips", "checks", "extraction", "training")), {
        k: v.get("error") for k, v in sections.items()}

    checks = sections["checks"]["figures"]
    assert checks["batch_independence"]["ok"] and checks["batch_independence"]["max_abs_diff"] == 0.0
    (deviation,) = checks["bf16_vs_fp32_generated"]["relative_l2"].values()
    assert 0 < deviation < gpucheck.BF16_TOLERANCE and checks["bf16_vs_fp32_generated"]["ok"]
    assert "skipped" in checks["bf16_vs_fp32_media"]
    if not torch.cuda.is_available():
        assert "skipped" in checks["resident_vs_cpu"]

    ext = sections["extraction"]["figures"]
    assert (ext["videos"], ext["frames_per_video"], ext["decode_failed"]) == (2, 10, 0)
    assert min(ext["vgg19_frames_per_s"], ext["decode_videos_per_s"], ext["end_to_end_videos_per_s"]) > 0
    bound = min(ext["vgg19_frames_per_s"] / ext["frames_per_video"], ext["decode_videos_per_s"])
    assert ext["ratio_to_bound"] == pytest.approx(ext["end_to_end_videos_per_s"] / bound)

    train = sections["training"]["figures"]
    head = train["heads"]["a+v-att"]
    assert "error" not in head, head.get("traceback")
    assert head["epoch_s"] > 0 and head["reference_loop"]["epoch_s"] > 0
    assert head["schedule_s"] == pytest.approx(train["load_s"] + head["schedule_epochs"] * (head["epoch_s"] + head["eval_s"]))
    assert head["schedule_speedup"] == pytest.approx(head["reference_loop"]["schedule_s"] / head["schedule_s"])
    assert all(t["met"] is None and "reduced" in t["note"] for t in report["targets"])
    assert "(reduced mode) | training a+v-att (300 epochs)" in report["markdown"]


def test_a_failing_or_overrunning_part_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    clip = tmp_path / "clip.mp4"
    monkeypatch.setattr("extract.bench.make_bench_clips", lambda *a, **k: [clip])

    def slow(*args):
        args[-1]["first"] = 1.5  # measured before the time ran out: kept
        time.sleep(5)
        return {"never": True}

    def broken(*args):
        raise RuntimeError("no cuDNN here")

    monkeypatch.setattr(gpucheck, "run_checks", slow)
    monkeypatch.setattr(gpucheck, "run_extraction_bench", broken)
    monkeypatch.setattr(gpucheck, "run_training_bench", lambda *a: {"heads": {"dmrn": {"schedule_s": 42.0}}})
    plan = dataclasses.replace(gpucheck.reduced_plan(), limits={"machine": 60, "checks": 1, "extraction": 60, "training": 60})
    report = gpucheck.run_gpucheck(tmp_path / "g.json", tmp_path / "w", device="cpu", plan=plan)
    sections = report["sections"]
    assert sections["checks"]["seconds"] < 4.5  # stopped at its limit of 1 s, not after its 5-s sleep
    assert not sections["checks"]["ok"] and "limit of 1 s" in sections["checks"]["error"]
    assert sections["checks"]["figures"] == {"first": 1.5}
    assert not sections["extraction"]["ok"] and sections["extraction"]["error"] == "RuntimeError: no cuDNN here"
    assert sections["training"]["ok"] and sections["training"]["figures"]["heads"]["dmrn"]["schedule_s"] == 42.0
    saved = json.loads((tmp_path / "g.json").read_text())
    assert saved["sections"]["extraction"]["error"] == "RuntimeError: no cuDNN here" and "finished" in saved
    schedule = next(t for t in saved["targets"] if t["name"].startswith("dmrn full schedule"))
    assert schedule["value"] == 42.0


def test_the_resident_check_runs_its_code_on_the_cpu(tmp_path):
    """On a GPU it compares CUDA with the CPU; here CPU with CPU, which must agree exactly."""
    result = gpucheck.check_resident_matches_cpu(tmp_path, "cpu", rows=100, epochs=1, seeds=(0, 1), head="a")
    assert result["ok"] and result["mean_difference"] == 0.0
    assert result["test_accuracy"]["cpu"] == result["test_accuracy"]["device"]
    assert len(result["test_accuracy"]["cpu"]) == 2 and all(0 <= a <= 1 for a in result["test_accuracy"]["cpu"])


def test_the_training_part_runs_a_whole_schedule_when_it_fits(tmp_path):
    """The full mode's path (here with the 3-epoch test head): timed epochs, the whole schedule
    run with fit, the h5 loop, the extrapolations."""
    from train_testutils import TEST_HEAD, registered_test_head

    plan = dataclasses.replace(gpucheck.reduced_plan(), rows=100, heads=(TEST_HEAD,), full_schedule=True)
    figures: dict = {}
    with registered_test_head():
        gpucheck.run_training_bench(plan, "cpu", tmp_path, time.perf_counter() + 600, figures)
    head = figures["heads"][TEST_HEAD]
    assert "error" not in head, head.get("traceback")
    assert head["schedule_epochs"] == 3 and head["batch_size"] == 8  # the head's own schedule
    assert head["full_schedule_fit_s"] > 0 and 0 <= head["full_schedule_test_accuracy"] <= 1
    assert head["full_schedule_measured_s"] == pytest.approx(figures["load_s"] + head["full_schedule_fit_s"])
    ref = head["reference_loop"]
    assert ref["schedule_s"] == pytest.approx(ref["load_s"] + 3 * ref["epoch_s"] + 1 * ref["eval_s"])  # evaluations every 5 epochs
    assert figures["train_samples"] == 80
