"""The one plugin mechanism (extract/core/plugins.py, docs/layers.md "One plugin mechanism"): heads,
tasks, extractors, config sections and avel-train subcommands come from entry-point groups; the
in-tree modules are all listed in setup.cfg; a third-party distribution (a ``*.dist-info`` folder
with ``entry_points.txt`` on sys.path, as pip installs one) adds its own; a plugin that fails or
takes a taken name is refused with a message that names it and its distribution."""
from __future__ import annotations

import ast
import importlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from extract import extractor_base
from extract.core import plugins, settings
from train import registry

REPO = Path(__file__).resolve().parents[1]

#: decorator -> the entry-point group whose modules use it
DECORATORS = {
    "register_head": plugins.HEADS,
    "register_task": plugins.TASKS,
    "register_extractor": plugins.EXTRACTORS,
    "section": plugins.CONFIG_SECTIONS,
    "register_section": plugins.CONFIG_SECTIONS,
}


def registering_modules() -> dict[str, set[str]]:
    """group -> the in-tree modules that call a registering decorator at module level, found by
    reading the source (a module nobody lists is never imported, so the registries cannot tell)."""
    found: dict[str, set[str]] = {group: set() for group in set(DECORATORS.values())}
    for path in sorted((REPO / "extract").rglob("*.py")) + sorted((REPO / "train").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            calls = [d for d in getattr(node, "decorator_list", []) if isinstance(d, ast.Call)]
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
                calls.append(node.value)
            for call in calls:
                name = getattr(call.func, "id", getattr(call.func, "attr", ""))
                if name in DECORATORS:
                    found[DECORATORS[name]].add(module)
    return found


def test_setup_cfg_lists_exactly_the_modules_that_register():
    """No folder scan any more: a module that registers a head/task/extractor/section must be listed
    in its group, and every listed module registers something of its group."""
    scanned = registering_modules()
    assert "train.heads.avel" in scanned[plugins.HEADS] and "extract.sol_extractors" in scanned[plugins.EXTRACTORS]
    for group, modules in scanned.items():
        listed = {p.module for p in plugins.setup_cfg_entry_points(REPO / "setup.cfg", group)}
        assert listed == modules, (group, sorted(listed ^ modules))


def test_the_source_tree_lists_are_the_ones_used_and_fill_the_registries():
    """Run from this source tree, avel's plugins are read from its setup.cfg (the venv's avel is an
    editable install of another checkout, whose metadata is another list); loading them fills
    every registry with the built-in names."""
    assert plugins.source_setup_cfg() == REPO / "setup.cfg"
    for group in plugins.GROUPS:
        found = plugins.entry_points(group)
        ours = [p for p in found if p.distribution.startswith("avel ")]
        assert ours == plugins.setup_cfg_entry_points(REPO / "setup.cfg", group)
        assert all(p.distribution == f"avel (source tree {REPO / 'setup.cfg'})" for p in ours)
    registry.discover()
    assert {"avel", "cml", "sol"} <= set(registry.TASKS)
    assert {"dmrn", "cmbs", "stm"} <= set(registry.HEADS)
    assert {"vgg19", "vggish", "resnet152_maps", "vggish_maps"} <= set(extractor_base.load_extractors())
    assert {"data", "store", "dask", "extract", "train", "sol"} <= set(settings.load_sections())
    assert plugins.find(plugins.COMMANDS, "gpucheck").value == "train.predict.gpucheck:command"


# --------------------------------------------------------------------------------------------
# third-party distributions


def make_distribution(root: Path, name: str, version: str, entry_points: dict[str, list[str]],
                      modules: dict[str, str]) -> Path:
    """An installed distribution as pip leaves it: ``<name>-<version>.dist-info`` (METADATA,
    entry_points.txt) and its modules, in ``root`` (put on sys.path by the caller)."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(
        "".join(f"[{group}]\n" + "".join(f"{line}\n" for line in lines) + "\n" for group, lines in entry_points.items()))
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    return root


FAKE_HEADS = '''
    from train.heads.base import Head
    from train.registry import register_head


    @register_head("fake-head")
    class FakeHead(Head):
        """A head from a third-party distribution (tests/test_plugins.py)."""

        task = "avel"
        settings = ("supervised",)
        train_defaults = {"lr": 0.5, "batch_size": 7, "epochs": 3}
'''
FAKE_EXTRACT = '''
    import dataclasses

    from extract.core.settings import section
    from extract.extractor_base import Extractor, register_extractor


    @register_extractor("fake_extractor")
    class FakeExtractor(Extractor):
        uses_audio = True


    @section("fakeplug")
    @dataclasses.dataclass
    class FakeSection:
        level: int = 3
'''
FAKE_COMMAND = '''
    import click


    @click.command("fake-cmd")
    @click.option("--times", type=int, default=2)
    def command(times):
        """Say hello from a plugin distribution.

        More text that the short help leaves out."""
        click.echo("hello " * times)
'''
FAKE_ENTRY_POINTS = {
    plugins.HEADS: ["fakeheads = fakeplug_heads"],
    plugins.EXTRACTORS: ["fakeextract = fakeplug_extract"],
    plugins.CONFIG_SECTIONS: ["fakeplug = fakeplug_extract"],
    plugins.COMMANDS: ["fake-cmd = fakeplug_cmd:command"],
}
FAKE_MODULES = {"fakeplug_heads": FAKE_HEADS, "fakeplug_extract": FAKE_EXTRACT, "fakeplug_cmd": FAKE_COMMAND}


@pytest.fixture
def isolated(monkeypatch):
    """Registries and the loaded-plugin memo as they are now, restored after the test; the in-tree
    plugins are loaded first, so only the test's distribution registers anything new."""
    registry.discover()
    extractor_base.load_extractors()
    settings.load_sections()
    monkeypatch.setattr(registry, "HEADS", dict(registry.HEADS))
    monkeypatch.setattr(registry, "TASKS", dict(registry.TASKS))
    monkeypatch.setattr(extractor_base, "EXTRACTORS", dict(extractor_base.EXTRACTORS))
    monkeypatch.setattr(settings, "SECTIONS", dict(settings.SECTIONS))
    monkeypatch.setattr(plugins, "_loaded", {})
    before = set(sys.modules)
    yield monkeypatch
    for name in set(sys.modules) - before:
        if name.startswith(("fakeplug", "brokenplug", "dupplug")):
            del sys.modules[name]


def install(monkeypatch, root: Path) -> None:
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()


def test_a_third_party_distribution_adds_a_head_an_extractor_a_section_and_a_command(isolated, tmp_path):
    install(isolated, make_distribution(tmp_path, "fakeplug", "0.1", FAKE_ENTRY_POINTS, FAKE_MODULES))
    head = registry.get_head("fake-head")
    assert head.__module__ == "fakeplug_heads" and head.name == "fake-head"
    assert "fake-head" in registry.head_names("avel") and "dmrn" in registry.head_names("avel")
    extractor = extractor_base.get_extractor("fake_extractor")
    assert extractor.__module__ == "fakeplug_extract" and extractor.uses_audio
    pipeline = settings.load_pipeline(search=False, overrides={"fakeplug": {"level": 5}})
    assert pipeline.fakeplug.level == 5 and settings.load_pipeline(search=False).fakeplug.level == 3
    plugin = plugins.find(plugins.COMMANDS, "fake-cmd")
    assert plugin.distribution == "fakeplug 0.1"
    assert plugins.docstring(plugin) == "Say hello from a plugin distribution.\n\nMore text that the short help leaves out."
    assert "fakeplug_cmd" not in sys.modules  # read from the source, not imported


def test_the_cli_lists_a_plugin_head_and_runs_a_plugin_command_it_imports_only_when_invoked(tmp_path):
    """As a user sees it: ``avel-train --list-heads`` and ``--help`` in a fresh interpreter with the
    distribution on the path."""
    make_distribution(tmp_path, "fakeplug", "0.1", FAKE_ENTRY_POINTS, FAKE_MODULES)
    script = textwrap.dedent("""
        import sys
        from click.testing import CliRunner
        from train.cli import main
        heads = CliRunner().invoke(main, ["--list-heads"], catch_exceptions=False)
        print(heads.output)
        help = CliRunner().invoke(main, ["--help"], catch_exceptions=False)
        print(help.output)
        print("imported before invoking:", "fakeplug_cmd" in sys.modules, "train.predict.gpucheck" in sys.modules)
        ran = CliRunner().invoke(main, ["fake-cmd", "--times", "3"], catch_exceptions=False)
        print("ran:", ran.exit_code, ran.output.strip())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)])}
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.strip()}
    assert rows["fake-head"][:6] == ["fake-head", "avel", "supervised", "0.5", "7", "3"]
    assert rows["dmrn"][1] == "avel"
    assert rows["fake-cmd"][1:] == ["Say", "hello", "from", "a", "plugin", "distribution."]
    assert rows["gpucheck"][1:4] == ["Measure", "the", "GPU"]
    assert "imported before invoking: False False" in proc.stdout
    assert "ran: 0 hello hello hello" in proc.stdout


def test_a_plugin_that_fails_to_import_names_itself_and_its_distribution(isolated, tmp_path):
    install(isolated, make_distribution(tmp_path, "brokenplug", "2.0", {plugins.HEADS: ["broken = brokenplug_heads"]},
                                        {"brokenplug_heads": "import not_a_module_anywhere\n"}))
    with pytest.raises(plugins.PluginError) as caught:
        registry.get_head("dmrn")
    message = str(caught.value)
    assert "plugin 'broken' of avel.heads (brokenplug_heads, from brokenplug 2.0) failed to load" in message
    assert "No module named 'not_a_module_anywhere'" in message


def test_a_plugin_that_takes_a_registered_name_is_refused_naming_both(isolated, tmp_path):
    duplicate = FAKE_HEADS.replace('"fake-head"', '"dmrn"').replace("FakeHead", "OtherDmrn")
    install(isolated, make_distribution(tmp_path, "dupplug", "1.0", {plugins.HEADS: ["dup = dupplug_heads"]},
                                        {"dupplug_heads": duplicate}))
    with pytest.raises(plugins.PluginError) as caught:
        registry.discover()
    message = str(caught.value)
    assert "plugin 'dup' of avel.heads (dupplug_heads, from dupplug 1.0)" in message
    in_tree = registry.HEADS["dmrn"]
    assert in_tree.__module__ == "train.heads.avel"
    assert f"head 'dmrn' of dupplug_heads.OtherDmrn is already registered by train.heads.avel.{in_tree.__qualname__}" in message


def test_two_distributions_declaring_one_command_name_are_refused_naming_both(isolated, tmp_path):
    make_distribution(tmp_path / "a", "alpha", "1.0", {plugins.COMMANDS: ["hello = alpha_cmd:command"]}, {})
    make_distribution(tmp_path / "b", "beta", "2.0", {plugins.COMMANDS: ["hello = beta_cmd:command"]}, {})
    install(isolated, tmp_path / "a")
    install(isolated, tmp_path / "b")
    with pytest.raises(plugins.PluginError, match=r"avel.commands: the name 'hello' is declared twice: "
                                                  r"alpha_cmd:command by alpha 1.0 and beta_cmd:command by beta 2.0"):
        plugins.entry_points(plugins.COMMANDS)


def test_installed_avel_metadata_is_used_only_outside_a_source_tree(isolated, tmp_path):
    """An ``avel`` distribution on the path (here a fake one first on sys.path, shadowing the venv's
    editable install of another checkout): ignored while this source tree's setup.cfg is there,
    read when avel is not a source tree (a wheel install: no setup.cfg beside the packages)."""
    install(isolated, make_distribution(tmp_path / "site", "avel", "9.9", {plugins.HEADS: ["stale = train.heads.gone"]}, {}))
    assert "stale" not in {p.name for p in plugins.entry_points(plugins.HEADS)}
    isolated.setattr(plugins, "SOURCE_ROOT", tmp_path / "wheel")
    assert plugins.source_setup_cfg() is None
    assert [(p.name, p.value, p.distribution) for p in plugins.entry_points(plugins.HEADS)] == [
        ("stale", "train.heads.gone", "avel 9.9")]
    with pytest.raises(plugins.PluginError, match=r"plugin 'stale' of avel.heads \(train.heads.gone, from avel 9.9\)"):
        plugins.load(plugins.HEADS)
