"""The cluster event log on real node processes and a real store: joins, a SIGKILL failover
(each fact exactly once), deploys per node, ctl actions, dead letters, store outages, garbage
in the stream, ``flask immutant events`` (``--since``, ``--json``, ``--follow``)."""

from __future__ import annotations

import json
import signal
import time
import typing
from pathlib import Path

import pytest
import redis

from flask_immutant import ImmutantState, events
from flask_immutant.cluster.lease import LeaseManager, read_holder
from flask_immutant.events import log as event_log
from flask_immutant.events.kinds import KINDS
from flask_immutant.events.plugin import since_value
from flask_immutant.keys import Keys
from flask_immutant.messaging.plugin import messaging_of

from support import NodeProcess, invoke_flask, run_flask, wait_until

DAEMON_APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension, daemons

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)

def run():
    ctx = daemons.current()
    while not ctx.wait(0.1):
        pass

daemons.start("worker", run, app=app)
'''

SHOP_APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension, messaging

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)

def work(body):
    raise RuntimeError("cannot handle " + str(body))

messaging.listen("/queue/orders", work, app=app)

@app.get("/")
def index():
    return "shop"
'''


@pytest.fixture
def keys(cluster_name: str) -> Keys:
    return Keys(cluster_name)


def read(store: redis.Redis, keys: Keys, kind: str | None = None) -> list[events.Event]:
    return [e for e in events.read(store, keys) if kind is None or e.kind == kind]


def worker_leases(store: redis.Redis, keys: Keys, kind: str = "lease.acquired") -> list[events.Event]:
    """The daemon's lease events (the runtimes hold other leases too: the job scheduler's)."""
    return [e for e in read(store, keys, kind) if e.fields["lease"] == "daemon:worker"]


def test_the_kinds_table_and_the_typed_names_agree():
    assert set(typing.get_args(events.Name)) == set(KINDS)
    for kind in KINDS.values():
        assert kind.meaning and kind.emitter and kind.fields


def test_an_unknown_kind_is_refused_without_raising_into_the_caller(store_client, keys, caplog):
    pipe = store_client.pipeline()
    events.record(pipe, keys, "member.exploded")  # type: ignore[arg-type]
    pipe.execute()
    assert read(store_client, keys) == []
    assert "unknown event kind 'member.exploded'" in caplog.text


def test_a_node_join_sigkill_failover_and_timeout_leave_are_each_one_event(start_node, node_env, tmp_path,
                                                                           store_client, keys):
    # Given three nodes, two of them running an app with a singleton daemon
    app = tmp_path / "daemon_app.py"
    app.write_text(DAEMON_APP)
    nodes = {
        "a": start_node("--clustered", "--node-name", "a", app=str(app)),
        "b": start_node("--clustered", "--node-name", "b", "--port-offset", "100", app=str(app)),
        "c": start_node("--clustered", "--node-name", "c", "--port-offset", "200"),
    }
    for node in nodes.values():
        node.wait_for("joined cluster")
    first = wait_until(lambda: read_holder(store_client, keys, "daemon:worker"), timeout=15)
    survivor = "b" if first.node == "a" else "a"
    # Then each join is one event, from the node that joined
    joined = wait_until(lambda: (found := read(store_client, keys, "member.joined")) and len(found) == 3 and found)
    assert sorted((e.fields["member"], e.node) for e in joined) == [("a", "a"), ("b", "b"), ("c", "c")]
    (acquired,) = wait_until(lambda: worker_leases(store_client, keys), timeout=5)
    assert acquired.node == first.node and acquired.fields["failover"] is False
    # When the holder's node is killed
    nodes[first.node].signal(signal.SIGKILL)
    nodes[first.node].wait()
    wait_until(lambda: (h := read_holder(store_client, keys, "daemon:worker")) and h.node == survivor, timeout=10)
    wait_until(lambda: read(store_client, keys, "member.left"), timeout=10)
    time.sleep(3.0)  # two more failure timeouts: every survivor has seen the death and polled again
    # Then the leave by timeout is one event, from one of the two survivors (the reaper)
    (left,) = read(store_client, keys, "member.left")
    assert left.fields == {"member": first.node, "reason": "timeout"}
    assert left.node in {survivor, "c"}
    # And the lease change is one failover event, from the new holder, naming the dead one
    failovers = [e for e in worker_leases(store_client, keys) if e.fields["failover"]]
    assert [(e.node, e.fields["lease"], e.fields["previous_node"]) for e in failovers] == [
        (survivor, "daemon:worker", first.node)]
    # And no one reported the dead holder's lease as released (it never was)
    assert worker_leases(store_client, keys, "lease.released") == []
    # And `flask immutant events` shows them in the store's order, with a header
    result = run_flask(["immutant", "events"], node_env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["TIME", "(store,", "UTC)", "KIND"]
    assert any("member.left" in line and f"member={first.node}" in line and "reason=timeout" in line
               for line in lines)


def test_a_graceful_stop_is_a_leave_and_a_release_not_a_failover(start_node, tmp_path, store_client, keys):
    app = tmp_path / "daemon_app.py"
    app.write_text(DAEMON_APP)
    a = start_node("--clustered", "--node-name", "a", app=str(app))
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", app=str(app))
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    first = wait_until(lambda: read_holder(store_client, keys, "daemon:worker"), timeout=15)
    nodes = {"a": a, "b": b}
    # When the holder's node stops (SIGTERM)
    nodes[first.node].signal(signal.SIGTERM)
    assert nodes[first.node].wait(20) == 0
    survivor = "b" if first.node == "a" else "a"
    # Then it said it left, released its lease, and the other node took it over: no failover
    wait_until(lambda: len(worker_leases(store_client, keys)) == 2, timeout=10)
    (left,) = read(store_client, keys, "member.left")
    assert (left.node, left.fields) == (first.node, {"member": first.node, "reason": "left"})
    (released,) = worker_leases(store_client, keys, "lease.released")
    assert released.node == first.node and released.fields["fence"] == first.fence
    taken = worker_leases(store_client, keys)[-1]
    assert taken.node == survivor and taken.fields["failover"] is False


def test_deploy_undeploy_ctl_and_a_dead_letter_are_events(start_node, node_env, tmp_path, store_client, keys):
    # Given two nodes with no app
    a = start_node("--clustered", "--node-name", "a")
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100")
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    folder = tmp_path / "shop"
    folder.mkdir()
    (folder / "app.py").write_text(SHOP_APP)
    # When an app is deployed
    result = run_flask(["immutant", "deploy"], node_env, cwd=folder)
    assert result.returncode == 0, result.stdout + result.stderr
    # Then the request is one event and each node reports its outcome once
    outcomes = wait_until(lambda: (found := read(store_client, keys, "deploy.node")) and len(found) == 2 and found,
                          timeout=30)
    assert sorted((e.node, e.fields["deployment"], e.fields["state"], e.fields["version"]) for e in outcomes) == [
        ("a", "shop", "deployed", 1), ("b", "shop", "deployed", 1)]
    (requested,) = read(store_client, keys, "deploy.requested")
    assert requested.fields["deployment"] == "shop" and requested.fields["version"] == 1
    assert "@" in requested.fields["by"]
    # When an operator disables node a's contexts
    assert run_flask(["immutant", "ctl", "disable", "--node", "a"], node_env).returncode == 0
    (action,) = read(store_client, keys, "ctl.action")
    assert action.fields["action"] == "disabled" and action.fields["scope_node"] == "a"
    # When the app is undeployed
    assert run_flask(["immutant", "undeploy", "shop"], node_env).returncode == 0
    gone = wait_until(lambda: (found := read(store_client, keys, "undeploy.node")) and len(found) == 2 and found,
                      timeout=20)
    assert sorted(e.node for e in gone) == ["a", "b"]
    assert [e.fields["deployment"] for e in read(store_client, keys, "undeploy.requested")] == ["shop"]
    # And `events --json --since` prints them all as JSON, in order
    listed = json.loads(run_flask(["immutant", "events", "--json", "--since", "10m"], node_env).stdout)
    kinds = [e["kind"] for e in listed]
    assert kinds.index("deploy.requested") < kinds.index("deploy.node") < kinds.index("undeploy.requested")


def test_a_dead_letter_is_one_event_from_the_consumer_that_buried_it(start_node, node_env, tmp_path, store_client,
                                                                     keys):
    # Given a node whose handler always raises, and one retry
    node_env = {**node_env, "IMMUTANT_MESSAGING_MAX_RETRIES": "1", "IMMUTANT_MESSAGING_MIN_BACKOFF": "0.05"}
    app = tmp_path / "shop_app.py"
    app.write_text(SHOP_APP)
    node = start_node("--clustered", "--node-name", "a", app=str(app), env=node_env)
    node.wait_for("consuming /queue/orders")
    # When a message fails twice
    state = ImmutantState.build({}, environ=node_env)
    messaging = messaging_of(state)
    try:
        messaging.publish("/queue/orders", {"n": 7})
        (dead,) = wait_until(lambda: read(store_client, keys, "message.dead"), timeout=30, message=node.output)
    finally:
        messaging.publisher.close()
        state.store.close()
    # Then it is one event, from that node, with the reason
    assert dead.node == "a" and dead.fields["destination"] == "/queue/orders" and dead.fields["attempts"] == 2
    assert "cannot handle" in dead.fields["reason"]



def test_a_huge_dead_letter_reason_is_cut_with_a_marker(start_node, node_env, tmp_path, store_client, keys):
    # Given a node whose handler raises with a text quoting the whole message body, and no retries
    node_env = {**node_env, "IMMUTANT_MESSAGING_MAX_RETRIES": "0"}
    app = tmp_path / "shop_app.py"
    app.write_text(SHOP_APP)
    node = start_node("--clustered", "--node-name", "a", app=str(app), env=node_env)
    node.wait_for("consuming /queue/orders")
    # When a message with a 100 000-character body is dead-lettered
    state = ImmutantState.build({}, environ=node_env)
    messaging = messaging_of(state)
    try:
        messaging.publish("/queue/orders", "x" * 100_000)
        (dead,) = wait_until(lambda: read(store_client, keys, "message.dead"), timeout=30, message=node.output)
    finally:
        messaging.publisher.close()
        state.store.close()
    # Then its event keeps the start of the reason and says how much was cut
    reason = dead.fields["reason"]
    kept, mark = reason.split(event_log.CUT_MARK)
    assert len(kept) == event_log.FIELD_LIMIT and "cannot handle xxx" in kept
    assert mark.endswith(" more characters]") and int(mark.split()[0]) > 90_000
    # And the other fields are whole
    assert dead.fields["destination"] == "/queue/orders" and dead.fields["attempts"] == 1


def test_a_holder_that_stops_without_deleting_its_key_released_it_and_did_not_lose_it(embedded_store, store_client,
                                                                                         keys):
    # Given this process's event writer (not one an earlier in-process test left) and a lease holder
    event_log.stop()
    event_log.start(store_client, keys, "n1", 1000)
    manager = LeaseManager(embedded_store.url, keys, "n1", 1.0)
    try:
        keeper = manager.keeper("solo", lambda fence: None, lambda: None)
        wait_until(lambda: keeper.held, timeout=5)
        # When it stops on purpose but leaves the key to expire
        keeper.stop(release=False)
        assert event_log.flush(5.0)
    finally:
        manager.close()
        event_log.stop()
    # Then that is a release that left the key to expire (as lease_released_total counts it), not a loss
    # (other keepers of this test process may write theirs to the same writer: only "solo" counts)
    assert [e for e in read(store_client, keys, "lease.lost") if e.fields["lease"] == "solo"] == []
    (released,) = [e for e in read(store_client, keys, "lease.released") if e.fields["lease"] == "solo"]
    assert released.fields == {"lease": "solo", "fence": released.fields["fence"], "left_to_expire": True}
    assert store_client.exists(keys.lease("solo"))  # the key is still there, waiting out its TTL

BROKEN_DAEMON_APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension, daemons

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)

def run():
    raise RuntimeError("broken daemon")

daemons.start("broken", run, app=app)
'''


def test_a_daemon_restart_is_an_event_from_the_runtime_running_it(start_node, tmp_path, store_client, keys):
    app = tmp_path / "broken_app.py"
    app.write_text(BROKEN_DAEMON_APP)
    node = start_node("--clustered", "--node-name", "a", app=str(app))
    node.wait_for("daemon broken failed")
    restarted = wait_until(lambda: read(store_client, keys, "daemon.restarted"), timeout=15)
    assert restarted[0].node == "a" and restarted[0].fields["daemon"] == "broken"
    assert restarted[0].fields["restarts"] == 1 and "broken daemon" in restarted[0].fields["error"]


def test_events_follow_prints_an_event_written_after_it_started(start_node, node_env, store_client, keys):
    # Given some history, and `events --follow --json` running
    pipe = store_client.pipeline()
    events.record(pipe, keys, "undeploy.requested", deployment="old", by="test")
    pipe.execute()
    follower = NodeProcess(["immutant", "events", "--follow", "--json"], node_env)
    reader = NodeProcess(["immutant", "events", "-f"], node_env)
    try:
        reader.wait_for("^TIME \\(store, UTC\\) +KIND +NODE +DETAILS$")
        time.sleep(1.5)  # let the JSON one start reading too (it prints nothing before a new event)
        assert follower.proc.poll() is None, follower.output
        # When an event is written
        assert run_flask(["immutant", "ctl", "stop", "--node", "x", "--future"], node_env).returncode == 0
        # Then it prints that one, and not the older one
        line = json.loads(follower.wait_for(r'"ctl.action"', timeout=15).string)
        assert line["fields"]["action"] == "stopped" and line["fields"]["scope_node"] == "x"
        assert "old" not in follower.output
        # And the table form prints it as a row under its header
        row = reader.wait_for(r"ctl\.action", timeout=15).string
        assert "action=stopped" in row and "scope_node=x" in row and "by=" in row
        assert "old" not in reader.output
    finally:
        follower.cleanup()
        reader.cleanup()


def test_garbage_in_the_stream_is_skipped_and_named(node_env, store_client, keys):
    # Given good events and garbage written by someone with store access
    pipe = store_client.pipeline()
    events.record(pipe, keys, "deploy.requested", node="a", deployment="one", version=1, rollback=False, by="t")
    pipe.execute()
    bad = [
        store_client.xadd(keys.event_log, {"nonsense": "1"}),
        store_client.xadd(keys.event_log, {"kind": "member.joined", "fields": "{not json"}),
        store_client.xadd(keys.event_log, {"kind": "member.joined", "fields": "[1, 2]"}),
        store_client.xadd(keys.event_log, {b"kind": b"\xff\xfe", b"fields": b"{}"}),
    ]
    pipe = store_client.pipeline()
    events.record(pipe, keys, "undeploy.requested", node="a", deployment="one", by="t")
    pipe.execute()
    # When the log is listed
    result = invoke_flask(["immutant", "events"], node_env)
    # Then the good ones are shown and each bad one is named in a warning
    assert result.returncode == 0
    assert "deploy.requested" in result.stdout and "undeploy.requested" in result.stdout
    for entry_id in bad[:3]:
        assert f"skipped the event {entry_id!r}" in result.stderr or f"skipped the event {entry_id}" in result.stderr
    assert result.stderr.count("Warning: skipped the event") == 4, result.stderr
    # And a key of another type is one warning, not a traceback
    store_client.delete(keys.event_log)
    store_client.set(keys.event_log, "x")
    result = invoke_flask(["immutant", "events", "--json"], node_env)
    assert result.returncode == 0 and json.loads(result.stdout) == []
    assert "is not a stream" in result.stderr
    # And the action an event records still happens: the garbage costs the event, not the action
    result = invoke_flask(["immutant", "ctl", "disable", "--node", "z", "--future"], node_env)
    assert result.returncode == 0, result.stderr
    assert store_client.hget(keys.context_control, "z|*") == b"DISABLED"
    writer = event_log.EventLog(store_client, keys, "n", maxlen=100)
    writer.add("member.joined", {"member": "n"})
    assert writer.flush(2.0) and store_client.get(keys.event_log) == b"x"


@pytest.mark.parametrize("text, expected", [("10m", ("ago", 600.0)), ("90s", ("ago", 90.0)),
                                            ("2h", ("ago", 7200.0)), ("1700000000", ("at", 1700000000.0)),
                                            ("2023-11-14T22:13:20Z", ("at", 1700000000.0)),
                                            ("2023-11-14T22:13:20", ("at", 1700000000.0))])
def test_since_takes_durations_and_timestamps(text, expected):
    assert since_value(text) == expected


def test_a_bad_since_is_one_line(node_env):
    result = invoke_flask(["immutant", "events", "--since", "yesterday"], node_env)
    assert result.returncode == 2
    assert "Invalid value for '--since': 'yesterday': expected a duration (30s, 10m, 2h, 1d)" in result.stderr


@pytest.mark.parametrize("follow", [[], ["--follow"]], ids=["list", "follow"])
@pytest.mark.parametrize("text, expected", [
    ("nan", "expected a timestamp from 1970-01-01T00:00:00Z"), ("inf", "expected a timestamp from 1970"),
    ("-inf", "expected a timestamp from 1970"), ("1e400", "expected a timestamp from 1970"),
    ("-5", "expected a timestamp from 1970"), ("0001-01-01", "expected a timestamp from 1970"),
    ("1e13", "to 9999-12-31T23:59:59Z (epoch 253402300799)"), ("99999999999d", "expected a duration of at most 36500d"),
    ("1" + "0" * 400 + "s", "expected a duration of at most 36500d"),
])
def test_a_since_that_no_stream_id_can_hold_is_the_one_line_error(node_env, store_client, keys, follow, text,
                                                                    expected):
    # Given a log with an event in it
    pipe = store_client.pipeline()
    events.record(pipe, keys, "undeploy.requested", node="a", deployment="one", by="t")
    pipe.execute()
    # When --since is not a finite time between the epoch and year 9999, or a duration over 100 years
    args = ["immutant", "events", *follow, "--since", text]
    result = run_flask(args, node_env, timeout=30) if follow else invoke_flask(args, node_env)
    # Then it is the usual one-line option error: no traceback, no warning about the stream
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"Error: Invalid value for '--since': {text!r}: " in result.stderr and expected in result.stderr
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr and result.stdout == ""


def test_the_stream_is_capped(store_client, keys):
    writer = event_log.EventLog(store_client, keys, "n", maxlen=100)
    for i in range(1000):
        writer.add("undeploy.requested", {"deployment": f"d{i}", "by": "t"})
        if i % 100 == 99:
            assert writer.flush()
    assert 100 <= store_client.xlen(keys.event_log) < 1000
    assert read(store_client, keys)[-1].fields["deployment"] == "d999"


def test_emit_never_raises_and_events_wait_out_a_store_outage(private_redis, keys):
    # Given a writer on a store that then goes down
    client = redis.Redis.from_url(private_redis.url, socket_timeout=1, socket_connect_timeout=1)
    writer = event_log.EventLog(client, keys, "n", maxlen=1000)
    private_redis.stop()
    # When events are emitted meanwhile, the emitter never sees an error and the write waits
    writer.add("lease.lost", {"lease": "x", "fence": 1, "reason": "cannot renew"})
    assert writer.flush(0.5) is False
    # Then once the store is back they are written
    private_redis.start()
    wait_until(lambda: writer.flush(0.5), timeout=10)
    (lost,) = read(client, keys)
    assert lost.kind == "lease.lost" and lost.node == "n"
    client.close()


def test_a_store_outage_seen_by_a_node_is_one_event_once_the_store_is_back(start_node, private_redis, keys):
    # Given a node on a store of its own
    node = start_node("--clustered", "--node-name", "a", env={"IMMUTANT_REDIS_URL": private_redis.url})
    node.wait_for("joined cluster")
    client = redis.Redis.from_url(private_redis.url)
    wait_until(lambda: read(client, keys, "member.joined"), timeout=10)
    # When the store is down for a few seconds (and comes back empty)
    private_redis.stop()
    time.sleep(3.0)
    private_redis.start()
    # Then the node writes one store.outage event, naming how long it lasted
    (outage,) = wait_until(lambda: read(client, keys, "store.outage"), timeout=20)
    assert outage.node == "a" and outage.fields["seconds"] >= 1.0 and outage.fields["error"]
    time.sleep(2.0)
    assert len(read(client, keys, "store.outage")) == 1
    client.close()


def test_docs_events_md_lists_every_kind_with_its_fields():
    doc = (Path(__file__).parent.parent / "docs" / "events.md").read_text(encoding="utf-8")
    table = doc.split("<!-- kinds-table -->", 1)[1].split("<!-- /kinds-table -->", 1)[0]
    rows = {line.split("|")[1].strip().strip("`"): line for line in table.strip().splitlines()[2:]}
    assert set(rows) == set(KINDS), "docs/events.md's kinds table differs from flask_immutant/events/kinds.py"
    for name, kind in KINDS.items():
        documented = rows[name].split("|")[4]
        assert [f.strip().strip("`") for f in documented.split(",")] == list(kind.fields), name
