"""Reading Keras weights files in the legacy HDF5 layout (``model.save_weights('x.h5')``).

The Keras applications weights of VGG-19 (``vgg19_weights_tf_dim_ordering_tf_kernels.h5`` and its
``_notop.h5``, the Oxford VGG Caffe weights ported to Keras: the weights behind the public AVE
features) are stored in this layout, as written by Keras' ``save_weights_to_hdf5_group`` and read
by its ``load_weights_from_hdf5_group`` (keras ``legacy/saving/legacy_h5_format.py``; Keras 1/2
``engine/saving.py``):

- the root group (or its ``model_weights`` subgroup, in a whole-model file) has the attribute
  ``layer_names``: the layers in model order, as byte strings; an attribute too large for an
  HDF5 object header is split into ``layer_names0``, ``layer_names1``, ...;
- each layer is a group of that name with the attribute ``weight_names`` (split the same way): the
  paths, relative to the layer's group, of its weight datasets, **in the order the layer takes
  them** (kernel, then bias). Files written by Keras 1 / early Keras 2 name them
  ``block1_conv1_W_1:0`` / ``block1_conv1_b_1:0`` (datasets directly in the layer's group),
  files written by later Keras 2 ``block1_conv1/kernel:0`` / ``block1_conv1/bias:0`` (a subgroup);
- layers without weights (input, pooling, flatten) are listed with an empty ``weight_names``.

Keras loads such a file by position: the i-th layer with weights in the file goes to the i-th
layer with weights in the model, whatever the names; so does :func:`vgg19_state_dict`. A
TensorFlow-ordered ("tf") convolution kernel is HWIO [3, 3, in, out]; PyTorch's is OIHW
[out, in, 3, 3] (``kernel.transpose(3, 2, 0, 1)``). Both compute a cross-correlation, and the
first layer's input channels are in the order the weights were trained on (BGR for the Caffe
weights: Keras' ``vgg19.preprocess_input`` flips RGB to BGR), so nothing else changes.

Imports numpy and h5py only (no torch).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_layer_weights", "vgg19_state_dict", "VGG19_CONV_WIDTHS", "KerasLayoutError"]

#: output channels of VGG-19's 16 convolutions in order (block1: 2, block2: 2, blocks 3-5: 4 each)
VGG19_CONV_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512, 512, 512, 512, 512)
#: convolutions per block (each block ends with a 2x2 max-pool)
VGG19_BLOCKS = (2, 2, 4, 4, 4)


class KerasLayoutError(ValueError):
    """A file is not a Keras legacy-HDF5 weights file of the expected network (names file, layer, shape)."""


def _attribute_list(group, name: str) -> list[str] | None:
    """A (possibly chunked) string-list attribute as a list of str; None when absent."""
    def text(item: Any) -> str:
        return item.decode("utf8") if isinstance(item, bytes) else str(item)

    if name in group.attrs:
        value = group.attrs[name]
        return [text(v) for v in np.atleast_1d(value)]
    chunks, k = [], 0
    while f"{name}{k}" in group.attrs:
        chunks += [text(v) for v in np.atleast_1d(group.attrs[f"{name}{k}"])]
        k += 1
    return chunks if k else None


def read_layer_weights(path: str | os.PathLike) -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """Every layer of a legacy Keras weights file, in file order: ``(layer name, [(weight name,
    array), ...])`` with the weights in the order of the layer's ``weight_names``.

    Raises :class:`KerasLayoutError` naming the file when it is not HDF5 or lacks the layout's
    attributes or datasets.
    """
    import h5py

    path = Path(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise KerasLayoutError(f"{path}: not an HDF5 file ({exc})") from None
    with handle as f:
        root = f
        if _attribute_list(f, "layer_names") is None and "model_weights" in f:
            root = f["model_weights"]  # a whole-model file (model.save): the weights live here
        layer_names = _attribute_list(root, "layer_names")
        if layer_names is None:
            raise KerasLayoutError(f"{path}: no 'layer_names' attribute: not a Keras weights file in the legacy "
                                   f"HDF5 layout (top-level keys: {', '.join(list(f.keys())[:8]) or 'none'})")
        layers = []
        for name in layer_names:
            if name not in root:
                raise KerasLayoutError(f"{path}: layer {name!r} is listed in 'layer_names' but has no group")
            group = root[name]
            weight_names = _attribute_list(group, "weight_names")
            if weight_names is None:
                raise KerasLayoutError(f"{path}: layer {name!r} has no 'weight_names' attribute")
            weights = []
            for weight_name in weight_names:
                if weight_name not in group:
                    raise KerasLayoutError(f"{path}: layer {name!r}: weight {weight_name!r} is listed but has no dataset")
                weights.append((weight_name, np.asarray(group[weight_name])))
            layers.append((name, weights))
    return layers


def vgg19_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The convolutions of a Keras VGG-19 weights file as a torchvision ``vgg19().features`` state
    dict: ``features.<i>.weight`` float32 [out, in, 3, 3] (OIHW) and ``features.<i>.bias`` [out].

    Accepts the full file (16 convolutions + fc1, fc2, predictions, which pool5 does not need)
    and the ``_notop`` file. Refuses, naming the file, the layer and the shape, a file whose
    layers with weights are not VGG-19's: 16 convolutions with an HWIO kernel [3, 3, in, out] and a
    bias [out], in VGG-19's widths, then at most three dense layers.
    """
    path = Path(path)
    weighted = [(name, weights) for name, weights in read_layer_weights(path) if weights]
    convs, rest = weighted[:len(VGG19_CONV_WIDTHS)], weighted[len(VGG19_CONV_WIDTHS):]
    if len(convs) < len(VGG19_CONV_WIDTHS):
        raise KerasLayoutError(f"{path}: {len(weighted)} layers with weights, VGG-19 has 16 convolutions "
                               f"(layers: {', '.join(n for n, _ in weighted) or 'none'})")
    state: dict[str, np.ndarray] = {}
    module_index = _conv_module_indices()
    in_channels = 3
    for (name, weights), out_channels, index in zip(convs, VGG19_CONV_WIDTHS, module_index):
        if len(weights) != 2:
            raise KerasLayoutError(f"{path}: layer {name!r} has {len(weights)} weights "
                                   f"({', '.join(w for w, _ in weights)}); a VGG-19 convolution has a kernel and a bias")
        (kernel_name, kernel), (bias_name, bias) = weights
        expected = (3, 3, in_channels, out_channels)
        if kernel.shape != expected:
            hint = (" (an OIHW / Theano-ordered kernel: use the 'tf_kernels' file)"
                    if kernel.shape == (out_channels, in_channels, 3, 3) else "")
            raise KerasLayoutError(f"{path}: layer {name!r}: kernel {kernel_name!r} has shape {kernel.shape}, "
                                   f"expected {expected} (HWIO, TensorFlow order){hint}")
        if bias.shape != (out_channels,):
            raise KerasLayoutError(f"{path}: layer {name!r}: bias {bias_name!r} has shape {bias.shape}, "
                                   f"expected ({out_channels},)")
        state[f"features.{index}.weight"] = np.ascontiguousarray(kernel.transpose(3, 2, 0, 1), dtype=np.float32)
        state[f"features.{index}.bias"] = np.ascontiguousarray(bias, dtype=np.float32)
        in_channels = out_channels
    if len(rest) > 3 or any(len(w) != 2 or w[0][1].ndim != 2 for _, w in rest):
        shapes = "; ".join(f"{n}: {[tuple(a.shape) for _, a in w]}" for n, w in rest)
        raise KerasLayoutError(f"{path}: after VGG-19's 16 convolutions expected at most the three dense layers "
                               f"(fc1, fc2, predictions), got {shapes}")
    return state


def _conv_module_indices() -> list[int]:
    """Indices of the Conv2d modules in torchvision's ``vgg19().features`` (:func:`extract.nets.vgg19_features`):
    per block its convolutions, each followed by a ReLU, then a max-pool."""
    indices, position = [], 0
    for convs in VGG19_BLOCKS:
        for _ in range(convs):
            indices.append(position)
            position += 2  # Conv2d, ReLU
        position += 1  # MaxPool2d
    return indices
