"""pipeline.yaml resolution: defaults <- file <- overrides, strict keys and types."""
from __future__ import annotations

import dataclasses

import pytest

from extract.config import ExtractConfig
from extract.core.settings import (
    ConfigError,
    SplitConfig,
    canonical_json,
    fingerprint,
    load_pipeline,
    merge,
    parse_set_option,
    register_section,
)
from tests.conftest import REPO
from train.config import TrainConfig


def write(tmp_path, text):
    path = tmp_path / "pipeline.yaml"
    path.write_text(text)
    return path


def test_defaults_come_from_dataclasses_when_no_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AVEL_PIPELINE", raising=False)
    p = load_pipeline()
    assert p.source is None
    assert p.extract == ExtractConfig()
    assert p.train == TrainConfig()
    assert p.heads == {}


def test_file_overrides_only_what_it_names(tmp_path):
    path = write(tmp_path, "extract:\n  frames_per_segment: 4\ntrain:\n  lr: 0.01\n  seeds: [1, 2]\n")
    p = load_pipeline(path)
    assert p.extract.frames_per_segment == 4
    assert p.extract.image_size == ExtractConfig().image_size
    assert p.train.lr == 0.01 and isinstance(p.train.lr, float)
    assert p.train.seeds == [1, 2]
    assert p.base_dir == tmp_path.resolve()


def test_int_is_accepted_for_float_but_not_the_reverse(tmp_path):
    p = load_pipeline(write(tmp_path, "train: {lr: 1}\n"))
    assert p.train.lr == 1.0 and isinstance(p.train.lr, float)
    with pytest.raises(ConfigError, match=r"extract\.segments: expected int, got 2\.5"):
        load_pipeline(write(tmp_path, "extract: {segments: 2.5}\n"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("trian: {lr: 1}\n", r"trian: unknown section"),
        ("train: {lrr: 1}\n", r"train\.lrr: unknown key"),
        ("train: {lr: fast}\n", r"train\.lr: expected float or null, got 'fast'"),
        ("train: {setting: semi}\n", r"train\.setting: expected one of \['supervised', 'weak'\]"),
        ("data: {splits: {train: {manifest: a.csv, root: x}}}\n", r"data\.splits\.train\.root: unknown key"),
        ("extract: {vggish_relu: 'yes'}\n", r"extract\.vggish_relu: expected bool"),
        ("heads: {dmrn: 3}\n", r"heads\.dmrn: expected a mapping"),
        ("- a\n- b\n", r"top level must be a mapping"),
    ],
)
def test_errors_name_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_pipeline(write(tmp_path, text))


def test_overrides_beat_the_file_and_set_option_parses_yaml_scalars(tmp_path):
    path = write(tmp_path, "train: {lr: 0.01, epochs: 5}\n")
    sets = parse_set_option(["train.lr=1e-4", "extract.extractors=[vgg19]", "store.path=/x/y.zarr"])
    assert sets == {"train": {"lr": "1e-4"}, "extract": {"extractors": ["vgg19"]}, "store": {"path": "/x/y.zarr"}}
    p = load_pipeline(path, sets)
    assert p.train.lr == 1e-4 and isinstance(p.train.lr, float) and p.train.epochs == 5
    assert p.extract.extractors == ["vgg19"]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_option(["train.lr"])


def test_splits_and_paths_resolve_against_the_file(tmp_path):
    path = write(tmp_path, "data:\n  splits:\n    test: {manifest: m/test.csv, video_root: v}\n")
    p = load_pipeline(path)
    assert p.split("test") == SplitConfig("m/test.csv", "v")
    assert p.path(p.split("test").manifest) == tmp_path.resolve() / "m" / "test.csv"
    assert p.path("/abs/x") == type(p.base_dir)("/abs/x")
    with pytest.raises(ConfigError, match=r"data\.splits\.val: unknown split \(configured: test\)"):
        p.split("val")


def test_dump_round_trips(tmp_path):
    p = load_pipeline(write(tmp_path, "train: {lr: 0.5}\nheads: {dmrn: {hidden: 7}}\n"))
    again = load_pipeline(write(tmp_path, p.dump()))
    assert again.to_dict() == p.to_dict()


def test_repository_pipeline_yaml_is_valid():
    p = load_pipeline(REPO / "pipeline.yaml")
    assert set(p.data.splits) == {"train", "val", "test"}
    assert p.extract.frames_per_segment == 16 and p.extract.segments == 10


def test_fingerprint_is_order_independent_and_value_sensitive():
    a = {"b": 1, "a": [1, 2], "c": {"y": 1.5, "x": None}}
    b = {"c": {"x": None, "y": 1.5}, "a": [1, 2], "b": 1}
    assert canonical_json(a) == '{"a":[1,2],"b":1,"c":{"x":null,"y":1.5}}'
    assert fingerprint(a) == fingerprint(b)
    assert fingerprint(a) != fingerprint({**a, "b": 2})
    import hashlib

    assert fingerprint(a, 64) == hashlib.sha256(canonical_json(a).encode()).hexdigest()


@dataclasses.dataclass
class Inner:
    x: int = 1


@dataclasses.dataclass
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    names: list[str] = dataclasses.field(default_factory=list)


def test_merge_is_strict_and_copies():
    base = Outer()
    new = merge(base, {"inner": {"x": 3}, "names": ["a"]}, "sec")
    assert new.inner.x == 3 and base.inner.x == 1 and new.names == ["a"]
    with pytest.raises(ConfigError, match=r"sec\.names\[1\]: expected str"):
        merge(base, {"names": ["a", 2]}, "sec")


def test_a_section_name_cannot_be_registered_twice():
    with pytest.raises(ValueError, match="already registered"):
        register_section("train", dict)
