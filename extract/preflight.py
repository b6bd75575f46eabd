"""Preflight checks of the extraction environment, and the ``doctor`` report.

A broken native library (decord, PyAV, torch, OpenCV) must stop a run *before* a store is created,
not mark every video failed one by one. :func:`check_environment` exercises the real code paths on
tiny generated inputs and returns one :class:`Check` per area:

``packages``
    torch, torchvision, decord (distribution ``decord2``), av, cv2 (``opencv-python-headless``),
    zarr and numpy import (torch first, see the import note of :mod:`extract.decode`); versions
    from ``importlib.metadata``.
``decode``
    a 2-s 64x48 clip with a 440 Hz tone at 44.1 kHz is written with :func:`extract.factories.media.write_clip`
    (PyAV) and decoded with :func:`extract.decode.decode_video` (decord + :func:`extract.audio.resample`):
    every frame grid (a native-size probe grid and the configured extractors' grids) comes back
    with the right shape, the probe frames have the grey level of the frame the decoder says it
    returned, and the audio is 2 s of 16 kHz, non-silent, with its peak at 440 Hz.
``resample``
    :func:`extract.audio.resample` of a 48 kHz tone to 16 kHz: length ``int(S / 3)``, frequency and
    level kept, and a 10 kHz tone (above the new Nyquist frequency) removed, not aliased.
``device``
    the requested device (``auto`` resolved with :func:`extract.extractors.resolve_device`) exists
    and runs a tensor op; CUDA free memory; the precision that will really run there.
``networks`` (``build_networks=True``)
    every configured extractor is built with :func:`extract.extractors.build_extractors` (weights
    resolved and loaded) and computes one tiny window (2 segments, 1 frame per segment) of the
    decoded clip; outputs must have the declared shapes, be valid and finite.

Every check runs in its own try/except: one failure never hides the others.
:func:`require_environment` raises :class:`PreflightError` listing every failed check with its fix.
:func:`doctor_json` / :func:`doctor_report` add the interpreter, package versions, devices, where
each weights file was found or looked for (without downloading anything) and whether a fresh
install would resolve the same versions (the installed avel's requirements, read with
``importlib.metadata.requires``, and ``constraints.txt``).

Only the standard library is imported at module level; torch & co. are imported by the checks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

__all__ = [
    "Check",
    "PreflightError",
    "check_environment",
    "require_environment",
    "doctor_json",
    "doctor_report",
    "render_doctor",
    "install_resolution",
    "format_failures",
    "REPORTED_PACKAGES",
]

#: (import name, distribution name) imported by the ``packages`` check, in this order (torch first)
CHECKED_MODULES: tuple[tuple[str, str], ...] = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("decord", "decord2"),
    ("av", "av"),
    ("cv2", "opencv-python-headless"),
    ("zarr", "zarr"),
    ("numpy", "numpy"),
)
#: distributions whose versions the doctor report lists
REPORTED_PACKAGES: tuple[str, ...] = (
    "torch", "torchvision", "decord2", "av", "zarr", "numpy", "dask", "distributed", "librosa", "avel",
)
#: weights kind (extract.weights) -> the config key that chooses it
WEIGHTS_KEYS: dict[str, str] = {
    "vgg19": "extract.visual_weights",
    "resnet152": "extract.sol_visual_weights",
    "vggish": "extract.audio_weights",
    "vggish_pca": "extract.audio_weights",
}

# the generated probe clip
CLIP_SECONDS = 2
CLIP_FPS = 10
CLIP_WIDTH, CLIP_HEIGHT = 64, 48
CLIP_RATE = 44100
TONE_HZ = 440.0
TONE_AMPLITUDE = 0.3
PROBE_GRID = "preflight_native"
PROBE_PER_SEGMENT = 2


@dataclasses.dataclass
class Check:
    """Outcome of one preflight check: ``fix`` says what the user should do when ``ok`` is false."""

    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        return f"[{'OK' if self.ok else 'FAIL'}] {self.name}: {self.detail}"


class PreflightError(RuntimeError):
    """The environment cannot run the extraction; ``checks`` holds every check (failed ones included)."""

    def __init__(self, message: str, checks: list[Check]):
        super().__init__(message)
        self.checks = checks


# ------------------------------------------------------------------------------------------
# small helpers


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _error(exc: BaseException, limit: int = 500) -> str:
    """``Type: message`` on one line."""
    text = " ".join(str(exc).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _package_label(dist: str, module: str | None = None) -> str:
    version = _version(dist)
    name = dist if module is None or module == dist else f"{dist} (module {module})"
    return f"{name} {version}" if version else f"{name} (not installed)"


def _project_dir() -> Path:
    """Folder holding the ``extract`` package (the checkout root for an editable install)."""
    import extract

    return Path(extract.__file__).resolve().parents[1]


def _requirement_text(dist: str) -> str:
    """The installed avel's requirement of ``dist`` (e.g. ``decord2<4,>=3.0``), else just its name."""
    for req in avel_requirements()[0] or []:
        if _canonical_name(_requirement_name(req)) == _canonical_name(dist):
            return req
    return dist


def _reinstall_fix(dist: str) -> str:
    return (f"reinstall it: pip install --force-reinstall '{_requirement_text(dist)}' (avel's requirement, "
            f"setup.cfg), or create a fresh virtual environment and run `pip install -e .` in the checkout")


def _tone(seconds: float, rate: int, freq: float, amplitude: float):
    import numpy as np

    t = np.arange(int(round(seconds * rate))) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(wave, rate: int) -> float:
    """Frequency of the largest magnitude of the Hann-windowed spectrum."""
    import numpy as np

    x = np.asarray(wave, np.float64)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spectrum) * rate / x.size)


def _rms(x) -> float:
    import numpy as np

    x = np.asarray(x, np.float64)
    return float(np.sqrt(np.mean(x * x))) if x.size else 0.0


def _level_of(index: int) -> int:
    """Grey level of frame ``index`` of the probe clip (distinct, far apart, survives H.264)."""
    return 10 * index + 20


def _identity(frames):
    return frames


def _probe_cfg(cfg):
    """The configuration of the tiny window the checks decode and compute: 2 segments, 1 frame each."""
    return dataclasses.replace(cfg, segments=CLIP_SECONDS, frames_per_segment=1, sol_frames_per_segment=1,
                               batch_frames=CLIP_SECONDS)


# ------------------------------------------------------------------------------------------
# 1. packages


def _check_packages() -> Check:
    failed, loaded = [], []
    for module, dist in CHECKED_MODULES:
        try:
            importlib.import_module(module)
        except BaseException as exc:  # noqa: BLE001 - a broken native library raises anything (even SystemExit)
            if isinstance(exc, KeyboardInterrupt):
                raise
            failed.append((module, dist, exc))
        else:
            loaded.append(_package_label(dist, module))
    if failed:
        detail = "; ".join(f"import {module} failed ({_package_label(dist, module)}): {_error(exc)}"
                           for module, dist, exc in failed)
        fix = "; ".join(f"{dist}: {_reinstall_fix(dist)}" for _, dist, _ in failed)
        return Check("packages", False, detail, fix)
    return Check("packages", True, "imported " + ", ".join(loaded))


# ------------------------------------------------------------------------------------------
# 2. decode


def _probe_grids(cfg) -> list:
    """The native-size probe grid and the configured extractors' frame grids (under the probe cfg)."""
    from .extractors import FrameGrid, get_extractor

    grids = [FrameGrid(per_segment=PROBE_PER_SEGMENT, prepare=_identity, name=PROBE_GRID)]
    probe = _probe_cfg(cfg)
    for name in cfg.extractors:
        try:
            cls = get_extractor(name)
        except ValueError:  # an unknown extractor: the networks check reports it
            continue
        grid = cls.grid_for(probe)
        if grid is not None and all(g.name != grid.name for g in grids):
            grids.append(grid)
    return grids


def _write_probe_clip(folder: Path) -> Path:
    import numpy as np

    from .factories.media import write_clip

    count = CLIP_SECONDS * CLIP_FPS
    frames = np.stack([np.full((CLIP_HEIGHT, CLIP_WIDTH, 3), _level_of(k), np.uint8) for k in range(count)])
    audio = _tone(CLIP_SECONDS, CLIP_RATE, TONE_HZ, TONE_AMPLITUDE)
    return write_clip(folder / "preflight.mp4", frames, fps=CLIP_FPS, audio=audio, sample_rate=CLIP_RATE)


def _verify_decoded(video, grids, segments: int) -> list[str]:
    """Problems of a decoded probe clip (empty list: as expected)."""
    import numpy as np

    from .audio import SAMPLE_RATE

    problems = []
    count = CLIP_SECONDS * CLIP_FPS
    if video.info.get("frames") != count:
        problems.append(f"{video.info.get('frames')} frames decoded, the clip has {count}")
    if (video.info.get("width"), video.info.get("height")) != (CLIP_WIDTH, CLIP_HEIGHT):
        problems.append(f"frame size {video.info.get('width')}x{video.info.get('height')}, "
                        f"the clip is {CLIP_WIDTH}x{CLIP_HEIGHT}")
    for grid in grids:
        frames, valid = video.frames.get(grid.name), video.frame_valid.get(grid.name)
        if frames is None or valid is None:
            problems.append(f"no frames for grid {grid.name}")
            continue
        if frames.dtype != np.uint8 or frames.shape[:2] != (segments, grid.per_segment) or frames.shape[-1] != 3:
            problems.append(f"grid {grid.name}: frames {frames.dtype} {frames.shape}, expected uint8 "
                            f"[{segments}, {grid.per_segment}, h, w, 3]")
            continue
        if not valid.all():
            problems.append(f"grid {grid.name}: {int((~valid).sum())} of {valid.size} frames inside the clip "
                            f"are marked invalid")
    probe = video.frames.get(PROBE_GRID)
    index = (video.info.get("frame_index") or {}).get(PROBE_GRID)
    if probe is not None and index is not None and probe.shape[2:4] == (CLIP_HEIGHT, CLIP_WIDTH):
        times = np.arange(segments)[:, None] + (np.arange(PROBE_PER_SEGMENT)[None, :] + 0.5) / PROBE_PER_SEGMENT
        if np.abs(np.asarray(index) - times * CLIP_FPS).max() > 1:
            problems.append(f"frames {np.asarray(index).tolist()} chosen for times {times.tolist()} s at {CLIP_FPS} fps")
        levels = probe.reshape(segments, PROBE_PER_SEGMENT, -1).mean(axis=-1)
        want = np.vectorize(_level_of)(np.asarray(index))
        if np.abs(levels - want).max() > 6:
            problems.append(f"frame content wrong: grey levels {np.round(levels, 1).tolist()}, "
                            f"expected {want.tolist()} (frames {np.asarray(index).tolist()})")
    elif probe is not None:
        problems.append(f"native frames {probe.shape}, expected [.., {CLIP_HEIGHT}, {CLIP_WIDTH}, 3]")
    wave = video.audio
    want_samples = CLIP_SECONDS * SAMPLE_RATE
    if wave is None:
        problems.append(f"no audio decoded ({video.info.get('audio_error', 'no reason given')})")
    else:
        wave = np.asarray(wave)
        if wave.ndim != 1 or not (0.95 * want_samples <= wave.size <= want_samples):
            problems.append(f"audio has shape {wave.shape}, expected about {want_samples} samples "
                            f"({CLIP_SECONDS} s at {SAMPLE_RATE} Hz)")
        elif not np.isfinite(wave).all():
            problems.append("audio has non-finite samples")
        else:
            level = _rms(wave[SAMPLE_RATE // 10: -SAMPLE_RATE // 10])
            if level < 0.3 * TONE_AMPLITUDE / np.sqrt(2):
                problems.append(f"audio is (nearly) silent: RMS {level:.4f}, the tone's is {TONE_AMPLITUDE / np.sqrt(2):.3f}")
            else:
                peak = _peak_hz(wave, SAMPLE_RATE)
                if abs(peak - TONE_HZ) > 3:
                    problems.append(f"audio tone at {peak:.1f} Hz after resampling to {SAMPLE_RATE} Hz, "
                                    f"expected {TONE_HZ:g} Hz (wrong sample rate?)")
        if video.info.get("audio_rate") not in (None, CLIP_RATE):
            problems.append(f"native audio rate read as {video.info.get('audio_rate')}, the clip has {CLIP_RATE}")
    return problems


def _check_decode(cfg) -> tuple[Check, Any]:
    """Write and decode the probe clip; returns the check and the DecodedVideo (None on failure)."""
    from .audio import SAMPLE_RATE

    decord_label = _package_label("decord2", "decord")
    with tempfile.TemporaryDirectory(prefix="avel-preflight-") as tmp:
        try:
            path = _write_probe_clip(Path(tmp))
        except Exception as exc:  # noqa: BLE001
            return Check("decode", False,
                         f"writing the test clip with PyAV ({_package_label('av')}) failed: {_error(exc)}",
                         "PyAV and its bundled FFmpeg do not work: " + _reinstall_fix("av")), None
        try:
            grids = _probe_grids(cfg)
        except Exception as exc:  # noqa: BLE001 - an unknown extractor name, ...
            return Check("decode", False, f"the frame grids of extract.extractors={list(cfg.extractors)} are "
                                          f"unavailable: {_error(exc)}", "fix extract.extractors"), None
        try:
            from .decode import VideoRequest, decode_video

            video = decode_video(VideoRequest("preflight", str(path)), grids, segments=CLIP_SECONDS, audio=True)
        except Exception as exc:  # noqa: BLE001 - ImportError/OSError of a broken decord, DecodeError, ...
            return Check("decode", False,
                         f"decoding a generated {CLIP_SECONDS}-s H.264/AAC clip with {decord_label} failed: {_error(exc)}",
                         "decord (or the resampler) does not work in this environment: " + _reinstall_fix("decord2")), None
        finally:
            from .sources import SOURCES

            SOURCES.clear()  # the readers of the probe clip, which is deleted now
    problems = _verify_decoded(video, grids, CLIP_SECONDS)
    if problems:
        return Check("decode", False,
                     f"{decord_label} decoded the generated clip wrongly: " + "; ".join(problems),
                     "check the decord2 and av installations (" + _reinstall_fix("decord2") + ")"), video
    resampler = video.info.get("audio_resampler", "?")
    note = "" if resampler == "kaiser_best" else f" (native rate not readable: decord's own resampler '{resampler}' used)"
    shapes = ", ".join(f"{g.name} {tuple(video.frames[g.name].shape)}" for g in grids)
    return Check("decode", True,
                 f"{decord_label}: {video.info.get('frames')} frames of {CLIP_WIDTH}x{CLIP_HEIGHT} with the right "
                 f"content ({shapes}); audio {video.info.get('audio_rate')} Hz -> {SAMPLE_RATE} Hz, "
                 f"{len(video.audio)} samples, tone at {_peak_hz(video.audio, SAMPLE_RATE):.1f} Hz{note}"), video


# ------------------------------------------------------------------------------------------
# 3. resample


def _check_resample() -> Check:
    try:
        import numpy as np

        from .audio import SAMPLE_RATE, resample

        rate = 48000
        tone = _tone(1.0, rate, TONE_HZ, 0.5)
        out = np.asarray(resample(tone, rate, SAMPLE_RATE))
        problems = []
        want = int(tone.size * SAMPLE_RATE / rate)
        if out.shape != (want,):
            problems.append(f"output shape {out.shape}, expected ({want},)")
        elif not np.isfinite(out).all():
            problems.append("non-finite output samples")
        else:
            middle = slice(SAMPLE_RATE // 10, -SAMPLE_RATE // 10)
            peak, gain = _peak_hz(out, SAMPLE_RATE), _rms(out[middle]) / _rms(tone)
            if abs(peak - TONE_HZ) > 2:
                problems.append(f"a {TONE_HZ:g} Hz tone comes out at {peak:.1f} Hz")
            if abs(gain - 1) > 0.02:
                problems.append(f"the tone's level changed by a factor {gain:.4f}")
            high = np.asarray(resample(_tone(1.0, rate, 10000.0, 0.5), rate, SAMPLE_RATE))
            leak = _rms(high[middle]) / _rms(tone)
            if not leak < 0.01:
                problems.append(f"a 10 kHz tone (above the 8 kHz Nyquist frequency) is aliased, not removed: "
                                f"{leak:.3g} of its level remains")
        if problems:
            return Check("resample", False, f"extract.audio.resample {rate} -> {SAMPLE_RATE} Hz: " + "; ".join(problems),
                         "the resampler gives wrong results: check the torch installation (" + _reinstall_fix("torch")
                         + ") and extract/audio.py")
        return Check("resample", True,
                     f"{rate} -> {SAMPLE_RATE} Hz: {out.size} samples, {TONE_HZ:g} Hz tone at {peak:.1f} Hz, "
                     f"level x{gain:.4f}, 10 kHz tone removed ({leak:.1e} left)")
    except Exception as exc:  # noqa: BLE001
        return Check("resample", False, f"extract.audio.resample failed: {_error(exc)}",
                     "check the torch installation (" + _reinstall_fix("torch") + ") and extract/audio.py")


# ------------------------------------------------------------------------------------------
# 4. device


def _precision_note(cfg, device: str) -> str:
    """What will really run: the frame CNNs' effective precision, VGGish always fp32."""
    from .extractors import FrameCNNExtractor, effective_precision, get_extractor, load_extractors

    asked = cfg.precision

    def is_frame_cnn(name: str) -> bool:
        try:
            return issubclass(get_extractor(name), FrameCNNExtractor)
        except ValueError:  # an unknown extractor: the decode and networks checks report it
            return False

    frame_cnns = [n for n in cfg.extractors if is_frame_cnn(n)]
    with _quiet("extract.extractors"):
        real = effective_precision(asked, device)
    cnn = "/".join(frame_cnns) or "frame CNNs"
    if asked == "auto":
        text = (f"precision auto: {cnn} run {real}" + (" autocast, channels_last" if real != "fp32" else "")
                + f" on {device}")
    elif real != asked:
        text = (f"extract.precision={asked} is not used on {device}: {cnn} run {real} "
                f"(only bf16 reduces precision on CPU)")
    elif real == "fp32":
        text = f"precision fp32 ({cnn})"
    elif str(device).startswith("cuda"):
        text = f"{cnn} run {real} autocast on {device}"
    else:
        text = f"{cnn} run bf16 autocast on {device} (fast only on CPUs with AVX512-BF16/AMX)"
    registered = load_extractors()
    others = [n for n in cfg.extractors if n in registered and registered[n].uses_audio]  # VGGish nets: fp32
    if others:
        text += f"; {'/'.join(others)} always fp32"
    return text


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence one logger's warnings for a moment (the precision note repeats them itself)."""
    target = logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.ERROR)
    try:
        yield
    finally:
        target.setLevel(level)


def _cpu_cores() -> str:
    total = os.cpu_count() or 0
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = total
    return f"{usable} usable of {total}" if usable != total else str(total)


def _check_device(cfg, device: str | None) -> tuple[Check, str | None]:
    """The check and the resolved device string when usable (None otherwise)."""
    asked = cfg.device if device is None else device
    try:
        import torch

        from .extractors import resolve_device

        resolved = resolve_device(asked)
        label = resolved if resolved == str(asked) else f"{resolved} (from {asked!r})"
        if resolved == "cpu":
            detail = f"{label}: {_cpu_cores()} cores, torch uses {torch.get_num_threads()} threads"
            return Check("device", True, f"{detail}; {_precision_note(cfg, resolved)}"), resolved
        if resolved.startswith("cuda"):
            cpu_fix = "use --device cpu (or --set extract.device=cpu)"
            if not torch.cuda.is_available():
                build = (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but no usable GPU/driver "
                         f"was found" if torch.version.cuda else f"torch {torch.__version__} is a CPU-only build")
                return Check("device", False, f"{label} requested but torch.cuda.is_available() is False: {build}",
                             f"{cpu_fix}; or run on a machine with an NVIDIA GPU and driver and a CUDA build of "
                             f"torch matching setup.cfg"), None
            index = torch.device(resolved).index
            index = torch.cuda.current_device() if index is None else index
            count = torch.cuda.device_count()
            if not 0 <= index < count:
                return Check("device", False, f"{label} requested but only {count} CUDA device(s) exist "
                                              f"(cuda:0..cuda:{count - 1})",
                             f"use --device cuda:N with N < {count}, or check CUDA_VISIBLE_DEVICES"), None
            value = float((torch.arange(8, device=resolved, dtype=torch.float32) * 2).sum().item())
            if value != 56.0:
                return Check("device", False, f"{label}: a tensor op returned {value}, expected 56",
                             f"the GPU gives wrong results; {cpu_fix}"), None
            free, total = torch.cuda.mem_get_info(index)
            name = torch.cuda.get_device_name(index)
            return Check("device", True,
                         f"{label}: {name}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB, torch CUDA "
                         f"{torch.version.cuda}; {_precision_note(cfg, resolved)}"), resolved
        # another torch device type (mps, xpu, ...): it must at least run a tensor op
        value = float((torch.arange(8, device=resolved, dtype=torch.float32) * 2).sum().item())
        if value != 56.0:
            return Check("device", False, f"{label}: a tensor op returned {value}, expected 56",
                         "use --device cpu or --device cuda"), None
        return Check("device", True, f"{label}: tensor op ok; {_precision_note(cfg, resolved)}"), resolved
    except Exception as exc:  # noqa: BLE001
        return Check("device", False, f"device {asked!r} is not usable: {_error(exc)}",
                     "set --device (extract.device) to auto, cpu, cuda or cuda:N"), None


# ------------------------------------------------------------------------------------------
# 5. networks


def _weights_plan(cfg) -> list[dict[str, Any]]:
    """The weights each configured extractor resolves: ``{extractor, kind, key, spec}``."""
    from .extractors import FrameCNNExtractor, VGGishExtractor, get_extractor
    from .sol_extractors import VGGishMapsExtractor

    plan = []
    for name in cfg.extractors:
        try:
            cls = get_extractor(name)
        except ValueError:  # an unknown extractor has no weights to list
            continue
        if issubclass(cls, FrameCNNExtractor):
            kind = cls.weights_kind
            plan.append({"extractor": name, "kind": kind, "key": WEIGHTS_KEYS.get(kind, f"the weights of {name}"),
                         "spec": cls.weights_spec(cfg)})
        elif issubclass(cls, (VGGishExtractor, VGGishMapsExtractor)):
            plan.append({"extractor": name, "kind": "vggish", "key": WEIGHTS_KEYS["vggish"], "spec": cfg.audio_weights})
            if issubclass(cls, VGGishExtractor) and cfg.vggish_pca:
                plan.append({"extractor": name, "kind": "vggish_pca", "key": WEIGHTS_KEYS["vggish_pca"],
                             "spec": "random" if cfg.audio_weights == "random" else "vggish"})
    return plan


def _weights_fix(cfg, name: str, message: str) -> str:
    """The fix for a WeightsUnavailable of extractor ``name``: which config key to set."""
    keys = [p["key"] for p in _weights_plan(dataclasses.replace(cfg, extractors=[name]))]
    match = re.match(r"\s*(\w+) weights", message)
    if match and match.group(1) in WEIGHTS_KEYS:
        keys = [WEIGHTS_KEYS[match.group(1)]]
    keys = list(dict.fromkeys(keys)) or ["extract.visual_weights", "extract.audio_weights"]
    key_text = " / ".join(keys)
    random_hint = ("`--weights random`" if set(keys) <= {"extract.visual_weights", "extract.audio_weights"}
                   else " ".join(f"`--set {k}=random`" for k in keys))
    return (f"put the file where the message says (or set $AVEL_WEIGHTS_DIR to the folder holding it), or set "
            f"{key_text} to the path of the weights file; for tests and the demo use {random_hint} "
            f"(untrained weights)")


def _synthetic_video(cfg, grids):
    """A DecodedVideo like the probe clip's, built without decoding (when the decode check failed)."""
    import numpy as np

    from .audio import SAMPLE_RATE
    from .extractors import DecodedVideo

    count = CLIP_SECONDS * CLIP_FPS
    native = np.stack([np.full((CLIP_HEIGHT, CLIP_WIDTH, 3), _level_of(k), np.uint8) for k in range(count)])
    frames, valid = {}, {}
    for grid in grids:
        index = [int((t + (i + 0.5) / grid.per_segment) * CLIP_FPS) for t in range(CLIP_SECONDS)
                 for i in range(grid.per_segment)]
        prepared = np.asarray(grid.prepare(native[index]))
        frames[grid.name] = prepared.reshape((CLIP_SECONDS, grid.per_segment) + prepared.shape[1:])
        valid[grid.name] = np.ones((CLIP_SECONDS, grid.per_segment), bool)
    audio = _tone(CLIP_SECONDS, SAMPLE_RATE, TONE_HZ, TONE_AMPLITUDE)
    return DecodedVideo(key="preflight", frames=frames, frame_valid=valid, audio=audio, info={"fps": CLIP_FPS})


def _forward(extractor, cfg, video) -> list[str]:
    """Problems of one tiny compute of ``extractor`` on ``video`` (2 segments, 1 frame each)."""
    import copy

    import numpy as np

    probe = copy.copy(extractor)  # same networks, the configuration of the tiny window
    probe.cfg = _probe_cfg(cfg)
    rows = probe.compute([video])
    problems = []
    if len(rows) != 1:
        return [f"{len(rows)} rows for one video"]
    row = rows[0]
    random_weights = all(getattr(w, "is_random", False) for w in
                         (getattr(extractor, "weights", None), getattr(extractor, "pca_weights", None)) if w is not None)
    for spec in probe.arrays():
        value = row.get(spec.name)
        if value is None:
            problems.append(f"no {spec.name!r} output")
            continue
        value = np.asarray(value)
        if value.shape != tuple(spec.row_shape):
            problems.append(f"{spec.name} {value.shape}, declared {tuple(spec.row_shape)}")
        if value.dtype.kind == "f":
            if np.isnan(value).any():
                problems.append(f"{spec.name} has NaN values")
            elif np.isinf(value).any() and not random_weights:
                problems.append(f"{spec.name} has infinite values")
    valid = row.get(f"{extractor.name}_valid")
    if valid is None or not np.asarray(valid).all():
        problems.append(f"segments not valid: {None if valid is None else np.asarray(valid).tolist()}")
    return problems


def _weights_label(extractor) -> str:
    names = [w.name for w in (getattr(extractor, "weights", None), getattr(extractor, "pca_weights", None)) if w is not None]
    return "+".join(names) or "?"


def _check_networks(cfg, device: str | None, video) -> Check:
    from .extractors import build_extractors
    from .weights import WeightsUnavailable

    where = device or "cpu"
    notes = [] if device else ["built on cpu because the requested device is not usable (see the device check)"]
    if video is None:
        try:
            video = _synthetic_video(cfg, _probe_grids(cfg))
            notes.append("computed on a synthetic window because decoding failed (see the decode check)")
        except Exception as exc:  # noqa: BLE001
            notes.append(f"no input for a test forward ({_error(exc)})")
    done, failed, fixes = [], [], []
    for name in cfg.extractors:
        try:
            (extractor,) = build_extractors(dataclasses.replace(cfg, extractors=[name]), where)
        except WeightsUnavailable as exc:
            failed.append(f"{name}: weights missing: {' '.join(str(exc).split())}")
            fixes.append(f"{name}: {_weights_fix(cfg, name, str(exc))}")
            continue
        except Exception as exc:  # noqa: BLE001
            failed.append(f"{name}: building it failed: {_error(exc)}")
            keys = sorted({p["key"] for p in _weights_plan(dataclasses.replace(cfg, extractors=[name]))})
            fixes.append(f"{name}: " + (f"check the weights file set by {', '.join(keys)}" if keys
                                        else "check extract.extractors (registered names only)"))
            continue
        if video is None:
            done.append(f"{name} built ({_weights_label(extractor)})")
            continue
        try:
            problems = _forward(extractor, cfg, video)
        except Exception as exc:  # noqa: BLE001
            problems = [f"forward failed: {_error(exc)}"]
        if problems:
            failed.append(f"{name} ({_weights_label(extractor)}) on {where}: " + "; ".join(problems))
            fixes.append(f"{name}: the network computes wrong outputs on {where}; try --device cpu and "
                         f"extract.precision=fp32, and check the torch installation")
        else:
            done.append(f"{name} ({_weights_label(extractor)}) ok")
        del extractor
    detail = "; ".join(failed + done + notes)
    if failed:
        return Check("networks", False, detail, "; ".join(fixes))
    return Check("networks", True, f"built on {where} and computed a 2-segment window: {detail}")


# ------------------------------------------------------------------------------------------
# public


def check_environment(cfg, device: str | None = None, *, build_networks: bool = True) -> list[Check]:
    """Run the preflight checks for the resolved ``extract`` config section ``cfg``.

    ``device`` overrides ``cfg.device``. Returns ``packages``, ``decode``, ``resample``, ``device``
    and (``build_networks``) ``networks`` checks, in that order; none raises.
    """
    checks: list[Check] = []

    def run(name: str, fn, *args):
        try:
            result = fn(*args)
        except Exception as exc:  # noqa: BLE001 - the checks catch their own errors; this is the last net
            result = Check(name, False, f"the check itself failed: {_error(exc)}", "report this as a bug")
        check, extra = result if isinstance(result, tuple) else (result, None)
        checks.append(check)
        log.log(logging.DEBUG if check.ok else logging.WARNING, "preflight %s", check.line())
        return extra

    run("packages", _check_packages)
    video = run("decode", _check_decode, cfg)
    run("resample", _check_resample)
    usable = run("device", _check_device, cfg, device)
    if build_networks:
        run("networks", _check_networks, cfg, usable, video)
    return checks


def format_failures(checks: list[Check]) -> str:
    failed = [c for c in checks if not c.ok]
    lines = [f"the environment cannot run the extraction: {len(failed)} of {len(checks)} preflight checks failed"]
    for c in failed:
        lines.append(f"  {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"    fix: {c.fix}")
    return "\n".join(lines)


def require_environment(cfg, device: str | None = None, *, build_networks: bool = True) -> list[Check]:
    """:func:`check_environment`, raising :class:`PreflightError` (every failed check, with its fix) if any failed."""
    checks = check_environment(cfg, device, build_networks=build_networks)
    if any(not c.ok for c in checks):
        raise PreflightError(format_failures(checks), checks)
    return checks


# ------------------------------------------------------------------------------------------
# doctor


#: the distribution whose requirements the doctor compares
DISTRIBUTION = "avel"


def _canonical_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(text: str) -> str:
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        return Requirement(text).name
    except InvalidRequirement:
        return text.strip()


def avel_requirements() -> tuple[list[str] | None, str]:
    """``(requirements, where from)``: the installed avel's ``install_requires`` from its metadata
    (``importlib.metadata.requires``; the extras' requirements left out), or ``(None, why)`` when
    avel is not installed (a source tree run without ``pip install``)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        dist = metadata.distribution(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None, (f"{DISTRIBUTION} is not installed (no package metadata: a source tree used without "
                      f"`pip install -e .`?), so its requirements are unknown; run `pip install -e .` in the checkout")
    reqs = [r for r in dist.requires or [] if not _extra_only(Requirement(r))]
    where = f"{DISTRIBUTION} {dist.version} metadata"
    origin = dist.read_text("direct_url.json")
    if origin:
        try:
            where += f" ({'editable install of ' if json.loads(origin).get('dir_info', {}).get('editable') else ''}" \
                     f"{json.loads(origin)['url']})"
        except (ValueError, KeyError, AttributeError):
            pass
    return reqs, where


def _extra_only(req) -> bool:
    """A requirement of an extra (``pytest>=8.0; extra == "test"``), not of a plain install."""
    return req.marker is not None and "extra" in str(req.marker) and not req.marker.evaluate({"extra": ""})


def _read_constraints(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def _compare(requirement: str, source: str) -> dict[str, Any]:
    """One requirement against the installed version: installed, satisfied, exact (a fresh install
    resolves exactly this version)."""
    from packaging.requirements import Requirement

    req = Requirement(requirement)
    installed = _version(req.name)
    row: dict[str, Any] = {"name": req.name, "requirement": requirement, "source": source, "installed": installed,
                           "satisfied": None, "exact": False}
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        row["satisfied"], row["note"] = True, "not needed on this platform"
        return row
    row["exact"] = any(s.operator in ("==", "===") and "*" not in s.version for s in req.specifier)
    row["satisfied"] = installed is not None and req.specifier.contains(installed, prereleases=True)
    return row


def install_resolution() -> dict[str, Any]:
    """Would a fresh install resolve the installed versions? The installed version of every
    requirement of the installed avel (:func:`avel_requirements`, its metadata) and of every
    ``name==version`` line of ``constraints.txt`` (next to the ``extract`` package) is compared
    with it.

    Returns ``{requirements, constraints, rows, mismatches, ranges, same, note}``: ``requirements``
    says where avel's requirements came from (None when avel is not installed), ``constraints`` the
    path (or None); ``mismatches`` are requirements the installed version does not satisfy;
    ``ranges`` are satisfied requirements that are not exact pins (a fresh install may pick newer
    versions); ``same`` is None when neither is there.
    """
    requirements, where = avel_requirements()
    constraints = _project_dir() / "constraints.txt"
    pins = _read_constraints(constraints)
    out: dict[str, Any] = {"requirements": where if requirements is not None else None,
                           "constraints": str(constraints) if pins is not None else None}
    rows = [_compare(r, where) for r in requirements or []] + [_compare(p, "constraints.txt") for p in pins or []]
    if requirements is None and pins is None:
        out["note"] = f"{where}; no constraints.txt next to the package either: cannot tell whether a fresh install " \
                      f"would resolve the same versions"
        out.update(rows=[], mismatches=[], ranges=[], same=None)
        return out
    exact = {_canonical_name(r["name"]) for r in rows if r["exact"]}
    mismatches = [r for r in rows if r["satisfied"] is False]
    ranges = [r for r in rows if not r["exact"] and _canonical_name(r["name"]) not in exact and r["satisfied"]]
    out.update(rows=rows, mismatches=mismatches, ranges=ranges, same=not mismatches and not ranges)
    if mismatches:
        out["note"] = "NO: installed versions differ from the requirements: " + ", ".join(
            f"{r['name']} {r['installed'] or 'not installed'} (wants {r['requirement']}, {r['source']})" for r in mismatches)
    elif ranges:
        out["note"] = (f"PARTLY: the {len(exact)} exactly pinned packages match; {len(ranges)} requirements are ranges, "
                       f"for which a fresh install may resolve newer versions: "
                       + ", ".join(f"{r['requirement']} (installed {r['installed']})" for r in ranges))
    else:
        out["note"] = f"YES: every requirement is pinned exactly and installed at that version ({len(rows)} checked)"
    if requirements is None:
        out["note"] += f" (only constraints.txt: {where})"
    return out


def _devices() -> dict[str, Any]:
    out: dict[str, Any] = {"cpu_cores": _cpu_cores(), "cuda": []}
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        out["torch_cuda_build"] = torch.version.cuda
        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                props = torch.cuda.get_device_properties(i)
                entry = {"index": i, "name": props.name, "total_gib": round(props.total_memory / 2**30, 1)}
                try:
                    entry["free_gib"] = round(torch.cuda.mem_get_info(i)[0] / 2**30, 1)
                except Exception as exc:  # noqa: BLE001
                    entry["error"] = _error(exc)
                out["cuda"].append(entry)
        else:
            out["cuda_note"] = ("torch is a CPU-only build" if not torch.version.cuda
                                else "no usable CUDA device (driver or GPU missing)")
    except Exception as exc:  # noqa: BLE001
        out["error"] = f"torch unusable: {_error(exc)}"
    return out


def _locate_weights(spec: str, kind: str) -> dict[str, Any]:
    """Where the weights of ``spec`` are (or would be looked for), without downloading."""
    from . import weights as W

    canon = W.CANONICAL[kind]
    spec = str(spec).strip()
    if spec == "random":
        return {"status": "random", "text": "random initialisation (no file)"}
    canon = W.ALTERNATES.get(kind, {}).get(spec, canon)  # e.g. vgg19 "keras-imagenet": any of its files
    if spec in canon.specs:
        searched = W._candidate_paths(canon)  # the module's own lookup order
        found = next((p for p in searched if p.is_file()), None)
        if found is not None:
            return {"status": "found", "path": str(found), "text": f"{canon.filename}: found at {found}"}
        download = ("downloads are off ($AVEL_OFFLINE)" if W._offline()
                    else f"the first run downloads it from {canon.url}")
        return {"status": "missing", "searched": [str(p) for p in searched],
                "text": f"{canon.filename}: NOT FOUND; looked in " + ", ".join(str(p) for p in searched) + f"; {download}"}
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        return {"status": "found", "path": str(path.resolve()), "text": f"file {path.resolve()}"}
    return {"status": "missing", "searched": [str(path.resolve())], "text": f"file {path.resolve()}: DOES NOT EXIST"}


@contextlib.contextmanager
def _no_downloads() -> Iterator[None]:
    """Weights resolution without downloads (the doctor reports, it does not fetch 550 MB)."""
    from .weights import OFFLINE_ENV

    old = os.environ.get(OFFLINE_ENV)
    os.environ[OFFLINE_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(OFFLINE_ENV, None)
        else:
            os.environ[OFFLINE_ENV] = old


def doctor_json(pipeline, *, device: str | None = None, build_networks: bool = True) -> dict[str, Any]:
    """The doctor report as a JSON-able dict (see :func:`doctor_report`)."""
    import platform

    cfg = pipeline.extract
    data: dict[str, Any] = {
        "python": {"version": sys.version.split()[0], "implementation": platform.python_implementation(),
                   "executable": sys.executable},
        "platform": platform.platform(),
        "config": {"source": getattr(pipeline, "source", None) or "defaults", "extractors": list(cfg.extractors),
                   "device": cfg.device if device is None else device, "precision": cfg.precision},
        "packages": {name: _version(name) for name in REPORTED_PACKAGES},
        "devices": _devices(),
    }
    weights = []
    try:
        for entry in _weights_plan(cfg):
            try:
                where = _locate_weights(entry["spec"], entry["kind"])
            except Exception as exc:  # noqa: BLE001
                where = {"status": "error", "text": _error(exc)}
            weights.append({**entry, **where})
    except Exception as exc:  # noqa: BLE001
        weights.append({"status": "error", "text": _error(exc)})
    data["weights"] = weights
    with _no_downloads():
        data["checks"] = [dataclasses.asdict(c) for c in check_environment(cfg, device, build_networks=build_networks)]
    data["ok"] = all(c["ok"] for c in data["checks"])
    try:
        data["install"] = install_resolution()
    except Exception as exc:  # noqa: BLE001
        data["install"] = {"note": f"could not compare: {_error(exc)}", "same": None, "mismatches": [], "ranges": []}
    return data


def render_doctor(data: dict[str, Any]) -> str:
    """The text form of a :func:`doctor_json` dict."""
    py, dev = data["python"], data["devices"]
    lines = [
        "avel doctor",
        f"python    {py['version']} ({py['implementation']}) {py['executable']}",
        f"platform  {data['platform']}",
        f"config    {data['config']['source']}: extractors {', '.join(data['config']['extractors'])}; "
        f"device {data['config']['device']}; precision {data['config']['precision']}",
        "",
        "packages",
    ]
    width = max(len(n) for n in data["packages"])
    lines += [f"  {name:<{width}}  {version or 'not installed'}" for name, version in data["packages"].items()]
    lines += ["", "devices", f"  cpu    {dev['cpu_cores']} cores" + (
        f", torch threads {dev['torch_threads']}" if "torch_threads" in dev else "")]
    if dev.get("error"):
        lines.append(f"  cuda   ? ({dev['error']})")
    elif dev["cuda"]:
        for d in dev["cuda"]:
            memory = f"{d.get('free_gib', '?')} GiB free of {d['total_gib']} GiB" if "error" not in d else d["error"]
            lines.append(f"  cuda:{d['index']} {d['name']}, {memory}")
    else:
        lines.append(f"  cuda   none ({dev.get('cuda_note', '')}; torch CUDA build: {dev.get('torch_cuda_build')})")
    lines += ["", "weights"]
    for w in data["weights"]:
        if "kind" in w:
            what = w["extractor"] if w["kind"] == w["extractor"] else f"{w['extractor']} ({w['kind']})"
            lines.append(f"  {what}: {w['key']}={w['spec']} -> {w['text']}")
        else:
            lines.append(f"  ? {w['text']}")
    lines += ["", "checks (weights are looked up, never downloaded, here)"]
    for c in data["checks"]:
        lines.append(f"  [{'OK' if c['ok'] else 'FAIL'}] {c['name']}: {c['detail']}")
        if not c["ok"] and c.get("fix"):
            lines.append(f"         fix: {c['fix']}")
    install = data["install"]
    sources = ", ".join(s for s in (install.get("requirements"), install.get("constraints")) if s) or "none"
    lines += ["", f"fresh install ({sources})", f"  {install['note']}", "",
              "result: " + ("all checks passed" if data["ok"] else
                            "FAILED: " + ", ".join(c["name"] for c in data["checks"] if not c["ok"]))]
    return "\n".join(lines)


def doctor_report(pipeline, *, device: str | None = None, build_networks: bool = True) -> str:
    """Human-readable report: python and platform, package versions, devices, weights files (where
    found or looked for; nothing is downloaded), the preflight checks with OK/FAIL and whether a
    fresh install would resolve the same versions (avel's requirements / constraints.txt)."""
    return render_doctor(doctor_json(pipeline, device=device, build_networks=build_networks))
