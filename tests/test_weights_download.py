"""Downloads of published weights go through ``torch.hub.download_url_to_file`` (extract/weights.py
``_download``), here from ``file://`` URLs (urllib, which torch.hub uses, opens them; no network):
the sha256 prefix of a hub file name and the full md5 of a Keras file are checked before the file
is moved into place, and a refused download leaves nothing under the real name nor a partial file."""
from __future__ import annotations

import dataclasses
import hashlib

import pytest
import torch

from extract import weights
from extract.weights import WeightsUnavailable, resolve_weights

PAYLOAD = b"not really weights, but bytes with a known digest\n" * 1000
SHA = hashlib.sha256(PAYLOAD).hexdigest()
MD5 = hashlib.md5(PAYLOAD).hexdigest()
KERAS = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "server" / "file.bin"
    path.parent.mkdir()
    path.write_bytes(PAYLOAD)
    return path.as_uri()


def test_the_download_is_torch_hubs(monkeypatch, tmp_path, source):
    calls = []
    real = torch.hub.download_url_to_file

    def spy(url, dst, hash_prefix=None, progress=True):
        calls.append((url, hash_prefix))
        return real(url, dst, hash_prefix=hash_prefix, progress=progress)

    monkeypatch.setattr(torch.hub, "download_url_to_file", spy)
    dest = tmp_path / "hub" / f"net-{SHA[:8]}.pth"
    weights._download(source, dest)
    assert calls == [(source, SHA[:8])]
    assert dest.read_bytes() == PAYLOAD
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]  # no temporary file left


def test_a_sha256_prefix_that_does_not_match_is_refused_and_nothing_is_left(tmp_path, source):
    dest = tmp_path / "hub" / "net-0123abcd.pth"
    with pytest.raises(RuntimeError, match=f'invalid hash value \\(expected "0123abcd", got "{SHA}"\\)'):
        weights._download(source, dest)
    assert list(dest.parent.iterdir()) == []


def test_the_published_sha256_prefix_of_the_table_is_used(tmp_path, source):
    """A file of the weights table is checked against its recorded prefix (resnet152: 394f9c45)."""
    dest = tmp_path / "hub" / "resnet152-394f9c45.pth"
    with pytest.raises(RuntimeError, match='expected "394f9c45"'):
        weights._download(source, dest)
    assert list(dest.parent.iterdir()) == []


def test_a_keras_file_is_checked_by_its_full_md5(monkeypatch, tmp_path, source):
    dest = tmp_path / "keras" / KERAS
    with pytest.raises(RuntimeError, match=f"md5 {MD5} is not the published 253f8cb515780f3b799900260a226db6 of {KERAS}"):
        weights._download(source, dest)
    assert list(dest.parent.iterdir()) == []
    # the same file when the table records its md5: accepted, in place
    table = tuple(dataclasses.replace(k, md5=MD5) if k.filename == KERAS else k for k in weights.KNOWN_FILES)
    monkeypatch.setattr(weights, "KNOWN_FILES", table)
    weights._download(source, dest)
    assert dest.read_bytes() == PAYLOAD and sorted(p.name for p in dest.parent.iterdir()) == [KERAS]


def test_resolve_downloads_into_the_hub_cache_or_names_the_file_and_the_fix(monkeypatch, tmp_path, source):
    """End to end through resolve_weights: a download that passes lands in the torch hub cache and
    is identified by its sha256; one that fails the table's checksum is WeightsUnavailable naming
    the file, the reason and where to put it."""
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(tmp_path / "weights"))
    monkeypatch.delenv(weights.OFFLINE_ENV, raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    canon = weights.CANONICAL["resnet152"]
    monkeypatch.setitem(weights.CANONICAL, "resnet152", dataclasses.replace(canon, url=source))
    with pytest.raises(WeightsUnavailable) as caught:
        resolve_weights("imagenet", "resnet152")
    message = str(caught.value)
    assert "resnet152 weights 'resnet152-394f9c45.pth' (chosen by extract.sol_visual_weights)" in message
    assert f'download failed: invalid hash value (expected "394f9c45", got "{SHA}")' in message
    assert f"save it as {tmp_path / 'weights' / 'resnet152-394f9c45.pth'}" in message  # $AVEL_WEIGHTS_DIR
    assert not (tmp_path / "hub" / "checkpoints" / "resnet152-394f9c45.pth").exists()

    ours = dataclasses.replace(canon, url=source, filename=f"resnet152-{SHA[:8]}.pth")
    monkeypatch.setitem(weights.CANONICAL, "resnet152", ours)
    got = resolve_weights("imagenet", "resnet152")
    assert got.path == tmp_path / "hub" / "checkpoints" / f"resnet152-{SHA[:8]}.pth"
    assert got.sha256 == SHA and got.path.read_bytes() == PAYLOAD
