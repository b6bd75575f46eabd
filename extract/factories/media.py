"""Writing real encoded clips (H.264 + AAC in MP4) with PyAV: demo data and test fixtures."""
from __future__ import annotations

import fractions
from pathlib import Path

import numpy as np


def _rate(fps: float | fractions.Fraction) -> fractions.Fraction:
    if isinstance(fps, fractions.Fraction):
        return fps
    return fractions.Fraction(fps).limit_denominator(1001)


def write_clip(
    path: str | Path,
    frames: np.ndarray | None,
    fps: float | fractions.Fraction = 25,
    audio: np.ndarray | None = None,
    sample_rate: int = 44100,
    *,
    video_codec: str = "libx264",
    audio_codec: str = "aac",
    crf: int = 18,
) -> Path:
    """Encode ``frames`` (uint8 RGB [N, H, W, 3], H and W even) at ``fps`` and ``audio``
    (float32 in [-1, 1], [channels, samples] or [samples]) into one container file.

    Either stream may be None (a silent video, or an audio-only file). Returns ``path``.
    """
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), mode="w")
    try:
        vstream = astream = None
        if frames is not None:
            frames = np.asarray(frames, dtype=np.uint8)
            if frames.ndim != 4 or frames.shape[-1] != 3:
                raise ValueError(f"frames must be [N, H, W, 3] uint8, got {frames.shape}")
            vstream = container.add_stream(video_codec, rate=_rate(fps))
            vstream.height, vstream.width = int(frames.shape[1]), int(frames.shape[2])
            vstream.pix_fmt = "yuv420p"
            if video_codec == "libx264":
                vstream.options = {"crf": str(crf), "preset": "veryfast"}
        if audio is not None:
            audio = np.asarray(audio, dtype=np.float32)
            if audio.ndim == 1:
                audio = audio[None, :]
            layout = {1: "mono", 2: "stereo", 6: "5.1"}.get(audio.shape[0])
            if layout is None:
                raise ValueError(f"audio with {audio.shape[0]} channels is not supported (1, 2 or 6)")
            astream = container.add_stream(audio_codec, rate=int(sample_rate))
            astream.layout = layout
        if vstream is not None:
            for image in frames:
                frame = av.VideoFrame.from_ndarray(image, format="rgb24")
                for packet in vstream.encode(frame):
                    container.mux(packet)
            for packet in vstream.encode():
                container.mux(packet)
        if astream is not None:
            block = 1024
            planar = np.ascontiguousarray(audio)
            for start in range(0, planar.shape[1], block):
                chunk = np.ascontiguousarray(planar[:, start : start + block])
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=astream.layout.name)
                frame.sample_rate = int(sample_rate)
                for packet in astream.encode(frame):
                    container.mux(packet)
            for packet in astream.encode():
                container.mux(packet)
    finally:
        container.close()
    return path
