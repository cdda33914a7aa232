"""The HAProxy reconciler (`flask immutant balancer --haproxy SOCKET`) against a real HAProxy:
the generated configuration, add/state/weight/address/del, and a full resync after a restart."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import requests
from balancer_support import Backend, haproxy_binary, running_haproxy, start_reconciler

from flask_immutant.balancer.haproxy import Reconciler, backend_name, render_config
from flask_immutant.contexts import registry
from flask_immutant.contexts.registry import Server
from flask_immutant.keys import Keys

from support import run_flask, wait_until


def test_backend_names_are_unique_and_valid():
    names = [backend_name(p) for p in ("/", "/shop", "/a/b", "/a_b", "/a.b-c")]
    assert names == ["ctx", "ctx_shop", "ctx_a_b", "ctx_a__b", "ctx_a.b-c"]


def test_the_generated_configuration_is_valid_haproxy_2_6(tmp_path: Path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(render_config(["/", "/shop", "/shop/admin"], socket_path=str(tmp_path / "s.sock")))
    result = subprocess.run([haproxy_binary(), "-c", "-f", str(config)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    text = config.read_text()
    # longest context path first, so /shop/admin is not taken by /shop
    assert text.index("use_backend ctx_shop_admin") < text.index("use_backend ctx_shop ")
    assert "cookie IMMUTANT_ROUTE insert indirect nocache" in text and "balance roundrobin" in text


def test_print_haproxy_config_covers_the_known_contexts(node_env, store_client, cluster_name, tmp_path: Path):
    registry.publish(store_client, Keys(cluster_name),
                     registry.Context("a", "/shop", "shop", "127.0.0.1", 1, 100, 1, 0.0), 30)
    out = tmp_path / "h.cfg"
    result = run_flask(["immutant", "balancer", "--print-haproxy-config", "--context", "/later", "--bind",
                        "127.0.0.1:9000", "--socket", "/run/h.sock", "-o", str(out)], node_env)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "backend ctx_shop" in text and "backend ctx_later" in text and "backend ctx\n" in text
    assert "bind 127.0.0.1:9000" in text and "stats socket /run/h.sock" in text


def test_the_reconciler_makes_haproxy_match_the_table(tmp_path: Path, cluster_name):
    with running_haproxy(tmp_path, ["/"], cluster_name) as haproxy:
        reconciler = Reconciler(haproxy.api)
        # Given two contexts, one draining
        reconciler.sync({"/": [Server("a", "127.0.0.1", 9001, 100, "ENABLED"),
                               Server("b", "127.0.0.1", 9002, 40, "DISABLED")]})
        servers = haproxy.servers()
        assert {n: (s.port, s.state, s.weight) for n, s in servers.items()} == {
            "a": (9001, "ready", 100), "b": (9002, "drain", 40)}
        # A pass with nothing changed does nothing
        assert reconciler.sync({"/": [Server("a", "127.0.0.1", 9001, 100, "ENABLED"),
                                      Server("b", "127.0.0.1", 9002, 40, "DISABLED")]}) == []
        # When a is stopped, b enabled on a new port with another weight, then a leaves
        reconciler.sync({"/": [Server("a", "127.0.0.1", 9001, 100, "STOPPED"),
                               Server("b", "127.0.0.1", 9003, 70, "ENABLED")]})
        assert {n: (s.port, s.state, s.weight) for n, s in haproxy.servers().items()} == {
            "a": (9001, "maint", 100), "b": (9003, "ready", 70)}
        done = reconciler.sync({"/": [Server("b", "127.0.0.1", 9003, 70, "ENABLED")]})
        assert "del server ctx/a" in done
        assert set(haproxy.servers()) == {"b"}
        # And a context path without a backend is skipped (with a warning), not an error
        reconciler.sync({"/": [Server("b", "127.0.0.1", 9003, 70, "ENABLED")],
                         "/new": [Server("b", "127.0.0.1", 9004, 70, "ENABLED")]})


def test_the_reconciler_process_resyncs_a_restarted_haproxy(node_env, store_client, cluster_name, tmp_path: Path):
    keys = Keys(cluster_name)
    backend = Backend("a")
    try:
        with running_haproxy(tmp_path, ["/"], cluster_name) as haproxy:
            reconciler = start_reconciler(node_env, tmp_path, haproxy.socket)
            try:
                # Given a context published while the reconciler runs
                registry.publish(store_client, keys, registry.Context("a", "/", "app", "127.0.0.1", backend.port,
                                                                      100, os.getpid(), time.time()), 60)
                registry.announce(store_client, keys, "a|/")
                wait_until(lambda: "a" in haproxy.servers(), timeout=5)
                wait_until(lambda: requests.get(haproxy.url + "/who", timeout=5).status_code == 200, timeout=5)
                assert requests.get(haproxy.url + "/who", timeout=5).json()["node"] == "a"
                # When HAProxy restarts (dynamic servers are gone)
                haproxy.stop()
                haproxy.start()
                assert haproxy.servers() == {}
                # Then the reconciler adds them back and traffic flows again
                wait_until(lambda: "a" in haproxy.servers(), timeout=5)
                wait_until(lambda: requests.get(haproxy.url + "/who", timeout=5).status_code == 200, timeout=5)
                reconciler.wait_for("HAProxy restarted")
                # And a context that leaves is removed
                registry.withdraw(store_client, keys, "a", "/", os.getpid())
                wait_until(lambda: haproxy.servers() == {}, timeout=5)
            finally:
                reconciler.cleanup()
    finally:
        backend.close()


def test_the_reconciler_says_clearly_when_there_is_no_socket(node_env, tmp_path: Path):
    result = run_flask(["immutant", "balancer", "--haproxy", str(tmp_path / "nope.sock")], node_env)
    assert result.returncode == 1 and "no such socket" in result.stderr


# --- no configuration injection (issue 10, point 8) ---

INJECTED = "/x\n    http-request redirect location http://evil.example"


def test_a_context_path_with_a_newline_is_refused_by_deploy(node_env, tmp_path: Path):
    (tmp_path / "app.py").write_text("from flask import Flask\napp = Flask(__name__)\n")
    result = run_flask(["immutant", "deploy", "--context-path", INJECTED, "--wait", "1"], node_env, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "--context-path" in line


def test_a_context_written_into_the_store_never_reaches_the_haproxy_configuration(node_env, store_client,
                                                                                  cluster_name, tmp_path: Path):
    keys = Keys(cluster_name)
    # Given a good context, and contexts a store writer added with a newline in the path or the host
    registry.publish(store_client, keys, registry.Context("a", "/shop", "shop", "127.0.0.1", 1, 100, 1, 0.0), 30)
    for node, path, host in (("b", INJECTED, "127.0.0.1"), ("c", "/ok", "127.0.0.1\n    server evil 10.6.6.6:80")):
        key = keys.context(node, path)
        store_client.set(key, json.dumps({"node": node, "context_path": path, "app": "x", "host": host, "port": 1,
                                          "load": 100, "pid": 1, "since": 0.0}), ex=30)
        store_client.sadd(keys.contexts, key)
    # When the configuration is generated
    out = tmp_path / "h.cfg"
    result = run_flask(["immutant", "balancer", "--print-haproxy-config", "--socket", str(tmp_path / "s.sock"),
                        "-o", str(out)], node_env)
    assert result.returncode == 0, result.stderr
    # Then it holds the good context only, and HAProxy accepts it
    text = out.read_text()
    assert "backend ctx_shop" in text and "evil" not in text and "backend ctx_ok" not in text
    check = subprocess.run([haproxy_binary(), "-c", "-f", str(out)], capture_output=True, text=True, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    # And an unsafe extra path given on the command line is one error line, no file written
    bad = run_flask(["immutant", "balancer", "--print-haproxy-config", "--context", INJECTED, "-o",
                     str(tmp_path / "bad.cfg")], node_env)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr and "context path" in bad.stderr
    assert not (tmp_path / "bad.cfg").exists()


def test_the_reconciler_sends_no_injected_runtime_api_command(tmp_path: Path, cluster_name, store_client):
    keys = Keys(cluster_name)
    backend = Backend("a")
    try:
        with running_haproxy(tmp_path, ["/"], cluster_name) as haproxy:
            # Given a good context and one whose node name carries a second runtime-API command
            registry.publish(store_client, keys, registry.Context("a", "/", "app", "127.0.0.1", backend.port, 100,
                                                                  os.getpid(), time.time()), 30)
            evil = "b;disable frontend immutant"
            key = keys.context(evil, "/")
            store_client.set(key, json.dumps({"node": evil, "context_path": "/", "app": "x", "host": "127.0.0.1",
                                              "port": backend.port, "load": 100, "pid": 1, "since": 0.0}), ex=30)
            store_client.sadd(keys.contexts, key)
            reconciler = Reconciler(haproxy.api)
            # When the reconciler syncs HAProxy with the store's table, and with a table built by hand
            reconciler.sync(registry.routing_table(store_client, keys))
            done = reconciler.sync({"/": [Server("a", "127.0.0.1", backend.port, 100, "ENABLED"),
                                          Server(evil, "127.0.0.1", backend.port, 100, "ENABLED"),
                                          Server("c", "127.0.0.1;shutdown frontend immutant", 1, 100, "ENABLED")]})
            # Then only the good server is in HAProxy, no command carried a ';', and the frontend still serves
            assert set(haproxy.servers()) == {"a"}
            assert not any(";" in command for command in done)
            wait_until(lambda: requests.get(haproxy.url + "/who", timeout=5).status_code == 200, timeout=5)
    finally:
        backend.close()


def test_a_load_factor_out_of_range_in_the_store_never_keeps_other_servers_out_of_haproxy(
        tmp_path: Path, cluster_name, store_client):
    keys = Keys(cluster_name)
    backend = Backend("z")
    try:
        with running_haproxy(tmp_path, ["/"], cluster_name) as haproxy:
            # Given a context a store writer published with a load factor HAProxy cannot take as a
            # weight (its servers sort before the good one), and a good context
            for node, load in (("a", 1000), ("b", -5)):
                key = keys.context(node, "/")
                store_client.set(key, json.dumps({"node": node, "context_path": "/", "app": "x", "host": "127.0.0.1",
                                                  "port": backend.port, "load": load, "pid": 1, "since": 0.0}), ex=30)
                store_client.sadd(keys.contexts, key)
            registry.publish(store_client, keys, registry.Context("z", "/", "app", "127.0.0.1", backend.port, 100,
                                                                  os.getpid(), time.time()), 30)
            # When the reconciler syncs HAProxy with the store's table
            Reconciler(haproxy.api).sync(registry.routing_table(store_client, keys))
            # Then the good server is in HAProxy and serves
            assert "z" in haproxy.servers()
            wait_until(lambda: requests.get(haproxy.url + "/who", timeout=5).status_code == 200, timeout=5)
    finally:
        backend.close()


def test_the_generated_configuration_never_forwards_the_reserved_prefix_however_spelt(
        start_node, node_env, cluster_name, tmp_path: Path):
    from balancer_support import HAProxyProcess
    from test_metrics import SPELLINGS, _public_address, raw_get, start_metrics_node

    # Given a node with metrics on behind HAProxy with the generated configuration, bound to every
    # address, and a client that is not loopback (the node would see HAProxy's loopback address)
    start_metrics_node(start_node, tmp_path)
    haproxy = HAProxyProcess(tmp_path, ["/"], cluster_name)
    haproxy.config.write_text(render_config(["/"], bind=f"0.0.0.0:{haproxy.port}", socket_path=haproxy.socket,
                                            cookie_key=cluster_name))
    haproxy.start()
    reconciler = start_reconciler(node_env, tmp_path, haproxy.socket)
    public = f"http://{_public_address()}:{haproxy.port}"
    try:
        wait_until(lambda: raw_get(public, "/")[0] == 200, 30)
        # When the client asks for the metrics path, spelt every way
        for target in SPELLINGS:
            status, body = raw_get(public, target)
            # Then HAProxy denies it (404) and never asks the node
            assert status == 404 and "immutant_" not in body, (target, status, body[:200])
    finally:
        reconciler.cleanup()
        haproxy.stop()
