"""Defaults of the extraction stage (section ``extract`` of pipeline.yaml)."""
from __future__ import annotations

import dataclasses
from typing import Literal

from .settings import section


@section("extract")
@dataclasses.dataclass
class ExtractConfig:
    """How features are computed. Fields marked (fp) change the numbers and enter the fingerprint."""

    #: (fp) segments per video window (T); AVE: 10 one-second segments
    segments: int = 10
    #: (fp) frames sampled per 1-s segment for VGG-19 (the AVE features used 16)
    frames_per_segment: int = 16
    #: (fp) network input size; frames are squashed (resized without crop) as the AVE reference did
    image_size: int = 224
    #: (fp) "squash" = whole frame resized to image_size x image_size; "crop" = short side + centre crop
    resize: Literal["squash", "crop"] = "squash"
    #: (fp) VGG-19 weights: "imagenet" (torchvision IMAGENET1K_V1), a file path, or "random"
    visual_weights: str = "imagenet"
    #: (fp) VGGish weights: "vggish" (torchvggish vggish-10086976.pth), a file path, or "random"
    audio_weights: str = "vggish"
    #: (fp) seed for "random" weights
    random_seed: int = 0
    #: (fp) keep VGGish's final ReLU (AVE features: true)
    vggish_relu: bool = True
    #: (fp) apply the AudioSet PCA + 8-bit quantisation post-processing (AVE features: false)
    vggish_pca: bool = False
    #: (fp) network precision: "auto" (bf16 autocast + channels_last on a CUDA GPU, fp16 on a GPU
    #: without bf16, fp32 on a CPU), "fp32", "bf16" or "fp16" (GPU only; fp32 on a CPU); the store
    #: records the precision that really ran
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: "auto" (cuda if available), "cpu", "cuda", "cuda:1"
    device: str = "auto"
    #: frames per VGG-19 forward batch
    batch_frames: int = 128
    #: torch threads for the networks on a CPU (null = every core; OMP_NUM_THREADS also bounds it)
    threads: int | None = None
    #: decode worker processes (null = all cores)
    decode_workers: int | None = None
    #: seconds a single video may take to decode before it is killed and marked failed
    decode_timeout_s: float = 120.0
    #: (fp) frames per 1-s segment of the sounding-object maps (``resnet152_maps``; STM paper: 4)
    sol_frames_per_segment: int = 4
    #: (fp) ResNet-152 weights of ``resnet152_maps``: "imagenet" (torchvision IMAGENET1K_V1), a file, or "random"
    sol_visual_weights: str = "imagenet"
    #: extractors to run: names from the extractor registry
    extractors: list[str] = dataclasses.field(default_factory=lambda: ["vgg19", "vggish"])
