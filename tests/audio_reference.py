"""Independent numpy references for the audio tests (shared by test_audio_frontend.py and test_native.py).

:func:`ref_resampy_kaiser_best` transcribes resampy's resampling loop output sample by output
sample (no polyphase bank, no torch), so it checks :func:`extract.audio.resample` end to end.
"""
from __future__ import annotations

import numpy as np


def ref_resampy_kaiser_best(x: np.ndarray, sr_in: int, sr_out: int, chunk: int = 2048) -> np.ndarray:
    """resampy's resampling loop (resampy/interpn.py) with its kaiser_best filter (beta 12.9846,
    rolloff 0.917347, 50 zero crossings, table stride int(scale * 2^13)), evaluated exactly.

    Output samples are computed ``chunk`` at a time (the same formula; bounded memory for long signals).
    """
    beta, roll, zeros, table = 12.9846, 0.917347, 50, 2**13
    x = np.asarray(x, dtype=np.float64)
    ratio = sr_out / sr_in
    scale = min(1.0, ratio)
    step = int(scale * table) / table  # zero-crossing units between neighbouring input samples

    def window(u):
        taper = np.i0(beta * np.sqrt(np.clip(1.0 - (u / zeros) ** 2, 0.0, None))) / np.i0(beta)
        return np.where(u <= zeros, roll * np.sinc(roll * u) * taper, 0.0) * scale

    t_all = np.arange(int(len(x) * ratio)) * (1.0 / ratio)
    i = np.arange(int(zeros / step) + 2)[None, :]
    pieces = []
    for lo in range(0, t_all.size, chunk):
        t = t_all[lo: lo + chunk]
        n = t.astype(np.int64)
        frac = scale * (t - n)
        left = n[:, None] - i
        right = n[:, None] + 1 + i
        y = (window(frac[:, None] + i * step) * np.where(left >= 0, x[np.clip(left, 0, None)], 0.0)).sum(1)
        y += (window((scale - frac)[:, None] + i * step) * np.where(right < len(x), x[np.clip(right, None, len(x) - 1)], 0.0)).sum(1)
        pieces.append(y)
    return np.concatenate(pieces) if pieces else np.zeros(0)
