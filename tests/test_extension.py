"""``ImmutantExtension`` follows the Flask extension conventions: ``ext(app)`` or ``init_app``, state
in ``app.extensions["immutant"]``, no app kept on the extension, settings validated once at init."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_immutant import ImmutantConfigError, ImmutantExtension, ImmutantState, get_state
from flask_immutant.settings import CORE_SETTINGS

pytestmark = pytest.mark.usefixtures("clean_env")


@pytest.fixture
def app() -> Iterator[Flask]:
    yield Flask("ext_test")


def test_extension_on_construction_keeps_state_in_app_extensions(app: Flask) -> None:
    # Given an app, when the extension is constructed with it
    ImmutantExtension(app)
    # Then its state is in app.extensions["immutant"], and get_state(app) finds it
    state = app.extensions["immutant"]
    assert isinstance(state, ImmutantState)
    assert get_state(app) is state


def test_one_extension_object_serves_several_apps_and_keeps_none() -> None:
    # Given one extension object, as an app factory module would hold it
    ext = ImmutantExtension()
    first, second = Flask("first"), Flask("second")
    first.config["IMMUTANT_CLUSTER"] = "blue"
    second.config["IMMUTANT_CLUSTER"] = "green"
    # When initialised on two apps
    ext.init_app(first)
    ext.init_app(second)
    # Then each app has its own state and plugin manager, and the extension holds no app
    assert get_state(first).settings["IMMUTANT_CLUSTER"] == "blue"
    assert get_state(second).settings["IMMUTANT_CLUSTER"] == "green"
    assert get_state(first).pm is not get_state(second).pm
    assert not hasattr(ext, "app")
    assert not any(isinstance(value, Flask) for value in vars(ext).values())


@pytest.mark.parametrize("again", ["same-object", "new-object"])
def test_initialising_an_app_twice_is_an_error(app: Flask, again: str) -> None:
    ext = ImmutantExtension(app)
    state = get_state(app)
    with pytest.raises(RuntimeError, match="already initialised"):
        if again == "same-object":
            ext.init_app(app)
        else:
            ImmutantExtension(app)
    assert get_state(app) is state


def test_app_config_gets_the_resolved_values(app: Flask, tmp_path: Path) -> None:
    # Given an app that sets some values, one of them as a string
    app.config.update(IMMUTANT_HTTP_PORT="9000", IMMUTANT_HOME=str(tmp_path / "home"), IMMUTANT_CLUSTERED="yes")
    # When initialised
    ImmutantExtension(app)
    # Then app.config holds every setting, defaulted and converted, equal to the state's
    settings = get_state(app).settings
    for row in CORE_SETTINGS:
        assert app.config[row.name] == settings[row.name], row.name
    assert app.config["IMMUTANT_HTTP_PORT"] == 9000
    assert app.config["IMMUTANT_CLUSTERED"] is True
    assert app.config["IMMUTANT_CLUSTER"] == "immutant"
    assert app.config["IMMUTANT_THREADS"] == 8
    assert app.config["IMMUTANT_HOME"] == str(tmp_path / "home")


def test_environment_overrides_app_config_for_node_settings(app: Flask, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the node sets IMMUTANT_* in the environment of the app's process
    app.config["IMMUTANT_CLUSTER"] = "from-config"
    monkeypatch.setenv("IMMUTANT_CLUSTER", "from-env")
    # When initialised, then the environment wins
    ImmutantExtension(app)
    assert app.config["IMMUTANT_CLUSTER"] == "from-env"
    assert get_state(app).keys.prefix == "immutant:from-env:"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"IMMUTANT_HTTP_PORT": 70000}, "IMMUTANT_HTTP_PORT=70000 (from app.config) is not allowed"),
        ({"IMMUTANT_REDIS_URL": "http://x"}, "IMMUTANT_REDIS_URL='http://x' (from app.config) is not allowed"),
        ({"IMMUTANT_CLUSTR": "x"}, "IMMUTANT_CLUSTR is not a flask-immutant setting; did you mean IMMUTANT_CLUSTER?"),
        ({"IMMUTANT_PLUGINS": "not a path!"}, "IMMUTANT_PLUGINS='not a path!' is not allowed"),
        ({"IMMUTANT_PLUGINS": ["no_such_plugin_module"]}, "cannot import plugin 'no_such_plugin_module'"),
    ],
    ids=["range", "url", "unknown-key", "plugins-syntax", "plugins-import"],
)
def test_bad_config_raises_at_init_app_and_leaves_no_state(app: Flask, config: dict[str, Any], message: str) -> None:
    # Given a bad app.config
    app.config.update(config)
    # When initialised, then the error comes now, at start-up, not at first use
    with pytest.raises(ImmutantConfigError) as caught:
        ImmutantExtension(app)
    assert message in str(caught.value)
    # And nothing half-built is left behind: fixing the config and retrying works
    assert "immutant" not in app.extensions
    for key in config:
        del app.config[key]
    ImmutantExtension(app)
    assert "immutant" in app.extensions


def test_init_app_connects_to_nothing(app: Flask) -> None:
    # Given a store URL nothing listens on, when initialised, then no connection is tried yet
    app.config["IMMUTANT_REDIS_URL"] = "redis://127.0.0.1:1/0"
    ImmutantExtension(app)
    assert "store" not in vars(get_state(app))


def test_get_state_inside_and_outside_an_app_context(app: Flask) -> None:
    # Given an initialised app
    ImmutantExtension(app)
    state = app.extensions["immutant"]
    # Then inside an app or request context get_state() finds the current app's state
    with app.app_context():
        assert get_state() is state
    with app.test_request_context("/"):
        assert get_state() is state
    # And outside any context it needs the app, as Flask's current_app does
    with pytest.raises(RuntimeError, match="outside of application context"):
        get_state()
    assert get_state(app) is state


def test_get_state_of_an_app_without_the_extension(app: Flask) -> None:
    with pytest.raises(RuntimeError, match=r"add ImmutantExtension\(app\)"):
        get_state(app)
    with app.app_context(), pytest.raises(RuntimeError, match=r"add ImmutantExtension\(app\)"):
        get_state()


def test_init_app_calls_the_init_app_hook_once_with_app_and_state(
    app: Flask, test_plugins: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given the recorder plugin configured in app.config
    from recorder import read  # type: ignore[import-not-found]

    record = tmp_path / "calls.jsonl"
    monkeypatch.setenv("RECORDER_FILE", str(record))
    app.config.update(IMMUTANT_PLUGINS=["recorder"], IMMUTANT_CLUSTER="hooked")
    # When the extension is initialised
    ImmutantExtension(app)
    # Then immutant_init_app ran once, after settings were resolved
    calls = [call for call in read(record) if call["hook"] == "immutant_init_app"]
    assert calls == [{"hook": "immutant_init_app", "pid": os.getpid(), "app": "ext_test", "cluster": "hooked"}]


def test_two_apps_in_one_process_load_different_plugins(test_plugins: Path) -> None:
    # Given two apps, only one of which asks for a plugin
    with_plugin, without = Flask("with_plugin"), Flask("without")
    with_plugin.config["IMMUTANT_PLUGINS"] = "sample_plugin"
    ImmutantExtension(with_plugin)
    ImmutantExtension(without)
    # Then each app's plugin manager holds what that app asked for: no process-wide registry
    assert get_state(with_plugin).pm.has_plugin("sample_plugin")
    assert not get_state(without).pm.has_plugin("sample_plugin")
