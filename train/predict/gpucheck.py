"""``avel-train gpucheck``: one command that measures the GPU path and writes every figure to one
JSON file (also ``python -m train.predict.gpucheck``).

A GPU is lent only now and then, for minutes; whoever has one runs this from a fresh clone
(``pip install -e .``) and gets the figures. It generates everything it needs and runs, each part
under its own time limit (an error or a time-out is recorded in the JSON and the next part runs):

1. **machine**: GPU name and memory, CUDA / cuDNN / torch versions, CPU model and count, load.
2. **checks** (the functions behind the tests marked ``gpu``, tests/test_gpu.py):
   ``batch_independence`` (a video's VGG-19 rows do not depend on the other videos of its batch,
   under cuDNN at the configured precision), ``bf16_vs_fp32`` (relative L2 between bf16 and fp32
   VGG-19 rows of generated clips, and of ../shared/media when present), ``resident_vs_cpu``
   (training on the device gives the CPU's test accuracy within seed noise).
3. **extraction** (:mod:`extract.bench` on generated 10-s 640x360 clips): VGG-19 frames/s at the
   configured precision (and at fp32), decode videos/s on all cores, end-to-end videos/s and its
   ratio to the slower bound (target >= 0.9).
4. **training** (:mod:`train.bench` on an AVE-sized synthetic store, 4143 videos): seconds per
   epoch and per full schedule for ``dmrn``, ``a+v-att`` and ``cmbs`` with this trainer, next to a
   per-batch h5 loop like the reference's on the same machine; DMRN's whole schedule is also run
   for real (target: < 60 s on one H100, >= 10x the h5 loop).

Without CUDA it runs a reduced mode (fewer and smaller clips, 1 frame per segment, a small store,
one timed epoch; the CUDA-only check is skipped) and says so in the JSON and on stdout. The full
mode is sized to finish in under 8 minutes on one H100 box (16 cores).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import logging
import math
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import numpy as np
import torch

log = logging.getLogger(__name__)

SCHEMA = 1
SECTIONS = ("machine", "checks", "extraction", "training")
HEADS = ("dmrn", "a+v-att", "cmbs")
#: targets of issue 27 (GPU): extraction end to end / slower bound; DMRN schedule seconds; speed-up
E2E_TARGET, DMRN_SCHEDULE_TARGET_S, SPEEDUP_TARGET = 0.9, 60.0, 10.0
#: bf16 rows farther than this from fp32 (relative L2) fail the check (measured on a CPU: ~0.007)
BF16_TOLERANCE = 0.05


@dataclasses.dataclass
class Plan:
    """The sizes of one run (recorded in the JSON)."""

    reduced: bool
    #: distinct clips rendered, and videos extracted in the benchmark (the clips repeated)
    clips: int = 32
    videos: int = 256
    clip_size: tuple[int, int] = (360, 640)  # height, width
    clip_fps: int = 30
    frames_per_segment: int = 16
    image_size: int = 224
    batch_frames: int = 128
    vgg_seconds: float = 8.0
    #: rows of the synthetic training store (AVE: 4143)
    rows: int = 4143
    heads: tuple[str, ...] = HEADS
    timed_epochs: int = 3
    reference_epochs: int = 2
    #: run the first head's whole schedule with fit (when the budget allows)
    full_schedule: bool = True
    #: resident-vs-CPU check: store rows, epochs, seeds
    check_rows: int = 400
    check_epochs: int = 8
    check_seeds: tuple[int, ...] = (0, 1, 2)
    #: seconds each section may take
    limits: dict[str, float] = dataclasses.field(default_factory=lambda: {
        "machine": 60, "checks": 150, "extraction": 150, "training": 300})


def full_plan() -> Plan:
    return Plan(reduced=False)


def reduced_plan() -> Plan:
    """A CPU-sized run: the same steps, small enough for a 2-core machine in a few minutes (158
    videos: 128 training samples, two whole batches of 64 for both trainers)."""
    return Plan(reduced=True, clips=2, videos=4, frames_per_segment=1, image_size=112, batch_frames=16, vgg_seconds=2.0, rows=158,
                timed_epochs=1, reference_epochs=1, full_schedule=False, check_rows=60, check_epochs=2, check_seeds=(0,),
                limits={"machine": 60, "checks": 300, "extraction": 300, "training": 600})


# ---------------------------------------------------------------------------------------------
# running sections: each under a time limit, errors recorded


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise :class:`SectionTimeout` in the main thread after ``seconds`` (SIGALRM; elsewhere no limit)."""
    usable = hasattr(signal, "SIGALRM") and seconds > 0 and _main_thread()
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise SectionTimeout(f"stopped after its limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def run_section(name: str, fn: Callable[[dict], dict | None], limit: float) -> dict[str, Any]:
    """``{"ok", "seconds", "figures", "error", "traceback"}`` of ``fn(figures)`` under ``limit``
    seconds. ``fn`` fills ``figures`` as it goes (and may return more of them), so a part that
    fails or runs out of time keeps what it measured before."""
    started = time.perf_counter()
    log.info("gpucheck: %s (limit %.0f s)", name, limit)
    figures: dict[str, Any] = {}
    try:
        with time_limit(limit), torch_flags_kept():
            figures.update(fn(figures) or {})
        out: dict[str, Any] = {"ok": True, "figures": figures}
    except (Exception, SectionTimeout) as exc:  # noqa: BLE001 - recorded, the next section runs
        log.warning("gpucheck: %s failed: %s: %s", name, type(exc).__name__, exc)
        out = {"ok": False, "figures": figures, "error": f"{type(exc).__name__}: {exc}",
               "traceback": traceback.format_exc()[-3000:]}
    out["seconds"] = round(time.perf_counter() - started, 2)
    return out


@contextlib.contextmanager
def torch_flags_kept():
    """Restore torch's global determinism and cuDNN flags afterwards: training seeds set
    deterministic kernels on CUDA (as every avel-train run does), which must not slow down the
    extraction figures of the next part (avel-extract never sets them)."""
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def _cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device) -> None:
    if _cuda(device):
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# 1. machine


def machine_info(device: str) -> dict[str, Any]:
    """GPU (name, memory, capability), CUDA/cuDNN/torch versions, CPU model and count, load."""
    from extract.provenance import package_versions

    info: dict[str, Any] = {
        "device": device,
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_gb": _memory_gb(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "versions": package_versions(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                       "capability": f"{props.major}.{props.minor}", "count": torch.cuda.device_count(),
                       "tf32_conv": torch.backends.cudnn.allow_tf32, "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    else:
        info["gpu"] = None
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def machine_label(info: dict[str, Any]) -> str:
    gpu = info.get("gpu")
    head = f"{gpu['name']}" if gpu else "no GPU"
    return f"{head}, {info.get('cpu_count')} CPU cores ({info.get('cpu')}), torch {info.get('torch')}, CUDA {info.get('cuda')}"


# ---------------------------------------------------------------------------------------------
# 2. checks (also run by tests/test_gpu.py)


def _extract_config(device: str, precision: str = "auto", image_size: int = 224, frames_per_segment: int = 16,
                    batch_frames: int = 16, segments: int = 10):
    from extract.config import ExtractConfig

    return ExtractConfig(segments=segments, frames_per_segment=frames_per_segment, image_size=image_size,
                         visual_weights="random", audio_weights="random", precision=precision, device=device,
                         batch_frames=batch_frames, extractors=["vgg19"])


def check_batch_independence(device: str, image_size: int = 224, batch_frames: int = 16, seed: int = 0) -> dict[str, Any]:
    """VGG-19 rows (random weights, ``extract.precision: auto``) of three videos computed alone,
    together and in reverse order: with fixed zero-padded chunks a row must not depend on the
    other videos of its batch. ``ok`` = the stored rows are identical."""
    from extract.extractors import DecodedVideo, VGG19Extractor

    cfg = _extract_config(device, image_size=image_size, frames_per_segment=4, batch_frames=batch_frames, segments=2)
    vgg = VGG19Extractor(cfg, device)
    rng = np.random.default_rng(seed)
    grid = vgg.frame_grid.name
    videos = []
    for v, invalid in enumerate((0, 3, 1)):
        frames = rng.integers(0, 256, (2, 4, image_size, image_size, 3), dtype=np.uint8)
        valid = np.ones((2, 4), bool)
        valid.reshape(-1)[:invalid] = False
        videos.append(DecodedVideo(key=f"v{v}", frames={grid: frames}, frame_valid={grid: valid}, audio=None))
    alone = [vgg.compute([video])[0]["visual"] for video in videos]
    together = [row["visual"] for row in vgg.compute(videos)]
    reverse = [row["visual"] for row in vgg.compute(videos[::-1])][::-1]
    diffs = [float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max()) for a, b in zip(alone * 2, together + reverse)]
    return {"ok": max(diffs) == 0.0, "max_abs_diff": max(diffs), "precision": vgg.precision, "device": device,
            "cudnn_benchmark": torch.backends.cudnn.benchmark, "cudnn_deterministic": torch.backends.cudnn.deterministic,
            "batch_frames": batch_frames, "image_size": image_size}


def relative_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b|| in float64 (0 when both are zero)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norm = np.linalg.norm(b)
    return float(np.linalg.norm(a - b) / norm) if norm > 0 else float(np.linalg.norm(a))


def check_precision_deviation(clips: Sequence[str | Path], device: str, frames_per_segment: int = 16,
                              image_size: int = 224, batch_frames: int = 64, low: str = "bf16") -> dict[str, Any]:
    """Relative L2 between the VGG-19 rows (random weights, seed 0) of each clip computed at
    ``low`` precision and at fp32 on ``device``; clips that cannot be decoded are listed.
    ``ok`` = every deviation is below :data:`BF16_TOLERANCE` and non-zero (the low path ran)."""
    from extract.decode import DecodeError, VideoRequest, decode_video
    from extract.extractors import VGG19Extractor

    nets = {p: VGG19Extractor(_extract_config(device, p, image_size, frames_per_segment, batch_frames), device)
            for p in ("fp32", low)}
    grid = nets["fp32"].frame_grid
    per_clip, failed = {}, {}
    for path in clips:
        try:
            video = decode_video(VideoRequest(Path(path).stem, str(path)), [grid], 10, audio=False)
        except DecodeError as exc:
            failed[Path(path).name] = str(exc)
            continue
        rows = {p: net.compute([video])[0] for p, net in nets.items()}
        keep = rows["fp32"]["vgg19_valid"]
        if not keep.any():
            failed[Path(path).name] = "no segment with enough frames in the first 10 s"
            continue
        per_clip[Path(path).name] = relative_l2(rows[low]["visual"][keep], rows["fp32"]["visual"][keep])
    values = list(per_clip.values())
    return {"ok": bool(values) and all(0 < v < BF16_TOLERANCE for v in values), "relative_l2": per_clip,
            "max": max(values) if values else None, "mean": float(np.mean(values)) if values else None,
            "not_used": failed, "precision": nets[low].precision, "device": device,
            "frames_per_segment": frames_per_segment, "image_size": image_size, "tolerance": BF16_TOLERANCE}


def check_resident_matches_cpu(workdir: str | Path, device: str, rows: int = 400, epochs: int = 8,
                               seeds: Sequence[int] = (0, 1, 2), head: str = "dmrn") -> dict[str, Any]:
    """Train ``head`` on a synthetic store on the CPU and resident on ``device``, the same seeds:
    test accuracies, and ``ok`` when the difference of the means is within seed noise
    (2 standard errors of the difference, at least 0.02)."""
    from ..bench import make_synthetic
    from ..data import load_task_data
    from ..loop import fit, resolve_schedule, seed_everything
    from ..registry import get_head
    from ..tasks.avel_task import AvelTask

    paths = make_synthetic(Path(workdir) / "resident", rows)
    manifests = {k: paths["manifests"][k] for k in ("train", "val", "test")}
    cfg = _train_config()
    accuracies: dict[str, list[float]] = {"cpu": [], "device": []}
    first_loss: dict[str, list[float]] = {"cpu": [], "device": []}
    for role, where in (("cpu", "cpu"), ("device", device)):
        data = load_task_data(paths["store"], manifests, device=where)
        for seed in seeds:
            seed_everything(seed, where)
            model = get_head(head)(num_classes=data.num_classes, setting="supervised").to(where)
            schedule = dataclasses.replace(resolve_schedule(cfg, type(model)), epochs=epochs)
            result = fit(model, AvelTask(data, cfg), schedule, seed)
            accuracies[role].append(result.results["test"].accuracy)
            first_loss[role].append(result.epochs[0]["train_loss"])
        del data
    cpu, dev = np.asarray(accuracies["cpu"]), np.asarray(accuracies["device"])
    n = len(seeds)
    noise = 2 * math.sqrt((cpu.var(ddof=1) + dev.var(ddof=1)) / n) if n > 1 else 0.0
    allowed = max(noise, 0.02)
    diff = float(abs(cpu.mean() - dev.mean()))
    return {"ok": diff <= allowed, "head": head, "rows": rows, "epochs": epochs, "seeds": list(seeds),
            "test_accuracy": accuracies, "first_epoch_train_loss": first_loss, "mean_difference": diff,
            "allowed": allowed, "device": device}


def _train_config():
    from extract.core.settings import load_pipeline

    return load_pipeline(search=False).train


def run_checks(plan: Plan, device: str, workdir: Path, clips: Sequence[Path], out: dict[str, Any]) -> None:
    """The checks, one after the other, into ``out``."""
    size = plan.image_size if not plan.reduced else min(plan.image_size, 64)
    out["batch_independence"] = _guard(lambda: check_batch_independence(device, image_size=size))
    media = _shared_media()
    out["bf16_vs_fp32_generated"] = _guard(lambda: check_precision_deviation(
        clips[:4], device, plan.frames_per_segment, plan.image_size, plan.batch_frames))
    if media:
        out["bf16_vs_fp32_media"] = _guard(lambda: check_precision_deviation(
            media, device, plan.frames_per_segment, plan.image_size, plan.batch_frames))
    else:
        out["bf16_vs_fp32_media"] = {"skipped": "../shared/media is absent on this machine"}
    if _cuda(device):
        out["resident_vs_cpu"] = _guard(lambda: check_resident_matches_cpu(
            workdir, device, plan.check_rows, plan.check_epochs, plan.check_seeds))
    else:
        out["resident_vs_cpu"] = {"skipped": "needs a CUDA device (reduced mode)"}


def _guard(fn: Callable[[], dict]) -> dict[str, Any]:
    """One check: its result, or the error (the next check runs)."""
    started = time.perf_counter()
    try:
        result = fn()
    except SectionTimeout:
        raise
    except Exception as exc:  # noqa: BLE001 - recorded
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]}
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _shared_media() -> list[Path]:
    """The clips of ../shared/media (beside the checkout, or $AVEL_SHARED/media), if present."""
    root = Path(os.environ.get("AVEL_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "media"
    if not root.is_dir():
        return []
    from extract.bench import VIDEO_EXTENSIONS

    return sorted(p for p in root.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS and p.name != "corrupted.mp4")


# ---------------------------------------------------------------------------------------------
# 3. extraction


def run_extraction_bench(plan: Plan, device: str, clips: Sequence[Path], workdir: Path, figures: dict[str, Any]) -> None:
    """:func:`extract.bench.run_benchmark` on the clips (repeated to ``plan.videos``), plus VGG-19
    at fp32 for the speed-up of the configured precision."""
    from extract.bench import bench_vgg19, run_benchmark
    from extract.extractors import VGG19Extractor
    from extract.core.settings import load_pipeline

    extract = {"visual_weights": "random", "audio_weights": "random", "device": device, "precision": "auto",
               "frames_per_segment": plan.frames_per_segment, "image_size": plan.image_size,
               "batch_frames": plan.batch_frames}
    pipeline = load_pipeline(None, {"extract": extract, "store": {"rows_per_shard": 16 if not plan.reduced else 2},
                                    "data": {"root": str(workdir)}}, search=False)
    videos = [clips[i % len(clips)] for i in range(plan.videos)]
    result = run_benchmark(pipeline, videos, vgg_seconds=plan.vgg_seconds)
    figures.update({
        "precision": result.precision, "clips": len(clips), "videos": result.clips,
        "clip": f"{plan.clip_size[1]}x{plan.clip_size[0]}, {plan.clip_fps} fps, 10 s",
        "frames_per_video": result.frames_per_video, "image_size": plan.image_size, "batch_frames": plan.batch_frames,
        "decode_workers": result.workers,
        "vgg19_frames_per_s": result.vgg_frames_per_s, "vgg19_videos_per_s": result.vgg_videos_per_s,
        "decode_videos_per_s": result.decode_videos_per_s, "decode_failed": result.decode_failed,
        "end_to_end_videos_per_s": result.end_to_end_videos_per_s, "bound_videos_per_s": result.bound,
        "ratio_to_bound": result.ratio, "text": result.text(),
    })
    if result.precision != "fp32":
        fp32 = VGG19Extractor(dataclasses.replace(pipeline.extract, precision="fp32"), device)
        figures["vgg19_fp32_frames_per_s"] = bench_vgg19(fp32, plan.vgg_seconds / 2)
        del fp32


# ---------------------------------------------------------------------------------------------
# 4. training


def run_training_bench(plan: Plan, device: str, workdir: Path, deadline: float, figures: dict[str, Any]) -> None:
    """Seconds per epoch / full schedule of each head with this trainer (store loaded once,
    resident on ``device``) and with the per-batch h5 loop (:func:`train.bench.time_reference_loop`);
    the first head's whole schedule run with :func:`train.loop.fit` when the time allows."""
    from ..bench import REF_EVAL_EVERY, make_synthetic, time_reference_loop
    from ..data import load_task_data
    from ..loop import fit, make_optimizer, resolve_schedule, seed_everything, train_epoch
    from ..registry import get_head
    from ..tasks.avel_task import AvelTask

    dev = torch.device(device)
    started = time.perf_counter()
    paths = make_synthetic(workdir / "ave-sized", plan.rows)
    figures.update({"rows": plan.rows, "train_samples": paths["sizes"]["train"],
                    "store_seconds": round(time.perf_counter() - started, 2), "heads": {}})
    manifests = {k: paths["manifests"][k] for k in ("train", "val", "test")}
    _sync(dev)
    t0 = time.perf_counter()
    data = load_task_data(paths["store"], manifests, device=dev)
    _sync(dev)
    figures["load_s"] = load_s = time.perf_counter() - t0
    cfg = _train_config()
    for number, head in enumerate(plan.heads):
        entry: dict[str, Any] = {}
        figures["heads"][head] = entry
        try:
            seed_everything(0, dev)
            model = get_head(head)(num_classes=data.num_classes, setting="supervised").to(dev)
            schedule = resolve_schedule(cfg, type(model))
            optimizer, _ = make_optimizer(model, schedule)
            task = AvelTask(data, cfg)
            gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
            epoch_s, eval_s = [], []
            for epoch in range(plan.timed_epochs + 1):  # the first is a warm-up
                _sync(dev)
                t0 = time.perf_counter()
                row = train_epoch(model, optimizer, task, schedule.batch_size, gen, rng, epoch + 1, schedule.grad_clip)
                _sync(dev)
                t1 = time.perf_counter()
                task.evaluate(model, "val")
                _sync(dev)
                if epoch:
                    epoch_s.append(t1 - t0)
                    eval_s.append(time.perf_counter() - t1)
            per_epoch = float(np.median(epoch_s)) + float(np.median(eval_s))
            entry.update({"schedule_epochs": schedule.epochs, "batch_size": schedule.batch_size,
                          "samples_per_epoch": len(data.splits["train"]),
                          "epoch_s": float(np.median(epoch_s)), "eval_s": float(np.median(eval_s)),
                          "last_train_loss": row["train_loss"],
                          "schedule_s": load_s + schedule.epochs * per_epoch})
            if plan.full_schedule and number == 0:
                needed = schedule.epochs * per_epoch * 1.3 + 10
                if time.perf_counter() + needed < deadline:
                    seed_everything(0, dev)
                    model = get_head(head)(num_classes=data.num_classes, setting="supervised").to(dev)
                    result = fit(model, AvelTask(data, cfg), schedule, 0)
                    entry["full_schedule_measured_s"] = load_s + result.train_seconds
                    entry["full_schedule_fit_s"] = result.train_seconds
                    entry["full_schedule_test_accuracy"] = result.results["test"].accuracy
                else:
                    entry["full_schedule_measured_s"] = None
                    entry["full_schedule_note"] = f"not run: about {needed:.0f} s needed, the time limit is nearer"
            ref = time_reference_loop(paths, head, dev, plan.reference_epochs, schedule.batch_size)
            ref_schedule = (ref["load_s"] + schedule.epochs * ref["epoch_s"]
                            + math.ceil(schedule.epochs / REF_EVAL_EVERY) * ref["eval_s"])
            entry["reference_loop"] = {"load_s": ref["load_s"], "epoch_s": ref["epoch_s"], "eval_s": ref["eval_s"],
                                       "data_epoch_s": ref["data_epoch_s"], "schedule_s": ref_schedule,
                                       # the reference drops the last partial batch of an epoch
                                       "samples_per_epoch": len(data.splits["train"]) // schedule.batch_size * schedule.batch_size}
            entry["schedule_speedup"] = ref_schedule / entry["schedule_s"]
            entry["epoch_speedup"] = ref["epoch_s"] / entry["epoch_s"]
        except (Exception, SectionTimeout) as exc:  # noqa: BLE001 - recorded, the next head runs
            entry["error"] = f"{type(exc).__name__}: {exc}"
            entry["traceback"] = traceback.format_exc()[-2000:]
            if isinstance(exc, SectionTimeout):
                raise
        finally:
            if _cuda(dev):
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# the command


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets with this run's values (``met`` None when not measured)."""
    ext = report["sections"].get("extraction", {}).get("figures") or {}
    heads = (report["sections"].get("training", {}).get("figures") or {}).get("heads", {})
    dmrn = heads.get("dmrn", {})
    schedule = dmrn.get("full_schedule_measured_s") or dmrn.get("schedule_s")

    reduced = report.get("reduced")

    def entry(name, value, target, met):
        out = {"name": name, "value": value, "target": target, "met": None if value is None or reduced else bool(met)}
        if reduced:
            out["note"] = "reduced mode: the targets are for a GPU run"
        return out

    ratio = ext.get("ratio_to_bound")
    speedup = dmrn.get("schedule_speedup")
    return [
        entry("extraction end to end / slower bound", ratio, f">= {E2E_TARGET}", ratio is not None and ratio >= E2E_TARGET),
        entry("dmrn full schedule, seconds", schedule, f"< {DMRN_SCHEDULE_TARGET_S:.0f} s",
              schedule is not None and schedule < DMRN_SCHEDULE_TARGET_S),
        entry("dmrn schedule speed-up over the per-batch h5 loop", speedup, f">= {SPEEDUP_TARGET:.0f}x",
              speedup is not None and speedup >= SPEEDUP_TARGET),
    ]


def markdown_rows(report: dict[str, Any]) -> str:
    """The rows of docs/benchmarks.md's gpucheck table for this run."""
    machine = report["machine_label"] + (" (reduced mode)" if report["reduced"] else "")
    ext = report["sections"].get("extraction", {}).get("figures") or {}
    heads = (report["sections"].get("training", {}).get("figures") or {}).get("heads", {})

    def num(value, digits=3):
        return "-" if value is None else f"{value:.{digits}g}"

    lines = []
    if ext:
        lines.append(f"| {machine} | extraction ({ext.get('precision')}, {ext.get('frames_per_video')} frames/video) "
                     f"| VGG-19 {num(ext.get('vgg19_frames_per_s'))} frames/s"
                     + (f" (fp32 {num(ext['vgg19_fp32_frames_per_s'])})" if ext.get("vgg19_fp32_frames_per_s") else "") + "; "
                     f"decode {num(ext.get('decode_videos_per_s'))} videos/s | {num(ext.get('end_to_end_videos_per_s'))} videos/s "
                     f"| {num(ext.get('ratio_to_bound'))} x bound |")
    for head, h in heads.items():
        if "epoch_s" not in h:
            lines.append(f"| {machine} | training {head} | error: {h.get('error', '?')} | | |")
            continue
        ref = h.get("reference_loop", {})
        measured = h.get("full_schedule_measured_s")
        lines.append(f"| {machine} | training {head} ({h['schedule_epochs']} epochs) | {num(h['epoch_s'])} s/epoch + "
                     f"{num(h['eval_s'])} s eval; h5 loop {num(ref.get('epoch_s'))} s/epoch | schedule "
                     f"{num(h['schedule_s'])} s" + (f" (run: {num(measured)} s)" if measured else "")
                     + f"; h5 loop {num(ref.get('schedule_s'))} s | {num(h.get('schedule_speedup'))}x |")
    return "\n".join(lines)


def summary_text(report: dict[str, Any]) -> str:
    lines = [f"avel gpucheck: {report['machine_label']}",
             f"mode: {report['mode']}; {report['wall_s']:.0f} s; JSON: {report['out']}"]
    for name in SECTIONS[1:]:
        sec = report["sections"].get(name)
        if sec is None:
            continue
        state = "ok" if sec["ok"] else f"FAILED ({sec.get('error')})"
        lines.append(f"- {name}: {state}, {sec['seconds']:.0f} s")
        if name == "checks":
            for check, res in (sec.get("figures") or {}).items():
                if "skipped" in res:
                    lines.append(f"    {check}: skipped ({res['skipped']})")
                else:
                    detail = {k: res.get(k) for k in ("max_abs_diff", "max", "mean_difference", "allowed") if k in res}
                    lines.append(f"    {check}: {'ok' if res.get('ok') else 'FAILED'} {detail}"
                                 + (f" {res['error']}" if "error" in res else ""))
        if name == "extraction" and "text" in (sec.get("figures") or {}):
            lines += ["    " + line for line in sec["figures"]["text"].splitlines()]
    lines.append("targets:")
    for t in report["targets"]:
        state = t.get("note") or "not measured" if t["met"] is None else ("met" if t["met"] else "NOT met")
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        lines.append(f"    {t['name']}: {value} (target {t['target']}): {state}")
    lines += ["docs/benchmarks.md rows:", report["markdown"]]
    return "\n".join(lines)


#: seconds for a whole run: full (one H100 box: < 8 minutes), reduced (a small CPU)
BUDGET_S = {"full": 450.0, "reduced": 900.0}


def run_gpucheck(out: str | Path, workdir: str | Path, *, device: str = "auto", plan: Plan | None = None,
                 sections: Sequence[str] = SECTIONS, budget_s: float | None = None) -> dict[str, Any]:
    """Run the sections, writing the JSON to ``out`` after each one; returns the report.
    ``budget_s`` default: :data:`BUDGET_S` of the plan's mode."""
    from extract.core.devices import resolve_device

    started, wall = time.perf_counter(), _dt.datetime.now(_dt.timezone.utc)
    device = resolve_device(device)
    if plan is None:
        plan = full_plan() if _cuda(device) else reduced_plan()
    out, workdir = Path(out), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if budget_s is None:
        budget_s = BUDGET_S["reduced" if plan.reduced else "full"]
    deadline = started + budget_s
    mode = ("full" if not plan.reduced else
            "reduced (" + ("no CUDA device here: " if not _cuda(device) else "") + "fewer and smaller clips, 1 frame per "
            "segment at 112 x 112, a small store; not the GPU figures)")
    report: dict[str, Any] = {"avel_gpucheck": SCHEMA, "command": sys.argv, "started": wall.isoformat(timespec="seconds"),
                              "device": device, "reduced": plan.reduced, "mode": mode, "budget_s": budget_s,
                              "plan": dataclasses.asdict(plan), "sections": {}, "out": str(out)}
    info = machine_info(device)
    report["machine"], report["machine_label"] = info, machine_label(info)

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        report["targets"] = targets(report)
        report["markdown"] = markdown_rows(report)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        os.replace(tmp, out)

    save()
    clips: list[Path] = []
    if {"checks", "extraction"} & set(sections):
        from extract.bench import make_bench_clips

        clip_section = run_section("clips", lambda figures: {"paths": [str(p) for p in make_bench_clips(
            workdir / "clips", plan.clips, plan.clip_size, plan.clip_fps)]}, plan.limits.get("clips", 180))
        report["sections"]["clips"] = clip_section
        clips = [Path(p) for p in (clip_section.get("figures") or {}).get("paths", [])]
        save()
    steps = {
        "checks": lambda figures: run_checks(plan, device, workdir, clips, figures),
        "extraction": lambda figures: run_extraction_bench(plan, device, clips, workdir, figures),
        "training": lambda figures: run_training_bench(plan, device, workdir, deadline, figures),
    }
    for name in SECTIONS[1:]:
        if name not in sections:
            continue
        left = deadline - time.perf_counter()
        if left < 5:
            report["sections"][name] = {"ok": False, "error": f"not run: the budget of {budget_s:.0f} s is spent", "seconds": 0}
        elif name in ("checks", "extraction") and not clips:
            report["sections"][name] = {"ok": False, "error": "not run: no clips (see sections.clips)", "seconds": 0}
        else:
            report["sections"][name] = run_section(name, steps[name], min(plan.limits[name], left))
        save()
    report["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    save()
    return report


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.ndarray,)):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    return str(value)


@click.command("gpucheck")
@click.option("--out", type=click.Path(dir_okay=False), default="json", show_default=True, help="The JSON file with every figure (rewritten after each part, so a run that is cut short keeps what it measured).")
@click.option("--workdir", type=click.Path(file_okay=False), default="/tmp/avel-gpucheck", show_default=True, help="Where the generated clips and synthetic stores are made (kept and reused by the next run).")
@click.option("--device", default="auto", show_default=True, help="auto (cuda when there is one), cuda, cuda:N, cpu.")
@click.option("--reduced/--full", "reduced", default=None, help="Reduced mode (2 clips, 1 frame per segment at 112 x 112, a 158-video store, one timed epoch) or the full GPU sizes. Default: full on CUDA, reduced without.")
@click.option("--only", default=None, metavar="PARTS", help="Comma list of the parts to run: checks, extraction, training (default: all).")
@click.option("--budget", type=click.FloatRange(min=10), default=None, help="Seconds for the whole run (default 450 full, 900 reduced); a part that would start past it is recorded as not run, a part is stopped at it, and the whole DMRN schedule is only run if it fits.")
@click.option("--clips", type=click.IntRange(min=1), default=None, help="Distinct clips to render (full: 32, reduced: 2).")
@click.option("--videos", type=click.IntRange(min=1), default=None, help="Videos extracted per extraction figure, the clips repeated (full: 256, reduced: 4).")
@click.option("--clip-size", default=None, metavar="WxH", help="Frame size of the generated 10-s clips (default 640x360, AVE's).")
@click.option("--frames-per-segment", type=click.IntRange(min=1), default=None, help="VGG-19 frames per 1-s segment (full: 16, AVE's; reduced: 1).")
@click.option("--image-size", type=click.IntRange(min=32), default=None, help="VGG-19 input side (full: 224; reduced: 112).")
@click.option("--rows", type=click.IntRange(min=100), default=None, help="Videos in the synthetic training store (full: 4143, AVE's; reduced: 158; at least 100, so that the h5 loop has a batch of 64).")
@click.option("--heads", default=None, help="Comma list of the heads to time (default: dmrn,a+v-att,cmbs).")
@click.pass_obj
def command(obj, out, workdir, device, reduced, only, budget, clips, videos, clip_size, frames_per_segment,
            image_size, rows, heads):
    """Measure the GPU path in one command and write every figure to one JSON file.

    \b
    1. machine: GPU, CUDA/cuDNN/torch versions, CPU model and cores, load
    2. checks (the tests marked gpu): VGG-19 rows do not depend on their batch under cuDNN; bf16
       against fp32 on generated clips and ../shared/media (when present); training resident on
       the GPU gives the CPU's accuracy within seed noise (CUDA only)
    3. extraction on generated 10-s 640x360 clips: VGG-19 frames/s at extract.precision auto (and
       fp32), decode videos/s on all cores, end-to-end videos/s and its ratio to the slower bound
       (target >= 0.9)
    4. training on an AVE-sized synthetic store: seconds per epoch and per schedule of dmrn,
       a+v-att and cmbs, next to a per-batch h5 loop like the reference's; DMRN's whole schedule
       run for real (targets: < 60 s, >= 10x the h5 loop)

    \b
    Every part runs under a time limit; an error is recorded in the JSON and the next part runs.
    Sized for < 8 minutes on one H100 box. Without CUDA it runs a reduced mode and says so.
    Example (a fresh clone on a GPU machine):
      pip install -e . && avel-train gpucheck --out json
    """
    from extract.core.clitools import setup_logging

    setup_logging((obj or {}).get("verbose", 0))
    plan = None
    if reduced is not None:
        plan = reduced_plan() if reduced else full_plan()
    else:
        from extract.core.devices import resolve_device

        plan = full_plan() if resolve_device(device).startswith("cuda") else reduced_plan()
    changes = {"clips": clips, "videos": videos, "frames_per_segment": frames_per_segment, "image_size": image_size, "rows": rows}
    plan = dataclasses.replace(plan, **{k: v for k, v in changes.items() if v is not None})
    if clip_size:
        try:
            width, height = (int(v) for v in clip_size.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"expected WxH, e.g. 640x360, got {clip_size!r}", param_hint="--clip-size") from None
        if width % 2 or height % 2:
            raise click.BadParameter("width and height must be even (H.264)", param_hint="--clip-size")
        plan = dataclasses.replace(plan, clip_size=(height, width))
    if heads:
        plan = dataclasses.replace(plan, heads=tuple(h.strip() for h in heads.split(",") if h.strip()))
    sections = SECTIONS
    if only:
        wanted = [p.strip() for p in only.split(",") if p.strip()]
        unknown = sorted(set(wanted) - set(SECTIONS[1:]))
        if unknown:
            raise click.BadParameter(f"unknown part(s) {unknown}; choose from {', '.join(SECTIONS[1:])}", param_hint="--only")
        sections = ("machine", *wanted)
    report = run_gpucheck(out, workdir, device=device, plan=plan, sections=sections, budget_s=budget)
    click.echo(summary_text(report))


def main(argv: Sequence[str] | None = None) -> None:  # pragma: no cover - python -m train.predict.gpucheck
    from ..cli import main as cli  # through avel-train: its -v and --config options, and its obj

    cli(["gpucheck", *(argv if argv is not None else sys.argv[1:])], prog_name="avel-train")


if __name__ == "__main__":  # pragma: no cover
    main()
