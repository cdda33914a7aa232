"""The public API (issue 12): the extension is the handle, one vocabulary, settings you can see,
docs/api.md against ``__all__``; the new shape and the old one both run on real nodes."""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

import flask_immutant
from flask_immutant import (
    ImmutantConfigError,
    ImmutantError,
    ImmutantExtension,
    NoAppError,
    caching,
    daemons,
    extension,
    get_state,
    jobs,
    messaging,
)
from flask_immutant import state as state_module
from flask_immutant.keys import Keys
from flask_immutant.messaging import MessagingError

from support import received, run_flask, wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE_FACTORY = ROOT / "example_factory"
OLD_STYLE = Path(__file__).resolve().parent / "apps" / "old_style"
API_MD = ROOT / "docs" / "api.md"
#: The modules whose ``__all__`` is the public surface docs/api.md lists.
PUBLIC_MODULES = ("flask_immutant", "flask_immutant.messaging", "flask_immutant.daemons", "flask_immutant.jobs",
                  "flask_immutant.caching", "flask_immutant.settings",
                  "flask_immutant.web", "flask_immutant.running")


@pytest.fixture
def fresh_process_state(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a process that has initialised no app yet (other tests did, in this one)."""
    monkeypatch.setattr(state_module, "_last_app", None)
    monkeypatch.setattr(state_module, "_pending", [])


def app_named(name: str, **config: Any) -> Flask:
    app = Flask(name)
    app.config.update(config)
    return app


# --- 1. the extension is the handle --------------------------------------------------------


@pytest.mark.usefixtures("clean_env", "fresh_process_state")
def test_declarations_on_the_extension_are_applied_to_every_app_it_serves() -> None:
    # Given an extension with declarations made before any app exists
    immutant = ImmutantExtension()

    @immutant.listen("/queue/api-declared")
    def received(body: Any) -> None: ...

    @immutant.daemon("api-daemon", singleton=False)
    def run(ctx: Any) -> None: ...

    @immutant.job("api-job", every="1m")
    def report(fire: Any) -> None: ...

    # Then the decorators return the functions themselves, and nothing is applied yet
    assert (received.__name__, run.__name__, report.__name__) == ("received", "run", "report")
    # When two apps are initialised (as tests and multi-app processes do)
    first, second = app_named("first"), app_named("second")
    immutant.init_app(first)
    immutant.init_app(second)
    # Then each app has every declaration, and the extension keeps no app alive
    for app in (first, second):
        state = get_state(app)
        assert "/queue/api-declared" in messaging.messaging_for(app).destinations
        assert [lst.destination.name for lst in messaging.messaging_for(app).listeners] == ["/queue/api-declared"]
        assert list(state.features["daemons"].specs) == ["api-daemon"]
        assert list(state.features["jobs"].specs) == ["api-job"]
    assert not any(isinstance(value, Flask) for value in vars(immutant).values())
    # And a declaration made after init_app reaches the apps already served
    immutant.declare("/topic/api-late")
    assert all("/topic/api-late" in messaging.messaging_for(app).destinations for app in (first, second))


@pytest.mark.usefixtures("clean_env", "fresh_process_state")
def test_a_module_level_declaration_without_an_app_waits_for_the_next_app() -> None:
    # Given module-level code with no app yet (an app factory's module): on the old code this
    # raised "working outside of application context"
    daemons.start("api-early", lambda: None)
    messaging.listen("/queue/api-early", lambda body: None)
    jobs.schedule("api-early-job", lambda: None, every="1m")
    # When the factory initialises an app, then another one
    first, second = app_named("first"), app_named("second")
    ImmutantExtension(first)
    ImmutantExtension(second)
    # Then the declarations went to the next app initialised, once
    assert list(get_state(first).features["daemons"].specs) == ["api-early"]
    assert list(get_state(first).features["jobs"].specs) == ["api-early-job"]
    assert "/queue/api-early" in messaging.messaging_for(first).destinations
    assert "daemons" not in get_state(second).features
    # And with an app initialised, a declaration without app= and outside a context goes to it
    daemons.start("api-later", lambda: None)
    assert list(get_state(second).features["daemons"].specs) == ["api-later"]


@pytest.mark.usefixtures("clean_env", "fresh_process_state")
def test_actions_need_an_app_and_say_so_in_one_line() -> None:
    # Given no app context at all, an action has nothing to act on: a NoAppError (a RuntimeError
    # too, as Flask's own) that says what to do
    for action in (lambda: messaging.publish("/queue/x", 1), lambda: caching.cache("x"),
                   lambda: ImmutantExtension().publish("/queue/x", 1)):
        with pytest.raises(NoAppError, match="pass app="):
            action()
    assert issubclass(NoAppError, RuntimeError)


def test_a_function_gets_its_context_only_if_it_takes_one() -> None:
    assert extension.with_context(lambda ctx: ("got", ctx), lambda: "context")() == ("got", "context")
    assert extension.with_context(lambda: "none", lambda: "context")() == "none"
    assert extension.with_context(lambda timeout=1: timeout, lambda: "context")() == 1


# --- 2. one vocabulary ---------------------------------------------------------------------


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize(("flag", "declare"), [
    ("IMMUTANT_DAEMONS", lambda app: daemons.declare("d", lambda: None, app=app)),
    ("IMMUTANT_JOBS", lambda app: jobs.schedule("j", lambda: None, every="1m", app=app)),
    ("IMMUTANT_MESSAGING", lambda app: messaging.listen("/queue/q", lambda body: None, app=app)),
    ("IMMUTANT_CACHE", lambda app: caching.cache("c", app=app)),
])
def test_a_switched_off_feature_is_an_error_naming_its_flag_at_declaration(flag: str, declare: Any) -> None:
    # Given an app with the feature switched off (on the old code, daemons and jobs were
    # accepted and silently never ran, and messaging raised a MessagingError only)
    app = app_named("off", **{flag: False})
    ImmutantExtension(app)
    # When it is used, then the error names the flag to set
    with pytest.raises(ImmutantConfigError, match=rf"set {flag} = True"):
        declare(app)


@pytest.mark.usefixtures("clean_env", "fresh_process_state")
def test_a_switched_off_feature_fails_init_app_for_the_extensions_declarations() -> None:
    immutant = ImmutantExtension()

    @immutant.daemon("needs-daemons")
    def run(ctx: Any) -> None: ...

    with pytest.raises(ImmutantConfigError, match="set IMMUTANT_DAEMONS = True"):
        immutant.init_app(app_named("off", IMMUTANT_DAEMONS=False))


@pytest.mark.usefixtures("clean_env")
def test_messaging_switched_off_is_still_a_messaging_error_for_old_code() -> None:
    app = app_named("off", IMMUTANT_MESSAGING=False)
    ImmutantExtension(app)
    with pytest.raises(MessagingError, match="IMMUTANT_MESSAGING"):
        messaging.publish("/queue/x", 1, app=app)


def test_every_public_exception_is_an_immutant_error() -> None:
    # Walk every module: a public exception class outside the hierarchy fails here (on the old
    # code: CacheContentionError and HAProxyError)
    outside = []
    for info in pkgutil.walk_packages(flask_immutant.__path__, "flask_immutant."):
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (inspect.isclass(value) and issubclass(value, BaseException) and not name.startswith("_")
                    and value.__module__.startswith("flask_immutant") and not issubclass(value, ImmutantError)):
                outside.append(f"{value.__module__}.{name}")
    assert outside == []


@pytest.mark.usefixtures("clean_env")
def test_a_listener_on_an_undeclared_destination_declares_it() -> None:
    app = app_named("undeclared")
    ImmutantExtension(app)
    messaging.listen("/topic/never-declared", lambda body: None, app=app)
    assert messaging.messaging_for(app).destinations["/topic/never-declared"].kind == "topic"


def test_old_names_are_aliases_of_the_new_ones() -> None:
    assert messaging.start is messaging.declare
    assert daemons.start is daemons.declare
    assert jobs.stop is jobs.unschedule
    assert flask_immutant.current() is None  # nothing runs on the test's thread


# --- 4. settings you can see ----------------------------------------------------------------


def test_config_prints_every_setting_and_where_it_came_from(node_env: dict[str, str]) -> None:
    # Given the factory app (its config sets IMMUTANT_CACHE), an environment variable with a
    # password in it, a secret, and a command-line override
    env = {**node_env, "IMMUTANT_REDIS_URL": "redis://:hunter2@127.0.0.1:1/0",
           "IMMUTANT_SECRET": "s3cret-s3cret-s3cret", "IMMUTANT_FAILURE_TIMEOUT": "3"}
    result = run_flask(["--app", "counter_app:create_app()", "immutant", "config", "--json",
                        "--set", "IMMUTANT_FAILURE_TIMEOUT=4"], env, cwd=EXAMPLE_FACTORY)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    # Then every setting row is there, with its effective value and its source
    rows = flask_immutant.ImmutantState.build(environ={}).settings.rows
    assert set(document) == set(rows)
    assert document["IMMUTANT_CACHE"] == {"value": True, "source": "app.config"}
    assert document["IMMUTANT_THREADS"] == {"value": 8, "source": "default"}
    assert document["IMMUTANT_CLUSTER"] == {"value": env["IMMUTANT_CLUSTER"], "source": "environment"}
    assert document["IMMUTANT_FAILURE_TIMEOUT"] == {"value": 4.0, "source": "command line"}
    # And no secret is printed, in either form
    assert document["IMMUTANT_SECRET"]["value"] == "********"
    assert document["IMMUTANT_REDIS_URL"]["value"] == "redis://:********@127.0.0.1:1/0"
    text = run_flask(["--app", "counter_app:create_app()", "immutant", "config"], env, cwd=EXAMPLE_FACTORY)
    assert "hunter2" not in text.stdout + result.stdout and "s3cret" not in text.stdout + result.stdout
    assert re.search(r"^IMMUTANT_CACHE\s+True\s+\(app\.config\)$", text.stdout, re.M), text.stdout


@pytest.mark.parametrize(("args", "error"), [
    (["--set", "IMMUTANT_THREADS"], "expected IMMUTANT_KEY=VALUE"),
    (["--set", "IMMUTANT_THREADZ=3"], "did you mean IMMUTANT_THREADS?"),
    (["--set", "IMMUTANT_THREADS=0"], "IMMUTANT_THREADS='0' (from option) is not allowed"),
])
def test_config_mistakes_are_one_error_line(node_env: dict[str, str], tmp_path: Path, args: list[str],
                                            error: str) -> None:
    result = run_flask(["immutant", "config", *args], node_env, cwd=tmp_path)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: ") and error in line


# --- 5. docs/api.md lists every public name --------------------------------------------------


def documented_names() -> dict[str, set[str]]:
    """``{module: names}`` from docs/api.md's ``## `module` `` sections and ``- `name` `` lines."""
    found: dict[str, set[str]] = {}
    module = None
    for line in API_MD.read_text(encoding="utf-8").splitlines():
        if heading := re.match(r"^## `([\w.]+)`", line):
            module = heading.group(1)
            found[module] = set()
        elif module and (item := re.match(r"^- `([\w.]+)`[^:]*: \S", line)):
            found[module].add(item.group(1))
    return found


def test_api_md_lists_every_public_name_with_one_line_each() -> None:
    documented = documented_names()
    assert set(documented) == set(PUBLIC_MODULES)
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        assert set(module.__all__) == documented[module_name], module_name
        for name in module.__all__:
            assert hasattr(module, name), f"{module_name}.__all__ names {name}, which it lacks"


#: Internals that left the public surface (issue 12 point 3), with their private homes.
INTERNALS = {
    "flask_immutant.caching": {"MODES": "flask_immutant.caching.base",
                               "CircuitBreaker": "flask_immutant.caching.breaker",
                               "Serializer": "flask_immutant.caching.serialization",
                               "registry": "flask_immutant.caching.caches"},
    "flask_immutant.jobs": {"JobSpec": "flask_immutant.jobs.spec"},
    "flask_immutant.messaging": {"Messaging": "flask_immutant.messaging.core", "messaging_for": None},
}


def test_internals_are_out_of_the_public_surface_and_old_imports_still_work() -> None:
    documented = documented_names()
    for module_name, names in INTERNALS.items():
        module = importlib.import_module(module_name)
        for name, home in names.items():
            # Then no __all__ and no API section lists the internal
            assert name not in module.__all__ and name not in documented[module_name], f"{module_name}.{name}"
            assert name not in flask_immutant.__all__
            if home is None:
                continue
            # And the old import still works, warns, and names the private home
            with pytest.warns(DeprecationWarning, match=rf"import it from {re.escape(home)}"):
                value = getattr(module, name)
            private = importlib.import_module(home)
            assert value is getattr(private, "registry_for" if name == "registry" else name)
    # And a name that never existed is still an AttributeError
    with pytest.raises(AttributeError, match="no attribute 'nonesuch'"):
        _ = caching.nonesuch


def test_scheduling_is_an_old_name_of_jobs_that_still_imports() -> None:
    # Given code written before jobs and scheduling became one module
    from flask_immutant import scheduling

    # Then each name it uses is the jobs one, with a warning naming the new module
    for name in jobs.__all__:
        with pytest.warns(DeprecationWarning, match=rf"flask_immutant.jobs: use jobs.{name}"):
            assert getattr(scheduling, name) is getattr(jobs, name)
    # And the internal it reached through it still warns with its private home
    with pytest.warns(DeprecationWarning, match=r"import it from flask_immutant\.jobs\.spec"):
        assert scheduling.JobSpec is importlib.import_module("flask_immutant.jobs.spec").JobSpec
    # And schedules stored by older versions name a function that still resolves
    with pytest.warns(DeprecationWarning):
        assert scheduling.fire is jobs.fire


# --- the new shape and the old one, on real nodes -------------------------------------------



def test_the_factory_example_in_a_two_node_cluster(start_node, node_env, store_client, cluster_name):
    # Given two nodes serving the factory example, started as its README says
    keys = Keys(cluster_name)
    app = "counter_app:create_app()"
    env = {"EXAMPLE_REPORT_EVERY": "1s"}
    nodes = {"first": start_node("--clustered", app=app, cwd=EXAMPLE_FACTORY, env=env),
             "second": start_node("--clustered", "--port-offset", "100", app=app, cwd=EXAMPLE_FACTORY, env=env)}
    names = {key: node.wait_for(r"flask-immutant node (\S+):").group(1) for key, node in nodes.items()}
    # Then the singleton daemon runs on one of them, and both receive its numbers (the listener)
    holder = json.loads(wait_until(lambda: store_client.get(keys.lease("daemon:ticker")), timeout=20))["node"]
    for node in nodes.values():
        wait_until(lambda node=node: received(node), timeout=20)
    # And the job reports, on one node per due time, the count it reads from the cluster cache
    report = wait_until(lambda: next((line for node in nodes.values() for line in list(node.lines)
                                      if "report:" in line and "None ticks" not in line), None), timeout=20)
    assert re.search(r"report: \d+ ticks \(due \d+, on \S+\)", report)
    # And the page reads the same cache on either node
    base = int(node_env["IMMUTANT_HTTP_PORT"])
    pages = [requests.get(f"http://127.0.0.1:{base + offset}/", timeout=5).json() for offset in (0, 100)]
    assert {page["node"] for page in pages} == set(names.values())
    assert all(isinstance(page["count"], int) for page in pages)

    # When the node running the daemon is killed (SIGKILL)
    victim = next(key for key, name in names.items() if name == holder)
    survivor = "second" if victim == "first" else "first"
    before = max(received(nodes["first"]) + received(nodes["second"]))
    seen = len(received(nodes[survivor]))
    nodes[victim].signal(signal.SIGKILL)
    nodes[victim].wait()
    # Then the daemon runs on the survivor, counting on from the cluster cache
    wait_until(lambda: (h := store_client.get(keys.lease("daemon:ticker"))) and
               json.loads(h)["node"] == names[survivor], timeout=15)
    wait_until(lambda: max(received(nodes[survivor])) > before + 1, timeout=20)
    after = received(nodes[survivor])[seen:]
    assert 1 not in after  # a fresh count would start again at 1


def test_the_factory_example_deploys_to_a_running_node(start_node, node_env, tmp_path):
    # Given a node serving nothing yet (its app runtimes inherit its environment)
    node = start_node("--clustered", cwd=tmp_path, env={"EXAMPLE_REPORT_EVERY": "1s"})
    node.wait_for("joined cluster")
    # When the factory example is deployed as its README says
    result = run_flask(["--app", "counter_app:create_app()", "immutant", "deploy"], node_env, cwd=EXAMPLE_FACTORY)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "deployment example_factory v1 registered: counter_app:create_app()" in result.stdout
    # Then the node runs its listener, daemon and job
    node.wait_for("deployed example_factory v1")
    wait_until(lambda: len(received(node)) >= 2, timeout=20)
    node.wait_for(r"report: \d+ ticks", timeout=20)


def test_old_style_code_runs_unchanged(start_node, store_client, cluster_name):
    # Given the example app as it was written before this API (ImmutantExtension(app), module
    # functions with app=), served by a node
    keys = Keys(cluster_name)
    node = start_node("--clustered", app="app", cwd=OLD_STYLE)
    # Then its listener, daemon, cache and job all work
    wait_until(lambda: store_client.get(keys.lease("daemon:counter")), timeout=20)
    wait_until(lambda: len(received(node)) >= 2, timeout=20)
    assert received(node)[:2] == [1, 2]
    # And every spelling of "what am I running for" agrees with the one current()
    for where, kind in (("listener", "Message"), ("job", "Fire"), ("daemon", "DaemonContext")):
        node.wait_for(rf"context {where} {kind} same=True", timeout=20)
    assert "same=False" not in node.output
    # And the old stop function is called on a graceful stop
    node.signal(signal.SIGTERM)
    node.wait()
    assert "counter stopped" in node.output
