"""Plugin loading: built-ins, ``IMMUTANT_PLUGINS``, entry points, flags and the start-up checks.

The key test installs a third-party plugin the way pip would (a module plus a ``.dist-info`` with
an ``entry_points.txt``) and shows that, with nothing else changed, it adds a setting, a
``flask immutant`` subcommand and a status section.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
from flask import Flask, current_app

from flask_immutant import ImmutantConfigError, ImmutantState, hookimpl, hookspecs
from flask_immutant.cli import cli
from flask_immutant.plugins import (
    DEFAULT_PLUGINS,
    ENTRY_POINT_GROUP,
    PluginManager,
    load,
    make_plugin_manager,
    plugin_names,
)

from support import run_flask

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def fresh_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the ``flask immutant`` group register plugin commands again, then restore it."""
    monkeypatch.setattr(cli, "_registered", False)
    monkeypatch.setattr(cli, "commands", dict(cli.commands))


# --- built-ins and IMMUTANT_PLUGINS -------------------------------------------------------


def test_built_in_features_are_registered_as_plugins() -> None:
    # Features that are off by default (cache, sessions, metrics) are unregistered until their flag is on.
    pm = ImmutantState.build({"IMMUTANT_CACHE": True, "IMMUTANT_SESSIONS": True, "IMMUTANT_METRICS": True},
                             environ={}).pm
    for name in DEFAULT_PLUGINS:
        assert pm.has_plugin(name), name
    assert set(DEFAULT_PLUGINS) <= set(plugin_names(pm))


def test_built_in_hook_implementations_are_trylast_so_users_can_run_first() -> None:
    pm = make_plugin_manager()
    checked = 0
    for name in DEFAULT_PLUGINS:
        plugin = pm.get_plugin(name)
        for caller in pm.get_hookcallers(plugin) or ():
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin:
                    assert impl.trylast, f"{name}.{caller.name} should be @hookimpl(trylast=True)"
                    checked += 1
    assert checked


def test_our_manager_finds_the_hooks_pluggy_finds() -> None:
    # It skips pluggy's slow attribute lookup for a plugin module's names that cannot be hooks
    # (imports, constants, unmarked functions): never one pluggy would have taken
    class Hooks:  # a plugin object, not a module: pluggy's own lookup
        @hookimpl
        def immutant_settings(self) -> list[Any]:
            return []

    module = types.ModuleType("odd_plugin")
    module.immutant_settings = staticmethod(hookimpl(lambda: []))  # a wrapper pluggy takes hooks from
    module.immutant_status = hookimpl(lambda state, store: None)
    module.unmarked = lambda: None
    module.proxy = current_app  # reading it outside an app would raise
    module.immutant_node_started = functools.cache(hookimpl(lambda node: None))  # callable, not a function
    module.Imported, module.sys, module.LIMIT = Hooks, sys, 3  # a class, a module, a constant
    served = types.ModuleType("served_plugin")  # a hook a module's __getattr__ serves (PEP 562)
    served.__getattr__ = lambda name: hookimpl(lambda state: None) if name == "immutant_runtime_started" \
        else (_ for _ in ()).throw(AttributeError(name))
    served.__dir__ = lambda: ["immutant_runtime_started"]
    plugins = [(importlib.import_module(name), name) for name in DEFAULT_PLUGINS]
    plugins += [(Hooks(), "hooks-object"), (module, "odd-module"), (served, "served-module")]

    def found(pm: pluggy.PluginManager) -> set[tuple[str, str, object, bool]]:
        pm.add_hookspecs(hookspecs)
        for plugin, name in plugins:
            pm.register(plugin, name=name)
        return {(caller.name, impl.plugin_name, getattr(impl.function, "__func__", impl.function), impl.trylast)
                for caller in pm.hook.__dict__.values() if isinstance(caller, pluggy.HookCaller)
                for impl in caller.get_hookimpls()}

    ours = found(PluginManager(hookspecs.PROJECT))
    assert ours == found(pluggy.PluginManager(hookspecs.PROJECT))
    assert {("immutant_status", "odd-module"), ("immutant_settings", "odd-module"),
            ("immutant_settings", "hooks-object")} <= {(hook, plugin) for hook, plugin, *_ in ours}


def test_plugin_by_module_path_from_app_config(test_plugins: Path) -> None:
    import sample_plugin  # type: ignore[import-not-found]

    state = ImmutantState.build({"IMMUTANT_PLUGINS": ["sample_plugin"]}, environ={})
    assert state.pm.get_plugin("sample_plugin") is sample_plugin
    assert state.settings["IMMUTANT_PLUGINS"] == ("sample_plugin",)


def test_plugin_by_module_and_attribute_from_the_environment(test_plugins: Path) -> None:
    # Given two plugins named in the environment, one of them an object inside a module
    import sample_plugin

    environ = {"IMMUTANT_PLUGINS": "sample_plugin:object_plugin, flagged_plugin"}
    # When the state is built, then both are registered under the path they were given by
    pm = ImmutantState.build({}, environ=environ).pm
    assert pm.get_plugin("sample_plugin:object_plugin") is sample_plugin.object_plugin
    assert pm.has_plugin("flagged_plugin")
    assert not pm.has_plugin("sample_plugin")


def test_environment_plugins_replace_app_config_plugins(test_plugins: Path) -> None:
    # IMMUTANT_PLUGINS follows the same precedence as every setting: the environment wins
    state = ImmutantState.build({"IMMUTANT_PLUGINS": "flagged_plugin"}, environ={"IMMUTANT_PLUGINS": "sample_plugin"})
    assert state.pm.has_plugin("sample_plugin")
    assert not state.pm.has_plugin("flagged_plugin")
    assert state.settings["IMMUTANT_PLUGINS"] == ("sample_plugin",)


def test_naming_a_built_in_again_is_harmless() -> None:
    pm = ImmutantState.build({"IMMUTANT_PLUGINS": [DEFAULT_PLUGINS[0]]}, environ={}).pm
    assert plugin_names(pm).count(DEFAULT_PLUGINS[0]) == 1


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module_for_immutant", "IMMUTANT_PLUGINS: cannot import plugin 'no_such_module_for_immutant'"),
        ("json.no_such_submodule", "IMMUTANT_PLUGINS: cannot import plugin 'json.no_such_submodule'"),
        ("sample_plugin:no_such_object", "IMMUTANT_PLUGINS: 'sample_plugin' has no attribute 'no_such_object'"),
    ],
)
def test_unimportable_plugin_is_a_clear_config_error(test_plugins: Path, path: str, message: str) -> None:
    with pytest.raises(ImmutantConfigError) as caught:
        ImmutantState.build({"IMMUTANT_PLUGINS": [path]}, environ={})
    assert str(caught.value).startswith(message)
    with pytest.raises(ImmutantConfigError, match=r"cannot import|has no attribute"):
        load(path)


def test_misspelled_hook_fails_at_start_up(test_plugins: Path) -> None:
    # Given a plugin whose @hookimpl is named immutant_stauts (meant: immutant_status)
    # When it is loaded, then check_pending refuses it now instead of never calling it
    with pytest.raises(ImmutantConfigError) as caught:
        ImmutantState.build({"IMMUTANT_PLUGINS": ["misspelled_plugin"]}, environ={})
    message = str(caught.value)
    assert "immutant_stauts" in message
    assert "misspelled_plugin" in message
    assert "unknown hook" in message


def test_hook_with_an_argument_the_hook_does_not_pass_fails_at_start_up(test_plugins: Path) -> None:
    with pytest.raises(ImmutantConfigError) as caught:
        ImmutantState.build({"IMMUTANT_PLUGINS": ["wrong_args_plugin"]}, environ={})
    message = str(caught.value)
    assert "wrong_args_plugin" in message
    assert "immutant_member_joined" in message
    assert "cluster" in message


@pytest.mark.parametrize(
    ("config", "environ", "registered"),
    [
        ({}, {}, True),
        ({"IMMUTANT_FLAGGED": True}, {}, True),
        ({"IMMUTANT_FLAGGED": False}, {}, False),
        ({}, {"IMMUTANT_FLAGGED": "off"}, False),
        ({"IMMUTANT_FLAGGED": False}, {"IMMUTANT_FLAGGED": "on"}, True),
    ],
    ids=["default-on", "config-on", "config-off", "env-off", "env-on-over-config-off"],
)
def test_plugin_whose_flag_is_off_is_unregistered(
    test_plugins: Path, config: dict[str, object], environ: dict[str, str], registered: bool
) -> None:
    # Given a plugin that owns the flag setting named by its FLAG attribute
    state = ImmutantState.build({"IMMUTANT_PLUGINS": ["flagged_plugin"], **config}, environ=environ)
    # Then it is registered only while the flag is on; its setting stays known either way
    assert state.pm.has_plugin("flagged_plugin") is registered
    assert state.settings["IMMUTANT_FLAGGED"] is registered
    assert ("flagged_plugin" in plugin_names(state.pm)) is registered


def test_plugin_status_sections_join_the_status_document(
    test_plugins: Path, immutant_home: Path, embedded_store: object, cluster_name: str
) -> None:
    config = {"IMMUTANT_HOME": str(immutant_home), "IMMUTANT_CLUSTER": cluster_name,
              "IMMUTANT_PLUGINS": "sample_plugin, sample_plugin:object_plugin"}
    document = ImmutantState.build(config, environ={}).status()
    assert document["sample"] == {"cluster": cluster_name}
    assert document["sample_object"] == {"cluster": cluster_name}
    assert document["members"] == []
    assert document["store"]["embedded"] is True


def test_two_plugins_contributing_one_status_section_is_an_error(
    test_plugins: Path, immutant_home: Path, embedded_store: object, cluster_name: str
) -> None:
    # Given two plugins that both return a "clash" status section
    config = {"IMMUTANT_HOME": str(immutant_home), "IMMUTANT_CLUSTER": cluster_name,
              "IMMUTANT_PLUGINS": ["clashing_plugin:first", "clashing_plugin:second"]}
    state = ImmutantState.build(config, environ={})
    # When the status document is assembled, then one of them cannot silently win
    with pytest.raises(ImmutantConfigError, match="two plugins contribute the status section 'clash'"):
        state.status()


# --- a third-party plugin installed through an entry point --------------------------------

HELLO_MODULE = '''\
"""A third-party flask-immutant plugin: a setting, a subcommand and a status section."""

from __future__ import annotations

from typing import Any

import click

from flask_immutant import Setting, hookimpl
from flask_immutant.cli import load_state, one_line_errors


def greeting(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 40:
        raise ValueError("a greeting of 1 to 40 characters")
    return value.strip()


@hookimpl
def immutant_settings() -> list[Setting]:
    return [Setting("IMMUTANT_HELLO_GREETING", "hello", greeting, "What `flask immutant hello` says.",
                    "text", env=True)]


@hookimpl
def immutant_register_commands(cli: click.Group) -> None:
    cli.add_command(hello)


@hookimpl
def immutant_status(state: Any) -> dict[str, Any]:
    return {"hello": {"greeting": state.settings["IMMUTANT_HELLO_GREETING"]}}


@click.command(help="Greet someone with IMMUTANT_HELLO_GREETING.")
@click.option("--name", default="world")
@click.pass_context
@one_line_errors
def hello(ctx: click.Context, name: str) -> None:
    state, _app, _path = load_state(ctx)
    click.echo(f"{state.settings['IMMUTANT_HELLO_GREETING']}, {name}!")
'''


@pytest.fixture
def hello_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``immutant-hello`` installed into a site folder, as pip would: module + dist-info."""
    site = tmp_path / "site"
    dist_info = site / "immutant_hello-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (site / "immutant_hello.py").write_text(HELLO_MODULE)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: immutant-hello\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nhello = immutant_hello\n")
    (dist_info / "top_level.txt").write_text("immutant_hello\n")
    importlib.invalidate_caches()  # importlib.metadata caches what each sys.path entry holds
    monkeypatch.syspath_prepend(str(site))
    try:
        yield site
    finally:
        sys.modules.pop("immutant_hello", None)
        importlib.invalidate_caches()


@pytest.fixture
def hello_env(node_env: dict[str, str], hello_installed: Path) -> dict[str, str]:
    """Environment for subprocesses: the session's store, this test's cluster, the plugin's site."""
    pythonpath = [str(hello_installed), *filter(None, [node_env.get("PYTHONPATH")])]
    return {**node_env, "PYTHONPATH": os.pathsep.join(pythonpath), "IMMUTANT_HELLO_GREETING": "bonjour"}


def test_entry_point_plugin_is_loaded_without_being_named(hello_installed: Path) -> None:
    # Given immutant-hello installed (and IMMUTANT_PLUGINS empty)
    # When a state is built, then the plugin is registered under its entry point name
    pm = ImmutantState.build({}, environ={}).pm
    assert pm.has_plugin("hello")
    plugin = pm.get_plugin("hello")
    assert plugin is not None and plugin.__name__ == "immutant_hello"
    assert ("immutant-hello", "1.0") in [(dist.project_name, dist.version) for _, dist in pm.list_plugin_distinfo()]


def test_entry_point_that_cannot_be_imported_is_a_clear_config_error(
    hello_installed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an installed package whose entry point names a module that is not there
    dist_info = hello_installed / "immutant_broken-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: immutant-broken\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nbroken = immutant_broken_missing\n")
    importlib.invalidate_caches()
    # When plugins are loaded, then the error says which module and where it was declared
    with pytest.raises(ImmutantConfigError) as caught:
        ImmutantState.build({}, environ={})
    assert f"entry point group {ENTRY_POINT_GROUP!r}" in str(caught.value)
    assert "immutant_broken_missing" in str(caught.value)


def test_entry_point_plugin_adds_a_validated_setting(hello_installed: Path) -> None:
    # Then its setting has a default, takes app.config and the environment...
    assert ImmutantState.build({}, environ={}).settings["IMMUTANT_HELLO_GREETING"] == "hello"
    configured = ImmutantState.build({"IMMUTANT_HELLO_GREETING": "hi"}, environ={})
    assert configured.settings["IMMUTANT_HELLO_GREETING"] == "hi"
    from_env = ImmutantState.build({}, environ={"IMMUTANT_HELLO_GREETING": "salut"})
    assert from_env.settings["IMMUTANT_HELLO_GREETING"] == "salut"
    # ...refuses a bad value like any core setting...
    with pytest.raises(ImmutantConfigError) as caught:
        ImmutantState.build({"IMMUTANT_HELLO_GREETING": ""}, environ={})
    assert str(caught.value) == (
        "IMMUTANT_HELLO_GREETING='' (from app.config) is not allowed: expected a greeting of 1 to 40 characters"
    )
    # ...and is what a misspelling is compared with
    with pytest.raises(ImmutantConfigError, match="did you mean IMMUTANT_HELLO_GREETING"):
        ImmutantState.build({"IMMUTANT_HELLO_GRETING": "hi"}, environ={})


def test_without_the_entry_point_the_setting_is_unknown() -> None:
    with pytest.raises(ImmutantConfigError, match="IMMUTANT_HELLO_GREETING is not a flask-immutant setting"):
        ImmutantState.build({"IMMUTANT_HELLO_GREETING": "hi"}, environ={})


def test_entry_point_plugin_adds_a_subcommand_seen_by_the_test_cli_runner(
    hello_installed: Path, fresh_cli: None
) -> None:
    # Given an app whose config sets the plugin's setting
    app = Flask("hello_app")
    app.config["IMMUTANT_HELLO_GREETING"] = "salut"
    runner = app.test_cli_runner()
    # When `flask immutant hello` runs in-process
    result = runner.invoke(cli, ["hello", "--name", "tests"])
    # Then the plugin's command answered, with the app's config
    assert result.exit_code == 0, result.output
    assert result.output == "salut, tests!\n"
    assert "hello" in runner.invoke(cli, ["--help"]).output


def test_entry_point_plugin_command_reports_a_bad_setting_in_one_line(
    hello_installed: Path, fresh_cli: None
) -> None:
    app = Flask("hello_app")
    app.config["IMMUTANT_HELLO_GREETING"] = "x" * 41
    result = app.test_cli_runner().invoke(cli, ["hello"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: IMMUTANT_HELLO_GREETING='xxxx")
    assert "expected a greeting of 1 to 40 characters" in result.output
    assert "Traceback" not in result.output


def test_entry_point_plugin_subcommand_in_a_real_flask_process(hello_env: dict[str, str], tmp_path: Path) -> None:
    # When `python -m flask immutant hello` runs with the plugin on PYTHONPATH (and no app here)
    result = run_flask(["immutant", "hello", "--name", "cluster"], hello_env, cwd=tmp_path)
    # Then the command exists and reads its setting from the environment
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "bonjour, cluster!\n"
    listing = run_flask(["immutant", "--help"], hello_env, cwd=tmp_path)
    assert "hello" in listing.stdout


def test_entry_point_plugin_status_section_in_status_json(hello_env: dict[str, str], tmp_path: Path) -> None:
    # Given the embedded store is running under IMMUTANT_HOME (the node_env fixture)
    # When `flask immutant status --json` runs with the plugin installed
    result = run_flask(["immutant", "status", "--json"], hello_env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    document = json.loads(result.stdout)
    # Then the plugin's section sits next to the built-in ones
    assert document["hello"] == {"greeting": "bonjour"}
    assert document["cluster"] == hello_env["IMMUTANT_CLUSTER"]
    assert document["members"] == []
    assert document["store"]["embedded"] is True


def test_status_json_without_the_plugin_has_no_hello_section(node_env: dict[str, str], tmp_path: Path) -> None:
    result = run_flask(["immutant", "status", "--json"], node_env, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "hello" not in json.loads(result.stdout)



def test_a_command_reuses_the_groups_plugin_manager_only_for_the_same_plugins_and_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, test_plugins: Path) -> None:
    """Regression: loading the app may put its folder on ``sys.path``, with entry-point plugins
    beside it that the group's manager, made before, never saw; reused, a node refused the
    plugin's setting (``IMMUTANT_HELLO_GREETING is not a flask-immutant setting``). A folder put
    there without a plugin (what ``flask``, the script, does for every command) keeps the manager."""
    import click

    from flask_immutant.cli import COMMANDS_MANAGER, _plugin_manager

    registered = make_plugin_manager(entry_points=False)

    def offered(extra: tuple[str, ...] = (), path: tuple[str, ...] = tuple(sys.path)) -> pluggy.PluginManager:
        ctx = click.Context(cli)
        ctx.meta[COMMANDS_MANAGER] = ((), path, registered)
        return _plugin_manager(ctx, extra)

    # The same plugins from the same path: the group's manager, once
    assert offered() is registered
    # Other plugins: a new manager, which looks again
    assert offered(("sample_plugin",)) is not registered
    # The app's folder put in front, with no plugin in it: still the group's manager
    before = tuple(sys.path)
    app_folder = tmp_path / "app"
    app_folder.mkdir()
    monkeypatch.syspath_prepend(str(app_folder))
    assert offered(path=before) is registered
    # A folder holding an installed plugin put in front: a new manager, which finds it
    dist_info = tmp_path / "site" / "immutant_hello-1.0.dist-info"
    dist_info.mkdir(parents=True)
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: immutant-hello\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\nhello = immutant_hello\n")
    (dist_info.parent / "immutant_hello.py").write_text(HELLO_MODULE)
    monkeypatch.syspath_prepend(str(dist_info.parent))
    try:
        assert offered(path=before).has_plugin("hello")
    finally:
        sys.modules.pop("immutant_hello", None)
    # A path changed otherwise (an entry gone): a new manager
    assert offered(path=(*before, "/elsewhere")) is not registered
