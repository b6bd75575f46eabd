"""Preflight checks and the doctor report (extract.preflight): all OK here with random weights, a
broken decord, a broken resampler, missing pretrained weights (no network), cuda on a CPU machine,
the doctor report and the fresh-install comparison."""
from __future__ import annotations

import importlib.metadata
import json
import sys

import numpy as np
import pytest
import torch

import extract.audio
import extract.decode
import extract.weights
from extract import preflight
from extract.preflight import Check, PreflightError, check_environment, doctor_json, doctor_report, require_environment
from extract.core.settings import load_pipeline

SMALL = {"segments": 2, "frames_per_segment": 1, "image_size": 32, "batch_frames": 4,
         "visual_weights": "random", "audio_weights": "random", "device": "cpu"}
NAMES = ["packages", "decode", "resample", "device", "networks"]


def make_pipeline(**extract):
    return load_pipeline(None, {"extract": {**SMALL, **extract}}, search=False)


def by_name(checks: list[Check]) -> dict[str, Check]:
    assert all(isinstance(c, Check) for c in checks)
    return {c.name: c for c in checks}


@pytest.fixture(scope="module")
def ok_checks() -> list[Check]:
    return check_environment(make_pipeline().extract)


def test_module_import_is_cheap():
    code = "import sys, extract.preflight; print(sorted(m for m in ('torch', 'decord', 'av', 'numpy', 'zarr') if m in sys.modules))"
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_all_checks_pass_here_with_random_weights(ok_checks):
    assert [c.name for c in ok_checks] == NAMES
    failed = [c.line() for c in ok_checks if not c.ok]
    assert not failed, failed
    checks = by_name(ok_checks)
    assert f"torch {importlib.metadata.version('torch')}" in checks["packages"].detail
    assert f"decord2 (module decord) {importlib.metadata.version('decord2')}" in checks["packages"].detail
    # the generated clip went through decord and the 44.1 -> 16 kHz resampler
    assert "20 frames of 64x48" in checks["decode"].detail
    assert "44100 Hz -> 16000 Hz, 32000 samples, tone at 440.0 Hz" in checks["decode"].detail
    assert "rgb_f1_32_squash (2, 1, 32, 32, 3)" in checks["decode"].detail  # the vgg19 grid of the config
    assert "48000 -> 16000 Hz: 16000 samples, 440 Hz tone at 440.0 Hz" in checks["resample"].detail
    assert checks["device"].detail.startswith("cpu:")
    assert "vgg19 (random) ok" in checks["networks"].detail and "vggish (random) ok" in checks["networks"].detail
    assert all(c.fix == "" for c in ok_checks)
    assert require_environment(make_pipeline().extract, build_networks=False)[-1].name == "device"


def test_broken_decord_fails_the_decode_check_and_nothing_else(monkeypatch):
    def broken():
        raise OSError("libavformat.so.61: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(extract.decode, "load_decord", broken)
    checks = check_environment(make_pipeline().extract)
    found = by_name(checks)
    decode = found["decode"]
    assert not decode.ok
    assert "libavformat.so.61: cannot open shared object file" in decode.detail
    assert "OSError" in decode.detail and "decord2" in decode.detail
    assert "pip install" in decode.fix and "decord2<4,>=3.0" in decode.fix
    # the other checks still ran, and the networks were exercised on a synthetic window instead
    assert [c.name for c in checks if not c.ok] == ["decode"]
    assert "synthetic window" in found["networks"].detail

    with pytest.raises(PreflightError) as info:
        require_environment(make_pipeline().extract, build_networks=False)
    message = str(info.value)
    assert "1 of 4 preflight checks failed" in message
    assert "decode:" in message and "libavformat.so.61" in message and "fix: " in message
    assert [c.name for c in info.value.checks if not c.ok] == ["decode"]


def test_import_error_of_decord_is_named(monkeypatch):
    def missing():
        raise ImportError("No module named 'decord'")

    monkeypatch.setattr(extract.decode, "load_decord", missing)
    with pytest.raises(PreflightError) as info:
        require_environment(make_pipeline().extract, build_networks=False)
    assert "ImportError: No module named 'decord'" in str(info.value)
    assert "decord2" in str(info.value)


def test_resampler_without_antialiasing_is_caught(monkeypatch):
    def linear(x, sr_in, sr_out=16000):  # right length, tone and level, but no anti-aliasing filter
        x = np.asarray(x, np.float32)
        n = int(x.size * sr_out / sr_in)
        return np.interp(np.arange(n) * sr_in / sr_out, np.arange(x.size), x).astype(np.float32)

    monkeypatch.setattr(extract.audio, "resample", linear)
    checks = by_name(check_environment(make_pipeline().extract, build_networks=False))
    assert not checks["resample"].ok
    assert "10 kHz tone" in checks["resample"].detail and "aliased" in checks["resample"].detail
    assert checks["decode"].ok  # the decoded 440 Hz tone itself survives linear interpolation

    def wrong_rate(x, sr_in, sr_out=16000):  # treats every input as 48 kHz
        return linear(x, 48000, sr_out)

    monkeypatch.setattr(extract.audio, "resample", wrong_rate)
    checks = by_name(check_environment(make_pipeline().extract, build_networks=False))
    assert not checks["decode"].ok and "audio has shape" in checks["decode"].detail


def test_missing_pretrained_weights_name_the_file_and_the_key(monkeypatch, tmp_path):
    empty_dir, hub = tmp_path / "weights", tmp_path / "hub"
    empty_dir.mkdir()
    monkeypatch.setenv("AVEL_WEIGHTS_DIR", str(empty_dir))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setenv("AVEL_OFFLINE", "1")
    downloads = []
    monkeypatch.setattr(extract.weights, "_download", lambda url, dest, timeout=30.0: downloads.append(url))

    cfg = make_pipeline(visual_weights="imagenet", sol_visual_weights="imagenet",
                        extractors=["vgg19", "resnet152_maps", "vggish"]).extract
    checks = by_name(check_environment(cfg))
    assert downloads == []
    networks = checks["networks"]
    assert not networks.ok
    assert "vgg19-dcbb9e9d.pth" in networks.detail and str(empty_dir / "vgg19-dcbb9e9d.pth") in networks.detail
    assert "resnet152-394f9c45.pth" in networks.detail
    assert "vggish (random) ok" in networks.detail  # the extractor with weights still ran
    assert "extract.visual_weights" in networks.fix and "--weights random" in networks.fix
    assert "extract.sol_visual_weights" in networks.fix
    assert [c.name for c in checks.values() if not c.ok] == ["networks"]

    with pytest.raises(PreflightError) as info:
        require_environment(cfg, build_networks=True)
    assert "networks:" in str(info.value) and "vgg19-dcbb9e9d.pth" in str(info.value)

    # the doctor reports where it looked, and does not download either
    text = doctor_report(load_pipeline(None, {"extract": {**SMALL, "visual_weights": "imagenet"}}, search=False),
                         build_networks=False)
    assert f"extract.visual_weights=imagenet -> vgg19-dcbb9e9d.pth: NOT FOUND; looked in {empty_dir}" in text
    assert "extract.audio_weights=random -> random initialisation" in text
    assert downloads == []


def test_found_weights_file_is_reported(monkeypatch, tmp_path):
    (tmp_path / "vgg19-dcbb9e9d.pth").write_bytes(b"not really weights")
    monkeypatch.setenv("AVEL_WEIGHTS_DIR", str(tmp_path))
    data = doctor_json(make_pipeline(visual_weights="imagenet"), build_networks=False)
    (vgg,) = [w for w in data["weights"] if w["kind"] == "vgg19"]
    assert vgg["status"] == "found" and vgg["path"] == str(tmp_path / "vgg19-dcbb9e9d.pth")
    assert vgg["key"] == "extract.visual_weights"


def test_cuda_request(monkeypatch):
    checks = by_name(check_environment(make_pipeline().extract, "cuda", build_networks=False))
    device = checks["device"]
    if torch.cuda.is_available():
        assert device.ok and "GiB free" in device.detail and torch.cuda.get_device_name(0) in device.detail
    else:
        assert not device.ok
        assert "torch.cuda.is_available() is False" in device.detail
        assert "--device cpu" in device.fix
    auto = by_name(check_environment(make_pipeline(device="auto").extract, build_networks=False))["device"]
    assert auto.ok and auto.detail.startswith(("cuda (from 'auto')" if torch.cuda.is_available() else "cpu (from 'auto')"))
    # a device index that does not exist
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count:
        bad = by_name(check_environment(make_pipeline().extract, f"cuda:{count}", build_networks=False))["device"]
        assert not bad.ok and f"only {count} CUDA device(s)" in bad.detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unusable_device_still_checks_the_networks_on_cpu():
    checks = by_name(check_environment(make_pipeline().extract, "cuda"))
    assert not checks["device"].ok
    assert checks["networks"].ok and "built on cpu because the requested device is not usable" in checks["networks"].detail


def test_precision_is_reported_as_it_will_run():
    fp16 = by_name(check_environment(make_pipeline(precision="fp16").extract, "cpu", build_networks=False))["device"]
    assert fp16.ok and "extract.precision=fp16 is not used on cpu: vgg19 run fp32" in fp16.detail
    assert "vggish always fp32" in fp16.detail
    bf16 = by_name(check_environment(make_pipeline(precision="bf16").extract, "cpu", build_networks=False))["device"]
    assert bf16.ok and "vgg19 run bf16 autocast on cpu" in bf16.detail


def test_doctor_report_and_json():
    pipeline = make_pipeline()
    data = doctor_json(pipeline)
    json.dumps(data)  # JSON-able
    version = importlib.metadata.version("torch")
    assert data["packages"]["torch"] == version
    assert data["packages"]["decord2"] == importlib.metadata.version("decord2")
    assert [c["name"] for c in data["checks"]] == NAMES and data["ok"]
    text = preflight.render_doctor(data)
    assert f"  torch        {version}" in text
    for name in NAMES:
        assert f"[OK] {name}:" in text
    assert "result: all checks passed" in text
    assert sys.version.split()[0] in text
    if not torch.cuda.is_available():
        assert "cuda   none" in text
    assert "fresh install" in text

    report = doctor_report(pipeline, build_networks=False)
    assert f"torch        {version}" in report and "[OK] decode:" in report and "] networks:" not in report


class FakeDistribution:
    """What ``importlib.metadata.distribution`` returns, with the requirements a test gives."""

    def __init__(self, requires, version="9.9", direct_url=None):
        self.requires, self.version, self._direct_url = requires, version, direct_url

    def read_text(self, name):
        return self._direct_url if name == "direct_url.json" else None


def fake_avel(monkeypatch, requires, **kw):
    real = importlib.metadata.distribution
    monkeypatch.setattr(importlib.metadata, "distribution",
                        lambda name: FakeDistribution(requires, **kw) if name == "avel" else real(name))


def test_install_resolution_compares_pins(monkeypatch, tmp_path):
    """The installed avel's requirements (its metadata) and constraints.txt against the installed
    versions; the requirements of extras (``extra == "test"``) are not part of a plain install."""
    torch_version = importlib.metadata.version("torch")
    numpy_version = importlib.metadata.version("numpy")
    fake_avel(monkeypatch, [f"torch=={torch_version}", "torchvision==0.0.1", "numpy>=1.0", "not-a-real-package-avel==1.0",
                            'also-not-real-avel>=1; extra == "test"'],
              direct_url='{"url": "file:///src/avel", "dir_info": {"editable": true}}')
    (tmp_path / "constraints.txt").write_text(f"# pinned\nnumpy=={numpy_version}\n")
    monkeypatch.setattr(preflight, "_project_dir", lambda: tmp_path)
    result = preflight.install_resolution()
    assert result["requirements"] == "avel 9.9 metadata (editable install of file:///src/avel)"
    assert [r["name"] for r in result["rows"]] == ["torch", "torchvision", "numpy", "not-a-real-package-avel", "numpy"]
    assert result["same"] is False
    assert sorted(r["name"] for r in result["mismatches"]) == ["not-a-real-package-avel", "torchvision"]
    assert result["ranges"] == []  # numpy>=1.0 is pinned exactly by constraints.txt
    assert result["note"].startswith("NO:") and "torchvision" in result["note"] and "not installed" in result["note"]

    (tmp_path / "constraints.txt").unlink()
    fake_avel(monkeypatch, [f"torch=={torch_version}", "numpy>=1.0"])
    result = preflight.install_resolution()
    assert result["mismatches"] == [] and [r["name"] for r in result["ranges"]] == ["numpy"]
    assert result["note"].startswith("PARTLY:") and result["requirements"] == "avel 9.9 metadata"


def test_install_resolution_without_an_installed_avel_says_so(monkeypatch, tmp_path):
    real = importlib.metadata.distribution

    def not_installed(name):
        if name == "avel":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    monkeypatch.setattr(preflight, "_project_dir", lambda: tmp_path)
    result = preflight.install_resolution()
    assert result["same"] is None and result["requirements"] is None
    assert result["note"].startswith("avel is not installed (no package metadata") and "pip install -e ." in result["note"]
    assert "no constraints.txt" in result["note"]
    (tmp_path / "constraints.txt").write_text(f"torch=={importlib.metadata.version('torch')}\n")
    result = preflight.install_resolution()
    assert result["same"] is True and result["note"].startswith("YES:") and "only constraints.txt: avel is not installed" in result["note"]
    assert preflight._requirement_text("av") == "av"  # the fix then names the package alone


def test_install_resolution_of_this_install():
    """The venv's avel: its metadata's requirements, each compared with the installed version."""
    result = preflight.install_resolution()
    if result["requirements"] is None:
        pytest.skip("avel is not installed")
    requires = [r for r in importlib.metadata.requires("avel") if "extra ==" not in r]
    assert [r["requirement"] for r in result["rows"][:len(requires)]] == requires
    names = {r["name"] for r in result["rows"][:len(requires)]}
    assert {"torch", "decord2", "av"} <= names and "pytest" not in names  # the test extra is left out
    torch_row = next(r for r in result["rows"] if r["name"] == "torch")
    assert torch_row["installed"] == importlib.metadata.version("torch")


def test_broken_package_is_named_with_version_and_fix(monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # "import av" now raises ImportError
    checks = by_name(check_environment(make_pipeline().extract, build_networks=False))
    packages = checks["packages"]
    assert not packages.ok
    assert f"import av failed (av {importlib.metadata.version('av')})" in packages.detail
    assert "ModuleNotFoundError: import of av halted" in packages.detail
    # the requirement as the installed avel's metadata records it (setup.cfg's av>=12.0,<19)
    wanted = next(r for r in importlib.metadata.requires("avel") if r.startswith("av<") or r.startswith("av>"))
    assert wanted == "av<19,>=12.0"
    assert f"pip install --force-reinstall '{wanted}'" in packages.fix and "pip install -e ." in packages.fix
    # the clip writer needs PyAV too: the decode check says so instead of blaming decord
    assert not checks["decode"].ok and "writing the test clip with PyAV (av " in checks["decode"].detail
    assert checks["resample"].ok and checks["device"].ok


def test_unknown_extractor_fails_only_the_networks_check():
    checks = by_name(check_environment(make_pipeline(extractors=["vggish", "no_such_net"]).extract))
    assert [c.name for c in checks.values() if not c.ok] == ["networks"]
    assert "unknown extractor 'no_such_net'" in checks["networks"].detail
    assert "vggish (random) ok" in checks["networks"].detail
    assert "extract.extractors" in checks["networks"].fix
