"""Extractors for sounding-object localization (the STM head, Li, Tian & Xu, BMVC 2021).

The paper's encoders differ from the AVE features, so these write their own store arrays:

- ``resnet152_maps`` -> ``frame_maps`` [T, F, 8, 8, 2048] float16: the ResNet-152 trunk (torchvision
  ``resnet152`` without ``avgpool``/``fc``, i.e. the conv5_x output) of each of F =
  ``extract.sol_frames_per_segment`` frames per 1-s segment (paper: 4), each frame squashed to
  256 x 256 (paper section 4.2), ImageNet-normalised; **not** averaged. Alongside it
  ``frame_times`` [T, F] float32 (the presentation time in seconds, in the video's own clock, of
  the frame each map was computed from) and ``frame_index`` [T, F] int32 (that frame's index in
  decoder order, which is the frame number of CVAT box annotations; -1 where the requested time
  lies outside the stream). Frame times follow :mod:`extract.core.frames` (``start + t + (i + 0.5) / F``,
  nearest frame).
- ``vggish_maps`` -> ``audio_maps`` [T, 6, 4, 512] float16: the VGGish convolutional trunk (before
  its fully connected layers) of each segment's 96 x 64 log-mel patch (the same patch the
  ``vggish`` extractor embeds, :func:`extract.audio.segment_patches`), channel-last.

**Stored form** (both map arrays): float16 plus a per-row scale, ``frame_maps_scale`` /
``audio_maps_scale`` [N] float32: the maps are ``stored * scale``. The scale is a power of two,
1.0 unless the row's largest magnitude exceeds the float16 range (65504), in which case it is the
smallest power of two that brings it into range (dividing by a power of two only shifts
exponents: no rounding beyond float16's own). Rows never written (missing, failed) hold scale 0
and all-zero maps. :meth:`extract.core.store.FeatureStore.read_scaled` applies the scale. No
non-finite number is ever stored: a video whose float32 maps hold NaN or inf (a broken network,
not a matter of range) raises in ``compute``, so the runner marks that row ``failed`` with the
count in its reason. Why float16 + scale rather than float32: measured on 8 demo clips, float32
takes 1.9x the bytes on disk (zstd-3: 4.08 vs 2.12 MB per clip of ``frame_maps`` at 1 frame/s;
AVE at 4 frames/s ~80 GB instead of ~40 GB), writes 1.8x and reads 1.7x slower, while float16
keeps every value to about 3 significant digits (error at most 2.7e-4 of a clip's largest value).

Validity (``<name>_valid`` [T], ANDed into the store's ``valid`` by the runner): ``resnet152_maps``
as ``vgg19`` (at least half of a segment's frames inside the stream; frames outside are zero maps
with ``frame_index`` -1), ``vggish_maps`` as ``vggish``.

``"random"`` ResNet-152 weights are torchvision's initialisation with the last batch norm of every
residual branch damped (:func:`extract.nets.damp_residual_branches`), so that the maps of the
untrained network stay of moderate size (torchvision's plain init doubles the activation variance
at each of the 50 blocks in eval mode, ~2e8 at conv5).

AVE at 4 frames/s is about 40 GB in float16: extract these into their own store, e.g.
``avel-extract --split test --set 'extract.extractors=[resnet152_maps,vggish_maps]'
--set store.path=data/stores/ave_sol.zarr``.

numpy only at import; torch/torchvision where the networks are built and run.
"""
from __future__ import annotations

import logging
from typing import Any, ClassVar

import numpy as np

from .config import ExtractConfig
from .extractor_base import DecodedVideo, Extractor, FrameCNNExtractor, configured_precision, register_extractor
from .core.store import ArraySpec

log = logging.getLogger(__name__)

__all__ = [
    "ResNet152MapsExtractor",
    "VGGishMapsExtractor",
    "build_resnet152_trunk",
    "SOL_IMAGE_SIZE",
    "NonFiniteMaps",
    "float16_with_scale",
    "scale_array_name",
]

#: input size of the STM encoders (paper section 4.2)
SOL_IMAGE_SIZE = 256
#: ResNet-152 conv5 output: stride 32, 2048 channels
RESNET_CHANNELS = 2048
#: VGGish conv trunk output for a 96 x 64 patch
VGGISH_MAP_SHAPE = (6, 4, 512)
#: the largest finite float16 value
FLOAT16_MAX = float(np.finfo(np.float16).max)


class NonFiniteMaps(ValueError):
    """An extractor computed NaN or inf map values for a video; raised in ``compute`` so that the
    runner marks the row failed (the message deliberately avoids the words the runner takes for an
    error of the machine, e.g. "weights", so that the row is failed rather than left missing)."""


def scale_array_name(array: str) -> str:
    """The per-row scale array of a map array: ``frame_maps`` -> ``frame_maps_scale``."""
    return f"{array}_scale"


def float16_with_scale(values: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """float32 maps -> (float16 maps, scale) with ``maps == float16 * scale`` up to float16 rounding.

    ``scale`` is 1.0 when every value fits float16, else the smallest power of two ``2**k`` that
    brings the largest magnitude into range. ``values`` must be finite (the caller checks; a
    ValueError here otherwise)."""
    values = np.asarray(values, dtype=np.float32)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    if not np.isfinite(peak):
        raise ValueError("float16_with_scale: the maps hold non-finite values")
    k = 0 if peak <= FLOAT16_MAX else int(np.ceil(np.log2(peak / FLOAT16_MAX)))
    while True:
        scale = np.float32(2.0 ** k)
        # a power of two: the division is exact in float32, the cast rounds as float16 always does
        stored = (values / scale).astype(np.float16) if k else values.astype(np.float16)
        if np.isfinite(stored).all():
            return stored, scale
        k += 1  # rounding at the very top of the range; one more halving always suffices


def _checked_float16(values: np.ndarray, extractor: str, key: str, array: str, network: str) -> tuple[np.ndarray, np.float32]:
    """:func:`float16_with_scale` of one video's float32 maps; :class:`NonFiniteMaps` naming the
    video and the count when some value is NaN or inf."""
    bad = ~np.isfinite(values)
    if bad.any():
        nan = int(np.isnan(values).sum())
        raise NonFiniteMaps(
            f"{extractor}: {int(bad.sum())} non-finite values ({nan} NaN, {int(bad.sum()) - nan} inf) in the {array} "
            f"of {key!r} ({network}); the row is failed instead of storing them"
        )
    stored, scale = float16_with_scale(values)
    if scale != 1.0:
        log.info("%s: %s: %s exceed the float16 range; stored divided by %g (%s)", extractor, key, array, float(scale),
                 scale_array_name(array))
    return stored, scale


def _network_label(net: str, source) -> str:
    """E.g. "ResNet-152, random init seed 0" or "ResNet-152, file sha256 394f9c45..." (not the file
    name: a name holding e.g. "weights" would make the runner take the failure for a machine error)."""
    if source.is_random:
        return f"{net}, random init seed {source.seed}"
    return f"{net}, file sha256 {source.sha256[:12]}"


def build_resnet152_trunk(weights, seed: int = 0):
    """torchvision ResNet-152 without ``avgpool`` and ``fc``, frozen, eval mode:
    [N, 3, H, W] normalised RGB -> [N, 2048, H/32, W/32].

    ``weights``: a spec for :func:`extract.weights.resolve_weights` (``"imagenet"``, a path,
    ``"random"``) or a resolved ``WeightsSource``. A file must be a torchvision ResNet-152 state
    dict (``fc.*`` tensors may be present; they are dropped); it is loaded strictly. Random weights
    are torchvision's own initialisation under ``seed`` (the global RNG is left untouched) with
    every residual branch's last batch norm damped (:func:`extract.nets.damp_residual_branches`),
    so that the untrained network's maps keep a moderate scale.

    The trunk is returned in ``channels_last`` memory format (also on the CPU, where it runs about
    25 % faster than NCHW at 256 x 256 with oneDNN; the numbers agree to float32 rounding).
    """
    import torch
    import torchvision
    from torch import nn

    from .nets import damp_residual_branches
    from .weights import WeightsSource, resolve_weights

    source = weights if isinstance(weights, WeightsSource) else resolve_weights(weights, "resnet152", seed=seed)
    if source.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(source.seed or 0))
            net = torchvision.models.resnet152(weights=None)
        damp_residual_branches(net)
    else:
        net = torchvision.models.resnet152(weights=None)
        state = source.load()
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{source.path}: not a torchvision ResNet-152 state dict ({exc})") from None
    trunk = nn.Sequential(*list(net.children())[:-2])  # conv1 .. layer4
    trunk.eval()
    for p in trunk.parameters():
        p.requires_grad_(False)
    return trunk.to(memory_format=torch.channels_last)


@register_extractor("resnet152_maps")
class ResNet152MapsExtractor(FrameCNNExtractor):
    """Per-frame ResNet-152 conv5 maps -> ``frame_maps`` [T, F, 8, 8, 2048] float16 with
    ``frame_maps_scale`` [] float32, plus ``frame_times`` [T, F] float32 and ``frame_index`` [T, F]
    int32 (see the module docstring)."""

    #: 2: damped residual branches of the random init; frame_maps_scale; non-finite maps fail the row
    code_version = "2"
    weights_kind = "resnet152"
    #: network input size (paper: 256 -> 8 x 8 maps); a class attribute so tests can shrink it
    image_size: ClassVar[int] = SOL_IMAGE_SIZE

    @classmethod
    def weights_spec(cls, cfg: ExtractConfig) -> str:
        return cfg.sol_visual_weights

    @classmethod
    def frames_per_segment(cls, cfg: ExtractConfig) -> int:
        return cfg.sol_frames_per_segment

    @classmethod
    def input_size(cls, cfg: ExtractConfig) -> int:
        return cls.image_size

    @staticmethod
    def build_model(weights):
        return build_resnet152_trunk(weights)

    @classmethod
    def specs_for(cls, cfg: ExtractConfig) -> list[ArraySpec]:
        T, F, s = cfg.segments, cfg.sol_frames_per_segment, cls.image_size // 32
        return [
            ArraySpec("frame_maps", (T, F, s, s, RESNET_CHANNELS), "float16"),
            ArraySpec(scale_array_name("frame_maps"), (), "float32"),
            ArraySpec("frame_times", (T, F), "float32"),
            ArraySpec("frame_index", (T, F), "int32"),
        ]

    @classmethod
    def describe(cls, cfg: ExtractConfig, weights: dict[str, Any] | None = None) -> dict[str, Any]:
        if weights is None:
            weights = cls.resolved_weights_identity(cfg)
        return {
            "name": "resnet152_maps",
            "code_version": cls.code_version,
            "weights": weights,
            "output": {"array": "frame_maps", "layer": "layer4 (conv5_x)", "layout": "T,F,H,W,C", "dtype": "float16",
                       "scale": "frame_maps_scale: maps = stored * scale (power of two, 1 when in the float16 range)"},
            "preprocessing": cls.frame_preprocessing(cfg, aggregate="none (one map per frame)"),
            "precision": configured_precision(cfg),
        }

    def compute(self, videos: list[DecodedVideo]) -> list[dict[str, np.ndarray]]:
        """Maps of every valid frame of every video, forwarded in fixed ``batch_frames`` chunks
        (zero-padded, so a video's numbers never depend on its neighbours)."""
        grid = self.frame_grid.name
        T, F = self.cfg.segments, self.cfg.sol_frames_per_segment
        s = self.image_size // 32
        maps = [np.zeros((T, F, s, s, RESNET_CHANNELS), np.float32) for _ in videos]
        for chunk, out in self._forward_chunks(videos, grid):
            for (v, t, f), feature in zip(chunk, out):
                maps[v][t, f] = feature.transpose(1, 2, 0)
        network = _network_label("ResNet-152", self.weights)
        rows = []
        for video, frame_maps in zip(videos, maps):
            stored, scale = _checked_float16(frame_maps, self.name, video.key, "frame_maps", network)
            valid_frames = video.frame_valid[grid]
            times, index = self._frame_times(video, grid)
            valid = self._segment_valid(valid_frames.sum(1), F)
            rows.append({
                "frame_maps": stored,
                scale_array_name("frame_maps"): np.asarray(scale, np.float32),
                "frame_times": times,
                "frame_index": np.where(valid_frames, index, -1).astype(np.int32),
                f"{self.name}_valid": valid,
            })
        return rows

    def _frame_times(self, video: DecodedVideo, grid: str) -> tuple[np.ndarray, np.ndarray]:
        """([T, F] float32 seconds, [T, F] int64 frame index) of the frames used.

        From the decoder's ``info["frame_pts"]`` / ``info["frame_index"]`` when present; otherwise
        (a DecodedVideo built by hand) the requested times, with the indices a constant-rate
        stream starting at 0 would have (``info["fps"]``), or -1 without an fps."""
        from .core.frames import segment_frame_times

        T, F = self.cfg.segments, self.cfg.sol_frames_per_segment
        pts = (video.info.get("frame_pts") or {}).get(grid)
        index = (video.info.get("frame_index") or {}).get(grid)
        if pts is not None and index is not None:
            return np.asarray(pts, np.float32).reshape(T, F), np.asarray(index, np.int64).reshape(T, F)
        start = float((video.info.get("window") or [0.0])[0])
        times = segment_frame_times(T, F, start=start)
        fps = float(video.info.get("fps") or 0.0)
        if fps > 0:
            est = np.floor(times * fps + 0.5 - 1e-9).astype(np.int64)  # nearest frame k/fps, ties earlier
            return times.astype(np.float32), est
        return times.astype(np.float32), np.full((T, F), -1, np.int64)


@register_extractor("vggish_maps")
class VGGishMapsExtractor(Extractor):
    """VGGish conv trunk per 1-s segment -> ``audio_maps`` [T, 6, 4, 512] float16 (channel-last)
    with ``audio_maps_scale`` [] float32 (see the module docstring).

    Weights: ``extract.audio_weights`` as the ``vggish`` extractor (only ``features.*`` is used).
    Valid where the waveform covers the segment's patch; zeros and invalid without audio. fp32.
    """

    uses_audio = True
    #: 2: scale-preserving random init (extract.nets._init_vggish_random);
    #: 3: audio_maps_scale, non-finite maps fail the row
    code_version = "3"

    def __init__(self, cfg: ExtractConfig, device: str = "cpu"):
        super().__init__(cfg, device)
        from .nets import build_vggish
        from .weights import resolve_weights

        self.weights = resolve_weights(cfg.audio_weights, "vggish", seed=cfg.random_seed)
        self.model = build_vggish(self.weights).to(self.device)
        log.info("vggish_maps on %s, weights %s", self.device, self.weights.name)

    @classmethod
    def specs_for(cls, cfg: ExtractConfig) -> list[ArraySpec]:
        return [
            ArraySpec("audio_maps", (cfg.segments,) + VGGISH_MAP_SHAPE, "float16"),
            ArraySpec(scale_array_name("audio_maps"), (), "float32"),
        ]

    @classmethod
    def describe(cls, cfg: ExtractConfig, weights: dict[str, Any] | None = None) -> dict[str, Any]:
        from .audio import RESAMPLER

        if weights is None:
            from .weights import resolve_weights

            weights = {"vggish": resolve_weights(cfg.audio_weights, "vggish", seed=cfg.random_seed).identity()}
        return {
            "name": "vggish_maps",
            "code_version": cls.code_version,
            "weights": weights,
            "output": {"array": "audio_maps", "layer": "features (last max-pool)", "layout": "T,H,W,C", "dtype": "float16",
                       "scale": "audio_maps_scale: maps = stored * scale (power of two, 1 when in the float16 range)"},
            "preprocessing": {
                "segments": cfg.segments,
                "mono": "mean of channels",
                "resampler": RESAMPLER,
                "stft": "periodic hann 400, hop 160, fft 512, magnitude",
                "mel": "64 HTK bands 125-7500 Hz, mel-space triangles, DC zeroed, log(x + 0.01)",
                "patch": "frames 100t..100t+95 (samples [16000t, 16000t+15600))",
            },
            "precision": "fp32",
        }

    def _weights_identity(self) -> dict[str, Any]:
        return {"vggish": self.weights.identity()}

    def compute(self, videos: list[DecodedVideo]) -> list[dict[str, np.ndarray]]:
        """One trunk forward of the T patches per video."""
        import torch

        from .audio import segment_patches

        T = self.cfg.segments
        network = _network_label("VGGish", self.weights)
        rows = []
        for video in videos:
            maps = np.zeros((T,) + VGGISH_MAP_SHAPE, np.float32)
            valid = np.zeros(T, bool)
            if video.audio is not None and np.asarray(video.audio).size > 0:
                patches, valid = segment_patches(np.asarray(video.audio, np.float32), T)
                if valid.any():
                    with torch.inference_mode():
                        y = self.model.features(torch.from_numpy(patches[:, None]).to(self.device))  # [T, 512, 6, 4]
                    maps[valid] = y.float().cpu().numpy().transpose(0, 2, 3, 1)[valid]
            stored, scale = _checked_float16(maps, self.name, video.key, "audio_maps", network)
            rows.append({"audio_maps": stored, scale_array_name("audio_maps"): np.asarray(scale, np.float32),
                         f"{self.name}_valid": valid})
        return rows
