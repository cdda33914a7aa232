"""A command loads only what it runs: the CLI group, the plugin manager and an app's import leave
the features' heavy libraries unimported (they load in a runtime, or in the command that uses
them). Checked in a fresh interpreter (``python -c``), since this test process has imported
everything already. docs/design.md, "Lazy imports: a command loads only what it runs"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

#: Libraries a feature needs only when it runs (a runtime, a node, or its own command).
FEATURE_LIBRARIES = ("dramatiq", "croniter", "rq_scheduler", "rq", "cachelib", "waitress", "aiohttp",
                     "prometheus_client", "opentelemetry", "tarfile", "msgpack")

APP = """
from flask import Flask
from flask_immutant import ImmutantExtension
app = Flask(__name__)
ImmutantExtension(app)
"""


#: The features' own store code, which a command that does not show or run them never needs.
FEATURE_MODULES = ("flask_immutant.contexts.registry", "flask_immutant.daemons.registry",
                   "flask_immutant.daemons.runner", "flask_immutant.jobs.store", "flask_immutant.messaging.core",
                   "flask_immutant.metrics.process", "flask_immutant.metrics.cluster", "flask_immutant.tracing.spans")


#: What ``flask immutant status`` reads the cluster without: the writers of events, a node's
#: identity, the features' runtime parts, and the job store while no app has jobs; a runtime's
#: deployment (read by ``init_app``), the process calls (``ctypes``) that only starting or
#: stopping the embedded store makes, and the Lua scripts' loader (status runs no script).
NOT_FOR_STATUS = ("flask_immutant.events.log", "flask_immutant.events.kinds", "flask_immutant.cluster.identity",
                  "flask_immutant.cluster.lease", "flask_immutant.jobs.store", "flask_immutant.caching.breaker",
                  "flask_immutant.metrics.definitions", "urllib.request", "flask_immutant.server.environ",
                  "flask_immutant.portable", "ctypes", "importlib.readers")


def modules_after(code: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> set[str]:
    """Names of the modules a fresh interpreter has loaded after running ``code``."""
    probe = code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=cwd,
                            env=env)
    return set(json.loads(result.stdout.splitlines()[-1]))


def loaded_after(code: str, cwd: Path | None = None) -> set[str]:
    """Top-level names (``redis``, not ``redis.client``) of the modules loaded after ``code``."""
    return {name.split(".")[0] for name in modules_after(code, cwd)}


def added_to_redis(loaded: set[str]) -> set[str]:
    """``loaded`` less what ``import redis`` loads by itself (redis-py 8 imports OpenTelemetry's
    SDK when it is installed): the commands need redis-py, but nothing more of ours."""
    return loaded - (loaded_after("import redis") - {"redis"}) if "redis" in loaded else loaded


def test_importing_the_cli_group_loads_no_store_client_and_no_feature_library() -> None:
    # Flask imports the group for every `flask` command (`flask run`, `flask routes`...)
    loaded = loaded_after("import flask_immutant.cli")
    assert "flask_immutant" in loaded
    assert loaded.isdisjoint({*FEATURE_LIBRARIES, "redis"}), loaded & {*FEATURE_LIBRARIES, "redis"}


def test_listing_the_commands_loads_no_feature_library() -> None:
    # `flask immutant ...` registers every plugin's commands: the plugin modules stay light
    modules = modules_after("from flask_immutant.cli import cli\n"
                            "from flask_immutant.plugins import make_plugin_manager\n"
                            "cli._register()\n"
                            "make_plugin_manager()")
    loaded = added_to_redis({name.split(".")[0] for name in modules})
    assert "pluggy" in loaded and "flask_immutant.daemons.plugin" in modules
    assert loaded.isdisjoint(FEATURE_LIBRARIES), loaded & set(FEATURE_LIBRARIES)
    assert modules.isdisjoint(FEATURE_MODULES), modules & set(FEATURE_MODULES)


def test_importing_an_app_loads_no_feature_library(tmp_path: Path) -> None:
    # What `deploy` and every command with an app pay: init_app registers, it does not start features
    (tmp_path / "lazyapp.py").write_text(APP, encoding="utf-8")
    loaded = added_to_redis(loaded_after("import lazyapp", cwd=tmp_path))
    assert "flask_immutant" in loaded
    assert loaded.isdisjoint(FEATURE_LIBRARIES), loaded & set(FEATURE_LIBRARIES)


def test_status_loads_only_what_it_shows(node_env: dict[str, str], tmp_path: Path) -> None:
    # A real `flask immutant status` against the session's store, its modules listed as it exits
    modules = modules_after("import atexit, json, sys\n"
                            "atexit.register(lambda: print(json.dumps(sorted(sys.modules))))\n"
                            "sys.argv = ['flask', 'immutant', 'status']\n"
                            "from flask.cli import main\n"
                            "main()", cwd=tmp_path, env=node_env)
    assert {"flask_immutant.cluster.membership", "flask_immutant.contexts.registry"} <= modules  # it did read
    loaded = added_to_redis({name.split(".")[0] for name in modules})
    assert loaded.isdisjoint(FEATURE_LIBRARIES), loaded & set(FEATURE_LIBRARIES)
    ours = modules - modules_after("import redis")  # with OpenTelemetry's SDK, redis-py loads ctypes itself (then
    # only flask_immutant.portable guards ours)
    assert ours.isdisjoint(NOT_FOR_STATUS), ours & set(NOT_FOR_STATUS)


def test_lazy_packages_list_and_serve_every_public_name_and_submodule() -> None:
    # In a fresh interpreter: dir() lists what is not imported yet, and a submodule (events.log)
    # is an attribute as it was when the package's __init__ imported it
    code = """
import flask_immutant.cluster as cluster, flask_immutant.events as events, flask_immutant.web as web
assert {"emit", "KINDS"} <= set(dir(events)) and "NodeIdentity" in dir(cluster), dir(events)
assert "ImmutantSessionInterface" in dir(web)
assert events.log.emit is events.emit and cluster.identity.NodeIdentity is cluster.NodeIdentity
try:
    events.nosuch
except AttributeError:
    pass
else:
    raise SystemExit("events.nosuch did not raise")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
