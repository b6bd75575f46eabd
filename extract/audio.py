"""The VGGish audio front end, as tensorflow/models research/audioset/vggish computes it.

Reference: ``mel_features.py``, ``vggish_input.py`` and ``vggish_params.py`` of the AudioSet VGGish
release (also shipped by the torchvggish port). The numbers are:

- mono: the channels are averaged (``vggish_input.waveform_to_examples``: ``np.mean(data, axis=1)``
  on [samples, channels]; :func:`to_mono` takes channels first, as PyAV/decord decode);
- 16 kHz: the reference resamples with ``resampy.resample`` (filter ``kaiser_best``: Kaiser
  windowed sinc, beta 12.9846, rolloff 0.917347, 50 zero crossings, 2^13-entry table). We compute
  the same filter ourselves (:func:`resample`: a polyphase bank of resampy's weights applied with
  ``torch.nn.functional.conv1d``), so neither resampy (and numba) nor torchaudio is a dependency;
  the output agrees with a float64 transcription of resampy's loop to ~1e-6 (absolute, for
  full-scale signals);
- STFT: 25 ms periodic Hann window (400 samples), hop 10 ms (160 samples), no centring/padding,
  FFT length 512 (next power of two), magnitude ``|rfft|`` -> 257 bins;
- mel: 64 bands, 125-7500 Hz, HTK mel scale ``1127 ln(1 + f/700)``, triangles linear in *mel*,
  the DC bin zeroed (:func:`mel_matrix`); no area normalisation;
- ``log(mel + 0.01)``;
- examples: 96 frames (0.96 s) x 64 bands, hop 96 frames.

AVE (Tian et al. 2018) extracts one VGGish example per 1-s segment: YapengTian/AVE-ECCV18
``vggish_input.wavfile_to_examples`` slices ``wav[i * sr:(i + 1) * sr]`` for i = 0..9 and keeps the
single example ``waveform_to_examples`` makes of each slice. :func:`segment_patches` therefore
takes, for segment ``t``, the 96 log-mel frames whose windows start at samples ``16000 t + 160 k``
(k = 0..95), i.e. the frames covering samples ``[16000 t, 16000 t + 15600)`` (the first 0.975 s
of the second; frame k spans 25 ms from ``t + k/100`` s). Because 16000 is a multiple of the
160-sample hop, this is exactly the first example of ``waveform_to_examples`` applied to second
``t`` alone; patches of different seconds share no samples. One difference from
the AVE script: it resampled each 1-s slice on its own, we resample the whole window once (the
two differ only within the resampling filter's reach of a slice edge).

This module needs numpy; :func:`resample` imports torch when called (no torchaudio).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math

import numpy as np

log = logging.getLogger(__name__)

__all__ = [
    "SAMPLE_RATE",
    "to_mono",
    "resample",
    "hertz_to_mel",
    "periodic_hann",
    "frame_signal",
    "stft_magnitude",
    "mel_matrix",
    "log_mel_spectrogram",
    "segment_patches",
    "patch_sample_span",
]

# vggish_params.py
SAMPLE_RATE = 16000
STFT_WINDOW_SECONDS = 0.025
STFT_HOP_SECONDS = 0.010
NUM_MEL_BINS = 64
MEL_MIN_HZ = 125.0
MEL_MAX_HZ = 7500.0
LOG_OFFSET = 0.01
EXAMPLE_WINDOW_SECONDS = 0.96

WINDOW_SAMPLES = int(round(SAMPLE_RATE * STFT_WINDOW_SECONDS))  # 400
HOP_SAMPLES = int(round(SAMPLE_RATE * STFT_HOP_SECONDS))  # 160
FFT_LENGTH = 2 ** int(math.ceil(math.log2(WINDOW_SAMPLES)))  # 512
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_SAMPLES  # 100
PATCH_FRAMES = int(round(EXAMPLE_WINDOW_SECONDS * FRAMES_PER_SECOND))  # 96

#: resampy's "kaiser_best" filter (resampy/filters.py: beta 12.9846, roll 0.917347, 50 zeros,
#: precision 13), evaluated at resampy's tap positions by our own polyphase resampler
RESAMPLER = {
    "name": "avel kaiser-windowed sinc (resampy kaiser_best filter), torch conv1d",
    "resampling_method": "polyphase kaiser-windowed sinc at resampy's tap positions",
    "beta": 12.9846,
    "rolloff": 0.917347,
    "zero_crossings": 50,
    "table_bits": 13,
}


def to_mono(samples: np.ndarray) -> np.ndarray:
    """Average the channels: [C, S] (channels first, as PyAV decodes planar audio) or [S] -> [S] float32."""
    samples = np.asarray(samples)
    if samples.ndim == 1:
        return samples.astype(np.float32, copy=False)
    if samples.ndim != 2:
        raise ValueError(f"to_mono expects [C, S] or [S] samples, got shape {samples.shape}")
    return samples.astype(np.float64).mean(axis=0).astype(np.float32)


def resample(x: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Resample a mono waveform [S] from ``sr_in`` to ``sr_out`` Hz -> [int(S * sr_out / sr_in)] float32.

    The filter is resampy's ``kaiser_best`` (the VGGish reference's resampler, :data:`RESAMPLER`):
    ``h(u) = scale * roll * sinc(roll * u) * kaiser(u / 50)`` for ``|u| <= 50`` zero crossings, with
    ``scale = min(1, sr_out / sr_in)``. Output sample ``j`` sits at input time ``t = j sr_in / sr_out``;
    with ``n = floor(t)`` and ``f = scale (t - n)``, resampy weights input sample ``n - i`` by
    ``h(f + i step)`` and sample ``n + 1 + i`` by ``h(scale - f + i step)``, where ``step`` is
    its table stride ``int(scale * 2^13) / 2^13`` (which is ``scale`` truncated: resampy's filter
    is therefore not exactly a function of the distance ``t - k``). These weights depend only on
    the output phase ``j mod (sr_out / g)`` (``g = gcd(sr_in, sr_out)``), so they form a kernel
    bank [sr_out / g, 1, width] (:func:`_kernel_bank`, computed in float64, cached) that ``conv1d`` applies
    with stride ``sr_in / g`` to the zero-padded signal (samples outside the signal count as
    zeros, as in resampy). A bank larger than :data:`BANK_BYTES` (rates sharing few factors with
    ``sr_out``: 16,000 phases x ~sr_in taps) is never built whole: blocks of its phases are built
    from the compact weights (:func:`_phase_weights`) and applied one after the other, each
    output phase by the same ``conv1d`` arithmetic, so the output is the same. The signal is convolved in float32 (rounding ~1e-7 relative).
    Output length as resampy: ``int(S * sr_out / sr_in)``; any length works, including signals
    shorter than the filter.
    """
    x = np.ascontiguousarray(np.asarray(x, dtype=np.float32).reshape(-1))
    sr_in, sr_out = int(sr_in), int(sr_out)
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"resample: sample rates must be positive, got {sr_in} -> {sr_out}")
    if sr_in == sr_out or x.size == 0:
        return x.copy()
    length = x.size * sr_out // sr_in  # == int(S * sr_out / sr_in), without float rounding
    if length == 0:
        return np.zeros(0, np.float32)
    import torch

    weights = _phase_weights(sr_in, sr_out)
    phases, stride, left, width = weights.phases, weights.stride, weights.left, weights.width
    blocks = -(-length // phases)  # conv1d output positions: each yields one output per phase
    right = max(0, (blocks - 1) * stride + width - left - x.size)
    padded = np.zeros(left + x.size + right, np.float32)
    padded[left: left + x.size] = x
    with torch.inference_mode():
        signal = torch.from_numpy(padded)[None, None]  # [1, 1, L]
        rows = max(1, BANK_BYTES // (4 * width))  # phases per bank block
        if rows >= phases:
            y = torch.nn.functional.conv1d(signal, _kernel_bank(sr_in, sr_out)[0], stride=stride)  # [1, phases, >= blocks]
            out = y[0, :, :blocks].T.reshape(-1)[:length]  # output j = block * phases + phase
            return out.numpy().copy()
        out = torch.empty(blocks, phases)
        for lo in range(0, phases, rows):  # a bank too large to hold: a block of phases at a time
            hi = min(phases, lo + rows)
            y = torch.nn.functional.conv1d(signal, weights.dense(lo, hi), stride=stride)  # [1, hi - lo, >= blocks]
            out[:, lo:hi] = y[0, :, :blocks].T
        return out.reshape(-1)[:length].numpy().copy()


#: the largest kernel bank (bytes) that :func:`resample` builds at once and caches: rates that
#: share few factors with the output rate (11,127 Hz, a mislabelled 44,099 Hz -> 16 kHz: 16,000
#: phases of 11,000-44,000 taps, 0.7-2.8 GB) are applied a block of phases at a time instead
BANK_BYTES = 16 * 2 ** 20


@dataclasses.dataclass(frozen=True)
class PhaseWeights:
    """resampy's kaiser_best weights per output phase, compactly: phase ``p`` weighs input samples
    ``base[p] - i`` by ``w_left[p, i]`` and ``base[p] + 1 + i`` by ``w_right[p, i]`` (i < taps),
    relative to its block's first sample (float32 of the float64 values). :meth:`dense` lays rows
    out as the kernel bank of ``conv1d`` ([rows, 1, width], tap ``k`` on sample ``k - left``)."""

    phases: int
    stride: int
    left: int
    width: int
    base: np.ndarray  # [phases] int64
    w_left: np.ndarray  # [phases, taps] float32
    w_right: np.ndarray  # [phases, taps] float32

    def dense(self, lo: int, hi: int):
        """torch float32 [hi - lo, 1, width]: rows ``lo..hi-1`` of the kernel bank."""
        import torch

        taps = self.w_left.shape[1]
        bank = np.zeros((hi - lo, self.width), np.float32)
        rows = np.arange(hi - lo)[:, None]
        offsets = np.arange(taps)[None, :]
        base = self.base[lo:hi, None] + self.left
        bank[rows, base - offsets] = self.w_left[lo:hi]
        bank[rows, base + 1 + offsets] = self.w_right[lo:hi]
        return torch.from_numpy(bank)[:, None, :]

    @property
    def nbytes(self) -> int:
        return self.base.nbytes + self.w_left.nbytes + self.w_right.nbytes


@functools.lru_cache(maxsize=8)
def _phase_weights(sr_in: int, sr_out: int) -> PhaseWeights:
    """The :class:`PhaseWeights` of ``sr_in -> sr_out`` (cached: at most 2 x phases x taps floats,
    17 MB for 44,099 Hz -> 16 kHz, where the dense bank would be 2.8 GB)."""
    g = math.gcd(sr_in, sr_out)
    phases, stride = sr_out // g, sr_in // g
    zeros = RESAMPLER["zero_crossings"]
    table = 2 ** RESAMPLER["table_bits"]
    scale = min(1.0, sr_out / sr_in)
    step = int(scale * table) / table  # resampy's index_step, in zero crossings per input sample
    taps = int(zeros / step) + 1  # i = 0..taps-1 covers every u = frac + i step <= zeros (frac >= 0)
    p = np.arange(phases, dtype=np.int64)
    base = p * stride // phases  # n_p = floor(p sr_in / sr_out), exactly
    frac = scale * ((p * stride - base * phases) / phases)  # scale * (t - n), in [0, scale)
    i = np.arange(taps, dtype=np.float64)[None, :]
    w_left = np.empty((phases, taps), np.float32)
    w_right = np.empty((phases, taps), np.float32)
    for lo in range(0, phases, 1024):  # float64 in blocks: no phases x taps float64 temporaries
        f = frac[lo:lo + 1024, None]
        w_left[lo:lo + 1024] = _kaiser_sinc(f + i * step, scale)  # weights of samples n - i
        w_right[lo:lo + 1024] = _kaiser_sinc((scale - f) + i * step, scale)  # weights of samples n + 1 + i
    left = taps - 1  # the earliest tap of phase 0 (n_0 = 0) is sample -(taps - 1)
    width = left + int(base[-1]) + 1 + taps
    return PhaseWeights(phases, stride, left, width, base, w_left, w_right)


@functools.lru_cache(maxsize=8)
def _kernel_bank(sr_in: int, sr_out: int):
    """resampy's kaiser_best weights per output phase: (torch [sr_out/g, 1, width] float32, left, sr_in/g).

    Row ``p`` holds the weights of output ``j = q * (sr_out/g) + p``; its tap ``k`` multiplies input
    sample ``q * (sr_in/g) + k - left``. Computed in float64 (exact integer phase arithmetic),
    stored as float32; cached (do not modify the returned tensor). Used by :func:`resample` only
    when it takes at most :data:`BANK_BYTES`; larger banks are never built whole.
    """
    weights = _phase_weights(sr_in, sr_out)
    return weights.dense(0, weights.phases), weights.left, weights.stride


def _kaiser_sinc(u: np.ndarray, scale: float) -> np.ndarray:
    """resampy's kaiser_best filter at ``u`` zero crossings (u >= 0), times ``scale``; 0 beyond 50."""
    beta, roll, zeros = RESAMPLER["beta"], RESAMPLER["rolloff"], RESAMPLER["zero_crossings"]
    inside = u <= zeros
    taper = np.i0(beta * np.sqrt(np.clip(1.0 - (u / zeros) ** 2, 0.0, None))) / np.i0(beta)
    return np.where(inside, scale * roll * np.sinc(roll * u) * taper, 0.0)


def hertz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """HTK mel scale: ``1127 ln(1 + f / 700)``."""
    return 1127.0 * np.log(1.0 + np.asarray(hz, dtype=np.float64) / 700.0)


def periodic_hann(length: int) -> np.ndarray:
    """Periodic Hann window ``0.5 - 0.5 cos(2 pi n / length)``, n = 0..length-1 (not symmetric)."""
    n = np.arange(length, dtype=np.float64)
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * n / length)


def frame_signal(x: np.ndarray, window: int, hop: int) -> np.ndarray:
    """[S] -> [1 + (S - window) // hop, window] overlapping frames (no padding; [0, window] if S < window)."""
    x = np.ascontiguousarray(x)
    count = 1 + (x.shape[0] - window) // hop if x.shape[0] >= window else 0
    if count == 0:
        return np.zeros((0, window), dtype=x.dtype)
    view = np.lib.stride_tricks.sliding_window_view(x, window)
    return view[: (count - 1) * hop + 1 : hop]


def stft_magnitude(x: np.ndarray) -> np.ndarray:
    """[S] float -> [frames, 257] float64 ``|rfft(frame * periodic_hann(400), 512)|``, hop 160."""
    frames = frame_signal(np.asarray(x, dtype=np.float64), WINDOW_SAMPLES, HOP_SAMPLES)
    return np.abs(np.fft.rfft(frames * periodic_hann(WINDOW_SAMPLES), FFT_LENGTH))


def mel_matrix(
    num_mel_bins: int = NUM_MEL_BINS,
    num_spectrogram_bins: int = FFT_LENGTH // 2 + 1,
    sample_rate: int = SAMPLE_RATE,
    lower_hz: float = MEL_MIN_HZ,
    upper_hz: float = MEL_MAX_HZ,
) -> np.ndarray:
    """[257, 64] float64 matrix that post-multiplies a magnitude spectrogram (VGGish mel weights).

    Band i is a triangle over ``band_edges[i], band_edges[i+1], band_edges[i+2]`` where the
    ``num_mel_bins + 2`` edges are equally spaced in HTK mel between ``lower_hz`` and ``upper_hz``;
    each FFT bin's weight is ``max(0, min(rising, falling))`` evaluated on the bin's mel value.
    Row 0 (DC) is zero. Differs from librosa's ``mel(htk=True)``, which builds the triangles in
    hertz and area-normalises them.
    """
    nyquist = sample_rate / 2.0
    if not 0.0 <= lower_hz < upper_hz <= nyquist:
        raise ValueError(f"mel_matrix: need 0 <= lower_hz < upper_hz <= {nyquist}, got {lower_hz}, {upper_hz}")
    bins_mel = hertz_to_mel(np.linspace(0.0, nyquist, num_spectrogram_bins))[:, None]
    edges = np.linspace(hertz_to_mel(lower_hz), hertz_to_mel(upper_hz), num_mel_bins + 2)
    lower, centre, upper = edges[:-2][None, :], edges[1:-1][None, :], edges[2:][None, :]
    rising = (bins_mel - lower) / (centre - lower)
    falling = (upper - bins_mel) / (upper - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights[0, :] = 0.0
    return weights


_MEL = None


def _mel() -> np.ndarray:
    global _MEL
    if _MEL is None:
        _MEL = mel_matrix()
    return _MEL


def log_mel_spectrogram(wave16k: np.ndarray) -> np.ndarray:
    """16 kHz mono waveform [S] -> [frames, 64] float64 ``log(mel(|STFT|) + 0.01)``.

    ``frames = 1 + (S - 400) // 160`` (0 when S < 400); frame k covers samples ``[160 k, 160 k + 400)``.
    """
    return np.log(stft_magnitude(wave16k) @ _mel() + LOG_OFFSET)


def patch_sample_span(t: int) -> tuple[int, int]:
    """Samples ``[begin, end)`` of a 16 kHz window that patch ``t`` is computed from (15600 samples)."""
    begin = t * SAMPLE_RATE
    return begin, begin + (PATCH_FRAMES - 1) * HOP_SAMPLES + WINDOW_SAMPLES


def segment_patches(wave16k: np.ndarray, segments: int) -> tuple[np.ndarray, np.ndarray]:
    """One VGGish example per 1-s segment: ([T, 96, 64] float32 log-mel patches, [T] bool valid).

    Patch ``t`` = log-mel frames ``100 t ... 100 t + 95`` of the window, computed from samples
    ``[16000 t, 16000 t + 15600)`` (:func:`patch_sample_span`). Where the waveform ends before a
    patch's last sample, the missing samples are zeros and the patch is marked invalid
    (``valid[t] = len(wave16k) >= 16000 t + 15600``). Samples beyond the last patch are ignored.
    """
    wave = np.asarray(wave16k, dtype=np.float64).reshape(-1)
    if segments <= 0:
        return np.zeros((0, PATCH_FRAMES, NUM_MEL_BINS), np.float32), np.zeros(0, bool)
    ends = np.array([patch_sample_span(t)[1] for t in range(segments)])
    valid = wave.size >= ends
    needed = int(ends[-1])
    if wave.size < needed:
        wave = np.concatenate([wave, np.zeros(needed - wave.size)])
    else:
        wave = wave[:needed]
    logmel = log_mel_spectrogram(wave)  # [(segments-1)*100 + 96, 64]
    starts = np.arange(segments) * FRAMES_PER_SECOND
    idx = starts[:, None] + np.arange(PATCH_FRAMES)[None, :]
    return logmel[idx].astype(np.float32), valid
