"""The extractor interface, shared by every extractor module: what an extractor declares and
computes (:class:`Extractor`, the frame-CNN base :class:`FrameCNNExtractor`), what the decoder hands
it (:class:`FrameGrid`, :class:`DecodedVideo`), the registry (:func:`register_extractor`,
:func:`get_extractor`) and device / precision resolution. The built-in extractors live in
:mod:`extract.extractors` (vgg19, vggish) and :mod:`extract.sol_extractors` (resnet152_maps,
vggish_maps); both import this module and neither imports the other. Extractor modules are
plugins: each is named in the entry-point group ``avel.extractors`` (setup.cfg, or a third
package's metadata) and imported on the first lookup (:mod:`extract.core.plugins`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from typing import Any, Callable, ClassVar

import numpy as np

from .config import ExtractConfig
from .core import plugins
from .core.devices import resolve_device  # noqa: F401  (re-exported: part of the extractor API)
from .core.store import ArraySpec

log = logging.getLogger(__name__)

__all__ = [
    "FrameGrid",
    "DecodedVideo",
    "Extractor",
    "EXTRACTORS",
    "register_extractor",
    "load_extractors",
    "get_extractor",
    "resolve_device",
    "effective_precision",
    "auto_precision",
    "configured_precision",
    "FrameCNNExtractor",
]


@dataclasses.dataclass
class FrameGrid:
    """Frames an extractor needs.

    ``per_segment`` frames per 1-s segment chosen by the frame ``rule`` (:mod:`extract.core.frames`:
    ``"pts"`` at the times of :func:`extract.core.frames.segment_frame_times`, ``"index"`` the AVE
    reference's frame-count rule); ``prepare`` (picklable, numpy/cv2 only) maps decoded uint8
    [N, H, W, 3] RGB frames to uint8 [N, h, w, 3] in the decode workers; grids with equal ``name``
    are decoded once and shared between extractors.
    """

    per_segment: int
    prepare: Callable[[np.ndarray], np.ndarray]
    name: str
    rule: str = "pts"


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
            raise ValueError(f"extractor {name!r} of {cls.__module__}.{cls.__qualname__} is already registered by "
                             f"{EXTRACTORS[name].__module__}.{EXTRACTORS[name].__qualname__}")
        cls.name = name
        EXTRACTORS[name] = cls
        return cls

    return decorate


def load_extractors() -> dict[str, type["Extractor"]]:
    """Import every extractor plugin (entry points ``avel.extractors``, once) and return :data:`EXTRACTORS`."""
    plugins.load(plugins.EXTRACTORS)
    return EXTRACTORS


def get_extractor(name: str) -> type["Extractor"]:
    """The registered extractor class ``name`` (every extractor plugin is loaded first)."""
    load_extractors()
    try:
        return EXTRACTORS[name]
    except KeyError:
        raise ValueError(f"extract.extractors: unknown extractor {name!r} (registered: {', '.join(sorted(EXTRACTORS))})") from None


def auto_precision(device: str) -> str:
    """What ``extract.precision: auto`` runs on ``device``: bf16 autocast on a CUDA GPU with bf16
    (compute capability >= 8.0, or one torch cannot query here: a Dask driver without the
    workers' GPU), fp16 on an older GPU, fp32 on a CPU."""
    if not str(device).startswith("cuda"):
        return "fp32"
    import torch

    try:
        major, _ = torch.cuda.get_device_capability(device)
    except (AssertionError, RuntimeError, ValueError):  # no CUDA here: the common GPU of today
        return "bf16"
    return "bf16" if major >= 8 else "fp16"


def effective_precision(precision: str, device: str) -> str:
    """The precision actually used: ``auto`` as :func:`auto_precision` says; otherwise as asked
    on CUDA, and on a CPU fp32 unless bf16 is asked."""
    if precision == "auto":
        return auto_precision(device)
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"extract.precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    if not str(device).startswith("cuda") and precision == "fp16":
        log.warning("extract.precision=fp16 is not used on %s; running fp32 (use bf16 for reduced precision on CPU)", device)
        return "fp32"
    return precision


def configured_precision(cfg: ExtractConfig) -> str:
    """``cfg.precision`` with ``auto`` resolved on ``cfg.device`` (what an extractor's identity
    records when it is described from a configuration that was not resolved yet)."""
    if cfg.precision != "auto":
        return cfg.precision
    return auto_precision(resolve_device(cfg.device))


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

#: the identity texts of the frame rules, interpolations and input normalisations (they enter the
#: store fingerprint: avel's own are unchanged since the first stores)
_FRAME_TIMES = {
    "pts": "start + t + (i + 0.5) / F, nearest pts, ties earlier",
    "index": "AVE reference: interval = int(n / T), frame int(l * interval + (i / F) * interval) of the n "
             "constant-rate frames (ffmpeg vsync cfr) of the window",
}
_INTERPOLATION_TEXT = {
    "auto": "cv2 INTER_AREA when shrinking, else INTER_LINEAR",
    "linear": "cv2 INTER_LINEAR",
}
_NORMALIZE_TEXT = {
    "imagenet": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
    "caffe": {"order": "BGR", "range": "0-255", "mean": [103.939, 116.779, 123.68]},
}


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
    def frame_rule(cls, cfg: ExtractConfig) -> str:
        """Which decoded frames stand for a segment (:data:`extract.core.frames.FRAME_RULES`)."""
        return "pts"

    @classmethod
    def interpolation(cls, cfg: ExtractConfig) -> str:
        """The resize interpolation (:data:`extract.core.frames.INTERPOLATIONS`)."""
        return "auto"

    @classmethod
    def normalization(cls, cfg: ExtractConfig) -> str:
        """The network input: ``"imagenet"`` (:func:`extract.nets.normalize_frames`) or ``"caffe"``
        (:func:`extract.nets.caffe_normalize_frames`)."""
        return "imagenet"

    @classmethod
    def resolved_weights_identity(cls, cfg: ExtractConfig) -> dict[str, Any]:
        """``{weights_kind: identity}`` of the configured weights (resolved and hashed, not loaded)."""
        from .weights import resolve_weights

        return {cls.weights_kind: resolve_weights(cls.weights_spec(cfg), cls.weights_kind, seed=cfg.random_seed).identity()}

    @classmethod
    def frame_preprocessing(cls, cfg: ExtractConfig, aggregate: str) -> dict[str, Any]:
        """The ``preprocessing`` part of :meth:`describe` (enters the fingerprint); ``aggregate``
        says how the per-frame outputs are combined."""
        rule, interpolation, normalization = cls.frame_rule(cfg), cls.interpolation(cfg), cls.normalization(cfg)
        return {
            "segments": cfg.segments,
            "frames_per_segment": cls.frames_per_segment(cfg),
            "frame_times": _FRAME_TIMES[rule],
            "image_size": cls.input_size(cfg),
            "resize": cfg.resize,
            "interpolation": _INTERPOLATION_TEXT[interpolation],
            "normalize": _NORMALIZE_TEXT[normalization],
            "aggregate": aggregate,
            "min_valid_fraction": cls.min_valid_fraction,
        }

    @classmethod
    def grid_for(cls, cfg: ExtractConfig) -> FrameGrid:
        from .core.frames import prepare_frames

        per_segment, size = cls.frames_per_segment(cfg), cls.input_size(cfg)
        rule, interpolation = cls.frame_rule(cfg), cls.interpolation(cfg)
        suffix = "" if (rule, interpolation) == ("pts", "auto") else f"_{rule}_{interpolation}"
        return FrameGrid(
            per_segment=per_segment,
            prepare=functools.partial(prepare_frames, image_size=size, resize=cfg.resize, interpolation=interpolation),
            name=f"rgb_f{per_segment}_{size}_{cfg.resize}{suffix}",
            rule=rule,
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

        from .nets import caffe_normalize_frames, normalize_frames

        normalize = caffe_normalize_frames if self.normalization(self.cfg) == "caffe" else normalize_frames
        n = len(frames)
        batch = self._staging((max(n, int(self.cfg.batch_frames)),) + frames[0].shape)  # reused: see _staging
        batch[:n], batch[n:] = frames, 0
        with torch.inference_mode(), _autocast(self.precision, self.device):
            x = normalize(torch.from_numpy(batch).to(self.device, non_blocking=True))
            y = self.model(x)
        return y[:n].float().cpu().numpy()

    def _staging(self, shape: tuple[int, ...]) -> np.ndarray:
        """The uint8 host buffer a forward batch is assembled in, reused by every forward (each
        waits for its result, so the buffer is free again): page-locked on CUDA, so that the
        host->device copy is a DMA that does not stage through pageable memory."""
        import torch

        buffer = getattr(self, "_staging_buffer", None)
        if buffer is None or tuple(buffer.shape) != tuple(shape):
            pinned = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.startswith("cuda"))
            self._staging_tensor, buffer = pinned, pinned.numpy()  # the tensor keeps the page-locked memory
            self._staging_buffer = buffer
        return buffer
