"""The networks of the extraction stage and their input preparation.

- :func:`build_vgg19_pool5`: VGG-19 (Simonyan & Zisserman 2015) convolutional part, exactly
  torchvision's ``vgg19().features`` (same module indices, so torchvision's ImageNet state dict
  loads strictly); [N, 3, 224, 224] -> pool5 [N, 512, 7, 7] (20,024,384 parameters).
- :class:`VGGish`: the AudioSet VGGish (Hershey et al. 2017) with the module and parameter names
  of the torchvggish port (``features.*``, ``embeddings.*``), so ``vggish-10086976.pth`` loads
  strictly; [N, 1, 96, 64] log-mel patches -> [N, 128] embeddings (72,141,184 parameters).
- :class:`VGGishPCA`: the AudioSet post-processing (PCA with whitening, clip to [-2, 2], 8-bit
  quantisation to 0..255) from the torchvggish ``pca_params`` file.
- :func:`damp_residual_branches`: the scale-keeping random init of a torchvision ResNet (used by
  the ``resnet152_maps`` extractor's ``"random"`` ResNet-152).
- :func:`prepare_frames` (numpy + cv2, defined in :mod:`extract.core.frames` so decode workers do not
  import torch), :func:`normalize_frames` (torch, ImageNet mean/std) and
  :func:`caffe_normalize_frames` (BGR 0-255 minus the Caffe means, as Keras'
  ``vgg19.preprocess_input``: the input of the Keras / Oxford Caffe VGG-19 weights).

torch is imported at module level: import this module only where networks run.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from .core.frames import prepare_frames  # noqa: F401 - re-exported: lives in the torch-free module
from .weights import WeightsSource, resolve_weights

log = logging.getLogger(__name__)

__all__ = [
    "VGG19_LAYERS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "vgg19_features",
    "build_vgg19_pool5",
    "VGGish",
    "VGGishPCA",
    "build_vggish",
    "build_vggish_pca",
    "damp_residual_branches",
    "prepare_frames",
    "normalize_frames",
    "caffe_normalize_frames",
    "CAFFE_BGR_MEAN",
    "count_parameters",
]

#: VGG-19 ("configuration E") convolutional layout: conv widths, "M" = 2x2 max-pool
VGG19_LAYERS: tuple[Any, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
                                 512, 512, 512, 512, "M", 512, 512, 512, 512, "M")
#: VGGish layout (conv 3x3 pad 1 + ReLU, "M" = 2x2 max-pool)
VGGISH_LAYERS: tuple[Any, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the Caffe VGG means, in BGR order, on 0-255 (keras imagenet_utils 'caffe' mode)
CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)

# vggish_params.py
EMBEDDING_SIZE = 128
QUANTIZE_MIN_VAL = -2.0
QUANTIZE_MAX_VAL = 2.0


from .core.devices import count_parameters  # noqa: E402,F401  (one implementation, shared with train/)


def _conv_stack(layout: tuple[Any, ...], in_channels: int) -> nn.Sequential:
    """Conv3x3(pad 1) + ReLU per width, MaxPool2d(2, 2) per "M" (torchvision/torchvggish indexing)."""
    layers: list[nn.Module] = []
    for v in layout:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, int(v), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = int(v)
    return nn.Sequential(*layers)


@contextlib.contextmanager
def _seeded(seed: int):
    """Context in which torch's global CPU RNG is seeded with ``seed`` and restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        yield


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _as_source(weights: str | WeightsSource, kind: str, seed: int) -> WeightsSource:
    return weights if isinstance(weights, WeightsSource) else resolve_weights(weights, kind, seed=seed)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# VGG-19 pool5


def vgg19_features() -> nn.Sequential:
    """Untrained ``torchvision.models.vgg19().features`` (37 modules, indices as torchvision)."""
    return _conv_stack(VGG19_LAYERS, 3)


def _init_like_torchvision(features: nn.Sequential) -> None:
    """torchvision VGG initialisation of conv layers: Kaiming normal (fan_out, relu), zero bias."""
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def _strip_prefix(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def build_vgg19_pool5(weights: str | WeightsSource, seed: int = 0) -> nn.Module:
    """VGG-19 up to pool5, frozen, eval mode: [N, 3, H, W] normalised RGB -> [N, 512, H/32, W/32].

    ``weights``: a spec for :func:`extract.weights.resolve_weights` (``"imagenet"``,
    ``"keras-imagenet"``, a path, ``"random"``) or a resolved :class:`WeightsSource`. A file must be
    a torchvision VGG-19 state dict or a Keras VGG-19 ``.h5`` weights file (converted by
    :func:`extract.keras_h5.vgg19_state_dict`); its ``features.*`` tensors are loaded strictly (the
    classifier is not needed for pool5). The Keras / Caffe weights expect
    :func:`caffe_normalize_frames` inputs, torchvision's :func:`normalize_frames` inputs.
    ``seed`` initialises random weights reproducibly (the global RNG is left untouched).
    """
    source = _as_source(weights, "vgg19", seed)
    if source.is_random:
        with _seeded(source.seed or 0):
            features = vgg19_features()
            _init_like_torchvision(features)
    else:
        features = vgg19_features()
        state = source.load()
        sub = _strip_prefix(state, "features.") if any(k.startswith("features.") for k in state) else state
        try:
            features.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{source.path}: not a torchvision VGG-19 state dict ({' '.join(str(exc).split())})") from None
    return _frozen(features)


# ------------------------------------------------------------------------------------------
# VGGish


class VGGish(nn.Module):
    """VGGish, parameter names as the torchvggish port: [N, 1, 96, 64] -> [N, 128].

    ``features``: conv 64, pool, conv 128, pool, conv 256, conv 256, pool, conv 512, conv 512,
    pool (3x3 convs, pad 1, ReLU; 2x2 max-pools) -> [N, 512, 6, 4]; flattened in TensorFlow's
    (height, width, channel) order -> 12288; ``embeddings``: FC 12288->4096, ReLU, 4096->4096,
    ReLU, 4096->128, ReLU. ``relu=False`` skips the final ReLU (the raw "embedding" layer output,
    which the AudioSet PCA post-processing was fitted on).
    """

    def __init__(self, relu: bool = True):
        super().__init__()
        self.relu = bool(relu)
        self.features = _conv_stack(VGGISH_LAYERS, 1)
        self.embeddings = nn.Sequential(
            nn.Linear(512 * 6 * 4, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, EMBEDDING_SIZE),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 1, 96, 64] log-mel patches (frames x bands) -> [N, 128]."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, 96, 64):
            raise ValueError(f"VGGish expects [N, 1, 96, 64] log-mel patches, got {tuple(x.shape)}")
        h = self.features(x)  # [N, 512, 6, 4]
        h = h.permute(0, 2, 3, 1).reshape(h.shape[0], -1)  # NHWC flatten, as the TF checkpoint
        head = self.embeddings if self.relu else self.embeddings[:-1]
        return head(h)


class VGGishPCA(nn.Module):
    """AudioSet post-processing: ``round((clip(P (e - mu), -2, 2) + 2) * 255 / 4)`` -> [N, 128] in 0..255.

    Buffers ``pca_matrix`` [128, 128] (eigenvectors as rows, whitening included) and ``pca_means``
    [128, 1], as torchvggish's ``Postprocessor``. Output stays float (values 0.0 ... 255.0).
    """

    def __init__(self):
        super().__init__()
        self.register_buffer("pca_matrix", torch.zeros(EMBEDDING_SIZE, EMBEDDING_SIZE))
        self.register_buffer("pca_means", torch.zeros(EMBEDDING_SIZE, 1))

    def load_pca_params(self, params: dict[str, Any]) -> None:
        """Load ``pca_eigen_vectors`` [128, 128] and ``pca_means`` [128] (the pca_params file's keys;
        ``pca_matrix`` is accepted for the first)."""
        vectors = params.get("pca_eigen_vectors", params.get("pca_matrix"))
        means = params.get("pca_means")
        if vectors is None or means is None:
            raise ValueError(f"PCA parameters need 'pca_eigen_vectors' and 'pca_means', got keys {sorted(params)}")
        vectors = torch.as_tensor(np.asarray(vectors), dtype=torch.float32)
        means = torch.as_tensor(np.asarray(means), dtype=torch.float32).reshape(-1, 1)
        if tuple(vectors.shape) != (EMBEDDING_SIZE, EMBEDDING_SIZE) or tuple(means.shape) != (EMBEDDING_SIZE, 1):
            raise ValueError(f"bad PCA shapes {tuple(vectors.shape)}, {tuple(means.shape)}; expected (128, 128), (128,)")
        self.pca_matrix.copy_(vectors)
        self.pca_means.copy_(means)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """[N, 128] raw embeddings -> [N, 128] quantised values 0..255 (float)."""
        projected = (self.pca_matrix @ (embeddings.T - self.pca_means)).T
        clipped = projected.clamp(QUANTIZE_MIN_VAL, QUANTIZE_MAX_VAL)
        return torch.round((clipped - QUANTIZE_MIN_VAL) * (255.0 / (QUANTIZE_MAX_VAL - QUANTIZE_MIN_VAL)))


def _init_vggish_random(model: VGGish) -> None:
    """Deterministic random init, in module order, that keeps the activations' scale (He et al.):
    convolutions Kaiming normal (fan_out, relu) as torchvision's VGGs and :func:`build_vgg19_pool5`,
    linears Kaiming normal (fan_in, relu), zero biases. PyTorch's default init shrinks the
    activations layer by layer: a random VGGish then gave demo embeddings that varied by ~2e-4
    around ~4e-3 (nearly constant, so audio-only heads could not learn from them); with this init
    they vary by ~0.02 around ~0.1 (measured on demo log-mel patches)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(m.bias)


def damp_residual_branches(net: nn.Module) -> float:
    """Make a randomly initialised torchvision ResNet keep its activation scale in eval mode.

    torchvision initialises every batch norm to gamma = 1, beta = 0 with running statistics 0 / 1,
    so in eval mode each BN is (nearly) the identity and each residual block adds a branch about as
    large as its input: the activation variance roughly doubles per block (measured on a demo frame:
    a random ResNet-152's conv5 maps reach ~2e8, past the float16 range, 65504). Here the last
    BN gamma of every residual branch (``bn3`` of a Bottleneck, ``bn2`` of a BasicBlock) is set to
    ``1 / sqrt(L)``, L = the number of residual blocks: each block then multiplies the variance by
    about ``1 + c / L``, and all L blocks together by at most about ``e^c``, whatever the depth
    (the Fixup / SkipInit idea). Unlike torchvision's ``zero_init_residual`` (gamma = 0, which
    turns 46 of ResNet-152's 50 blocks into identities and leaves a stem + four strided 1x1
    convolutions whose conv5 cells each see an 11 x 11 pixel patch) every block still contributes
    and the maps keep ResNet-152's receptive field. Deterministic (no random numbers drawn).
    Returns the gamma used."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    blocks = [m for m in net.modules() if isinstance(m, (Bottleneck, BasicBlock))]
    if not blocks:
        raise ValueError(f"{type(net).__name__} has no torchvision residual blocks")
    gamma = 1.0 / float(np.sqrt(len(blocks)))
    with torch.no_grad():
        for block in blocks:
            last = block.bn3 if isinstance(block, Bottleneck) else block.bn2
            last.weight.fill_(gamma)
    return gamma


def build_vggish(weights: str | WeightsSource, relu: bool = True, seed: int = 0) -> VGGish:
    """VGGish, frozen, eval mode; ``weights`` a spec ("vggish", path, "random") or a WeightsSource."""
    source = _as_source(weights, "vggish", seed)
    if source.is_random:
        with _seeded(source.seed or 0):
            model = VGGish(relu=relu)
            _init_vggish_random(model)
    else:
        model = VGGish(relu=relu)
        try:
            model.load_state_dict(source.load(), strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{source.path}: not a torchvggish VGGish state dict ({exc})") from None
    return _frozen(model)  # type: ignore[return-value]


def build_vggish_pca(weights: str | WeightsSource, seed: int = 0) -> VGGishPCA:
    """The PCA post-processor; random weights = a seeded random orthogonal matrix and N(0, 1) means."""
    source = _as_source(weights, "vggish_pca", seed)
    pca = VGGishPCA()
    if source.is_random:
        g = torch.Generator().manual_seed(int(source.seed or 0))
        q, _ = torch.linalg.qr(torch.randn(EMBEDDING_SIZE, EMBEDDING_SIZE, generator=g, dtype=torch.float64))
        pca.load_pca_params({"pca_eigen_vectors": q.float(), "pca_means": torch.randn(EMBEDDING_SIZE, generator=g)})
    else:
        pca.load_pca_params(source.load())
    return _frozen(pca)  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------
# frame preparation


def normalize_frames(frames: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> ``dtype`` [N, 3, H, W] ``(x / 255 - mean) / std`` (ImageNet), channels_last.

    The result keeps the input's device; its memory is NHWC (``torch.channels_last``), which is
    free here since the input is already NHWC.
    """
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"normalize_frames expects [N, H, W, 3], got {tuple(x.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=x.device)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=x.device)
    x = (x.to(torch.float32) / 255.0 - mean) / std  # [N, H, W, 3]
    return x.permute(0, 3, 1, 2).to(dtype)  # NCHW view of NHWC memory = channels_last


def caffe_normalize_frames(frames: torch.Tensor | np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> ``dtype`` [N, 3, H, W]: channels flipped to BGR, values 0-255 minus
    :data:`CAFFE_BGR_MEAN` (103.939, 116.779, 123.68), no scaling: Keras'
    ``vgg19.preprocess_input`` ("caffe" mode), the input the Oxford Caffe VGG-19 weights expect.
    Keeps the input's device; NHWC memory (channels_last), like :func:`normalize_frames`.
    """
    x = torch.as_tensor(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"caffe_normalize_frames expects [N, H, W, 3], got {tuple(x.shape)}")
    mean = torch.tensor(CAFFE_BGR_MEAN, dtype=torch.float32, device=x.device)
    x = x.flip(-1).to(torch.float32) - mean  # [N, H, W, 3] BGR
    return x.permute(0, 3, 1, 2).to(dtype)
