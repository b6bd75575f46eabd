"""Defaults of the extraction stage (section ``extract`` of pipeline.yaml) and its named recipes."""
from __future__ import annotations

import dataclasses
from typing import Any, Literal, Mapping

from .core.settings import ConfigError, section

__all__ = ["ExtractConfig", "Recipe", "RECIPES"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named extraction recipe (``extract.recipe``): the keys it sets.

    ``fixed`` keys define the recipe: an explicit value that contradicts one (pipeline.yaml,
    ``--set``, a CLI option) is an error naming the key. ``defaults`` fill keys that were not given
    explicitly (an explicit value is kept: other weights files, ``random`` for tests, another
    precision; all of them enter the store fingerprint). ``refused`` maps a key to values that make
    no sense with the recipe, with the reason.
    """

    description: str
    fixed: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    refused: Mapping[str, Mapping[Any, str]] = dataclasses.field(default_factory=dict)


#: the recipes ``extract.recipe`` names (docs/extraction.md, "Recipes")
RECIPES: dict[str, Recipe] = {
    "avel": Recipe(
        "avel's own: torchvision VGG-19 (ImageNet mean/std on RGB 0-1), frames nearest to the centres of 16 "
        "sub-intervals of each second, anti-aliased resize; VGGish AudioSet (every key free; not given = the "
        "dataclass default)",
    ),
    "ave2018": Recipe(
        "the public AVE features (Tian et al. ECCV 2018, visual_feature.h5 / audio_feature.h5): Keras VGG-19 "
        "'imagenet' (Oxford's Caffe weights) block5_pool on BGR 0-255 minus the Caffe means, 16 frames per second "
        "by the reference's frame-count rule on ffmpeg's constant-rate frames, cv2 bilinear 224x224 squash, mean "
        "per second; VGGish AudioSet fc2 + ReLU, no PCA",
        fixed={"frames_per_segment": 16, "image_size": 224, "resize": "squash", "frame_rule": "index",
               "interpolation": "linear", "normalize": "caffe", "vggish_relu": True, "vggish_pca": False},
        defaults={"visual_weights": "keras-imagenet", "audio_weights": "vggish", "precision": "fp32"},
        refused={"visual_weights": {"imagenet": "torchvision's VGG-19 (IMAGENET1K_V1) was trained separately from "
                                                 "the Oxford/Keras weights the public features used: its pool5 "
                                                 "channels are other features"}},
    ),
}


@section("extract")
@dataclasses.dataclass
class ExtractConfig:
    """How features are computed. Fields marked (fp) change the numbers and enter the fingerprint."""

    #: (fp) named recipe (:data:`RECIPES`): "avel" (default) or "ave2018" (equal to the public AVE
    #: features); it sets frames_per_segment, image_size, resize, frame_rule, interpolation,
    #: normalize, vggish_relu, vggish_pca and the default weights and precision
    recipe: Literal["avel", "ave2018"] = "avel"
    #: (fp) segments per video window (T); AVE: 10 one-second segments
    segments: int = 10
    #: (fp) frames sampled per 1-s segment for VGG-19 (the AVE features used 16)
    frames_per_segment: int = 16
    #: (fp) network input size; frames are squashed (resized without crop) as the AVE reference did
    image_size: int = 224
    #: (fp) "squash" = whole frame resized to image_size x image_size; "crop" = short side + centre crop
    resize: Literal["squash", "crop"] = "squash"
    #: (fp) which decoded frames stand for a segment (VGG-19): "pts" = nearest to the centres of F
    #: sub-intervals of each second; "index" = the AVE reference's frame-count rule on ffmpeg's
    #: constant-rate frames (extract/frames.py)
    frame_rule: Literal["pts", "index"] = "pts"
    #: (fp) resize interpolation (VGG-19): "auto" = cv2 INTER_AREA when shrinking, else INTER_LINEAR;
    #: "linear" = cv2 INTER_LINEAR always (cv2.resize's default, as the AVE reference)
    interpolation: Literal["auto", "linear"] = "auto"
    #: (fp) VGG-19 input: "imagenet" = RGB / 255 with ImageNet mean/std (torchvision weights);
    #: "caffe" = BGR 0-255 minus 103.939/116.779/123.68 (Keras vgg19.preprocess_input, Caffe weights)
    normalize: Literal["imagenet", "caffe"] = "imagenet"
    #: (fp) VGG-19 weights: "imagenet" (torchvision IMAGENET1K_V1), "keras-imagenet" (the Keras /
    #: Oxford Caffe weights, .h5 or jcjohnson's .pth), "pretrained" (the recipe's), a file path, or "random"
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

    def resolve_overrides(self, explicit: Mapping[str, Any], where: str = "extract") -> "ExtractConfig":
        """Apply :attr:`recipe` after pipeline.yaml / ``--set`` / CLI options were merged
        (:func:`extract.core.settings.merge` calls it with the keys given explicitly): fill the recipe's
        keys that were not given, refuse explicit values that contradict it (ConfigError naming the
        key), and turn the weights word "pretrained" into the recipe's pretrained weights."""
        recipe = RECIPES[self.recipe]
        changes: dict[str, Any] = {}
        for key, value in recipe.fixed.items():
            if key in explicit and explicit[key] != value:
                raise ConfigError(
                    f"{where}.{key}: recipe {self.recipe!r} sets {value!r}, got {explicit[key]!r}; drop the key "
                    f"(or set {where}.recipe to 'avel' to choose it freely)")
            changes[key] = value
        for key, value in recipe.defaults.items():
            if key not in explicit:
                changes[key] = value
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.default is not dataclasses.MISSING}
        for other in RECIPES.values():  # keys another recipe sets fall back to the defaults here
            for key in list(other.fixed) + list(other.defaults):
                if key not in explicit and key not in changes:
                    changes[key] = defaults[key]
        if self.visual_weights == "pretrained" or changes.get("visual_weights") == "pretrained":
            changes["visual_weights"] = recipe.defaults.get("visual_weights", defaults["visual_weights"])
        for key, values in recipe.refused.items():
            value = changes.get(key, getattr(self, key))
            if value in values:
                raise ConfigError(f"{where}.{key}: {value!r} does not go with recipe {self.recipe!r}: {values[value]}; "
                                  f"use {recipe.defaults.get(key)!r} (the recipe's default), a file path or 'random'")
        return dataclasses.replace(self, **changes) if changes else self
