"""The settings table: every bad value is refused with one clear error, values resolve in order
default < app.config < environment < options, and node settings survive a trip through the
environment of a child process."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest

from flask_immutant import ImmutantConfigError, Setting
from flask_immutant.settings import (
    CORE_SETTINGS,
    identifier,
    int_range,
    resolve,
    table,
    to_bool,
    unknown_environment,
)

ROWS = table(CORE_SETTINGS)

PORT = "an integer from 1 to 65535"
NAME = "1-64 characters: letters, digits"
URL = "a URL with scheme redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://"
BOOL = "a boolean"
PLUGINS = "a list of import paths"

#: (key, bad value, part of the "expected ..." text that says what is allowed)
BAD_VALUES: list[tuple[str, Any, str]] = [
    ("IMMUTANT_HOME", 42, "a filesystem path"),
    ("IMMUTANT_HOME", "", "a filesystem path"),
    ("IMMUTANT_HOME", "   ", "a filesystem path"),
    ("IMMUTANT_HOME", ["/tmp"], "a filesystem path"),
    ("IMMUTANT_CLUSTER", "", NAME),
    ("IMMUTANT_CLUSTER", None, NAME),
    ("IMMUTANT_CLUSTER", 7, NAME),
    ("IMMUTANT_CLUSTER", "-leading-dash", NAME),
    ("IMMUTANT_CLUSTER", "has space", NAME),
    ("IMMUTANT_CLUSTER", "a/b", NAME),
    ("IMMUTANT_CLUSTER", "x" * 65, NAME),
    ("IMMUTANT_REDIS_URL", "http://localhost:6379", URL),
    ("IMMUTANT_REDIS_URL", "localhost:6379", URL),
    ("IMMUTANT_REDIS_URL", "sentinel://h:26379/mymaster", URL),
    ("IMMUTANT_REDIS_URL", 6379, URL),
    ("IMMUTANT_REDIS_URL", "unix://", "unix:// needs a socket path"),
    ("IMMUTANT_REDIS_URL", "unix://localhost", "unix:// needs a socket path"),
    ("IMMUTANT_REDIS_URL", "redis+sentinel://h:26379", "a sentinel URL needs a service name"),
    ("IMMUTANT_REDIS_URL", "rediss+sentinel://h1:26379,h2:26379/", "a sentinel URL needs a service name"),
    ("IMMUTANT_CLUSTERED", "maybe", BOOL),
    ("IMMUTANT_CLUSTERED", "enabled", BOOL),
    ("IMMUTANT_CLUSTERED", 2, BOOL),
    ("IMMUTANT_CLUSTERED", None, BOOL),
    ("IMMUTANT_NODE_NAME", "bad name", NAME),
    ("IMMUTANT_NODE_NAME", "_hidden", NAME),
    ("IMMUTANT_NODE_NAME", "nœud", NAME),
    ("IMMUTANT_NODE_NAME", 12, NAME),
    ("IMMUTANT_NODE_NAME", "n" * 65, NAME),
    ("IMMUTANT_APP_ID", "../shop", NAME),
    ("IMMUTANT_APP_ID", "a b", NAME),
    ("IMMUTANT_REDIS_URL", "redis://h:port/0", "host:port"),
    ("IMMUTANT_REDIS_URL", "redis://h:70000", "host:port"),
    ("IMMUTANT_REDIS_URL", "redis://h:6379/zero", "a database number"),
    ("IMMUTANT_REDIS_URL", "redis+sentinel://h1:26379,h2:x/mymaster", "sentinel host:port"),
    ("IMMUTANT_HOST", "", "a host name or IP address"),
    ("IMMUTANT_HOST", "   ", "a host name or IP address"),
    ("IMMUTANT_HOST", "local host", "a host name or IP address"),
    ("IMMUTANT_HOST", 127, "a host name or IP address"),
    ("IMMUTANT_ADVERTISE_HOST", "0.0.0.0", "the address other nodes"),
    ("IMMUTANT_ADVERTISE_HOST", "a b", "the address other nodes"),
    ("IMMUTANT_HTTP_PORT", 0, PORT),
    ("IMMUTANT_HTTP_PORT", -1, PORT),
    ("IMMUTANT_HTTP_PORT", 65536, PORT),
    ("IMMUTANT_HTTP_PORT", "http", PORT),
    ("IMMUTANT_HTTP_PORT", 80.5, PORT),
    ("IMMUTANT_HTTP_PORT", "80.0", PORT),
    ("IMMUTANT_HTTP_PORT", True, PORT),
    ("IMMUTANT_HTTP_PORT", None, PORT),
    ("IMMUTANT_PORT_OFFSET", -1, "an integer from 0 to 60000"),
    ("IMMUTANT_PORT_OFFSET", 60001, "an integer from 0 to 60000"),
    ("IMMUTANT_PORT_OFFSET", "ten", "an integer from 0 to 60000"),
    ("IMMUTANT_THREADS", 0, "an integer from 1 to 512"),
    ("IMMUTANT_THREADS", 513, "an integer from 1 to 512"),
    ("IMMUTANT_THREADS", "many", "an integer from 1 to 512"),
    ("IMMUTANT_THREADS", False, "an integer from 1 to 512"),
    ("IMMUTANT_HTTP_CONNECTION_LIMIT", 9, "an integer from 10 to 100000"),
    ("IMMUTANT_HTTP_CONNECTION_LIMIT", "lots", "an integer from 10 to 100000"),
    ("IMMUTANT_HTTP_IDLE_TIMEOUT", 0, "a number of seconds from 1 to 3600"),
    ("IMMUTANT_HTTP_IDLE_TIMEOUT", "nan", "a number of seconds from 1 to 3600"),
    ("IMMUTANT_HTTP_READ_TIMEOUT", "inf", "a number of seconds from 1 to 3600"),
    ("IMMUTANT_HTTP_MAX_BODY", 1023, "an integer >= 1024"),
    ("IMMUTANT_HTTP_MAX_BODY", "1G", "an integer >= 1024"),
    ("IMMUTANT_TRUSTED_PROXIES", "balancer.local", "IP addresses or networks"),
    ("IMMUTANT_TRUSTED_PROXIES", "10.0.0.0/33", "IP addresses or networks"),
    ("IMMUTANT_TRUSTED_PROXIES", 42, "IP addresses or networks"),
    ("IMMUTANT_LEASE_REPLICAS", -1, "an integer from 0 to 16"),
    ("IMMUTANT_LEASE_REPLICAS", "two", "an integer from 0 to 16"),
    ("IMMUTANT_FAILURE_TIMEOUT", 0.4, "a number of seconds from 0.5 to 300"),
    ("IMMUTANT_FAILURE_TIMEOUT", 301, "a number of seconds from 0.5 to 300"),
    ("IMMUTANT_FAILURE_TIMEOUT", "soon", "a number of seconds from 0.5 to 300"),
    ("IMMUTANT_FAILURE_TIMEOUT", "nan", "a number of seconds from 0.5 to 300"),
    ("IMMUTANT_FAILURE_TIMEOUT", "inf", "a number of seconds from 0.5 to 300"),
    ("IMMUTANT_FAILURE_TIMEOUT", True, "a number of seconds from 0.5 to 300"),
    ("IMMUTANT_FAILURE_TIMEOUT", None, "a number of seconds from 0.5 to 300"),
    ("IMMUTANT_SHUTDOWN_TIMEOUT", 0, "a number of seconds from 0.5 to 600"),
    ("IMMUTANT_SHUTDOWN_TIMEOUT", 601, "a number of seconds from 0.5 to 600"),
    ("IMMUTANT_SHUTDOWN_TIMEOUT", "later", "a number of seconds from 0.5 to 600"),
    ("IMMUTANT_PLUGINS", "not a path!", PLUGINS),
    ("IMMUTANT_PLUGINS", "good.module, bad-module", PLUGINS),
    ("IMMUTANT_PLUGINS", ["good.module", 3], PLUGINS),
    ("IMMUTANT_PLUGINS", 42, PLUGINS),
    ("IMMUTANT_PLUGINS", {"a": 1}, PLUGINS),
    ("IMMUTANT_PLUGINS", "pkg.mod:a:b", PLUGINS),
    ("IMMUTANT_PLUGINS", "pkg.mod:", PLUGINS),
    ("IMMUTANT_PLUGINS", "1st.plugin", PLUGINS),
]

#: (key, raw value, typed value it resolves to)
GOOD_VALUES: list[tuple[str, Any, Any]] = [
    ("IMMUTANT_HOME", "/srv/immutant", "/srv/immutant"),
    ("IMMUTANT_HOME", Path("/srv/immutant"), "/srv/immutant"),
    ("IMMUTANT_HOME", "~/imt", os.path.join(os.path.expanduser("~"), "imt")),
    ("IMMUTANT_HOME", "relative/dir", os.path.join(os.getcwd(), "relative", "dir")),
    ("IMMUTANT_CLUSTER", "prod-1.eu_west", "prod-1.eu_west"),
    ("IMMUTANT_CLUSTER", "x" * 64, "x" * 64),
    ("IMMUTANT_REDIS_URL", "redis://h:6379/0", "redis://h:6379/0"),
    ("IMMUTANT_REDIS_URL", "rediss://:secret@h:6380", "rediss://:secret@h:6380"),
    ("IMMUTANT_REDIS_URL", "unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("IMMUTANT_REDIS_URL", "redis+sentinel://h1:26379,h2:26379/mymaster", "redis+sentinel://h1:26379,h2:26379/mymaster"),
    ("IMMUTANT_REDIS_URL", "rediss+sentinel://h:26379/svc/2", "rediss+sentinel://h:26379/svc/2"),
    ("IMMUTANT_REDIS_URL", "", None),
    ("IMMUTANT_CLUSTERED", True, True),
    ("IMMUTANT_CLUSTERED", "yes", True),
    ("IMMUTANT_NODE_NAME", "node-1", "node-1"),
    ("IMMUTANT_NODE_NAME", "", None),
    ("IMMUTANT_APP_ID", "shop-2", "shop-2"),
    ("IMMUTANT_APP_ID", "", None),
    ("IMMUTANT_HOST", "0.0.0.0", "0.0.0.0"),
    ("IMMUTANT_HOST", "node1.example.com", "node1.example.com"),
    ("IMMUTANT_HOST", "::", "::"),
    ("IMMUTANT_ADVERTISE_HOST", " 10.0.0.5 ", "10.0.0.5"),
    ("IMMUTANT_ADVERTISE_HOST", "", None),
    ("IMMUTANT_HTTP_PORT", "9000", 9000),
    ("IMMUTANT_HTTP_PORT", " 80 ", 80),
    ("IMMUTANT_HTTP_PORT", 65535, 65535),
    ("IMMUTANT_PORT_OFFSET", 0, 0),
    ("IMMUTANT_THREADS", "512", 512),
    ("IMMUTANT_HTTP_CONNECTION_LIMIT", "5000", 5000),
    ("IMMUTANT_HTTP_IDLE_TIMEOUT", "2.5", 2.5),
    ("IMMUTANT_HTTP_READ_TIMEOUT", 120, 120.0),
    ("IMMUTANT_HTTP_MAX_BODY", "1048576", 1048576),
    ("IMMUTANT_TRUSTED_PROXIES", "127.0.0.1, 10.0.0.0/8, ::1",
     (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))),
    ("IMMUTANT_TRUSTED_PROXIES", "", ()),
    ("IMMUTANT_FAILURE_TIMEOUT", "1.5", 1.5),
    ("IMMUTANT_FAILURE_TIMEOUT", 1, 1.0),
    ("IMMUTANT_LEASE_REPLICAS", "1", 1),
    ("IMMUTANT_SHUTDOWN_TIMEOUT", 600, 600.0),
    ("IMMUTANT_PLUGINS", "a.b, c.d:plugin", ("a.b", "c.d:plugin")),
    ("IMMUTANT_PLUGINS", ["a.b"], ("a.b",)),
    ("IMMUTANT_PLUGINS", "", ()),
]


def _case_id(key: str, value: Any, _: Any) -> str:
    return f"{key.removeprefix('IMMUTANT_')}={value!r}"[:50]


def test_every_core_setting_has_bad_and_good_value_cases() -> None:
    # Given the core settings table, then each row is exercised below: a new row needs cases here.
    assert {key for key, _, _ in BAD_VALUES} == set(ROWS)
    assert {key for key, _, _ in GOOD_VALUES} == set(ROWS)


@pytest.mark.parametrize(("key", "value", "allowed"), BAD_VALUES, ids=[_case_id(*c) for c in BAD_VALUES])
def test_bad_value_in_app_config_is_refused_naming_key_value_and_what_is_allowed(
    key: str, value: Any, allowed: str
) -> None:
    # Given a bad value in app.config, when settings are resolved
    with pytest.raises(ImmutantConfigError) as caught:
        resolve(ROWS, config={key: value}, environ={})
    # Then one error names the key, the value given, where it came from and what is allowed
    message = str(caught.value)
    assert f"{key}={value!r}" in message
    assert "(from app.config)" in message
    assert f"expected {allowed}" in message


@pytest.mark.parametrize(
    ("layer", "source"), [("config", "app.config"), ("environ", "environment"), ("overrides", "option")]
)
def test_error_names_the_layer_the_bad_value_came_from(layer: str, source: str) -> None:
    # Given the same bad port given through each layer in turn
    layers: dict[str, dict[str, Any]] = {"config": {}, "environ": {}, "overrides": {}}
    layers[layer]["IMMUTANT_HTTP_PORT"] = "eighty"
    # When resolved, then the message says where the value came from
    with pytest.raises(ImmutantConfigError, match=rf"IMMUTANT_HTTP_PORT='eighty' \(from {source}\).*{PORT}"):
        resolve(ROWS, **layers)


@pytest.mark.parametrize(("key", "raw", "expected"), GOOD_VALUES, ids=[_case_id(*c) for c in GOOD_VALUES])
def test_good_value_is_converted_to_its_type(key: str, raw: Any, expected: Any) -> None:
    assert resolve(ROWS, config={key: raw}, environ={})[key] == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), ("TRUE", True), ("yes", True), (" on ", True),
     ("0", False), ("false", False), ("No", False), ("off", False), ("", False)],
)
def test_bool_strings_from_the_environment(text: str, expected: bool) -> None:
    # Given IMMUTANT_CLUSTERED set in the environment as a string, then it is read as a boolean
    assert resolve(ROWS, environ={"IMMUTANT_CLUSTERED": text})["IMMUTANT_CLUSTERED"] is expected


@pytest.mark.parametrize("text", ["maybe", "2", "y e s", "truthy", "-1"])
def test_other_strings_are_not_booleans(text: str) -> None:
    with pytest.raises(ImmutantConfigError, match=rf"IMMUTANT_CLUSTERED='{text}' \(from environment\).*{BOOL}"):
        resolve(ROWS, environ={"IMMUTANT_CLUSTERED": text})


def test_to_bool_refuses_values_that_are_only_truthy() -> None:
    values: tuple[Any, ...] = (1, 0, None, [], "maybe")
    for value in values:
        with pytest.raises(ValueError, match="a boolean"):
            to_bool(value)


# --- unknown keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("IMMUTANT_CLUSTR", "IMMUTANT_CLUSTER"),
        ("IMMUTANT_CLUSTERD", "IMMUTANT_CLUSTERED"),
        ("IMMUTANT_REDIS_ULR", "IMMUTANT_REDIS_URL"),
        ("IMMUTANT_HTTP_PROT", "IMMUTANT_HTTP_PORT"),
        ("IMMUTANT_PORT_OFSET", "IMMUTANT_PORT_OFFSET"),
        ("IMMUTANT_NODENAME", "IMMUTANT_NODE_NAME"),
        ("IMMUTANT_FAILURE_TIMOUT", "IMMUTANT_FAILURE_TIMEOUT"),
        ("IMMUTANT_PLUGIN", "IMMUTANT_PLUGINS"),
    ],
)
@pytest.mark.parametrize("layer", ["config", "overrides"])
def test_unknown_key_suggests_the_closest_setting(typo: str, meant: str, layer: str) -> None:
    # Given a misspelled key in app.config or among the options
    with pytest.raises(ImmutantConfigError) as caught:
        resolve(ROWS, environ={}, **{layer: {typo: "x"}})  # type: ignore[arg-type]
    # Then the error names it and what was probably meant
    assert str(caught.value) == f"{typo} is not a flask-immutant setting; did you mean {meant}?"


def test_unknown_key_with_nothing_close_points_to_the_table() -> None:
    # Given a key that resembles no setting (the shared prefix alone is not resemblance)
    with pytest.raises(ImmutantConfigError) as caught:
        resolve(ROWS, config={"IMMUTANT_BANANA": 1}, environ={})
    assert str(caught.value) == "IMMUTANT_BANANA is not a flask-immutant setting; see the settings table in the README"


def test_keys_without_the_prefix_belong_to_someone_else() -> None:
    settings = resolve(ROWS, config={"SECRET_KEY": "s", "SESSION_TYPE": "redis", "immutant_cluster": "x"}, environ={})
    assert settings["IMMUTANT_CLUSTER"] == "immutant"
    assert "SECRET_KEY" not in settings


def test_unknown_environment_variables_are_warnings_not_errors() -> None:
    # Given a misspelled variable in the (shared) environment
    environ = {"IMMUTANT_CLUSTR": "blue", "IMMUTANT_CLUSTER": "green", "PATH": "/bin"}
    # When resolved, then it is ignored, and reported as a warning with the probable meaning
    assert resolve(ROWS, environ=environ)["IMMUTANT_CLUSTER"] == "green"
    assert unknown_environment(ROWS, environ) == [
        "IMMUTANT_CLUSTR is not a flask-immutant setting; did you mean IMMUTANT_CLUSTER?"
    ]


# --- precedence ---------------------------------------------------------------------------

#: A node-level setting is ``env=True``; this one is app-only, so the environment cannot set it.
APP_ONLY = Setting("IMMUTANT_APP_ONLY", "default", identifier, "An app-level test setting.", "name")
ROWS_WITH_APP_ONLY = table([*CORE_SETTINGS, APP_ONLY])


@pytest.mark.parametrize(
    ("config", "environ", "overrides", "expected"),
    [
        ({}, {}, {}, 8),
        ({"IMMUTANT_THREADS": 2}, {}, {}, 2),
        ({"IMMUTANT_THREADS": 2}, {"IMMUTANT_THREADS": "3"}, {}, 3),
        ({"IMMUTANT_THREADS": 2}, {"IMMUTANT_THREADS": "3"}, {"IMMUTANT_THREADS": 4}, 4),
        ({}, {}, {"IMMUTANT_THREADS": 4}, 4),
        ({"IMMUTANT_THREADS": 2}, {}, {"IMMUTANT_THREADS": None}, 2),
        ({}, {"IMMUTANT_THREADS": "3"}, {"IMMUTANT_THREADS": None}, 3),
    ],
    ids=["default", "config", "env-over-config", "option-over-all", "option-only", "None-option-not-given",
         "None-option-keeps-env"],
)
def test_precedence_default_config_environment_options(
    config: dict[str, Any], environ: dict[str, str], overrides: dict[str, Any], expected: int
) -> None:
    assert resolve(ROWS, config, environ, overrides)["IMMUTANT_THREADS"] == expected


def test_environment_cannot_set_an_app_only_setting() -> None:
    # Given an env=False row set in both app.config and the environment
    settings = resolve(ROWS_WITH_APP_ONLY, {"IMMUTANT_APP_ONLY": "configured"}, {"IMMUTANT_APP_ONLY": "from-env"})
    # Then app.config wins, and the environment is not consulted at all
    assert settings["IMMUTANT_APP_ONLY"] == "configured"
    assert resolve(ROWS_WITH_APP_ONLY, {}, {"IMMUTANT_APP_ONLY": "bad value!"})["IMMUTANT_APP_ONLY"] == "default"


def test_only_the_winning_value_is_validated() -> None:
    # A bad value in app.config that the environment replaces is never used, so never refused.
    settings = resolve(ROWS, {"IMMUTANT_THREADS": "many"}, {"IMMUTANT_THREADS": "4"})
    assert settings["IMMUTANT_THREADS"] == 4


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Given no configuration at all and XDG_DATA_HOME set
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    settings = resolve(ROWS, environ={})
    # Then every row has its default and IMMUTANT_HOME is per user
    assert settings["IMMUTANT_HOME"] == str(tmp_path / "flask-immutant")
    assert {k: v for k, v in settings.items() if k != "IMMUTANT_HOME"} == {
        row.name: row.default for row in CORE_SETTINGS if row.name != "IMMUTANT_HOME"
    }


def test_default_home_without_xdg_data_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve(ROWS, environ={})["IMMUTANT_HOME"] == str(tmp_path / ".local" / "share" / "flask-immutant")


# --- Settings.environ() -------------------------------------------------------------------

CHANGED_EVERYWHERE: dict[str, Any] = {
    "IMMUTANT_HOME": "/srv/imt",
    "IMMUTANT_CLUSTER": "blue",
    "IMMUTANT_REDIS_URL": "redis+sentinel://:pw@h1:26379,h2:26379/mymaster/2",
    "IMMUTANT_CLUSTERED": True,
    "IMMUTANT_NODE_NAME": "n1",
    "IMMUTANT_HOST": "0.0.0.0",
    "IMMUTANT_ADVERTISE_HOST": "10.0.0.5",
    "IMMUTANT_HTTP_PORT": 9000,
    "IMMUTANT_PORT_OFFSET": 100,
    "IMMUTANT_THREADS": 3,
    "IMMUTANT_HTTP_CONNECTION_LIMIT": 50,
    "IMMUTANT_HTTP_IDLE_TIMEOUT": 7.5,
    "IMMUTANT_HTTP_READ_TIMEOUT": 9,
    "IMMUTANT_HTTP_MAX_BODY": 4096,
    "IMMUTANT_TRUSTED_PROXIES": ["127.0.0.1", "10.1.0.0/16"],
    "IMMUTANT_FAILURE_TIMEOUT": 1.25,
    "IMMUTANT_LEASE_REPLICAS": 1,
    "IMMUTANT_SHUTDOWN_TIMEOUT": 4,
    "IMMUTANT_PLUGINS": ["a.b", "c.d:plugin"],
    "IMMUTANT_APP_ID": "shop",
}


@pytest.mark.parametrize("config", [{}, CHANGED_EVERYWHERE], ids=["defaults", "every-row-changed"])
def test_environ_round_trips_through_resolve(config: dict[str, Any]) -> None:
    # Given settings resolved in a parent process
    assert set(CHANGED_EVERYWHERE) == set(ROWS)
    settings = resolve(ROWS, config, environ={})
    # When handed to a child process as environment variables
    environ = settings.environ()
    assert all(isinstance(value, str) for value in environ.values())
    # Then the child resolves the very same values from the environment alone (app-only rows,
    # such as IMMUTANT_APP_ID, are the app's own: a node's runtimes never inherit them)
    node_level = {name for name, row in ROWS.items() if row.env}
    child = resolve(ROWS, {}, environ)
    assert {k: child[k] for k in node_level} == {k: settings[k] for k in node_level}
    assert "IMMUTANT_APP_ID" not in environ


def test_environ_leaves_out_unset_and_app_only_settings() -> None:
    settings = resolve(ROWS_WITH_APP_ONLY, {"IMMUTANT_APP_ONLY": "configured"}, environ={})
    environ = settings.environ()
    assert "IMMUTANT_APP_ONLY" not in environ
    assert "IMMUTANT_REDIS_URL" not in environ
    assert "IMMUTANT_NODE_NAME" not in environ
    assert environ["IMMUTANT_CLUSTERED"] == "0"
    assert environ["IMMUTANT_PLUGINS"] == ""



def test_a_runtime_inherits_core_rows_and_only_the_feature_rows_its_node_was_given() -> None:
    # Given a node whose environment sets one feature row, whose app config sets another, a third at its default
    rows = table([*CORE_SETTINGS, *(Setting(f"IMMUTANT_FEATURE_{n}", 5, int_range(0), "x", "int", env=True)
                                    for n in ("ENV", "CONFIG", "DEFAULT"))])
    settings = resolve(rows, {"IMMUTANT_FEATURE_CONFIG": 1}, environ={"IMMUTANT_FEATURE_ENV": "7"})
    # When its runtimes' environment is made
    environ = settings.runtime_environ()
    # Then the operator's choice travels, and every core row (the node and its runtimes must agree)
    assert environ["IMMUTANT_FEATURE_ENV"] == "7"
    assert {name for name, row in ROWS.items() if row.env and settings[name] is not None} <= set(environ)
    # And neither a default nor the node's app config overrides the config of an app the runtime loads
    assert "IMMUTANT_FEATURE_DEFAULT" not in environ and "IMMUTANT_FEATURE_CONFIG" not in environ

# --- the table itself ---------------------------------------------------------------------


def test_settings_are_read_only() -> None:
    settings = resolve(ROWS, environ={})
    with pytest.raises(TypeError):
        settings["IMMUTANT_CLUSTER"] = "other"  # type: ignore[index]


def test_a_key_declared_twice_is_an_error() -> None:
    twice = Setting("IMMUTANT_CLUSTER", "x", identifier, "Declared again by a plugin.", "name")
    with pytest.raises(ImmutantConfigError, match="setting IMMUTANT_CLUSTER is declared twice"):
        table([*CORE_SETTINGS, twice])


def test_setting_names_carry_the_prefix() -> None:
    with pytest.raises(ValueError, match="setting names start with IMMUTANT_"):
        Setting("CLUSTER", "x", identifier, "No prefix.", "name")


def test_every_core_row_is_documented() -> None:
    for row in CORE_SETTINGS:
        assert row.help.strip().endswith("."), row.name
        assert row.type, row.name
