"""Section ``heads``: per-head options, the ``"*"`` entry for every head that has an option, and
errors for names and keys that match nothing."""
from __future__ import annotations

import pytest

from extract.core.settings import load_pipeline
from train.runs import head_class_and_config, head_overrides


def test_star_entry_applies_where_the_option_exists_and_own_entry_wins():
    heads = {"*": {"loss": "ce"}, "a+v-att": {"loss": "reference", "hidden": 64}}
    assert head_overrides(heads, "dmrn") == {"loss": "ce"}
    assert head_overrides(heads, "a+v-att") == {"loss": "reference", "hidden": 64}
    assert head_overrides(heads, "avltc") == {}  # AVLTC's config has no `loss`: the paper fixes CE
    pipeline = load_pipeline(None, {"heads": heads}, search=False)
    assert head_class_and_config(pipeline, "dmrn", "avel")[1].loss == "ce"
    assert head_class_and_config(pipeline, "a+v-att", "avel")[1].loss == "reference"
    assert head_class_and_config(pipeline, "a+v-att", "avel")[1].hidden == 64


def test_names_and_keys_that_match_nothing_are_errors():
    with pytest.raises(ValueError, match=r"heads\.dmrm: no such head"):
        head_overrides({"dmrm": {"loss": "ce"}}, "dmrn")
    with pytest.raises(ValueError, match=r'heads\."\*"\.los: no registered head has an option'):
        head_overrides({"*": {"los": "ce"}}, "dmrn")
    with pytest.raises(ValueError, match="loss"):  # a wrong value is refused by the head's config
        head_class_and_config(load_pipeline(None, {"heads": {"*": {"loss": "mse"}}}, search=False), "dmrn", "avel")
