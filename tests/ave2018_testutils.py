"""Helpers of the ave2018 tests: random VGG-19 weights written in the legacy Keras HDF5 layout (both
weight-name styles) and as a torchvision state dict, the ffmpeg ``rgb24`` frames that imageio gave
the AVE reference, and an independent float64 transcription of the reference's visual pipeline.

The Keras layout written here follows keras ``save_weights_to_hdf5_group`` (legacy h5 format):
root attribute ``layer_names`` (every layer, in model order, as bytes), per layer a group with the
attribute ``weight_names`` (its weights' dataset paths relative to the group, in the order the
layer takes them; an empty list for layers without weights), kernels HWIO."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np

#: VGG-19's layers as keras.applications.vgg19 names them, in model order (no-weight layers included)
KERAS_VGG19_LAYERS = (
    ["input_1"]
    + ["block1_conv1", "block1_conv2", "block1_pool"]
    + [f"block2_conv{c}" for c in (1, 2)] + ["block2_pool"]
    + [f"block3_conv{c}" for c in (1, 2, 3, 4)] + ["block3_pool"]
    + [f"block4_conv{c}" for c in (1, 2, 3, 4)] + ["block4_pool"]
    + [f"block5_conv{c}" for c in (1, 2, 3, 4)] + ["block5_pool"]
)
CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
#: torchvision vgg19().features indices of the 16 convolutions
TORCHVISION_CONV_INDEX = (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34)
#: keras' VGG19 preprocess_input ("caffe" mode) means, BGR order
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


def random_vgg19_convs(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """16 (kernel OIHW float32, bias float32) pairs: He-scaled normal kernels (activations keep
    their scale through the 16 ReLU convolutions) and clearly non-zero biases."""
    rng = np.random.default_rng(seed)
    convs, cin = [], 3
    for cout in CONV_WIDTHS:
        w = rng.normal(0.0, np.sqrt(2.0 / (9 * cin)), size=(cout, cin, 3, 3)).astype(np.float32)
        b = rng.normal(0.0, 2.0, size=cout).astype(np.float32)
        convs.append((w, b))
        cin = cout
    return convs


def conv_layer_names() -> list[str]:
    return [n for n in KERAS_VGG19_LAYERS if "_conv" in n]


def write_keras_vgg19(path: Path, convs, style: str = "keras1", top: bool = False) -> Path:
    """Write ``convs`` (OIHW) as a Keras VGG-19 weights file in the legacy HDF5 layout.

    ``style="keras1"``: datasets ``<layer>_W_1:0`` / ``<layer>_b_1:0`` in the layer's group (the
    names of the original vgg19_weights_tf_dim_ordering_tf_kernels files); ``"keras2"``: datasets
    ``<layer>/kernel:0`` / ``<layer>/bias:0`` (a subgroup, as Keras 2 writes them). The datasets
    are created bias first, so only ``weight_names`` gives the kernel-then-bias order.
    ``top``: add fc1, fc2, predictions (small random dense layers; pool5 does not use them)."""
    import h5py

    names = list(KERAS_VGG19_LAYERS) + (["flatten", "fc1", "fc2", "predictions"] if top else [])
    rng = np.random.default_rng(1)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode("utf8") for n in names])
        f.attrs["backend"] = b"tensorflow"
        if style == "keras2":
            f.attrs["keras_version"] = b"2.2.4"
        weights = dict(zip(conv_layer_names(), convs))
        for name in names:
            group = f.create_group(name)
            if name in weights:
                kernel_oihw, bias = weights[name]
                arrays = [kernel_oihw.transpose(2, 3, 1, 0), bias]  # OIHW -> HWIO
            elif name in ("fc1", "fc2", "predictions"):
                arrays = [rng.normal(size=(8, 8)).astype(np.float32), np.zeros(8, np.float32)]
            else:
                group.attrs["weight_names"] = np.array([], dtype="S1")
                continue
            if style == "keras1":
                wnames = [f"{name}_W_1:0", f"{name}_b_1:0"]
            elif style == "keras2":
                wnames = [f"{name}/kernel:0", f"{name}/bias:0"]
            else:
                raise ValueError(style)
            for wname, value in reversed(list(zip(wnames, arrays))):
                group.create_dataset(wname, data=value)
            group.attrs["weight_names"] = np.array([w.encode("utf8") for w in wnames])
    return path


def write_torch_vgg19(path: Path, convs) -> Path:
    """The same weights as a torchvision ``vgg19()`` state dict (``features.<i>.weight`` / ``.bias``)."""
    import torch

    state = {}
    for index, (w, b) in zip(TORCHVISION_CONV_INDEX, convs):
        state[f"features.{index}.weight"] = torch.from_numpy(w.copy())
        state[f"features.{index}.bias"] = torch.from_numpy(b.copy())
    torch.save(state, path)
    return path


def ffmpeg_rgb24_frames(path: Path) -> np.ndarray | None:
    """Every frame as the reference's ``imageio.get_reader(path, 'ffmpeg')`` delivered it: the ffmpeg
    binary (imageio-ffmpeg's) with ``-pix_fmt rgb24 -vcodec rawvideo -f image2pipe`` (uint8
    [K, H, W, 3]); None when imageio-ffmpeg is not installed."""
    try:
        import imageio_ffmpeg
    except ImportError:
        return None
    exe = imageio_ffmpeg.get_ffmpeg_exe()
    probe = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(probe)
    probe.close()
    width, height = meta["size"]
    raw = subprocess.run([exe, "-v", "error", "-i", str(path), "-pix_fmt", "rgb24", "-vcodec", "rawvideo",
                          "-f", "image2pipe", "-"], capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, height, width, 3)


def reference_frame_numbers(vid_len: int, t: int = 10, sample_num: int = 16) -> list[int]:
    """The reference's ``video_frame_sample(int(vid_len / t), t, sample_num)``, transcribed from
    YapengTian/AVE-ECCV18 feature extraction (visual_feature_extractor.py, as in
    talgold9/AVE-ECCV18 feature_extraction/visual_feature_extractor.py lines 22-29)."""
    frame_interval = int(vid_len / t)
    num = []
    for l in range(t):
        for i in range(sample_num):
            num.append(int(l * frame_interval + (i * 1.0 / sample_num) * frame_interval))
    return num


def reference_inputs(frames: np.ndarray, numbers) -> np.ndarray:
    """The reference's network inputs for ``frames[numbers]``: ``cv2.resize(im, (224, 224))`` (its
    default bilinear interpolation, on uint8 RGB), then keras ``preprocess_input`` ('caffe'): RGB
    -> BGR, minus the means, here in float64. [N, 224, 224, 3] float64, BGR."""
    import cv2

    out = np.empty((len(numbers), 224, 224, 3), np.float64)
    for k, n in enumerate(numbers):
        image = cv2.resize(frames[n], (224, 224)).astype(np.float64)
        out[k] = image[..., ::-1] - np.asarray(CAFFE_MEAN_BGR)
    return out


def reference_pool5(inputs_bgr: np.ndarray, convs) -> np.ndarray:
    """block5_pool of keras VGG19 on float64 inputs [N, 224, 224, 3] (BGR, mean-subtracted), with
    its own float64 convolutions: 3x3 'same' conv + ReLU per layer, 2x2/2 max-pool after each
    block. Returns [N, 7, 7, 512] float64 (channel-last, as Keras)."""
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(np.ascontiguousarray(inputs_bgr.transpose(0, 3, 1, 2)))
    blocks = (2, 2, 4, 4, 4)
    k = 0
    with torch.no_grad():
        for convs_in_block in blocks:
            for _ in range(convs_in_block):
                w, b = convs[k]
                x = F.relu(F.conv2d(x, torch.from_numpy(w).double(), torch.from_numpy(b).double(), padding=1))
                k += 1
            x = F.max_pool2d(x, 2, 2)
    return x.numpy().transpose(0, 2, 3, 1)
