"""How a store records what made it: the fingerprint (everything that changes the numbers), the
store attributes (extractor identities, weights, package versions), and the per-row records
``source`` (the file a row was made from) and ``ran`` (what computed it).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
from pathlib import Path
from typing import Any

from .core.settings import fingerprint, to_dict
from .core.store import SCHEMA_VERSION, differing_fields  # noqa: F401  (re-exported, see __all__)

__all__ = ["VERSIONED", "package_versions", "store_fingerprint_fields", "effective_config", "file_identity",
           "ran_label", "differing_fields", "store_attrs", "upgraded_fields", "same_feature_set"]

#: packages whose versions are recorded in the store (distribution name -> label); decord decodes
#: the frames, PyAV ("av") the audio
VERSIONED = {"torch": "torch", "torchvision": "torchvision", "decord2": "decord", "av": "av", "zarr": "zarr",
             "numpy": "numpy", "librosa": "librosa", "avel": "avel"}


def package_versions() -> dict[str, str]:
    """Versions of python and the packages that make the numbers (``"absent"`` if not installed)."""
    from importlib import metadata

    out = {"python": platform.python_version()}
    for dist, label in VERSIONED.items():
        try:
            out[label] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[label] = _source_version() if label == "avel" else "absent"
    return out


def _source_version() -> str:
    """avel's version from setup.cfg when running from a source checkout (not installed)."""
    import configparser

    setup_cfg = Path(__file__).resolve().parents[1] / "setup.cfg"
    parser = configparser.ConfigParser()
    try:
        parser.read(setup_cfg)
        return f"{parser['metadata']['version']} (source)"
    except (KeyError, configparser.Error):
        return "absent"


def store_fingerprint_fields(cfg, identities: dict[str, Any]) -> dict[str, Any]:
    """What the store fingerprint hashes: everything that changes the numbers, nothing else.

    Only the store's own extractors enter it (each identity carries its weights, preprocessing and
    precision), so a setting of an extractor the store does not hold (``frames_per_segment`` for
    an audio-only store, say) neither refuses a run nor misses the cache. A named recipe other
    than avel's own (``extract.recipe: ave2018``) enters it by name too."""
    fields = {
        "schema_version": SCHEMA_VERSION,
        "segments": cfg.segments,
        "extractors": identities,
    }
    recipe = getattr(cfg, "recipe", "avel")
    if recipe != "avel":  # avel's own stores keep the fingerprints they had before recipes existed
        fields["recipe"] = recipe
    return fields


def effective_config(cfg, device: str):
    """``cfg`` with the precision that really runs on ``device`` (fp16 asked on a CPU runs fp32),
    so that the store records, and fingerprints, what ran."""
    from .extractors import effective_precision

    precision = effective_precision(cfg.precision, device)
    return cfg if precision == cfg.precision else dataclasses.replace(cfg, precision=precision)


def file_identity(path: str) -> str:
    """``size=<bytes>;mtime_ns=<ns>`` of a file, "" if it cannot be read: a row remembers the file
    it was made from, and a changed file is extracted again."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"size={st.st_size};mtime_ns={st.st_mtime_ns}"


def ran_label(extractors) -> str:
    """What computes a row: ``vgg19=cpu/fp32,vggish=cpu/fp32`` (stored per row in ``ran``)."""
    return ",".join(f"{e.name}={e.device}/{getattr(e, 'precision', 'fp32')}" for e in extractors)


def store_attrs(cfg, identities: dict[str, Any]) -> dict[str, Any]:
    fields = store_fingerprint_fields(cfg, identities)
    return {
        "extractor": to_dict(cfg),
        "fingerprint": fingerprint(fields),
        "fingerprint_fields": fields,
        "extractors": identities,
        "weights": {name: ident.get("weights") for name, ident in identities.items()},
        "versions": package_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def upgraded_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """``fingerprint_fields`` of an older store or checkpoint with every weights identity as
    avel records it now (:func:`extract.weights.upgrade_identity`); the rest unchanged."""
    import copy

    from .weights import upgrade_identity

    out = copy.deepcopy(fields or {})
    for ident in (out.get("extractors") or {}).values():
        weights = ident.get("weights") if isinstance(ident, dict) else None
        if isinstance(weights, dict):
            for kind, value in weights.items():
                weights[kind] = upgrade_identity(value)
    return out


def same_feature_set(old_fingerprint: str, old_fields: dict[str, Any] | None, new_fingerprint: str) -> bool:
    """Whether a store or checkpoint recorded as ``old_fingerprint`` / ``old_fields`` holds the
    features of ``new_fingerprint``: equal fingerprints, or equal once the old record's weights
    identities are upgraded (:func:`upgraded_fields`: stores made before logical weights
    identities existed)."""
    if old_fingerprint == new_fingerprint:
        return True
    return bool(old_fields) and fingerprint(upgraded_fields(old_fields)) == new_fingerprint
