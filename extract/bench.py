"""``avel-extract bench``: is the extraction as fast as its slowest stage allows?

Three figures, measured in one run on the same machine and clips:

1. **VGG-19 only**: frames/s of :class:`~extract.extractors.VGG19Extractor` forwards (normalisation,
   host->device copy, pool5) on random uint8 frames of ``image_size``, ``batch_frames`` per
   forward, at the configured precision and device. Divided by ``segments * frames_per_segment``
   it gives the videos/s the network allows.
2. **decode only**: videos/s of the decode workers (``extract.decode_workers``, default all cores)
   doing exactly what a run does (frame sampling, one sorted pass, resize, audio), results
   discarded.
3. **end to end**: videos/s of a real :func:`extract.run.run_extraction` of the same clips into a
   fresh temporary store (steady state: from "decode workers started" to the end).

It prints the three figures, the bound ``min(VGG-bound videos/s, decode videos/s)`` and the ratio
end-to-end / bound (the target is >= 0.9: the other stage fully hidden). VGGish and the store
writes are not in the bound; on a CPU-only machine the networks and the decoders share the same
cores, so the bound cannot be reached there.
"""
from __future__ import annotations

import dataclasses
import glob
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .decode import DecodePool, Failure, VideoRequest, decode_video

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".flv")


@dataclasses.dataclass
class BenchResult:
    device: str
    precision: str
    clips: int
    frames_per_video: int
    vgg_frames_per_s: float
    decode_videos_per_s: float
    decode_failed: int
    end_to_end_videos_per_s: float
    workers: int

    @property
    def vgg_videos_per_s(self) -> float:
        return self.vgg_frames_per_s / self.frames_per_video

    @property
    def bound(self) -> float:
        return min(self.vgg_videos_per_s, self.decode_videos_per_s)

    @property
    def ratio(self) -> float:
        return self.end_to_end_videos_per_s / self.bound if self.bound > 0 else 0.0

    def text(self) -> str:
        return "\n".join([
            f"device {self.device}, precision {self.precision}, {self.workers} decode workers, "
            f"{self.clips} clips, {self.frames_per_video} frames per video",
            f"VGG-19 only:  {self.vgg_frames_per_s:.4g} frames/s = {self.vgg_videos_per_s:.4g} videos/s",
            f"decode only:  {self.decode_videos_per_s:.4g} videos/s" + (f" ({self.decode_failed} failed)" if self.decode_failed else ""),
            f"end to end:   {self.end_to_end_videos_per_s:.4g} videos/s",
            f"bound min(VGG, decode) = {self.bound:.4g} videos/s; end-to-end / bound = {self.ratio:.3f} (target >= 0.9)",
        ])


def find_clips(spec: str) -> list[Path]:
    """A folder (its video files, sorted) or a glob pattern -> clip paths; ValueError if none."""
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        clips = sorted(p for p in path.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
    else:
        clips = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec)))
    if not clips:
        raise ValueError(f"--clips {spec}: no video files there ({', '.join(VIDEO_EXTENSIONS)})")
    return clips


#: the benchmark clips: AVE's usual frame size (height, width) and rate
BENCH_CLIP_SIZE = (360, 640)
BENCH_CLIP_FPS = 30


def _write_bench_clip(job: tuple) -> str:
    """Render one demo scene (:mod:`extract.factories.demo`: textured background, moving shape, tones) at
    the benchmark size and encode it (runs in a worker process)."""
    from .factories.demo import SAMPLE_RATE, compensate_priming, render_audio, render_frames
    from .factories.media import write_clip

    video, seed, fps, size, path = job
    partial = Path(path).with_name(f".{Path(path).name}.partial.mp4")
    write_clip(partial, render_frames(video, seed, fps=fps, frame_size=size), fps=fps,
               audio=compensate_priming(render_audio(video, seed)), sample_rate=SAMPLE_RATE, crf=23)
    os.replace(partial, path)
    return str(path)


def make_bench_clips(folder: str | Path, count: int, frame_size: tuple[int, int] = BENCH_CLIP_SIZE,
                     fps: int = BENCH_CLIP_FPS, seed: int = 0, workers: int | None = None) -> list[Path]:
    """``count`` 10-s H.264/AAC clips of ``frame_size`` (height, width) at ``fps`` under ``folder``
    (the demo's scenes, :func:`extract.factories.demo.render_frames`), rendered in ``workers`` processes
    (default all cores); clips already there are kept. Returns their paths, sorted."""
    import concurrent.futures
    import multiprocessing

    from .factories.demo import plan_demo

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    height, width = frame_size
    plan = plan_demo(max(count, 15), seed, 0)[:count]
    paths = [folder / f"bench_{width}x{height}_{fps}fps_s{seed}_{i:03d}.mp4" for i in range(count)]
    jobs = [(video, seed, fps, (height, width), str(path)) for video, path in zip(plan, paths) if not path.exists()]
    if jobs:
        log.info("rendering %d benchmark clips (%dx%d, %d fps, 10 s) into %s", len(jobs), width, height, fps, folder)
        workers = max(1, min(len(jobs), workers or os.cpu_count() or 1))
        context = multiprocessing.get_context("spawn")  # safe after CUDA was initialised in this process
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            list(pool.map(_write_bench_clip, jobs))
    return paths


def bench_vgg19(extractor, seconds: float = 10.0, min_batches: int = 2) -> float:
    """Frames/s of ``extractor._forward`` on random frames (one warm-up batch, then >= ``seconds``)."""
    import torch

    size, batch = extractor.cfg.image_size, int(extractor.cfg.batch_frames)
    rng = np.random.default_rng(0)
    frames = list(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    extractor._forward(frames)  # warm-up (cudnn autotune, allocations)
    if extractor.device.startswith("cuda"):
        torch.cuda.synchronize()
    count, started = 0, time.perf_counter()
    while count < min_batches or time.perf_counter() - started < seconds:
        extractor._forward(frames)  # returns host numpy: synchronised
        count += 1
    return count * batch / (time.perf_counter() - started)


def bench_decode(requests: Sequence[VideoRequest], grids, segments: int, audio: bool, workers: int,
                 timeout_s: float) -> tuple[float, int]:
    """(videos/s, failures) of the decode workers on ``requests`` (worker start-up excluded)."""
    with DecodePool(workers, timeout_s, ahead=2 * workers) as pool:
        pool.wait_ready()
        started = time.perf_counter()
        failed = sum(isinstance(r, Failure) for r in pool.imap(decode_video, [(r, grids, segments, audio) for r in requests]))
        elapsed = time.perf_counter() - started
    return len(requests) / elapsed, failed


def run_benchmark(pipeline, clips: Sequence[Path], vgg_seconds: float = 10.0, keep_store: str | None = None) -> BenchResult:
    """Measure the three figures on ``clips`` with the configuration of ``pipeline``."""
    from .extractors import build_extractors, effective_precision, resolve_device
    from .run import _set_cpu_threads, run_extraction

    cfg = pipeline.extract
    device = resolve_device(cfg.device)
    _set_cpu_threads(device)
    extractors = build_extractors(cfg, device)
    vgg = next((e for e in extractors if e.name == "vgg19"), None)
    if vgg is None:
        raise ValueError("avel-extract bench needs the vgg19 extractor in extract.extractors")
    workers = cfg.decode_workers or os.cpu_count() or 1
    requests = [VideoRequest(f"{i:05d}_{p.stem}", str(p)) for i, p in enumerate(clips)]
    grids = list({g.name: g for g in (e.frame_grid for e in extractors) if g is not None}.values())
    audio = any(e.uses_audio for e in extractors)

    log.info("bench 1/3: VGG-19 forwards for %.0f s", vgg_seconds)
    vgg_fps = bench_vgg19(vgg, vgg_seconds)
    log.info("bench 2/3: decoding %d clips with %d workers", len(requests), workers)
    decode_vps, decode_failed = bench_decode(requests, grids, cfg.segments, audio, workers, cfg.decode_timeout_s)
    log.info("bench 3/3: end-to-end extraction of %d clips", len(requests))
    with tempfile.TemporaryDirectory(prefix="avel-bench-") as tmp:
        store = Path(keep_store) if keep_store else Path(tmp) / "bench.zarr"
        summary = run_extraction(pipeline, requests, store_path=store, extractors=extractors, progress=True)
    e2e = (summary.done + summary.failed) / summary.steady_seconds if summary.steady_seconds > 0 else 0.0
    return BenchResult(
        device=device,
        precision=effective_precision(cfg.precision, device),
        clips=len(requests),
        frames_per_video=cfg.segments * cfg.frames_per_segment,
        vgg_frames_per_s=vgg_fps,
        decode_videos_per_s=decode_vps,
        decode_failed=decode_failed,
        end_to_end_videos_per_s=e2e,
        workers=workers,
    )
