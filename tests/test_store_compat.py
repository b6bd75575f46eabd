"""Stores and checkpoints made by earlier avel versions keep working.

- The fingerprints of feature sets whose weights are random (the demo, the tests, benchmarks) are
  pinned: the values below were computed with avel at commit b8fe0b3 (before recipes, logical
  weights identities and ``precision: auto`` existed). A change that alters them silently orphans
  every such store and cache entry, so it must be deliberate (and then come with an upgrade path).
- Stores recorded before logical weights identities existed name a published file by its file
  name and sha256 (``{"name": "vgg19-dcbb9e9d.pth", "sha256": "dcbb9e9d...", "seed": None}``);
  avel now records the same weights as ``vgg19-torchvision-imagenet1k-v1``. Such a store is the
  same feature set: a run accepts it and records the new identity (``upgraded_from`` keeps the old
  fingerprint); avel-predict accepts the checkpoints of heads trained on it. Another file is still
  refused.
"""
from __future__ import annotations

import copy

import pytest

from extract.extractors import extractor_identity
from extract.prepare import check_identity, open_run_store
from extract.provenance import same_feature_set, store_attrs, upgraded_fields
from extract.core.settings import fingerprint, load_pipeline
from extract.core.store import StoreError, core_specs, create_store, open_store
from extract.weights import KNOWN_FILES, known_identity, upgrade_identity

#: fingerprints computed by avel at b8fe0b3 for these `extract` sections (random weights)
PINNED = {
    "demo": ({"visual_weights": "random", "audio_weights": "random", "frames_per_segment": 1}, "f220f324125358a8"),
    "random16": ({"visual_weights": "random", "audio_weights": "random"}, "c7b3cd8b6940c476"),
    "bf16": ({"visual_weights": "random", "audio_weights": "random", "precision": "bf16"}, "90cba37d7cb801d9"),
    "sol": ({"visual_weights": "random", "audio_weights": "random", "sol_visual_weights": "random",
             "extractors": ["resnet152_maps", "vggish_maps"]}, "138b7bc14cfddcf7"),
}


def _cfg(section):
    return load_pipeline(None, {"extract": dict(section, device="cpu")}, search=False).extract


@pytest.mark.parametrize("name", sorted(PINNED))
def test_fingerprints_of_random_weight_feature_sets_are_those_of_earlier_versions(name):
    section, expected = PINNED[name]
    cfg = _cfg(section)
    from extract.provenance import effective_config

    cfg = effective_config(cfg, "cpu")
    assert store_attrs(cfg, extractor_identity(cfg))["fingerprint"] == expected


def _legacy(identity_fields, kind, sha):
    """fingerprint_fields with the weights of ``kind`` recorded the way avel 0.1 did."""
    old = copy.deepcopy(identity_fields)
    for ident in old["extractors"].values():
        if kind in ident.get("weights", {}):
            ident["weights"][kind] = {"name": "vgg19-dcbb9e9d.pth", "sha256": sha, "seed": None}
    return old


def _logical_fields():
    """fingerprint_fields of the default recipe as if the torchvision VGG-19 file were resolved."""
    cfg = _cfg({"visual_weights": "random", "audio_weights": "random", "frames_per_segment": 2})
    fields = store_attrs(cfg, extractor_identity(cfg))["fingerprint_fields"]
    fields["extractors"]["vgg19"]["weights"]["vgg19"] = known_identity("vgg19-torchvision-imagenet1k-v1")
    return fields


def test_a_legacy_identity_of_a_published_file_upgrades_to_its_logical_identity():
    prefix = next(k.sha256_prefix for k in KNOWN_FILES if k.filename == "vgg19-dcbb9e9d.pth")
    legacy = {"name": "vgg19-dcbb9e9d.pth", "sha256": prefix + "0" * 56, "seed": None}
    assert upgrade_identity(legacy) == known_identity("vgg19-torchvision-imagenet1k-v1")
    # another file under the same name, a random init and a short digest stay what they are
    other = {"name": "vgg19-dcbb9e9d.pth", "sha256": "f" * 64, "seed": None}
    assert upgrade_identity(other) == other
    assert upgrade_identity({"name": "random", "sha256": "random", "seed": 0})["sha256"] == "random"
    assert upgrade_identity({"name": "x", "sha256": prefix, "seed": None})["sha256"] == prefix


def test_a_store_recorded_with_the_legacy_identity_is_accepted_and_upgraded(tmp_path):
    new_fields = _logical_fields()
    prefix = next(k.sha256_prefix for k in KNOWN_FILES if k.filename == "vgg19-dcbb9e9d.pth")
    old_fields = _legacy(new_fields, "vgg19", prefix + "1" * 56)
    assert fingerprint(old_fields) != fingerprint(new_fields)
    assert fingerprint(upgraded_fields(old_fields)) == fingerprint(new_fields)
    T = 10
    specs = [s for s in core_specs(T) if s.name == "valid"]
    new_attrs = {"fingerprint": fingerprint(new_fields), "fingerprint_fields": new_fields,
                 "extractors": new_fields["extractors"], "weights": {}}
    old_attrs = {"fingerprint": fingerprint(old_fields), "fingerprint_fields": old_fields,
                 "extractors": old_fields["extractors"], "weights": {}}
    path = tmp_path / "old.zarr"
    create_store(path, ["a"], T, specs, old_attrs)
    check_identity(open_store(path), new_attrs, T)  # accepted, read-only: nothing changes
    assert open_store(path).fingerprint == old_attrs["fingerprint"]

    class StoreCfg:
        rows_per_shard, compression_level = 16, 3

    with open_run_store(path, ["a", "b"], T, specs, new_attrs, StoreCfg()) as store:
        assert len(store) == 2
    upgraded = open_store(path)
    assert upgraded.fingerprint == new_attrs["fingerprint"]
    assert upgraded.attrs["upgraded_from"] == old_attrs["fingerprint"]

    # the same name with another file's digest is another feature set: refused, naming the field
    other = tmp_path / "other.zarr"
    wrong = _legacy(new_fields, "vgg19", "e" * 64)
    create_store(other, ["a"], T, specs, {"fingerprint": fingerprint(wrong), "fingerprint_fields": wrong})
    with pytest.raises(StoreError, match="vgg19.weights.vgg19"):
        check_identity(open_store(other), new_attrs, T)


def test_predict_accepts_the_checkpoint_of_a_head_trained_on_a_legacy_store():
    new_fields = _logical_fields()
    prefix = next(k.sha256_prefix for k in KNOWN_FILES if k.filename == "vgg19-dcbb9e9d.pth")
    old_fields = _legacy(new_fields, "vgg19", prefix + "2" * 56)
    assert same_feature_set(fingerprint(old_fields), old_fields, fingerprint(new_fields))
    assert not same_feature_set(fingerprint(old_fields), None, fingerprint(new_fields))
    assert not same_feature_set(fingerprint(new_fields), new_fields, fingerprint(old_fields))
