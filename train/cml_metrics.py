"""Cross-modality localization (CML, Tian et al. ECCV 2018 sec. 5; Xue et al. TMM 2021 sec. III-D):
pure functions for training pairs, the sliding-window search and the metric.

The task: a video has T one-second segments and an event covering ``onset <= t < onset + l``.
Given the l event seconds of one modality (the *query*), find where they sit in the other
modality. A2V: audio query, search the visual track; V2A: visual query, search the audio track.

With a per-segment distance matrix ``dist[i, j]`` = distance between query-modality segment i
and target-modality segment j ([T, T]), the prediction is (Tian et al. eq. 8)::

    t* = argmin_{t in 0 .. T-l}  sum_{s=0}^{l-1} dist[onset + s, t + s]

(first minimum on ties, as ``np.argmin`` in the reference ``cmm_test.py``). A sample is correct
when t* equals ``onset`` (exact match); the chance level of a sample is 1 / (T - l + 1).

Only samples with 0 < l < T are evaluated (an event covering the whole video has one position).
Training pairs are all segments of the training videos, label 1 where the segment lies inside an
event of its video (its audio and visual match), 0 elsewhere.

This module needs numpy only.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class CmlQuery:
    """One evaluated sample: the event ``onset .. onset + length - 1`` of feature row ``key``."""

    sample_id: str
    key: str
    onset: int
    length: int


def event_span(onset: int, offset: int, segments: int) -> tuple[int, int]:
    """(onset, length) of the event ``onset <= t < offset`` clipped to ``0 .. segments``."""
    lo, hi = max(0, int(onset)), min(int(segments), int(offset))
    return lo, max(0, hi - lo)


def is_evaluable(length: int, segments: int) -> bool:
    """Tian et al.: only events shorter than the whole video (0 < l < T) are evaluated."""
    return 0 < length < segments


def cml_queries(samples: Iterable, segments: int) -> list[CmlQuery]:
    """The evaluable queries of manifest samples (objects with ``sample_id, key, category, onset,
    offset``): samples with an event of length 0 < l < T, in manifest order."""
    out = []
    for s in samples:
        if not s.category:
            continue
        onset, length = event_span(s.onset, s.offset, segments)
        if is_evaluable(length, segments):
            out.append(CmlQuery(s.sample_id, s.key, onset, length))
    return out


def match_labels(samples: Iterable, segments: int) -> dict[str, np.ndarray]:
    """Per feature key, [T] float32 pair labels: 1 where the segment lies inside an event of any
    sample of that video window (audio and visual match), 0 elsewhere. Keys in first-seen order."""
    out: dict[str, np.ndarray] = {}
    for s in samples:
        row = out.setdefault(s.key, np.zeros(segments, dtype=np.float32))
        if s.category:
            onset, length = event_span(s.onset, s.offset, segments)
            row[onset:onset + length] = 1.0
    return out


def window_scores(dist: np.ndarray, onset: int, length: int) -> np.ndarray:
    """[T - l + 1] cumulative distances of the query rows ``onset .. onset+l-1`` of ``dist``
    ([T, T], query segment x target segment) against every target window start t:
    ``score[t] = sum_s dist[onset + s, t + s]``."""
    dist = np.asarray(dist)
    if dist.ndim != 2 or dist.shape[0] != dist.shape[1]:
        raise ValueError(f"dist must be a square [T, T] matrix, got shape {dist.shape}")
    T = dist.shape[0]
    if not (0 < length <= T and 0 <= onset <= T - length):
        raise ValueError(f"query onset={onset} length={length} does not fit in T={T} segments")
    starts = np.arange(T - length + 1)[:, None]  # [W, 1]
    offsets = np.arange(length)[None, :]  # [1, l]
    return dist[onset + offsets, starts + offsets].sum(axis=1)


def search_start(dist: np.ndarray, onset: int, length: int) -> int:
    """Predicted start t* (0-based) of the query's match: argmin of :func:`window_scores`."""
    return int(np.argmin(window_scores(dist, onset, length)))


def predict_starts(dist_av: np.ndarray, onsets: Sequence[int], lengths: Sequence[int]) -> dict[str, np.ndarray]:
    """A2V and V2A predicted starts for N queries.

    ``dist_av`` [N, T, T]: distance between audio segment i and visual segment j of the query's
    video. A2V searches visual windows for the audio query (rows = audio); V2A searches audio
    windows for the visual query (the transpose). Returns ``{"a2v": [N], "v2a": [N]}`` int64.
    """
    dist_av = np.asarray(dist_av)
    if dist_av.ndim != 3 or len(dist_av) != len(onsets) or len(onsets) != len(lengths):
        raise ValueError(f"need dist_av [N, T, T] and N onsets/lengths, got {dist_av.shape}, {len(onsets)}, {len(lengths)}")
    a2v = [search_start(d, o, n) for d, o, n in zip(dist_av, onsets, lengths)]
    v2a = [search_start(d.T, o, n) for d, o, n in zip(dist_av, onsets, lengths)]
    return {"a2v": np.asarray(a2v, dtype=np.int64), "v2a": np.asarray(v2a, dtype=np.int64)}


def exact_match_accuracy(predicted: Sequence[int], true: Sequence[int]) -> float:
    """% of samples whose predicted start equals the true start."""
    predicted, true = np.asarray(predicted), np.asarray(true)
    if predicted.shape != true.shape:
        raise ValueError(f"predicted {predicted.shape} and true {true.shape} starts differ in shape")
    if predicted.size == 0:
        raise ValueError("no samples to score (no event shorter than the video in this split?)")
    return float(100.0 * np.mean(predicted == true))


def chance_accuracy(lengths: Sequence[int], segments: int) -> float:
    """% expected from a uniformly random start: mean over samples of 1 / (T - l + 1)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        raise ValueError("no samples to score")
    if np.any(lengths < 1) or np.any(lengths > segments):
        raise ValueError(f"event lengths must lie in 1..{segments}, got {sorted(set(lengths.tolist()))}")
    return float(100.0 * np.mean(1.0 / (segments - lengths + 1)))


def cml_metrics(dist_av: np.ndarray, onsets: Sequence[int], lengths: Sequence[int]) -> dict[str, float]:
    """A2V / V2A exact-match accuracy (%), their mean, the chance level (%) and the sample count."""
    dist_av = np.asarray(dist_av)
    T = dist_av.shape[-1]
    preds = predict_starts(dist_av, onsets, lengths)
    a2v = exact_match_accuracy(preds["a2v"], onsets)
    v2a = exact_match_accuracy(preds["v2a"], onsets)
    return {
        "a2v_acc": a2v,
        "v2a_acc": v2a,
        "mean_acc": (a2v + v2a) / 2.0,
        "chance_acc": chance_accuracy(lengths, T),
        "num_samples": float(len(onsets)),
    }
