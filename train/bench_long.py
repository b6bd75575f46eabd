"""``python -m train.bench_long``: avel-predict on long videos, wall time and peak memory by length.

What it does (docs/benchmarks.md, "Long videos"):

1. **A run.** ``--run`` names a trained run (any avel-train run directory of task avel); without
   it, a small demo is made in the work folder (``avel-extract demo``, its extraction, a DMRN
   trained for ``--epochs`` epochs): the demo recipe (random VGG-19 / VGGish weights, 1 frame
   per segment, T = 10). The head's quality does not matter here, only its features' cost.
2. **Clips.** One minute of 320x240 H.264 (``--fps``, x264 veryfast) with 48 kHz stereo AAC is
   encoded once (a moving pattern and a chirp over noise, so that neither stream is trivial);
   each requested length is that minute repeated by remuxing (packets copied with shifted
   timestamps, nothing re-encoded), e.g. 10 and 60 minutes.
3. **Runs.** For a short clip (``--baseline-seconds``, default 20 s: the model's own memory and
   the start-up time) and each length, ``avel-predict CLIP --run RUN --no-cache --no-plots``
   runs as a child process, ``nice``-d by ``--nice``. A sampler reads, every ``--interval``
   seconds, ``/proc/<pid>/smaps_rollup`` of that process and all its descendants (the
   ``avel-extract`` child, its decode workers and their forkserver) and sums them: **PSS**
   (proportional set size: a page shared by n processes counts 1/n in each, so the sum is the
   memory the tree really holds) and **RSS** (shared pages counted in every process: an upper
   bound). The peak of each sum is reported; a process living less than one interval can be
   missed, so the peaks are lower bounds of the true peak by at most what such a process holds.
   It also sums the CPU seconds (utime + stime, ``/proc/<pid>/stat``) of the tree: on a shared
   machine the wall time follows the load of the other jobs, the CPU time much less. A series
   (every ~5 s: seconds, PSS, RSS, CPU seconds, processes) goes to ``<workdir>/out/<label>-memory.csv``.
4. **Report.** Per run: seconds, peak PSS and RSS sums (MiB), the number of processes seen, the
   load average before and after, and the ratios the targets are about: time(longest) /
   time(shortest long clip), peak(longest) / peak(shortest long clip), and peak(longest) -
   peak(baseline). ``--json-out`` writes them as JSON.

Linux only (``/proc``). It takes a while: the demo recipe costs about 2 CPU-seconds per 10-s
window on a 2-core CPU, so 70 minutes of video are about 15-25 minutes of runs.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
#: the clips' format (the issue's measurement: 320x240 H.264, 48 kHz stereo AAC)
WIDTH, HEIGHT = 320, 240
SAMPLE_RATE = 48000
BASE_SECONDS = 60


# ------------------------------------------------------------------------------------------
# clips


def write_base_clip(path: Path, fps: int = 25, seconds: int = BASE_SECONDS, seed: int = 0) -> Path:
    """``seconds`` of 320x240 H.264 at ``fps`` + 48 kHz stereo AAC: a drifting colour pattern with
    a moving square, and per channel a chirp over low noise."""
    import av

    from extract.factories.media import encode_audio

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), mode="w")
    try:
        video = container.add_stream("libx264", rate=fps)
        video.width, video.height, video.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        video.options = {"crf": "23", "preset": "veryfast"}
        audio = container.add_stream("aac", rate=SAMPLE_RATE)
        audio.layout = "stereo"
        yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
        for k in range(seconds * fps):
            t = k / fps
            image = np.empty((HEIGHT, WIDTH, 3), np.uint8)
            image[..., 0] = (127 + 100 * np.sin(xx / 23.0 + t)).astype(np.uint8)
            image[..., 1] = (127 + 100 * np.sin(yy / 17.0 - 0.7 * t)).astype(np.uint8)
            image[..., 2] = (127 + 100 * np.sin((xx + yy) / 31.0 + 0.3 * t)).astype(np.uint8)
            x0 = int((WIDTH - 40) * (0.5 + 0.5 * np.sin(0.9 * t)))
            y0 = int((HEIGHT - 40) * (0.5 + 0.5 * np.cos(0.6 * t)))
            image[y0:y0 + 40, x0:x0 + 40] = (240, 40, 40)
            for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in video.encode():
            container.mux(packet)
        n = seconds * SAMPLE_RATE
        t = np.arange(n) / SAMPLE_RATE
        chirp = np.sin(2 * np.pi * (300 * t + 200 * t ** 2 / seconds))
        wave = np.stack([0.3 * chirp, 0.3 * np.roll(chirp, 4800)]) + 0.01 * rng.standard_normal((2, n))
        encode_audio(container, audio, wave)
    finally:
        container.close()
    return path


def repeat_clip(base: Path, path: Path, repeats: int) -> Path:
    """``base`` ``repeats`` times in a row, by remuxing its packets with shifted timestamps."""
    import av

    with av.open(str(base)) as src:
        packets = {s.index: [] for s in src.streams}
        for packet in src.demux():
            if packet.size == 0 or packet.dts is None:  # flush packets (MP4 packets all have a dts)
                continue
            packets[packet.stream.index].append((packet.pts, packet.dts, packet.duration, bytes(packet), packet.is_keyframe))
        spans = {}
        for index, items in packets.items():
            ends = [(p if p is not None else d) + (dur or 0) for p, d, dur, _, _ in items]
            starts = [(p if p is not None else d) for p, d, _, _, _ in items]
            spans[index] = max(ends) - min(starts)
        with av.open(str(path), mode="w") as out:
            streams = {s.index: out.add_stream_from_template(s) for s in src.streams}
            order = sorted(((rep, index, k) for rep in range(repeats) for index, items in packets.items()
                            for k in range(len(items))),
                           key=lambda item: (item[0], float((packets[item[1]][item[2]][1] + 0) * src.streams[item[1]].time_base)))
            for rep, index, k in order:
                pts, dts, duration, data, key = packets[index][k]
                shift = rep * spans[index]
                packet = av.Packet(data)
                packet.stream = streams[index]
                packet.pts = None if pts is None else pts + shift
                packet.dts = dts + shift
                packet.duration = duration
                packet.time_base = src.streams[index].time_base
                packet.is_keyframe = key
                out.mux(packet)
    return path


def make_clip(workdir: Path, seconds: int, fps: int) -> Path:
    """A clip of ``seconds`` (a multiple of 60, or shorter than a minute: cut by remuxing whole
    seconds is not needed, a short clip is encoded directly)."""
    clips = workdir / "clips"
    if seconds < BASE_SECONDS:
        path = clips / f"clip-{seconds}s-{fps}fps.mp4"
        if not path.exists():
            write_base_clip(path.with_suffix(".part.mp4"), fps, seconds).rename(path)
        return path
    if seconds % BASE_SECONDS:
        raise click.UsageError(f"lengths of a minute or more must be whole minutes, got {seconds} s")
    base = clips / f"base-{BASE_SECONDS}s-{fps}fps.mp4"
    if not base.exists():
        write_base_clip(base.with_suffix(".part.mp4"), fps, BASE_SECONDS).rename(base)
    path = clips / f"clip-{seconds // 60}min-{fps}fps.mp4"
    if not path.exists():
        repeat_clip(base, path.with_suffix(".part.mp4"), seconds // BASE_SECONDS).rename(path)
    return path


# ------------------------------------------------------------------------------------------
# memory of a process tree


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{task}/children") as fh:
                    found.extend(int(x) for x in fh.read().split())
            except OSError:
                continue
    except OSError:
        pass
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (via /proc/<pid>/task/*/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def _rollup(pid: int) -> tuple[int, int]:
    """(PSS, RSS) of a process in KiB from /proc/<pid>/smaps_rollup; (0, 0) when it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss = int(line.split()[1])
    except OSError:
        pass
    return pss, rss


def _cpu_ticks(pid: int) -> int | None:
    """utime + stime of a process in clock ticks (/proc/<pid>/stat), None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted after the comm
    except (OSError, IndexError, ValueError):
        return None


@dataclasses.dataclass
class MemoryPeak:
    pss_mib: float = 0.0
    rss_mib: float = 0.0
    processes: int = 0
    samples: int = 0
    #: CPU seconds of the tree: the last utime + stime seen of every process (a process living
    #: less than one interval is missed)
    cpu_s: float = 0.0


class TreeSampler:
    """Samples the summed PSS and RSS of a process tree in a thread until :meth:`stop`."""

    def __init__(self, pid: int, interval: float = 0.2, series: Path | None = None):
        self.pid, self.interval = pid, interval
        self.peak = MemoryPeak()
        self.seen: set[int] = set()
        self.ticks: dict[int, int] = {}
        self.series = open(series, "w") if series is not None else None
        self._started = time.perf_counter()
        if self.series:
            self.series.write("seconds,pss_mib,rss_mib,cpu_s,processes\n")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-sampler")

    def start(self) -> "TreeSampler":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = process_tree(self.pid)
            self.seen.update(pids)
            pss = rss = 0
            for p in pids:
                a, b = _rollup(p)
                pss, rss = pss + a, rss + b
                ticks = _cpu_ticks(p)
                if ticks is not None:
                    self.ticks[p] = ticks
            self.peak.pss_mib = max(self.peak.pss_mib, pss / 1024)
            self.peak.rss_mib = max(self.peak.rss_mib, rss / 1024)
            self.peak.samples += 1
            if self.series and self.peak.samples % max(1, round(5 / self.interval)) == 1:  # a row every ~5 s
                self.series.write(f"{time.perf_counter() - self._started:.1f},{pss / 1024:.0f},{rss / 1024:.0f},"
                                  f"{self.cpu_seconds():.1f},{len(pids)}\n")
                self.series.flush()
            self._stop.wait(self.interval)

    def cpu_seconds(self) -> float:
        return sum(self.ticks.values()) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> MemoryPeak:
        self._stop.set()
        self._thread.join()
        self.peak.processes = len(self.seen)
        self.peak.cpu_s = self.cpu_seconds()
        if self.series:
            self.series.close()
        return self.peak


# ------------------------------------------------------------------------------------------
# runs


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def _cli(module: str, *args: str, nice: int = 0) -> None:
    command = (["nice", "-n", str(nice)] if nice else []) + [sys.executable, "-m", module, *args]
    log.info("$ %s", " ".join(command))
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(command)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-3000:]}")


def make_demo_run(workdir: Path, epochs: int, nice: int) -> Path:
    """A DMRN run of the demo recipe in ``workdir/demo`` (made once, reused)."""
    demo = workdir / "demo"
    runs = sorted((demo / "runs" / "avel-dmrn-supervised").glob("seed0-*"))
    if runs and (runs[-1] / "checkpoint.safetensors").is_file():
        return runs[-1]
    _cli("extract.cli", "demo", "--out", str(demo), "--videos", "15", "--background-videos", "0", "--seed", "3", nice=nice)
    config = demo / "pipeline.yaml"
    _cli("extract.cli", "--config", str(config), "--split", "all", "--no-progress", nice=nice)
    _cli("train.cli", "--config", str(config), "--head", "dmrn", "--epochs", str(epochs), nice=nice)
    runs = sorted((demo / "runs" / "avel-dmrn-supervised").glob("seed0-*"))
    if not runs:
        raise click.ClickException(f"no run was written under {demo / 'runs'}")
    return runs[-1]


@dataclasses.dataclass
class RunFigures:
    label: str
    seconds_of_video: float
    wall_s: float
    peak_pss_mib: float
    peak_rss_mib: float
    cpu_s: float
    processes: int
    exit_code: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]


def time_predict(run: Path, clip: Path, out: Path, label: str, video_seconds: float, nice: int,
                 interval: float, extra: tuple[str, ...] = ()) -> RunFigures:
    """``avel-predict clip --run run --no-cache --no-plots`` as a child, timed and sampled."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    command = (["nice", "-n", str(nice)] if nice else []) + [
        sys.executable, "-m", "train.predict.cli", str(clip), "--run", str(run), "--out", str(out),
        "--no-cache", "--no-plots", "--no-progress", *extra]
    load_before = os.getloadavg()
    log.info("%s: $ %s", label, " ".join(command))
    started = time.perf_counter()
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = TreeSampler(proc.pid, interval, series=out.parent / f"{label}-memory.csv").start()
    output, _ = proc.communicate()
    wall = time.perf_counter() - started
    peak = sampler.stop()
    load_after = os.getloadavg()
    (out.parent / f"{label}.log").write_text(output)
    if proc.returncode != 0:
        log.warning("%s: avel-predict exited %d; its output is in %s", label, proc.returncode, out.parent / f"{label}.log")
    return RunFigures(label, video_seconds, wall, peak.pss_mib, peak.rss_mib, peak.cpu_s, peak.processes, proc.returncode,
                      tuple(round(x, 2) for x in load_before), tuple(round(x, 2) for x in load_after))


def report(figures: list[RunFigures], baseline: RunFigures | None) -> dict:
    """The figures and the ratios of the targets (longest vs shortest long clip, vs the baseline)."""
    doc = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": f"{platform.node()} "
           f"({os.cpu_count()} CPUs, {platform.machine()})", "runs": [dataclasses.asdict(f) for f in figures]}
    if baseline is not None:
        doc["baseline"] = dataclasses.asdict(baseline)
    long = [f for f in figures if f.label != "baseline"]
    if len(long) >= 2:
        short, longest = long[0], long[-1]
        doc["length_ratio"] = longest.seconds_of_video / short.seconds_of_video
        doc["time_ratio"] = longest.wall_s / short.wall_s
        doc["cpu_ratio"] = longest.cpu_s / short.cpu_s if short.cpu_s else None
        doc["pss_ratio"] = longest.peak_pss_mib / short.peak_pss_mib
        doc["rss_ratio"] = longest.peak_rss_mib / short.peak_rss_mib
    if baseline is not None and long:
        doc["pss_above_baseline_mib"] = long[-1].peak_pss_mib - baseline.peak_pss_mib
    return doc


HEADER = (f"{'run':<10} {'video':>8} {'wall s':>8} {'CPU s':>8} {'peak PSS MiB':>13} {'peak RSS MiB':>13} "
          f"{'procs':>5} {'exit':>4}  load before -> after")


def row_line(r: dict) -> str:
    """One run's figures as a line of the table under :data:`HEADER`."""
    return (f"{r['label']:<10} {r['seconds_of_video'] / 60:>7.1f}m {r['wall_s']:>8.1f} {r.get('cpu_s', 0):>8.1f} "
            f"{r['peak_pss_mib']:>13.0f} {r['peak_rss_mib']:>13.0f} {r['processes']:>5} {r['exit_code']:>4}  "
            f"{'/'.join(map(str, r['load_before']))} -> {'/'.join(map(str, r['load_after']))}")


def summary_lines(doc: dict) -> list[str]:
    rows = ([doc["baseline"]] if "baseline" in doc else []) + list(doc["runs"])
    lines = [HEADER] + [row_line(r) for r in rows]
    if "time_ratio" in doc:
        cpu = f", CPU time x{doc['cpu_ratio']:.2f}" if doc.get("cpu_ratio") else ""
        lines.append(f"length x{doc['length_ratio']:.1f}: time x{doc['time_ratio']:.2f} (target <= {1.1 * doc['length_ratio']:.1f}){cpu}, "
                     f"peak PSS x{doc['pss_ratio']:.2f} (target <= 1.2), peak RSS x{doc['rss_ratio']:.2f}")
    if "pss_above_baseline_mib" in doc:
        lines.append(f"peak PSS of the longest run minus the baseline's: {doc['pss_above_baseline_mib']:.0f} MiB "
                     "(target < 2048)")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workdir", type=click.Path(file_okay=False), default="/tmp/avel-bench-long", show_default=True,
              help="Clips, the demo run (when --run is not given) and the predict outputs go here; clips and run are reused.")
@click.option("--run", "run_dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="A trained avel run to predict with (default: a demo-recipe DMRN made in --workdir).")
@click.option("--minutes", type=click.IntRange(min=1), multiple=True, default=(10, 60), show_default=True,
              help="Clip lengths in minutes (repeat the option); the ratios compare the last with the first.")
@click.option("--baseline-seconds", type=click.IntRange(min=0, max=59), default=20, show_default=True,
              help="A short clip first, for the model's own memory and the start-up time (0: none).")
@click.option("--fps", type=click.IntRange(min=1), default=25, show_default=True, help="Frame rate of the clips.")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True, help="Epochs of the demo run (when made).")
@click.option("--nice", type=click.IntRange(min=0, max=19), default=10, show_default=True, help="nice level of every child.")
@click.option("--interval", type=click.FloatRange(min=0.02), default=0.25, show_default=True, help="Seconds between memory samples.")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="Also write the figures as JSON here.")
@click.option("-v", "--verbose", count=True, help="More logging.")
def main(workdir, run_dir, minutes, baseline_seconds, fps, epochs, nice, interval, json_out, verbose):
    """Time avel-predict on generated long videos and sample the peak memory of all its processes.

    \b
      python -m train.bench_long                         # 20 s baseline, 10 and 60 minutes
      python -m train.bench_long --minutes 2 --minutes 8 --run data/demo/runs/avel-dmrn-supervised/seed0-*

    Clips: 320x240 H.264 at --fps with 48 kHz stereo AAC (one minute encoded, repeated by
    remuxing). Each run is `avel-predict CLIP --run RUN --no-cache --no-plots` under `nice`;
    memory is the sum over the process and all its descendants of PSS (and RSS) from
    /proc/PID/smaps_rollup, sampled every --interval seconds. Targets (issue 28): time of the
    longest clip <= 1.1 x its length ratio to the first (6.6x for 60 vs 10 min); its peak memory
    <= 1.2 x the first's and < 2 GiB above the baseline's. Linux only.
    """
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(message)s")
    if not Path("/proc/self/smaps_rollup").exists():
        raise click.ClickException("this benchmark reads /proc/PID/smaps_rollup (Linux 4.14 or newer)")
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    click.echo(f"load average at start: {'/'.join(f'{x:.2f}' for x in os.getloadavg())}", err=True)
    run = Path(run_dir) if run_dir else make_demo_run(work, epochs, nice)
    click.echo(f"run: {run}", err=True)
    lengths = [m * 60 for m in minutes]
    clips = {s: make_clip(work, s, fps) for s in ([baseline_seconds] if baseline_seconds else []) + lengths}
    figures, baseline = [], None
    if baseline_seconds:
        baseline = time_predict(run, clips[baseline_seconds], work / "out" / "baseline", "baseline", baseline_seconds,
                                nice, interval)
        click.echo(HEADER + "\n" + row_line(dataclasses.asdict(baseline)), err=True)
    for seconds in lengths:
        label = f"{seconds // 60}min"
        figures.append(time_predict(run, clips[seconds], work / "out" / label, label, seconds, nice, interval))
        click.echo(row_line(dataclasses.asdict(figures[-1])), err=True)
    doc = report(figures, baseline)
    doc["command"] = " ".join(sys.argv)
    doc["run"] = str(run)
    click.echo("\n".join(summary_lines(doc)))
    if json_out:
        Path(json_out).write_text(json.dumps(doc, indent=1))
    if any(f.exit_code != 0 for f in figures + ([baseline] if baseline else [])):
        sys.exit(1)


if __name__ == "__main__":
    main()
