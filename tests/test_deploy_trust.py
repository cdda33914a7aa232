"""What a store writer cannot make a node do with deployments: run a record copied under another
name, roll back to an older record, unpack outside the data folder, or lose an archive a
deployment still names — on a real node and the real store. (Issue 10, points 4 to 6.)"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path

import pytest
from test_deploy import deploy, get, write_app

from flask_immutant.keys import Keys

from support import children_of, process_name, run_flask, wait_until


def process_states(pid: int) -> dict[int, str]:
    """Every descendant of ``pid`` but the runtime template (always there, runtimes or not) with
    its state letter (``Z``: a zombie nobody reaped)."""
    found: dict[int, str] = {}
    pending = [pid]
    while pending:
        for child in children_of(pending.pop()):
            with contextlib.suppress(OSError):
                state = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
                pending.append(child)
                if process_name(child) != "immutant-tmpl":
                    found[child] = state
    return found


def node_state(env: dict[str, str], name: str) -> dict:
    rows = {row["name"]: row for row in json.loads(run_flask(["immutant", "list", "--json"], env).stdout)}
    return rows[name]["nodes"]["a"]


@pytest.fixture
def node(start_node, node_env):
    a = start_node("--clustered", "--node-name", "a")
    a.wait_for("joined cluster")
    a.port = int(node_env["IMMUTANT_HTTP_PORT"])
    return a


def test_a_record_copied_under_another_name_is_refused_and_starts_nothing(node, node_env, tmp_path, store_client,
                                                                          cluster_name):
    # Given one deployment running on a node
    keys = Keys(cluster_name)
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    wait_until(lambda: get(node.port), timeout=10)
    before = process_states(node.pid)
    # When a store writer copies its signed record under other field names
    signed = store_client.hget(keys.deployments, "shop")
    for copy in ("copy1", "copy2", "copy3"):
        store_client.hset(keys.deployments, copy, signed)
    store_client.publish(keys.deployments_changed, "copy1")
    # Then the node refuses each copy, saying why
    node.wait_for("refusing deployment copy1: .*copied under another name")
    node.wait_for("refusing deployment copy3")
    time.sleep(3)  # several reconcile passes, each of which started more runtimes before
    # And it runs exactly the processes it ran before: no extra runtime, no zombie
    after = process_states(node.pid)
    assert sorted(after) == sorted(before), (before, after)
    assert "Z" not in after.values()
    assert get(node.port)["version"] == "1"  # type: ignore[index]
    listing = {row["name"]: row for row in json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)}
    assert "copied under another name" in listing["copy2"]["error"]
    # And undeploying the real one leaves no runtime behind
    assert run_flask(["immutant", "undeploy", "shop"], node_env).returncode == 0
    wait_until(lambda: not process_states(node.pid), timeout=15)


def test_writing_back_an_older_record_never_rolls_a_node_back(node, node_env, tmp_path, store_client, cluster_name,
                                                            start_node):
    keys = Keys(cluster_name)
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    old_record = store_client.hget(keys.deployments, "shop")
    write_app(folder, "2")
    assert deploy(node_env, folder).returncode == 0
    current_record = store_client.hget(keys.deployments, "shop")
    wait_until(lambda: (get(node.port) or {}).get("version") == "2", timeout=10)
    # When a store writer writes the older signed record back
    store_client.hset(keys.deployments, "shop", old_record)
    store_client.publish(keys.deployments_changed, "shop")
    # Then the node refuses it and keeps serving the newer version
    node.wait_for("refusing deployment shop: shop v1 .*is older than v2")
    time.sleep(1.5)
    assert get(node.port)["version"] == "2"  # type: ignore[index]
    assert node_state(node_env, "shop")["state"] == "refused"
    # And once the current record is back, the node reports it deployed again
    store_client.hset(keys.deployments, "shop", current_record)
    store_client.publish(keys.deployments_changed, "shop")
    wait_until(lambda: node_state(node_env, "shop")["state"] == "deployed", timeout=10)
    store_client.hset(keys.deployments, "shop", old_record)
    # And the node remembers what it has seen in its own data dir: after a SIGKILL and a restart,
    # with only the old record in the store, it still refuses it
    node.signal(signal.SIGKILL)
    node.wait()
    again = start_node("--clustered", "--node-name", "a")
    again.wait_for("refusing deployment shop: shop v1 .*is older than v2", timeout=30)
    assert "deployed shop v1" not in again.output


def test_a_deliberate_rollback_is_signed_and_accepted(node, node_env, tmp_path, store_client, cluster_name):
    keys = Keys(cluster_name)
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    old_record = store_client.hget(keys.deployments, "shop")
    write_app(folder, "2")
    assert deploy(node_env, folder).returncode == 0
    newer_record = store_client.hget(keys.deployments, "shop")
    wait_until(lambda: (get(node.port) or {}).get("version") == "2", timeout=10)
    # Given the store is restored from a backup taken at v1 (counter of issued versions included)
    store_client.hset(keys.deployments, "shop", old_record)
    store_client.delete(keys.deployments_issued)
    write_app(folder, "1")
    result = deploy(node_env, folder, "--wait", "10")
    # Then a plain deploy is refused by the node that ran v2, and says how to roll back
    assert result.returncode == 1 and "--rollback" in result.stdout, result.stdout + result.stderr
    assert get(node.port)["version"] == "2"  # type: ignore[index]
    # When the operator rolls back on purpose
    result = deploy(node_env, folder, "--rollback")
    # Then the node deploys it
    assert result.returncode == 0, result.stdout + result.stderr
    wait_until(lambda: (get(node.port) or {}).get("version") == "1", timeout=10)
    # And the record from before the rollback cannot be written back either
    store_client.hset(keys.deployments, "shop", newer_record)
    store_client.publish(keys.deployments_changed, "shop")
    node.wait_for("refusing deployment shop: shop v2 .*is older than v1")
    assert get(node.port)["version"] == "1"  # type: ignore[index]


@pytest.mark.parametrize("name", ["../../escaped", "(absolute)", "a/b", "-x", "x" * 65, "two words"])
def test_a_deployment_name_cannot_escape_the_data_folder(node, node_env, tmp_path, immutant_home, name):
    name = name.replace("(absolute)", str(tmp_path / "escaped"))
    folder = write_app(tmp_path / "shop", "1")
    result = deploy(node_env, folder, "--archive", "--name", name)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert "--name" in line and "letters, digits" in line
    assert not list(immutant_home.rglob("escaped")) and not (tmp_path / "escaped").exists()


def test_archives_stay_while_named_and_go_with_their_deployment(node_env, tmp_path, store_client, cluster_name,
                                                               start_node):
    keys = Keys(cluster_name)
    folder = write_app(tmp_path / "shipped", "1")
    # Given an archive deployment made while no node runs
    result = deploy(node_env, folder, "--archive")
    assert result.returncode == 0, result.stdout + result.stderr
    first = keys.deployment_archive(json.loads(store_client.hget(keys.deployments, "shipped"))["record"]["archive"])
    # Then the archive does not expire (a node may join months later)
    assert store_client.ttl(first) == -1
    # And a node joining later deploys it
    late = start_node("--clustered", "--node-name", "late")
    late.wait_for("deployed shipped v1", timeout=30)
    # When it is replaced, the old archive goes and the new one stays
    write_app(folder, "2")
    assert deploy(node_env, folder, "--archive").returncode == 0
    second = keys.deployment_archive(json.loads(store_client.hget(keys.deployments, "shipped"))["record"]["archive"])
    assert second != first and store_client.exists(second) and not store_client.exists(first)
    # When it is undeployed, its archive goes too
    assert run_flask(["immutant", "undeploy", "shipped"], node_env).returncode == 0
    assert not store_client.exists(second)


def test_a_garbage_record_under_an_unsafe_name_is_refused_and_can_be_undeployed(node, node_env, store_client,
                                                                               cluster_name):
    keys = Keys(cluster_name)
    # Given a record a store writer put under a name no deploy accepts
    store_client.hset(keys.deployments, "../../evil", json.dumps({"record": {"name": "../../evil"},
                                                                   "signature": "0" * 64}))
    store_client.publish(keys.deployments_changed, "../../evil")
    node.wait_for(r"refusing deployment \.\./\.\./evil")
    # Then the operator can remove it by that name
    result = run_flask(["immutant", "undeploy", "../../evil", "--wait", "5"], node_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "undeployed ../../evil"  # every node has let go of it
    assert store_client.hget(keys.deployments, "../../evil") is None


def test_an_undeployed_record_written_back_is_refused(node, node_env, tmp_path, store_client, cluster_name):
    keys = Keys(cluster_name)
    # Given a deployment that ran on a node and was then undeployed
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    wait_until(lambda: get(node.port), timeout=10)
    signed = store_client.hget(keys.deployments, "shop")
    assert run_flask(["immutant", "undeploy", "shop", "--wait", "10"], node_env).returncode == 0
    wait_until(lambda: not process_states(node.pid), timeout=15)
    # When a store writer writes its signed record back
    store_client.hset(keys.deployments, "shop", signed)
    store_client.publish(keys.deployments_changed, "shop")
    # Then the node refuses it, saying why, and starts nothing
    node.wait_for("refusing deployment shop: shop v1 .*was undeployed")
    time.sleep(1.5)
    assert not process_states(node.pid)
    rows = {row["name"]: row for row in json.loads(run_flask(["immutant", "list", "--json"], node_env).stdout)}
    assert rows["shop"]["nodes"]["a"]["state"] == "refused", rows
    # And a fresh deploy of the same name is accepted
    assert deploy(node_env, folder).returncode == 0
    wait_until(lambda: (get(node.port) or {}).get("version") == "1", timeout=10)
    assert json.loads(store_client.hget(keys.deployments, "shop"))["record"]["version"] == 2


@pytest.mark.parametrize("issued", [b'{"epoch": 1e400, "version": 1}', b'{"version": -1e400}', b"[1, 2]", b"\xff"])
def test_a_garbage_counter_of_issued_versions_never_breaks_a_deploy(node_env, tmp_path, store_client, cluster_name,
                                                                   issued):
    keys = Keys(cluster_name)
    folder = write_app(tmp_path / "shop", "1")
    assert deploy(node_env, folder).returncode == 0
    # When a store writer garbles the counter of versions issued for the name
    store_client.hset(keys.deployments_issued, "shop", issued)
    # Then the next deploy still issues a newer version (the stored record decides)
    result = deploy(node_env, folder)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert json.loads(store_client.hget(keys.deployments, "shop"))["record"]["version"] == 2
