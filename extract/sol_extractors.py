"""Extractors for sounding-object localization (the STM head, Li, Tian & Xu, BMVC 2021).

The paper's encoders differ from the AVE features, so these write their own store arrays:

- ``resnet152_maps`` -> ``frame_maps`` [T, F, 8, 8, 2048] float16: the ResNet-152 trunk (torchvision
  ``resnet152`` without ``avgpool``/``fc``, i.e. the conv5_x output) of each of F =
  ``extract.sol_frames_per_segment`` frames per 1-s segment (paper: 4), each frame squashed to
  256 x 256 (paper section 4.2), ImageNet-normalised; **not** averaged. Alongside it
  ``frame_times`` [T, F] float32 (the presentation time in seconds, in the video's own clock, of
  the frame each map was computed from) and ``frame_index`` [T, F] int32 (that frame's index in
  decoder order, which is the frame number of CVAT box annotations; -1 where the requested time
  lies outside the stream). Frame times follow :mod:`extract.frames` (``start + t + (i + 0.5) / F``,
  nearest frame).
- ``vggish_maps`` -> ``audio_maps`` [T, 6, 4, 512] float16: the VGGish convolutional trunk (before
  its fully connected layers) of each segment's 96 x 64 log-mel patch (the same patch the
  ``vggish`` extractor embeds, :func:`extract.audio.segment_patches`), channel-last.

Validity (``<name>_valid`` [T], ANDed into the store's ``valid`` by the runner): ``resnet152_maps``
as ``vgg19`` (at least half of a segment's frames inside the stream; frames outside are zero maps
with ``frame_index`` -1), ``vggish_maps`` as ``vggish``.

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
from .extractor_base import DecodedVideo, Extractor, FrameCNNExtractor, register_extractor
from .store import ArraySpec

log = logging.getLogger(__name__)

__all__ = ["ResNet152MapsExtractor", "VGGishMapsExtractor", "build_resnet152_trunk", "SOL_IMAGE_SIZE"]

#: input size of the STM encoders (paper section 4.2)
SOL_IMAGE_SIZE = 256
#: ResNet-152 conv5 output: stride 32, 2048 channels
RESNET_CHANNELS = 2048
#: VGGish conv trunk output for a 96 x 64 patch
VGGISH_MAP_SHAPE = (6, 4, 512)


def build_resnet152_trunk(weights, seed: int = 0):
    """torchvision ResNet-152 without ``avgpool`` and ``fc``, frozen, eval mode:
    [N, 3, H, W] normalised RGB -> [N, 2048, H/32, W/32].

    ``weights``: a spec for :func:`extract.weights.resolve_weights` (``"imagenet"``, a path,
    ``"random"``) or a resolved ``WeightsSource``. A file must be a torchvision ResNet-152 state
    dict (``fc.*`` tensors may be present; they are dropped); it is loaded strictly. Random weights
    are torchvision's own initialisation under ``seed`` (the global RNG is left untouched).
    """
    import torch
    import torchvision
    from torch import nn

    from .weights import WeightsSource, resolve_weights

    source = weights if isinstance(weights, WeightsSource) else resolve_weights(weights, "resnet152", seed=seed)
    if source.is_random:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(source.seed or 0))
            net = torchvision.models.resnet152(weights=None)
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
    return trunk


@register_extractor("resnet152_maps")
class ResNet152MapsExtractor(FrameCNNExtractor):
    """Per-frame ResNet-152 conv5 maps -> ``frame_maps`` [T, F, 8, 8, 2048] float16, plus
    ``frame_times`` [T, F] float32 and ``frame_index`` [T, F] int32 (see the module docstring)."""

    code_version = "1"
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
            "output": {"array": "frame_maps", "layer": "layer4 (conv5_x)", "layout": "T,F,H,W,C", "dtype": "float16"},
            "preprocessing": cls.frame_preprocessing(cfg, aggregate="none (one map per frame)"),
            "precision": cfg.precision,
        }

    def compute(self, videos: list[DecodedVideo]) -> list[dict[str, np.ndarray]]:
        """Maps of every valid frame of every video, forwarded in fixed ``batch_frames`` chunks
        (zero-padded, so a video's numbers never depend on its neighbours)."""
        grid = self.frame_grid.name
        T, F = self.cfg.segments, self.cfg.sol_frames_per_segment
        s = self.image_size // 32
        maps = [np.zeros((T, F, s, s, RESNET_CHANNELS), np.float16) for _ in videos]
        for chunk, out in self._forward_chunks(videos, grid):
            for (v, t, f), feature in zip(chunk, out):
                maps[v][t, f] = feature.transpose(1, 2, 0).astype(np.float16)
        rows = []
        for video, frame_maps in zip(videos, maps):
            if not np.isfinite(frame_maps).all():
                log.warning("resnet152_maps: %s: some map values exceed the float16 range and are stored as inf "
                            "(expected only with untrained weights)", video.key)
            valid_frames = video.frame_valid[grid]
            times, index = self._frame_times(video, grid)
            valid = self._segment_valid(valid_frames.sum(1), F)
            rows.append({
                "frame_maps": frame_maps,
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
        from .frames import segment_frame_times

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
    """VGGish conv trunk per 1-s segment -> ``audio_maps`` [T, 6, 4, 512] float16 (channel-last).

    Weights: ``extract.audio_weights`` as the ``vggish`` extractor (only ``features.*`` is used).
    Valid where the waveform covers the segment's patch; zeros and invalid without audio. fp32.
    """

    uses_audio = True
    code_version = "2"  # 2: scale-preserving random init (extract.nets._init_vggish_random)

    def __init__(self, cfg: ExtractConfig, device: str = "cpu"):
        super().__init__(cfg, device)
        from .nets import build_vggish
        from .weights import resolve_weights

        self.weights = resolve_weights(cfg.audio_weights, "vggish", seed=cfg.random_seed)
        self.model = build_vggish(self.weights).to(self.device)
        log.info("vggish_maps on %s, weights %s", self.device, self.weights.name)

    @classmethod
    def specs_for(cls, cfg: ExtractConfig) -> list[ArraySpec]:
        return [ArraySpec("audio_maps", (cfg.segments,) + VGGISH_MAP_SHAPE, "float16")]

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
            "output": {"array": "audio_maps", "layer": "features (last max-pool)", "layout": "T,H,W,C", "dtype": "float16"},
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
        rows = []
        for video in videos:
            maps = np.zeros((T,) + VGGISH_MAP_SHAPE, np.float16)
            valid = np.zeros(T, bool)
            if video.audio is not None and np.asarray(video.audio).size > 0:
                patches, valid = segment_patches(np.asarray(video.audio, np.float32), T)
                if valid.any():
                    with torch.inference_mode():
                        y = self.model.features(torch.from_numpy(patches[:, None]).to(self.device))  # [T, 512, 6, 4]
                    maps[valid] = y.float().cpu().numpy().transpose(0, 2, 3, 1)[valid].astype(np.float16)
            rows.append({"audio_maps": maps, f"{self.name}_valid": valid})
        return rows
