"""Networks (extract/nets.py) and the weights rule (extract/weights.py).

VGGish is checked against the torchvggish port's state-dict layout (harritaylor/torchvggish
``vggish.py``: ``make_layers`` [64, M, 128, M, 256, 256, M, 512, 512, M] and ``embeddings``
12288 -> 4096 -> 4096 -> 128) with a float64 forward written here from torch.nn.functional ops.
"""
from __future__ import annotations

import dataclasses
import hashlib
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from extract import nets, weights
from extract.weights import WeightsUnavailable, file_sha256, resolve_weights

torch.set_num_threads(2)

#: torchvggish state dict: name -> shape (conv indices skip ReLU and MaxPool modules)
TORCHVGGISH_KEYS = {
    "features.0.weight": (64, 1, 3, 3), "features.0.bias": (64,),
    "features.3.weight": (128, 64, 3, 3), "features.3.bias": (128,),
    "features.6.weight": (256, 128, 3, 3), "features.6.bias": (256,),
    "features.8.weight": (256, 256, 3, 3), "features.8.bias": (256,),
    "features.11.weight": (512, 256, 3, 3), "features.11.bias": (512,),
    "features.13.weight": (512, 512, 3, 3), "features.13.bias": (512,),
    "embeddings.0.weight": (4096, 12288), "embeddings.0.bias": (4096,),
    "embeddings.2.weight": (4096, 4096), "embeddings.2.bias": (4096,),
    "embeddings.4.weight": (128, 4096), "embeddings.4.bias": (128,),
}
#: pools after these conv indices
VGGISH_POOL_AFTER = {"features.0", "features.3", "features.8", "features.13"}


def random_vggish_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in TORCHVGGISH_KEYS.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = (2.0 / fan_in) ** 0.5 if len(shape) > 1 else 0.05
        state[name] = torch.randn(shape, generator=g) * scale
    return state


def reference_vggish(state: dict[str, torch.Tensor], x: torch.Tensor, relu: bool) -> torch.Tensor:
    """float64 forward: conv3x3(pad 1)+ReLU (+ 2x2 max-pool), NHWC flatten, 3 FC (last ReLU optional)."""
    h = x.double()
    for prefix in ("features.0", "features.3", "features.6", "features.8", "features.11", "features.13"):
        h = F.relu(F.conv2d(h, state[prefix + ".weight"].double(), state[prefix + ".bias"].double(), padding=1))
        if prefix in VGGISH_POOL_AFTER:
            h = F.max_pool2d(h, 2, 2)
    h = h.transpose(1, 3).transpose(1, 2).reshape(h.shape[0], -1)  # torchvggish's TF-compatible order
    for i, prefix in enumerate(("embeddings.0", "embeddings.2", "embeddings.4")):
        h = F.linear(h, state[prefix + ".weight"].double(), state[prefix + ".bias"].double())
        if i < 2 or relu:
            h = F.relu(h)
    return h


@pytest.fixture(scope="module")
def vggish_state():
    return random_vggish_state()


def test_vggish_parameter_count_and_names_match_reference_layout():
    expected = sum(int(np.prod(s)) for s in TORCHVGGISH_KEYS.values())
    assert expected == 72_141_184
    model = nets.VGGish()
    assert nets.count_parameters(model) == expected
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == TORCHVGGISH_KEYS


def test_vggish_forward_matches_float64_reference(vggish_state):
    x = torch.randn(3, 1, 96, 64, generator=torch.Generator().manual_seed(1))
    model = nets.VGGish(relu=False).eval()
    model.load_state_dict(vggish_state, strict=True)
    with torch.inference_mode():
        raw = model(x)
        model.relu = True
        rectified = model(x)
    ref_raw = reference_vggish(vggish_state, x, relu=False)
    assert raw.shape == (3, 128)
    tol = 1e-4 * ref_raw.abs().max().item()
    torch.testing.assert_close(raw.double(), ref_raw, rtol=1e-4, atol=tol)
    torch.testing.assert_close(rectified.double(), ref_raw.clamp(min=0), rtol=1e-4, atol=tol)
    assert (ref_raw < 0).any() and (ref_raw > 0).any()  # the final ReLU matters for this input


def test_vggish_rejects_wrong_state_dict_and_input(tmp_path):
    torch.save({"features.0.weight": torch.zeros(64, 1, 3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth: not a torchvggish VGGish state dict"):
        nets.build_vggish(str(tmp_path / "bad.pth"))
    with pytest.raises(ValueError, match=r"\[N, 1, 96, 64\]"):
        nets.VGGish()(torch.zeros(1, 1, 64, 96))


def test_vggish_pca_matches_numpy_reference(tmp_path):
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((128, 128))
    means = rng.standard_normal(128)
    path = tmp_path / "pca_params.pth"
    torch.save({"pca_eigen_vectors": vectors, "pca_means": means}, path)  # numpy arrays, as torchvggish's file
    pca = nets.build_vggish_pca(str(path))
    emb = rng.standard_normal((5, 128)).astype(np.float32) * 0.3
    ours = pca(torch.from_numpy(emb)).numpy()
    projected = (vectors.astype(np.float32) @ (emb.T - means.astype(np.float32)[:, None])).T
    expected = np.round((np.clip(projected, -2.0, 2.0) + 2.0) * 255.0 / 4.0)
    np.testing.assert_array_equal(ours, expected)
    assert ours.min() == 0 and ours.max() == 255  # clipping happened on both sides


def test_vgg19_pool5_matches_torchvision_features(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    with torch.random.fork_rng():
        torch.manual_seed(5)
        tv = make_layers(cfgs["E"]).eval()
    # a torchvision-style full state dict: features.* plus a classifier that pool5 does not need
    state = {f"features.{k}": v for k, v in tv.state_dict().items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "vgg19.pth")
    ours = nets.build_vgg19_pool5(str(tmp_path / "vgg19.pth"))
    assert nets.count_parameters(ours) == 20_024_384
    assert not any(p.requires_grad for p in ours.parameters())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = ours(x)
        torch.testing.assert_close(out, tv(x), rtol=0, atol=0)
    assert out.shape == (2, 512, 1, 1)


@pytest.mark.slow
def test_vgg19_pool5_is_7x7_for_224():
    model = nets.build_vgg19_pool5("random", seed=0)
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 512, 7, 7)


def test_random_weights_are_seeded_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a = nets.build_vgg19_pool5("random", seed=1).state_dict()
    assert torch.equal(state, torch.random.get_rng_state())
    b = nets.build_vgg19_pool5("random", seed=1).state_dict()
    c = nets.build_vgg19_pool5("random", seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.weight"], c["0.weight"])
    # torchvision's VGG init: Kaiming normal (fan_out, relu) weights, zero biases
    w = a["34.weight"]
    assert torch.all(a["34.bias"] == 0)
    assert abs(w.std().item() - (2.0 / (512 * 9)) ** 0.5) < 0.02 * (2.0 / (512 * 9)) ** 0.5



def test_random_vggish_keeps_the_activation_scale():
    """He init in every layer (the PyTorch default shrank random embeddings to a near-constant):
    weight std = sqrt(2 / fan) per layer, zero biases, and the embedding of varied inputs varies."""
    state = torch.random.get_rng_state()
    model = nets.build_vggish("random", seed=3)
    assert torch.equal(state, torch.random.get_rng_state())
    for name, p in model.state_dict().items():
        if name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.ndim == 4:  # conv: fan_out = out_channels * 3 * 3
            expected = (2.0 / (p.shape[0] * 9)) ** 0.5
            assert abs(p.std().item() - expected) < 0.05 * expected, name
        else:  # linear: fan_in = in_features
            expected = (2.0 / p.shape[1]) ** 0.5
            assert abs(p.std().item() - expected) < 0.05 * expected, name
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 96, 64, generator=g) * 1.3 - 1.6  # log-mel patch statistics
    with torch.inference_mode():
        spread = model(x).std(dim=0).mean().item()
    assert spread > 5e-3, spread


def _demo_frame_batch(size: int) -> torch.Tensor:
    """Normalised [2, 3, size, size] batch of real-ish images: two frames of a demo clip (textured
    background; one with the class object drawn), squashed to ``size`` as the extractor does."""
    from extract.factories import demo
    from extract.core.frames import prepare_frames

    video = next(v for v in demo.plan_demo(15, 0, 0) if v.category)
    frames = demo.render_frames(video, 0)
    k = [video.onset * demo.FPS + 3, 0 if video.onset else demo.SECONDS * demo.FPS - 1]
    return nets.normalize_frames(prepare_frames(frames[k], image_size=size, resize="squash"))


def test_random_resnet152_maps_stay_finite_and_moderate():
    """torchvision's plain init (eval-mode BN = identity) doubles the activation variance at each of
    ResNet-152's 50 residual blocks: its conv5 maps of a demo frame exceed the float16 range. The
    "random" ResNet-152 of resnet152_maps damps every branch (gamma of the last BN = 1/sqrt(50))
    and stays finite and moderate, without collapsing to zero. (That the damping is the only change
    to torchvision's seeded init is checked in test_sol_extractors.py.)"""
    import copy

    from extract.sol_extractors import build_resnet152_trunk

    x = _demo_frame_batch(128)  # 4 x 4 maps: the growth is per block, not per pixel
    state = torch.random.get_rng_state()
    ours = build_resnet152_trunk("random", seed=0)
    assert torch.equal(state, torch.random.get_rng_state())
    plain = copy.deepcopy(ours)  # the old init: torchvision's, undamped (gamma 1 everywhere)
    gamma = 1.0 / 50 ** 0.5
    with torch.no_grad():
        for name, module in plain.named_modules():
            if name.endswith("bn3"):
                assert torch.allclose(module.weight, torch.full_like(module.weight, gamma)), name
                module.weight.fill_(1.0)
    with torch.inference_mode():
        y_ours, y_plain = ours(x).float(), plain(x).float()
    assert y_ours.shape == (2, 2048, 4, 4)
    assert torch.isfinite(y_ours).all()
    peak = y_ours.abs().max().item()
    assert 1e-2 < peak < 1e3, peak
    assert y_ours.std().item() > 1e-3
    assert (y_ours[0] != y_ours[1]).any()  # the object frame differs from the background frame
    # the old init on the same image: far beyond float16 (the demo's 13 million inf)
    assert y_plain.abs().max().item() > float(np.finfo(np.float16).max)


def test_damp_residual_branches_counts_blocks():
    import torchvision

    net = torchvision.models.resnet18(weights=None)  # BasicBlocks: the last BN is bn2
    assert nets.damp_residual_branches(net) == pytest.approx(1 / 8 ** 0.5)
    assert torch.allclose(net.layer3[1].bn2.weight, torch.full((256,), 1 / 8 ** 0.5))
    assert torch.all(net.layer3[1].bn1.weight == 1) and torch.all(net.layer3[0].downsample[1].weight == 1)
    with pytest.raises(ValueError, match="no torchvision residual blocks"):
        nets.damp_residual_branches(nets.vgg19_features())


# ---- preprocessing --------------------------------------------------------------------------


def test_prepare_frames_squash_and_crop():
    frame = np.zeros((1, 240, 320, 3), np.uint8)
    frame[:, :, :160] = (200, 10, 10)  # left half red
    frame[:, :, 160:] = (10, 10, 200)  # right half blue
    squashed = nets.prepare_frames(frame, 224, "squash")
    assert squashed.shape == (1, 224, 224, 3) and squashed.dtype == np.uint8
    np.testing.assert_array_equal(squashed[0, :, :111], np.broadcast_to([200, 10, 10], (224, 111, 3)))
    np.testing.assert_array_equal(squashed[0, :, 113:], np.broadcast_to([10, 10, 200], (224, 111, 3)))

    bars = np.full((2, 240, 320, 3), 50, np.uint8)
    bars[:, :, 36:284] = 180  # a centre band a little wider than the 240x240 crop
    cropped = nets.prepare_frames(bars, 224, "crop")
    assert cropped.shape == (2, 224, 224, 3)
    assert np.all(cropped == 180)  # the side bars are cut away


def test_prepare_frames_area_interpolation_averages_blocks():
    rng = np.random.default_rng(4)
    frames = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    out = nets.prepare_frames(frames, 32, "squash")
    block_mean = frames.reshape(2, 32, 2, 32, 2, 3).astype(np.float64).mean(axis=(2, 4))
    assert np.abs(out.astype(np.float64) - block_mean).max() <= 0.5 + 1e-9
    with pytest.raises(ValueError, match="uint8"):
        nets.prepare_frames(frames.astype(np.float32), 32)


def test_normalize_frames_imagenet():
    rng = np.random.default_rng(6)
    frames = rng.integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    out = nets.normalize_frames(frames)
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last)
    mean = np.array([0.485, 0.456, 0.406])
    std = np.array([0.229, 0.224, 0.225])
    expected = ((frames / 255.0 - mean) / std).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-5)


# ---- weights rule ---------------------------------------------------------------------------


@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    """Empty AVEL_WEIGHTS_DIR and torch hub cache; downloads fail as without network."""
    calls = []

    def refuse(url, dest, timeout=30.0):
        calls.append((url, dest))
        raise OSError("network is unreachable")

    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(weights, "_download", refuse)
    return tmp_path, calls


def test_random_weights_identity():
    source = resolve_weights("random", "vgg19", seed=7)
    assert source.is_random
    assert source.identity() == {"name": "random", "sha256": "random", "seed": 7}


def test_explicit_path_identity_is_the_file_digest(tmp_path):
    path = tmp_path / "my_vggish.pth"
    torch.save({"w": torch.arange(5.0)}, path)
    source = resolve_weights(str(path), "vggish")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert source.identity() == {"name": "my_vggish.pth", "sha256": digest, "seed": None}
    assert torch.equal(source.load()["w"], torch.arange(5.0))


def test_missing_weights_raise_a_clear_error(no_weights_anywhere):
    tmp_path, calls = no_weights_anywhere
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights("imagenet", "vgg19")
    message = str(info.value)
    assert "vgg19-dcbb9e9d.pth" in message
    assert "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth" in message
    assert str(tmp_path / "weights" / "vgg19-dcbb9e9d.pth") in message
    assert "network is unreachable" in message
    assert len(calls) == 1
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        resolve_weights(str(tmp_path / "nope.pth"), "vgg19")
    with pytest.raises(ValueError, match="unknown spec 'imagenet'"):
        resolve_weights("imagenet", "vggish")


@pytest.mark.parametrize("kind, spec, key", [
    ("vgg19", "imagenet", "extract.visual_weights"),
    ("resnet152", "imagenet", "extract.sol_visual_weights"),
    ("vggish", "vggish", "extract.audio_weights"),
    ("vggish_pca", "pretrained", "extract.audio_weights"),
])
def test_missing_weights_name_the_file_the_config_key_and_where_avel_looked(no_weights_anywhere, monkeypatch, kind,
                                                                           spec, key):
    tmp_path, _ = no_weights_anywhere
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    canon = weights.CANONICAL[kind]
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights(spec, kind)
    message = str(info.value)
    assert message.startswith(f"{kind} weights ")  # the preflight reads the kind from here
    assert canon.filename in message and canon.url in message
    assert f"{key}=random" in message and f"set {key} to the path" in message
    for other in set(weights.CONFIG_KEYS.values()) - {key}:
        assert other not in message
    looked = [tmp_path / "weights" / canon.filename, tmp_path / "hub" / "checkpoints" / canon.filename]
    assert all(str(path) in message for path in looked), message
    # a configured path that does not exist: the key and the path looked at
    missing = tmp_path / "elsewhere" / "mine.pth"
    with pytest.raises(WeightsUnavailable) as info:
        resolve_weights(str(missing), kind)
    assert key in str(info.value) and str(missing) in str(info.value) and "does not exist" in str(info.value)


def test_config_keys_agree_with_the_preflight_and_the_extractors():
    from extract import preflight
    from extract.config import ExtractConfig
    from extract.sol_extractors import ResNet152MapsExtractor

    assert weights.CONFIG_KEYS == preflight.WEIGHTS_KEYS
    assert set(weights.CONFIG_KEYS) == set(weights.CANONICAL)
    cfg = dataclasses.replace(ExtractConfig(), visual_weights="a.pth", sol_visual_weights="b.pth", audio_weights="c.pth")
    for kind, key in weights.CONFIG_KEYS.items():
        assert hasattr(cfg, key.split(".", 1)[1]), key
    # the key named for resnet152 is the one the resnet152_maps extractor reads
    assert ResNet152MapsExtractor.weights_kind == "resnet152"
    assert ResNet152MapsExtractor.weights_spec(cfg) == getattr(cfg, weights.CONFIG_KEYS["resnet152"].split(".", 1)[1])


def test_offline_mode_never_downloads(no_weights_anywhere, monkeypatch):
    _, calls = no_weights_anywhere
    monkeypatch.setenv(weights.OFFLINE_ENV, "1")
    with pytest.raises(WeightsUnavailable, match="AVEL_OFFLINE"):
        resolve_weights("vggish", "vggish")
    assert calls == []


def test_lookup_order_weights_dir_then_hub_cache_then_download(no_weights_anywhere, monkeypatch):
    tmp_path, _ = no_weights_anywhere
    hub_file = tmp_path / "hub" / "checkpoints" / "vggish_pca_params-970ea276.pth"  # torch hub's name
    hub_file.parent.mkdir(parents=True)
    hub_file.write_bytes(b"hub copy")
    assert resolve_weights("vggish", "vggish_pca").path == hub_file
    local = tmp_path / "weights" / "pca_params-970ea276.pth"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"local copy")
    source = resolve_weights("pretrained", "vggish_pca")
    assert source.path == local and source.sha256 == hashlib.sha256(b"local copy").hexdigest()

    def fake_download(url, dest, timeout=30.0):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(b"downloaded")

    monkeypatch.setattr(weights, "_download", fake_download)
    source = resolve_weights("imagenet", "resnet152")
    assert source.path == tmp_path / "hub" / "checkpoints" / "resnet152-394f9c45.pth"
    assert source.sha256 == hashlib.sha256(b"downloaded").hexdigest()


def test_digest_cache_follows_file_changes(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"one")
    assert file_sha256(path) == hashlib.sha256(b"one").hexdigest()
    path.write_bytes(b"three")  # other size -> other cache key
    assert file_sha256(path) == hashlib.sha256(b"three").hexdigest()


def test_non_state_dict_file_is_refused(tmp_path):
    path = tmp_path / "model.pth"
    with open(path, "wb") as fh:
        pickle.dump(object, fh, protocol=2)
    with pytest.raises(ValueError, match="weights_only"):
        resolve_weights(str(path), "vgg19").load()
