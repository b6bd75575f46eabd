"""Feature extractors: what is computed per video window, batched across the videos of a shard.

An extractor declares the frames it needs (:class:`FrameGrid`, decoded and prepared by the decode
workers), the store arrays it writes (:meth:`Extractor.arrays`), its identity for the store
fingerprint (:meth:`Extractor.identity`) and computes rows from :class:`DecodedVideo` objects
(:meth:`Extractor.compute`). Extractors are registered by name with :func:`register_extractor`;
``extract.extractors`` in pipeline.yaml lists the ones to run.

Built in:

- ``vgg19`` -> ``visual`` [T, 7, 7, 512] float16: VGG-19 pool5 of ``frames_per_segment`` frames
  per 1-s segment (``extract.frame_rule``: times of :func:`extract.core.frames.segment_frame_times`, or
  the AVE reference's frame-count rule), averaged over the segment's valid frames, channel-last as
  the AVE ``visual_feature.h5``; input ``extract.normalize`` (ImageNet mean/std on RGB, or Caffe
  BGR minus means for the Keras / Caffe weights of the ``ave2018`` recipe);
- ``vggish`` -> ``audio`` [T, 128] float32: one VGGish embedding per segment from the first 0.96 s
  of each second (:func:`extract.audio.segment_patches`).

Validity: each extractor also returns ``"<name>_valid"`` [T] bool; the runner ANDs them into the
store's ``valid``. A segment's feature row is all zeros where its validity is false.

Determinism: a video's rows never depend on the other videos in the call. VGG-19 forwards fixed
``batch_frames``-sized chunks (the last one zero-padded to full size), so every convolution runs on
the same batch shape whatever the neighbours; VGGish runs one video (T patches) per forward.
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

from . import extractor_base as _base
from .config import ExtractConfig
from .extractor_base import (  # noqa: F401  (re-exported: the public names of the extractor API)
    EXTRACTORS,
    DecodedVideo,
    Extractor,
    FrameCNNExtractor,
    FrameGrid,
    auto_precision,
    configured_precision,
    effective_precision,
    get_extractor,
    load_extractors,
    register_extractor,
    resolve_device,
)
from .core.store import ArraySpec

log = logging.getLogger(__name__)

__all__ = _base.__all__ + ["build_extractors", "extractor_identity", "VGG19Extractor", "VGGishExtractor"]


# ------------------------------------------------------------------------------------------
# VGG-19 pool5


@register_extractor("vgg19")
class VGG19Extractor(FrameCNNExtractor):
    """VGG-19 pool5 averaged over each segment's frames -> ``visual`` [T, S, S, 512] float16 (S = image_size / 32).

    A segment is valid when at least :attr:`min_valid_fraction` of its frames lie within the
    video stream; its row is the mean of pool5 over those frames (channel-last), else zeros.
    """

    code_version = "1"
    weights_kind = "vgg19"

    @classmethod
    def weights_spec(cls, cfg: ExtractConfig) -> str:
        return cfg.visual_weights

    @classmethod
    def frames_per_segment(cls, cfg: ExtractConfig) -> int:
        return cfg.frames_per_segment

    @classmethod
    def input_size(cls, cfg: ExtractConfig) -> int:
        return cfg.image_size

    @classmethod
    def frame_rule(cls, cfg: ExtractConfig) -> str:
        return cfg.frame_rule

    @classmethod
    def interpolation(cls, cfg: ExtractConfig) -> str:
        return cfg.interpolation

    @classmethod
    def normalization(cls, cfg: ExtractConfig) -> str:
        return cfg.normalize

    @staticmethod
    def build_model(weights):
        from .nets import build_vgg19_pool5

        return build_vgg19_pool5(weights)

    @property
    def spatial(self) -> int:
        return self.cfg.image_size // 32

    @classmethod
    def specs_for(cls, cfg: ExtractConfig) -> list[ArraySpec]:
        s = cfg.image_size // 32  # five 2x2 max-pools
        return [ArraySpec("visual", (cfg.segments, s, s, 512), "float16")]

    @classmethod
    def describe(cls, cfg: ExtractConfig, weights: dict[str, Any] | None = None) -> dict[str, Any]:
        if weights is None:
            weights = cls.resolved_weights_identity(cfg)
        return {
            "name": "vgg19",
            "code_version": cls.code_version,
            "weights": weights,
            "output": {"array": "visual", "layer": "pool5", "layout": "T,H,W,C", "dtype": "float16"},
            "preprocessing": cls.frame_preprocessing(cfg, aggregate="mean over valid frames"),
            "precision": configured_precision(cfg),
        }

    def compute(self, videos: list[DecodedVideo]) -> list[dict[str, np.ndarray]]:
        """Pool5 of every valid frame of every video, in fixed ``batch_frames`` chunks; per-segment means."""
        grid = self.frame_grid.name
        T, s = self.cfg.segments, self.spatial
        sums = [np.zeros((T, 512, s, s), np.float64) for _ in videos]
        counts = [np.zeros(T, np.int64) for _ in videos]
        for chunk, pooled in self._forward_chunks(videos, grid):
            for (v, t, _), feature in zip(chunk, pooled):
                sums[v][t] += feature
                counts[v][t] += 1
        out = []
        for video, total, count in zip(videos, sums, counts):
            valid = self._segment_valid(count, video.frame_valid[grid].shape[1])
            mean = np.zeros((T, s, s, 512), np.float16)
            if valid.any():
                m = total[valid] / count[valid][:, None, None, None]
                mean[valid] = m.transpose(0, 2, 3, 1).astype(np.float16)
            out.append({"visual": mean, f"{self.name}_valid": valid})
        return out


# ------------------------------------------------------------------------------------------
# VGGish


@register_extractor("vggish")
class VGGishExtractor(Extractor):
    """VGGish embedding of each 1-s segment -> ``audio`` [T, 128] float32.

    Valid where the waveform covers the segment's patch (samples ``[16000 t, 16000 t + 15600)``);
    zeros and invalid without audio. Runs in fp32 whatever ``extract.precision`` (it is small).
    With ``vggish_pca`` the AudioSet PCA + 8-bit quantisation is applied (values 0..255, as float).
    PCA parameters: the canonical ``pca_params`` file for "vggish"/"pretrained" or a weights path,
    random for "random".
    """

    uses_audio = True
    #: 2: random weights use a scale-preserving init (see extract.nets._init_vggish_random)
    code_version = "2"

    def __init__(self, cfg: ExtractConfig, device: str = "cpu"):
        super().__init__(cfg, device)
        from .nets import build_vggish, build_vggish_pca

        self.weights, self.pca_weights = self.resolve(cfg)
        self.model = build_vggish(self.weights, relu=cfg.vggish_relu).to(self.device)
        self.pca = build_vggish_pca(self.pca_weights).to(self.device) if self.pca_weights is not None else None
        log.info("vggish on %s, weights %s, pca %s", self.device, self.weights.name, self.pca_weights and self.pca_weights.name)

    @staticmethod
    def resolve(cfg: ExtractConfig):
        from .weights import resolve_weights

        weights = resolve_weights(cfg.audio_weights, "vggish", seed=cfg.random_seed)
        pca = None
        if cfg.vggish_pca:
            pca_spec = "random" if cfg.audio_weights == "random" else "vggish"
            pca = resolve_weights(pca_spec, "vggish_pca", seed=cfg.random_seed)
        return weights, pca

    @classmethod
    def specs_for(cls, cfg: ExtractConfig) -> list[ArraySpec]:
        return [ArraySpec("audio", (cfg.segments, 128), "float32")]

    @classmethod
    def describe(cls, cfg: ExtractConfig, weights: dict[str, Any] | None = None) -> dict[str, Any]:
        from .audio import RESAMPLER

        if weights is None:
            w, pca = cls.resolve(cfg)
            weights = {"vggish": w.identity(), "vggish_pca": pca.identity() if pca is not None else None}
        return {
            "name": "vggish",
            "code_version": cls.code_version,
            "weights": weights,
            "output": {"array": "audio", "relu": cfg.vggish_relu, "pca": cfg.vggish_pca, "dtype": "float32"},
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
        return {"vggish": self.weights.identity(), "vggish_pca": self.pca_weights.identity() if self.pca_weights else None}

    def compute(self, videos: list[DecodedVideo]) -> list[dict[str, np.ndarray]]:
        """One forward of the T patches per video (so rows never depend on other videos)."""
        import torch

        from .audio import segment_patches

        T = self.cfg.segments
        out = []
        for video in videos:
            embedding = np.zeros((T, 128), np.float32)
            valid = np.zeros(T, bool)
            if video.audio is not None and np.asarray(video.audio).size > 0:
                patches, valid = segment_patches(np.asarray(video.audio, np.float32), T)
                if valid.any():
                    with torch.inference_mode():
                        x = torch.from_numpy(patches[:, None]).to(self.device)
                        y = self.model(x)
                        if self.pca is not None:
                            y = self.pca(y)
                    embedding[valid] = y.float().cpu().numpy()[valid]
            out.append({"audio": embedding, f"{self.name}_valid": valid})
        return out


# ------------------------------------------------------------------------------------------


def build_extractors(cfg: ExtractConfig, device: str | None = None) -> list[Extractor]:
    """Instantiate (and load the weights of) every extractor in ``cfg.extractors``, in that order."""
    names = list(cfg.extractors)
    if len(set(names)) != len(names):
        raise ValueError(f"extract.extractors lists an extractor twice: {names}")
    device = resolve_device(device if device is not None else cfg.device)
    return [get_extractor(name)(cfg, device) for name in names]


def extractor_identity(cfg: ExtractConfig) -> dict[str, Any]:
    """``{extractor name: identity}`` for ``cfg.extractors`` without building networks (weights files are hashed)."""
    return {name: get_extractor(name).describe(cfg) for name in cfg.extractors}
