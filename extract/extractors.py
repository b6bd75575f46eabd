"""Feature extractors: what is computed per video window, batched across the videos of a shard.

An extractor declares the frames it needs (:class:`FrameGrid`, decoded and prepared by the decode
workers), the store arrays it writes (:meth:`Extractor.arrays`), its identity for the store
fingerprint (:meth:`Extractor.identity`) and computes rows from :class:`DecodedVideo` objects
(:meth:`Extractor.compute`). Extractors are registered by name with :func:`register_extractor`;
``extract.extractors`` in pipeline.yaml lists the ones to run.

Built in:

- ``vgg19`` -> ``visual`` [T, 7, 7, 512] float16: VGG-19 pool5 of ``frames_per_segment`` frames
  per 1-s segment (times: :func:`extract.frames.segment_frame_times`), averaged over the segment's
  valid frames, channel-last as the AVE ``visual_feature.h5``;
- ``vggish`` -> ``audio`` [T, 128] float32: one VGGish embedding per segment from the first 0.96 s
  of each second (:func:`extract.audio.segment_patches`).

Validity: each extractor also returns ``"<name>_valid"`` [T] bool; the runner ANDs them into the
store's ``valid``. A segment's feature row is all zeros where its validity is false.

Determinism: a video's rows never depend on the other videos in the call. VGG-19 forwards fixed
``batch_frames``-sized chunks (the last one zero-padded to full size), so every convolution runs on
the same batch shape whatever the neighbours; VGGish runs one video (T patches) per forward.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable, ClassVar

import numpy as np

from .config import ExtractConfig
from .store import ArraySpec

log = logging.getLogger(__name__)

__all__ = [
    "FrameGrid",
    "DecodedVideo",
    "Extractor",
    "EXTRACTORS",
    "register_extractor",
    "get_extractor",
    "build_extractors",
    "extractor_identity",
    "resolve_device",
    "effective_precision",
    "FrameCNNExtractor",
    "VGG19Extractor",
    "VGGishExtractor",
]


@dataclasses.dataclass
class FrameGrid:
    """Frames an extractor needs.

    ``per_segment`` frames per 1-s segment at the times of
    :func:`extract.frames.segment_frame_times`; ``prepare`` (picklable, numpy/cv2 only) maps decoded
    uint8 [N, H, W, 3] RGB frames to uint8 [N, h, w, 3] in the decode workers; grids with equal
    ``name`` are decoded once and shared between extractors.
    """

    per_segment: int
    prepare: Callable[[np.ndarray], np.ndarray]
    name: str


@dataclasses.dataclass
class DecodedVideo:
    """One decoded video window, as the decode workers hand it to the extractors."""

    #: store row key
    key: str
    #: grid name -> prepared uint8 frames [T, F, h, w, 3]
    frames: dict[str, np.ndarray]
    #: grid name -> [T, F] bool, false where the requested time lies outside the video stream
    frame_valid: dict[str, np.ndarray]
    #: float32 mono 16 kHz waveform of the window (sample 0 = window start), None without audio
    audio: np.ndarray | None
    #: fps, duration, width, height, rotation, audio_sr, channels, ...
    info: dict = dataclasses.field(default_factory=dict)


#: extractor name -> class
EXTRACTORS: dict[str, type["Extractor"]] = {}


def register_extractor(name: str) -> Callable[[type], type]:
    """Class decorator: register an :class:`Extractor` subclass under ``name`` (duplicates refused)."""

    def decorate(cls: type) -> type:
        if name in EXTRACTORS:
            raise ValueError(f"extractor {name!r} is already registered by {EXTRACTORS[name].__module__}.{EXTRACTORS[name].__qualname__}")
        cls.name = name
        EXTRACTORS[name] = cls
        return cls

    return decorate


def get_extractor(name: str) -> type["Extractor"]:
    try:
        return EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"extract.extractors: unknown extractor {name!r} (registered: {', '.join(sorted(EXTRACTORS))})") from None


def resolve_device(device: str | None) -> str:
    """``"auto"``/None -> ``"cuda"`` when available else ``"cpu"``; anything else unchanged."""
    if device in (None, "", "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def effective_precision(precision: str, device: str) -> str:
    """The precision actually used: as asked on CUDA; on CPU fp32 unless bf16 is asked."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"extract.precision: expected fp32, bf16 or fp16, got {precision!r}")
    if not str(device).startswith("cuda") and precision == "fp16":
        log.warning("extract.precision=fp16 is not used on %s; running fp32 (use bf16 for reduced precision on CPU)", device)
        return "fp32"
    return precision


def _autocast(precision: str, device: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type="cuda" if str(device).startswith("cuda") else "cpu", dtype=dtype)


class Extractor:
    """Base class. Subclasses set ``uses_audio`` and implement :meth:`describe`, :meth:`arrays`, :meth:`compute`."""

    name: ClassVar[str] = ""
    uses_audio: ClassVar[bool] = False
    #: bump when the computation changes the numbers (enters the identity)
    code_version: ClassVar[str] = "1"

    def __init__(self, cfg: ExtractConfig, device: str = "cpu"):
        self.cfg = cfg
        self.device = resolve_device(device)

    @property
    def frame_grid(self) -> FrameGrid | None:
        """The frames this extractor needs, or None (audio only)."""
        return self.grid_for(self.cfg)

    @classmethod
    def grid_for(cls, cfg: ExtractConfig) -> FrameGrid | None:
        """The frame grid of an extractor of this class under ``cfg`` (no weights needed)."""
        return None

    def arrays(self) -> list[ArraySpec]:
        """The store arrays it writes (row shapes exclude the leading N axis)."""
        return self.specs_for(self.cfg)

    @classmethod
    def specs_for(cls, cfg: ExtractConfig) -> list[ArraySpec]:
        """The arrays an extractor of this class writes under ``cfg`` (no weights needed)."""
        raise NotImplementedError

    @classmethod
    def describe(cls, cfg: ExtractConfig, weights: dict[str, Any] | None = None) -> dict[str, Any]:
        """Identity from the configuration; ``weights`` = identities of already resolved weights
        (otherwise weights files are resolved and hashed, nothing is loaded)."""
        raise NotImplementedError

    def identity(self) -> dict[str, Any]:
        """JSON: name, code_version, weights identity, preprocessing; enters the store fingerprint."""
        return self.describe(self.cfg, self._weights_identity())

    def _weights_identity(self) -> dict[str, Any]:
        raise NotImplementedError

    def compute(self, videos: list[DecodedVideo]) -> list[dict[str, np.ndarray]]:
        """Rows for each video, in order: ``{array name: row array, "<name>_valid": [T] bool}``."""
        raise NotImplementedError

    def _check_segments(self, video: DecodedVideo, count: int, what: str) -> None:
        if count != self.cfg.segments:
            raise ValueError(f"{self.name}: video {video.key!r} has {count} segments of {what}, expected extract.segments={self.cfg.segments}")


# ------------------------------------------------------------------------------------------
# Frame CNNs (shared by vgg19 and sol_extractors.resnet152_maps)


class FrameCNNExtractor(Extractor):
    """Base of extractors that run an image CNN on the frames of a :class:`FrameGrid`.

    Shared: weights resolution (:attr:`weights_kind` from :meth:`weights_spec`), the effective
    precision, model placement (channels_last on CUDA), the frame grid, the checks on the decoded
    frames and the batched forward over fixed ``batch_frames``-sized chunks (the last one
    zero-padded, so a video's numbers never depend on its neighbours). Subclasses set
    :attr:`weights_kind` and implement :meth:`weights_spec`, :meth:`frames_per_segment`,
    :meth:`input_size`, :meth:`build_model`, :meth:`specs_for`, :meth:`describe`, :meth:`compute`.
    """

    uses_audio = False
    #: weights name for :func:`extract.weights.resolve_weights` and key of the weights identity
    weights_kind: ClassVar[str] = ""
    #: a segment needs at least this fraction of its frames inside the stream
    min_valid_fraction: ClassVar[float] = 0.5

    def __init__(self, cfg: ExtractConfig, device: str = "cpu"):
        super().__init__(cfg, device)
        import torch

        from .weights import resolve_weights

        self.weights = resolve_weights(self.weights_spec(cfg), self.weights_kind, seed=cfg.random_seed)
        self.precision = effective_precision(cfg.precision, self.device)
        model = self.build_model(self.weights)
        if self.device.startswith("cuda"):
            model = model.to(memory_format=torch.channels_last)
        self.model = model.to(self.device)
        log.info("%s on %s, %s, weights %s", self.name, self.device, self.precision, self.weights.name)

    @classmethod
    def weights_spec(cls, cfg: ExtractConfig) -> str:
        """The configured weights spec ("imagenet", a path, "random")."""
        raise NotImplementedError

    @classmethod
    def frames_per_segment(cls, cfg: ExtractConfig) -> int:
        raise NotImplementedError

    @classmethod
    def input_size(cls, cfg: ExtractConfig) -> int:
        """Side of the square network input, in pixels."""
        raise NotImplementedError

    @staticmethod
    def build_model(weights):
        """The frozen eval-mode network for a resolved ``WeightsSource``: [N, 3, h, w] -> [N, C, h/32, w/32]."""
        raise NotImplementedError

    @classmethod
    def resolved_weights_identity(cls, cfg: ExtractConfig) -> dict[str, Any]:
        """``{weights_kind: identity}`` of the configured weights (resolved and hashed, not loaded)."""
        from .weights import resolve_weights

        return {cls.weights_kind: resolve_weights(cls.weights_spec(cfg), cls.weights_kind, seed=cfg.random_seed).identity()}

    @classmethod
    def frame_preprocessing(cls, cfg: ExtractConfig, aggregate: str) -> dict[str, Any]:
        """The ``preprocessing`` part of :meth:`describe` (enters the fingerprint); ``aggregate``
        says how the per-frame outputs are combined."""
        return {
            "segments": cfg.segments,
            "frames_per_segment": cls.frames_per_segment(cfg),
            "frame_times": "start + t + (i + 0.5) / F, nearest pts, ties earlier",
            "image_size": cls.input_size(cfg),
            "resize": cfg.resize,
            "interpolation": "cv2 INTER_AREA when shrinking, else INTER_LINEAR",
            "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "aggregate": aggregate,
            "min_valid_fraction": cls.min_valid_fraction,
        }

    @classmethod
    def grid_for(cls, cfg: ExtractConfig) -> FrameGrid:
        from .frames import prepare_frames

        per_segment, size = cls.frames_per_segment(cfg), cls.input_size(cfg)
        return FrameGrid(
            per_segment=per_segment,
            prepare=functools.partial(prepare_frames, image_size=size, resize=cfg.resize),
            name=f"rgb_f{per_segment}_{size}_{cfg.resize}",
        )

    def _weights_identity(self) -> dict[str, Any]:
        return {self.weights_kind: self.weights.identity()}

    def _valid_frame_refs(self, videos: list[DecodedVideo], grid: str) -> list[tuple[int, int, int]]:
        """(video, segment, frame) of every valid frame, in list order (fixes the chunk boundaries)."""
        refs = []
        size = self.input_size(self.cfg)
        for v, video in enumerate(videos):
            frames, valid = video.frames.get(grid), video.frame_valid.get(grid)
            if frames is None or valid is None:
                raise ValueError(f"{self.name}: video {video.key!r} has no frames for grid {grid!r} (has {sorted(video.frames)})")
            self._check_segments(video, valid.shape[0], f"frame validity for {grid}")
            if frames.shape[:2] != valid.shape or frames.shape[2:] != (size, size, 3) or frames.dtype != np.uint8:
                raise ValueError(
                    f"{self.name}: video {video.key!r}: frames {frames.dtype} {frames.shape} do not match validity "
                    f"{valid.shape} and uint8 [T, F, {size}, {size}, 3]"
                )
            refs += [(v, int(t), int(f)) for t, f in zip(*np.nonzero(valid))]
        return refs

    def _chunks(self, refs: list) -> list[list]:
        n = max(1, int(self.cfg.batch_frames))
        return [refs[i: i + n] for i in range(0, len(refs), n)]

    def _forward_chunks(self, videos: list[DecodedVideo], grid: str):
        """Yield ``(chunk, features)``: ``chunk`` = (video, segment, frame) refs of at most
        batch_frames valid frames, ``features`` float32 [len(chunk), C, s, s] of those frames."""
        for chunk in self._chunks(self._valid_frame_refs(videos, grid)):
            yield chunk, self._forward([videos[v].frames[grid][t, f] for v, t, f in chunk])

    def _segment_valid(self, valid_frame_count: np.ndarray, per_segment: int) -> np.ndarray:
        """[T] bool: at least :attr:`min_valid_fraction` of a segment's ``per_segment`` frames are valid."""
        return valid_frame_count >= max(1, int(np.ceil(self.min_valid_fraction * per_segment)))

    def _forward(self, frames: list[np.ndarray]) -> np.ndarray:
        """uint8 [h, w, 3] frames (at most batch_frames) -> float32 [n, C, s, s]; zero-padded to batch_frames."""
        import torch

        from .nets import normalize_frames

        n = len(frames)
        batch = np.zeros((max(n, int(self.cfg.batch_frames)),) + frames[0].shape, np.uint8)
        batch[:n] = np.stack(frames)
        with torch.inference_mode(), _autocast(self.precision, self.device):
            x = normalize_frames(torch.from_numpy(batch).to(self.device, non_blocking=True))
            y = self.model(x)
        return y[:n].float().cpu().numpy()


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
            "precision": cfg.precision,
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


# extractors defined in other modules register themselves when imported
from . import sol_extractors  # noqa: E402,F401  (resnet152_maps, vggish_maps)
