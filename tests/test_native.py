"""The native kernels the extraction stage runs, exercised for real and checked against independent
references (not import checks):

- resampling (:func:`extract.audio.resample`: our polyphase kaiser_best bank on torch ``conv1d``)
  of seconds of 44.1 / 48 kHz (down) and 8 kHz (up) audio against the numpy transcription of
  resampy's loop (tests/audio_reference.py), and a 1 kHz tone that must stay at 1 kHz;
- decoding (decord frames + audio, PyAV for the rate) of a generated H.264/AAC clip with known
  colours and tones at 44.1 and 48 kHz, checked against what was written and against an
  independent PyAV decode resampled by the numpy reference;
- a VGG-19 forward (extract.nets, random seeded weights, CPU) to [N, 512, 7, 7], with the first
  block and the last block recomputed in float64 numpy from the same weights.

None of this imports torchaudio (the point: its native library failed to load against torch).
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from audio_reference import ref_resampy_kaiser_best

SR = 16000


def sine(freq: float, seconds: float, rate: int, amplitude: float) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(round(seconds * rate))) / rate)


def spectrum_peak(wave: np.ndarray, rate: int) -> tuple[float, float]:
    """(frequency in Hz of the largest |rfft| bin, amplitude of a sine at that bin), Hann window."""
    window = np.hanning(len(wave))
    spectrum = np.abs(np.fft.rfft(wave * window))
    k = int(np.argmax(spectrum))
    return k * rate / len(wave), 2.0 * spectrum[k] / window.sum()


def band_amplitude(wave: np.ndarray, rate: int, freq: float, half_width: float = 20.0) -> float:
    window = np.hanning(len(wave))
    spectrum = np.abs(np.fft.rfft(wave * window))
    hz = np.fft.rfftfreq(len(wave), 1.0 / rate)
    return float(2.0 * spectrum[np.abs(hz - freq) <= half_width].max() / window.sum())


def test_resampling_works_where_torchaudio_cannot_be_imported():
    """A fresh interpreter in which ``import torchaudio`` fails (as when its library does not load)."""
    import subprocess

    code = (
        "import sys; sys.modules['torchaudio'] = None\n"
        "import numpy as np\n"
        "from extract.audio import resample\n"
        "import extract.decode\n"
        "t = np.arange(48000) / 48000\n"
        "y = resample(np.sin(2 * np.pi * 1000 * t).astype('float32'), 48000, 16000)\n"
        "print(y.shape[0], round(float(np.abs(y[800:-800]).max()), 3))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["16000", "1.0"]


# ------------------------------------------------------------------------------------------
# resampling


@pytest.mark.parametrize("sr_in", [44100, 48000, 8000])
def test_resample_seconds_of_audio_like_resampy(sr_in):
    """3 s of noise + tones through the whole polyphase bank (every phase, thousands of conv1d
    positions, both signal edges) against the per-sample numpy transcription of resampy."""
    from extract.audio import resample

    rng = np.random.default_rng(sr_in)
    x = sine(440.0, 3.0, sr_in, 0.3) + sine(3000.0, 3.0, sr_in, 0.2) + rng.standard_normal(3 * sr_in) * 0.1
    x = x.astype(np.float32)
    ours = resample(x, sr_in, SR)
    ref = ref_resampy_kaiser_best(x.astype(np.float64), sr_in, SR)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (3 * SR,)
    err = np.abs(ours - ref).max()
    assert err < 1e-5, err  # measured 5e-7 .. 8e-7 (float32 convolution)
    assert np.all(np.isfinite(ours))


@pytest.mark.parametrize("sr_in", [44100, 48000, 8000])
def test_a_1khz_tone_stays_at_1khz(sr_in):
    from extract.audio import resample

    y = resample(sine(1000.0, 2.0, sr_in, 0.5).astype(np.float32), sr_in, SR)
    assert y.shape == (2 * SR,)
    freq, amplitude = spectrum_peak(y[800:-800], SR)  # leave out the zero-padded edges
    assert abs(freq - 1000.0) <= SR / len(y[800:-800]), freq
    assert amplitude == pytest.approx(0.5, rel=2e-3)
    # steady state: a unit-gain passband, the sine comes out as a sine of the same amplitude
    middle = y[SR // 2: -SR // 2]
    t = (np.arange(len(y)) / SR)[SR // 2: -SR // 2]
    fit = np.linalg.lstsq(np.stack([np.sin(2 * np.pi * 1000 * t), np.cos(2 * np.pi * 1000 * t)], 1), middle, rcond=None)[0]
    assert np.hypot(*fit) == pytest.approx(0.5, rel=1e-3)
    assert np.abs(middle - 0.5 * np.sin(2 * np.pi * 1000 * t)).max() < 2e-3


def test_downsampling_removes_what_would_alias():
    """11 kHz is above the 8 kHz Nyquist of the output: kaiser_best must remove it (it would
    alias to 5 kHz), and keep 1 kHz."""
    from extract.audio import resample

    x = (sine(1000.0, 2.0, 48000, 0.4) + sine(11000.0, 2.0, 48000, 0.4)).astype(np.float32)
    y = resample(x, 48000, SR)[800:-800]
    assert band_amplitude(y, SR, 1000.0) == pytest.approx(0.4, rel=3e-3)
    assert band_amplitude(y, SR, 5000.0) < 1e-4


# ------------------------------------------------------------------------------------------
# decoding a generated clip

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 50, 210]], np.uint8)  # one per second
FPS = 10
SIZE = 64


def pyav_mono(path) -> tuple[np.ndarray, int]:
    """Independent decode: PyAV, first audio stream, mean of the channels (float64)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        planes = np.concatenate([frame.to_ndarray() for frame in container.decode(stream)], axis=1)
        return planes.astype(np.float64).mean(axis=0), stream.codec_context.sample_rate


@pytest.fixture(scope="module", params=[44100, 48000])
def coloured_clip(request, tmp_path_factory):
    """3 s, 64x64 at 10 fps, second t a flat COLOURS[t]; stereo AAC at the rate: left 1 kHz (0.5),
    right 1 kHz (0.3) + 11 kHz (0.2, above the 16 kHz output's Nyquist)."""
    from extract.factories.media import write_clip

    rate = request.param
    frames = np.repeat(COLOURS, FPS, axis=0)[:, None, None, :] * np.ones((1, SIZE, SIZE, 1), np.uint8)
    left = sine(1000.0, 3.0, rate, 0.5)
    right = sine(1000.0, 3.0, rate, 0.3) + sine(11000.0, 3.0, rate, 0.2)
    path = tmp_path_factory.mktemp(f"clip{rate}") / "clip.mp4"
    write_clip(path, frames, fps=FPS, audio=np.stack([left, right]).astype(np.float32), sample_rate=rate)
    return path, rate


def test_decode_a_generated_clip(coloured_clip):
    from extract.decode import VideoRequest, decode_video
    from extract.extractors import FrameGrid

    path, rate = coloured_clip
    grid = FrameGrid(per_segment=4, prepare=lambda frames: np.asarray(frames), name="id")
    video = decode_video(VideoRequest("clip", str(path)), [grid], segments=3, audio=True)

    frames = video.frames["id"]
    assert frames.shape == (3, 4, SIZE, SIZE, 3) and video.frame_valid["id"].all()
    mean_colour = frames.reshape(3, 4, -1, 3).astype(np.float64).mean(axis=2)  # [T, F, 3]
    assert np.abs(mean_colour - COLOURS[:, None, :]).max() <= 6, mean_colour  # measured 2 (yuv420p round trip)
    assert frames.astype(np.int16).std(axis=(2, 3)).max() < 3  # flat images stay flat

    info = video.info
    assert info["audio_rate"] == rate and info["audio_channels"] == 2 and info["audio_resampler"] == "kaiser_best"
    wave = video.audio
    assert wave.dtype == np.float32 and wave.shape == (3 * SR,)
    body = wave[SR // 4: -SR // 4]  # leave out AAC priming and the end
    freq, _ = spectrum_peak(body, SR)
    assert abs(freq - 1000.0) <= 1.0, freq
    # mono = mean of the channels: 1 kHz at (0.5 + 0.3) / 2, and the 11 kHz half (0.1) filtered out
    assert band_amplitude(body, SR, 1000.0) == pytest.approx(0.4, rel=0.03)
    assert band_amplitude(body, SR, 16000 - 11000.0) < 1e-4  # where 11 kHz would alias to (measured 2e-6)

    # the same samples decoded independently (PyAV) and resampled by the numpy reference
    mono, native = pyav_mono(path)
    assert native == rate
    assert band_amplitude(mono[rate // 4: -rate // 4], rate, 11000.0) > 0.05  # AAC kept the 11 kHz tone
    ref = ref_resampy_kaiser_best(mono, rate, SR)[: 3 * SR]
    assert np.abs(wave - ref).max() < 1e-5  # measured 4.5e-7


# ------------------------------------------------------------------------------------------
# VGG-19


def conv3x3_relu(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """float64 numpy 3x3 convolution (cross-correlation, zero padding 1) + bias + ReLU: [N, C, H, W] -> [N, O, H, W]."""
    n, c, h, w = x.shape
    padded = np.zeros((n, c, h + 2, w + 2))
    padded[:, :, 1:-1, 1:-1] = x
    out = np.zeros((n, weight.shape[0], h, w))
    for dy in range(3):
        for dx in range(3):
            patch = padded[:, :, dy: dy + h, dx: dx + w]  # [N, C, H, W]
            out += np.einsum("nchw,oc->nohw", patch, weight[:, :, dy, dx], optimize=True)
    return np.maximum(out + bias[None, :, None, None], 0.0)


def maxpool2(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def test_vgg19_forward_against_numpy():
    import torch

    from extract.nets import build_vgg19_pool5, normalize_frames

    model = build_vgg19_pool5("random", seed=11)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and isinstance(model[27], torch.nn.MaxPool2d)  # pool4
    # the random init gives zero biases (torchvision's); use non-zero ones so they are checked too
    with torch.no_grad():
        for conv in convs:
            conv.bias.copy_(torch.linspace(-0.05, 0.05, conv.bias.numel()))
    params = [(c.weight.detach().double().numpy(), c.bias.detach().double().numpy()) for c in convs]

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(2, 224, 224, 3), dtype=np.uint8)
    x = normalize_frames(images).contiguous()
    captured = {}
    hook = model[27].register_forward_hook(lambda module, inputs, output: captured.setdefault("pool4", output.detach().clone()))
    try:
        with torch.inference_mode():
            block1 = model[:5](x)
            out = model(x)
    finally:
        hook.remove()
    assert out.shape == (2, 512, 7, 7) and torch.isfinite(out).all() and (out > 0).any()

    # block 1 (conv-relu-conv-relu-pool) from the normalised input, in float64 numpy
    x64 = ((images.astype(np.float64) / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
    x64 = x64.transpose(0, 3, 1, 2)
    ref1 = maxpool2(conv3x3_relu(conv3x3_relu(x64, *params[0]), *params[1]))
    got1 = block1.double().numpy()
    assert got1.shape == ref1.shape == (2, 64, 112, 112)
    assert np.abs(got1 - ref1).max() <= 2e-5 * np.abs(ref1).max()  # measured 3e-7 (float32)

    # block 5 (4 x conv 512 + pool) from torch's pool4 output ([2, 512, 14, 14]) -> pool5
    pool4 = captured["pool4"].double().numpy()
    assert pool4.shape == (2, 512, 14, 14)
    ref5 = pool4
    for w, b in params[12:16]:
        ref5 = conv3x3_relu(ref5, w, b)
    ref5 = maxpool2(ref5)
    got5 = out.double().numpy()
    assert np.abs(got5 - ref5).max() <= 2e-5 * np.abs(ref5).max()  # measured 4e-7 (float32)
