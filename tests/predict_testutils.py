"""Clips for the avel-predict tests, drawn with the demo's generator (extract.factories.demo) but in no split:
a clip with a known event interval, a long clip made of several demo plans, a clip without audio."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from extract.factories import demo
from extract.factories.media import write_clip


def plan(index: int, category: str, onset: int, offset: int, video_id: str = "probe") -> demo.DemoVideo:
    """A 10-s demo plan: the class object AND its sound in seconds onset..offset-1, nothing else
    (no distractor, no one-modality cue) in the other seconds."""
    seconds = demo.SECONDS
    cue = tuple(category if onset <= t < offset else "" for t in range(seconds))
    return demo.DemoVideo(index=index, video_id=video_id, split="predict", category=category, onset=onset,
                          offset=offset, visual=cue, audio=cue)


def write_plans(path: Path, plans: Sequence[demo.DemoVideo], seconds: float | None = None, seed: int = 7,
                audio: bool = True) -> Path:
    """Encode the plans one after the other (10 s each) as one clip, cut to ``seconds``."""
    frames = np.concatenate([demo.render_frames(p, seed) for p in plans])
    track = np.concatenate([demo.render_audio(p, seed) for p in plans])
    if seconds is not None:
        frames = frames[: int(round(seconds * demo.FPS))]
        track = track[: int(round(seconds * demo.SAMPLE_RATE))]
    write_clip(path, frames, fps=demo.FPS, audio=demo.compensate_priming(track) if audio else None,
               sample_rate=demo.SAMPLE_RATE, crf=demo.CRF)
    return path


def expected_labels(plans: Sequence[demo.DemoVideo], seconds: int) -> list[str]:
    """The true label of every second of :func:`write_plans` ("background" outside the events)."""
    out = []
    for p in plans:
        out.extend(p.label(t) or "background" for t in range(demo.SECONDS))
    return out[:seconds]
