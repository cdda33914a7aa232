"""Metrics: the definitions and docs/metrics.md agree, the allow-list, the metrics path, the
multi-process folder across real processes, and ``flask immutant metrics`` against a real node."""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from flask import Flask

from flask_immutant import ImmutantExtension
from flask_immutant.errors import ImmutantConfigError
from flask_immutant.metrics import definitions, process
from flask_immutant.metrics.cluster import ClusterCollector
from flask_immutant.metrics.http import METRICS_PATH, allowed

from support import invoke_flask, run_flask, track, wait_until

DOC = Path(__file__).resolve().parent.parent / "docs" / "metrics.md"


@pytest.fixture
def metrics_off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Metrics are process-wide: each test starts and ends with them off and no folder set."""
    monkeypatch.delenv(process.MULTIPROC_ENV, raising=False)
    process.disable()
    try:
        yield
    finally:
        process.disable()


def node_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node's metrics folder, exported as prepare_folder does; unset again after the test
    (monkeypatch records the variable before prepare_folder sets it, or it would restore it)."""
    monkeypatch.setenv(process.MULTIPROC_ENV, "")
    return process.prepare_folder(tmp_path / "node")


# --- the definitions and their docs ------------------------------------------------------------


def test_every_metric_is_named_once_with_the_prefix_and_kind_suffix() -> None:
    names = [metric.name for metric in definitions.ALL]
    assert len(names) == len(set(names)) >= 30
    for metric in definitions.ALL:
        assert re.fullmatch(r"immutant_[a-z_]+", metric.name), metric.name
        assert metric.name.endswith("_total") == (metric.kind == "counter"), metric.name
        assert metric.help.strip().endswith("."), f"{metric.name}: help is a sentence"
        assert all(re.fullmatch(r"[a-z_]+", label) for label in metric.labels), metric.name


def test_docs_list_every_metric_with_its_labels_one_line_each() -> None:
    # Given docs/metrics.md's table rows: | `name` | kind | labels | meaning |
    rows = re.findall(r"^\| `(immutant_\w+)` \| (\w+) \| ([^|]*) \|", DOC.read_text(encoding="utf-8"), re.MULTILINE)
    documented = {name: (kind, labels.strip()) for name, kind, labels in rows}
    # Then each metric is there once, with its kind and labels, and nothing else is
    assert len(rows) == len(documented), "a metric is documented twice"
    expected = {m.name: (m.kind, ", ".join(f"`{label}`" for label in m.labels) or "-") for m in definitions.ALL}
    assert documented == expected


# --- who may read them -----------------------------------------------------------------------


def test_loopback_is_always_allowed_and_others_only_through_the_allow_list() -> None:
    ten = (ipaddress.ip_network("10.0.0.0/8"),)
    assert allowed("127.0.0.1", ()) and allowed("127.8.9.1", ()) and allowed("::1", ())
    assert allowed("::ffff:127.0.0.1", ())  # an IPv4 peer on a dual-stack socket
    assert not allowed("10.1.2.3", ()) and allowed("10.1.2.3", ten)
    assert not allowed("192.168.1.1", ten) and not allowed("fe80::1", ten)
    assert allowed("2001:db8::5", (ipaddress.ip_network("::/0"),))
    assert not allowed("", ten) and not allowed("not-an-address", ten)


def test_a_bad_allow_list_is_one_clear_error_naming_the_key() -> None:
    app = Flask(__name__)
    app.config.update(IMMUTANT_METRICS=True, IMMUTANT_METRICS_ALLOW="10.0.0.0/8, prometheus.local")
    with pytest.raises(ImmutantConfigError) as caught:
        ImmutantExtension(app)
    message = str(caught.value)
    assert "IMMUTANT_METRICS_ALLOW" in message and "prometheus.local" in message and "\n" not in message


# --- the metrics path on an app ---------------------------------------------------------------


def _app(**config: object) -> Flask:
    app = Flask(__name__)
    app.config.update(IMMUTANT_METRICS=True, IMMUTANT_MESSAGING=False, IMMUTANT_DAEMONS=False, IMMUTANT_JOBS=False,
                      **config)
    ImmutantExtension(app)

    @app.get("/-/other")
    def other() -> str:
        return "the app's own"

    return app


def test_the_path_answers_loopback_and_refuses_others(metrics_off: None) -> None:
    # Given an app with metrics on and a counter that moved
    client = _app().test_client()
    definitions.PUBLISHED.inc("/queue/unit", amount=3)
    # When loopback asks, Then it gets the exposition text with that counter
    ok = client.get(METRICS_PATH, environ_base={"REMOTE_ADDR": "127.0.0.1"})
    assert ok.status_code == 200 and ok.content_type.startswith("text/plain")
    assert 'immutant_messages_published_total{destination="/queue/unit"} 3.0' in ok.get_data(as_text=True)
    # When another address asks, Then it is refused in one line naming the setting
    refused = client.get(METRICS_PATH, environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert refused.status_code == 403 and "IMMUTANT_METRICS_ALLOW" in refused.get_data(as_text=True)
    # And the app's own routes are untouched
    assert client.get("/-/other").get_data(as_text=True) == "the app's own"
    assert client.post(METRICS_PATH, environ_base={"REMOTE_ADDR": "127.0.0.1"}).status_code == 405


def test_the_allow_list_opens_the_path_to_a_network(metrics_off: None) -> None:
    client = _app(IMMUTANT_METRICS_ALLOW="10.0.0.0/8").test_client()
    assert client.get(METRICS_PATH, environ_base={"REMOTE_ADDR": "10.9.9.9"}).status_code == 200
    assert client.get(METRICS_PATH, environ_base={"REMOTE_ADDR": "192.168.0.9"}).status_code == 403


def test_metrics_off_leaves_the_path_to_the_app_and_records_nothing(metrics_off: None) -> None:
    app = Flask(__name__)
    app.config.update(IMMUTANT_MESSAGING=False, IMMUTANT_DAEMONS=False, IMMUTANT_JOBS=False)
    ImmutantExtension(app)
    assert not process.enabled()
    definitions.PUBLISHED.inc("/queue/unit")  # a no-op
    assert app.test_client().get(METRICS_PATH).status_code == 404


# --- what a scrape reads from the store ------------------------------------------------------


def _depth(collector: ClusterCollector) -> float | None:
    for found in collector.collect():
        if found.name == definitions.QUEUE_DEPTH.name:
            return next((sample.value for sample in found.samples if sample.labels["destination"] == "/queue/depth"),
                        None)
    return None


def test_a_scrape_serves_the_last_reading_and_refreshes_it_in_the_background(
        metrics_off: None, immutant_home: Path, embedded_store: object, cluster_name: str) -> None:
    # Given an app on the real store with one message waiting on a queue nobody consumes
    app = track(Flask(__name__))
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name, IMMUTANT_METRICS=True)
    immutant = ImmutantExtension(app)
    with app.app_context():
        immutant.publish("/queue/depth", 1)
    collector = ClusterCollector(app.extensions["immutant"], fresh_for=3600)
    # When the first scrape reads, Then it reads in line
    assert _depth(collector) == 1.0
    # When a second message arrives, Then a fresh reading still serves the next scrape
    with app.app_context():
        immutant.publish("/queue/depth", 2)
    assert _depth(collector) == 1.0
    # When the reading is stale, Then that scrape still gets it, and a later one the new reading
    collector.fresh_for = 0.0
    assert _depth(collector) == 1.0
    wait_until(lambda: _depth(collector) == 2.0, 10, message="the background reading")


# --- several processes, one node --------------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys
    from flask_immutant.metrics import definitions, process
    process.enable()
    definitions.DELIVERED.inc("/queue/mp", amount=int(sys.argv[1]))
    definitions.IN_FLIGHT.inc("/queue/mp")
    print("recorded", flush=True)
    sys.stdin.readline()  # stay alive until told
""")


def test_values_of_several_processes_add_up_and_a_dead_ones_live_gauges_go(
        metrics_off: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a node's folder and two real processes recording into it
    node_folder(tmp_path, monkeypatch)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True, env={**os.environ}) for n in (2, 5)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline().strip() == "recorded"
        # When this process renders, Then it sums both processes' counters and live gauges
        text = process.render()[0].decode()
        assert 'immutant_messages_delivered_total{destination="/queue/mp"} 7.0' in text
        assert 'immutant_messages_in_flight{destination="/queue/mp"} 2.0' in text
        # When one is SIGKILLed, Then its counter stays (it happened) and its live gauge goes
        children[0].kill()
        children[0].wait()
        text = process.render()[0].decode()
        assert 'immutant_messages_delivered_total{destination="/queue/mp"} 7.0' in text
        assert 'immutant_messages_in_flight{destination="/queue/mp"} 1.0' in text
    finally:
        for child in children:
            child.kill()
            child.communicate()


def test_a_scrape_skips_a_file_a_process_is_still_creating_and_drops_a_dead_ones_empty_file(
        metrics_off: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a node's folder and a real process recording into it
    folder = node_folder(tmp_path, monkeypatch)
    child = subprocess.Popen([sys.executable, "-c", CHILD, "2"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env={**os.environ})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "recorded"
        # And the file of a kind it is creating right now (prometheus_client opens it, then sizes it)
        (folder / f"histogram_{child.pid}.db").touch()
        # When this process renders, Then the scrape answers with every value written (it failed: 500)
        text = process.render()[0].decode()
        assert 'immutant_messages_delivered_total{destination="/queue/mp"} 2.0' in text
        # When a process was killed between creating and sizing its counter file
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        (folder / f"counter_{dead.pid}.db").touch()
        # Then a scrape still answers, and that empty file is gone rather than folded
        text = process.render()[0].decode()
        assert 'immutant_messages_delivered_total{destination="/queue/mp"} 2.0' in text
        assert not [path.name for path in folder.iterdir() if str(dead.pid) in path.name]
    finally:
        child.kill()
        child.communicate()


NO_FOLDER = textwrap.dedent("""
    import logging, os, shutil
    from flask_immutant.metrics import definitions, process
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    process.enable()
    definitions.LEASE_HOLDER.set(1, "scheduler")
    shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    definitions.PUBLISHED.inc("/queue/orders")
    definitions.HANDLER_SECONDS.observe(0.01, "/queue/orders")
    definitions.HANDLER_SECONDS.observe(0.02, "/queue/orders")
    definitions.IN_FLIGHT.dec("/queue/orders")
    print("returned", definitions.HANDLER_SECONDS._live is None, definitions.LEASE_HOLDER._live is not None)
""")


def test_a_metric_call_never_raises_into_its_caller_and_goes_quiet_after_a_failure(tmp_path: Path) -> None:
    # Given a process recording into a node's folder, with one value recorded, and then the folder
    # removed (a tmp cleaner, a second node on the same data dir): no new file can be opened
    folder = tmp_path / "node" / "metrics"
    folder.mkdir(parents=True)
    # When every kind of call site records (counters' file is open already: unlabelled ones open it)
    done = subprocess.run([sys.executable, "-c", NO_FOLDER], env={**os.environ, process.MULTIPROC_ENV: str(folder)},
                          capture_output=True, text=True, timeout=60, check=False)
    # Then every call returned, each failing metric said so once, and is a no-op from then on
    assert done.returncode == 0 and done.stdout.strip() == "returned True True", done.stderr
    failed = sorted(line for line in done.stderr.splitlines() if "stopped recording" in line)
    assert failed == sorted(f"metrics: {name} stopped recording in this process (no more values until restart)"
                            for name in ("immutant_message_handler_seconds", "immutant_messages_in_flight"))


EXITING = textwrap.dedent("""
    import sys
    from flask_immutant.metrics import definitions, process
    process.enable()
    definitions.DELIVERED.inc("/queue/mp", amount=int(sys.argv[1]))
    definitions.HANDLER_SECONDS.observe(float(sys.argv[1]) / 100, "/queue/mp")
    definitions.IN_FLIGHT.inc("/queue/mp")
    definitions.LEASE_HOLDER.set(1, "scheduler")
""")


def _counted(text: str) -> dict[str, float]:
    """A scrape's counter and histogram samples (what outlives a process)."""
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line.startswith(("immutant_messages_delivered", "immutant_message_handler"))}


def test_folding_dead_processes_keeps_every_value_contract(
        metrics_off: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins prometheus_client's private file layout (MmapedDict, KIND_PID.db) that archive.py writes."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    folder = node_folder(tmp_path, monkeypatch)
    for rounds in ((1, 2, 3), (4, 5)):
        # Given real processes that recorded into the node's folder and exited
        for amount in rounds:
            subprocess.run([sys.executable, "-c", EXITING, str(amount)], env={**os.environ}, check=True)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(folder))
        unfolded = _counted(generate_latest(registry).decode())
        # When a scrape renders
        text = process.render()[0].decode()
        # Then it shows what reading every file showed (up to float rounding: the sums are added
        # in another order), their gauges are gone, and the folder holds one archive per kind,
        # however many processes came and went
        assert _counted(text) == pytest.approx(unfolded) and len(unfolded) > 5
        assert "immutant_messages_in_flight{" not in text and "immutant_lease_holder{" not in text
        assert sorted(f.name for f in folder.glob("*.db")) == ["counter_archive.db", "histogram_archive.db"]
    assert 'immutant_messages_delivered_total{destination="/queue/mp"} 15.0' in text
    assert 'immutant_message_handler_seconds_count{destination="/queue/mp"} 5.0' in text


EVERY_KIND = textwrap.dedent("""
    import sys
    import prometheus_client as prom
    ODD = 'quote " backslash \\\\ newline \\n unicode \u00e9'
    GAUGES = ("livesum", "livemax", "livemin", "liveall", "sum", "max", "min", "all")
    events = prom.Counter("contract_events", "Events; help with a \\\\ and a \\n newline.", ["name"])
    bare = prom.Counter("contract_bare", "No labels.")
    seconds = prom.Histogram("contract_seconds", "Durations.", ["name", "kind"], buckets=(0.001, 0.1, 1.5, 1e7))
    gauges = {mode: prom.Gauge(f"contract_{mode}", f"A {mode} gauge.", ["name"], multiprocess_mode=mode)
              for mode in GAUGES}

    def record(n):
        events.labels("plain").inc(n)
        events.labels(ODD).inc(0.25 * n)
        bare.inc(n)
        for value in (0.0005, 0.05, 1.0, 3.0, 1e8)[:n]:
            seconds.labels("plain", "a").observe(value)
        seconds.labels(ODD, "b").observe(0.1 * n)
        for mode, gauge in gauges.items():
            gauge.labels("plain").set(n)
            gauge.labels(ODD).set(-n)
        gauges["livesum"].labels(f"only-{n}").set(n)  # a series only this process has

    n = int(sys.argv[1])
    record(n)
    print("recorded", flush=True)
    while sys.argv[2] == "stay" and sys.stdin.readline():  # each line: record again
        record(n)
        print("recorded", flush=True)
""")


def _families(text: str) -> dict[str, tuple[str, str, list[tuple[str, tuple[tuple[str, str], ...], float]]]]:
    """A scrape's families as prometheus_client's parser reads them: type, help, sorted samples."""
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: (family.type, family.documentation,
                          sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in family.samples))
            for family in text_string_to_metric_families(text)}


def _same_text(ours: str, theirs: str) -> None:
    """Same families, samples and line texts up to the value (escaping, label order, ``le``); the
    values equal up to float rounding (sums of the same values, maybe in another order)."""
    assert sorted(line.rsplit(" ", 1)[0] for line in ours.splitlines()) == \
        sorted(line.rsplit(" ", 1)[0] for line in theirs.splitlines())
    mine, reference = _families(ours), _families(theirs)
    assert mine.keys() == reference.keys()
    for name, (kind, help_text, samples) in reference.items():
        assert mine[name][:2] == (kind, help_text)
        assert [sample[:2] for sample in mine[name][2]] == [sample[:2] for sample in samples]
        assert [sample[2] for sample in mine[name][2]] == pytest.approx([sample[2] for sample in samples], rel=1e-12)


def _prometheus_client_text(folder: Path) -> str:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(folder))
    return generate_latest(registry).decode()


def test_the_folder_render_matches_prometheus_client_contract(
        metrics_off: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Pins prometheus_client's file reader and merge (counters, histograms, every gauge mode but
    mostrecent) that folder.py reproduces: a scrape shows what MultiProcessCollector shows."""
    from flask_immutant.metrics.folder import FolderRender

    caplog.set_level(logging.DEBUG, logger="flask_immutant.metrics")
    folder = node_folder(tmp_path, monkeypatch)
    # Given processes that recorded every kind and gauge mode, odd label values and help text
    # included: two that exited (folded at the next scrape), two that still run
    for n in (3, 4):
        subprocess.run([sys.executable, "-c", EVERY_KIND, str(n), "exit"], env={**os.environ}, check=True)
    living = [subprocess.Popen([sys.executable, "-c", EVERY_KIND, str(n), "stay"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True, env={**os.environ}) for n in (1, 2)]
    try:
        for child in living:
            assert child.stdout is not None and child.stdout.readline().strip() == "recorded"
        # When a scrape renders (folding the dead), Then it is prometheus_client's text of the folder
        ours = process.render()[0].decode()
        assert not [r for r in caplog.records if "only prometheus_client renders" in r.getMessage()]
        _same_text(ours, _prometheus_client_text(folder))
        assert 'contract_events_total{name="quote \\" backslash \\\\ newline \\n unicode \u00e9"} 2.5' in ours
        assert 'contract_seconds_bucket{kind="a",le="1e+07",name="plain"} 10.0' in ours
        # When a living process records again, Then the next scrape shows its current values
        assert living[1].stdin is not None and living[1].stdout is not None
        living[1].stdin.write("more\n")
        living[1].stdin.flush()
        assert living[1].stdout.readline().strip() == "recorded"
        ours = process.render()[0].decode()
        _same_text(ours, _prometheus_client_text(folder))
        assert 'contract_events_total{name="plain"} 12.0' in ours
        # When one is SIGKILLed, Then its live gauges go, its counters stay, as prometheus_client has it
        living[0].kill()
        living[0].wait()
        ours = process.render()[0].decode()
        _same_text(ours, _prometheus_client_text(folder))
        assert 'contract_livesum{name="only-1"}' not in ours and 'contract_livesum{name="only-2"} 2.0' in ours
        # And a fresh render of the same folder (nothing kept from earlier scrapes) says the same
        _same_text(FolderRender().render(str(folder)).decode(), ours)
    finally:
        for child in living:
            child.kill()
            child.communicate()


UNSUPPORTED = textwrap.dedent("""
    import prometheus_client as prom
    prom.Counter("contract_plain", "Counted.").inc(2)
    prom.Summary("contract_summary", "A summary.").observe(0.5)
    prom.Gauge("contract_recent", "Most recent.", multiprocess_mode="mostrecent").set(7)
""")


def test_a_folder_with_kinds_the_fast_render_does_not_know_is_rendered_by_prometheus_client(
        metrics_off: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flask_immutant.metrics.folder import FolderRender, Unsupported

    folder = node_folder(tmp_path, monkeypatch)
    subprocess.run([sys.executable, "-c", UNSUPPORTED], env={**os.environ}, check=True)
    with pytest.raises(Unsupported):
        FolderRender().render(str(folder))
    for _ in range(2):  # the first scrape tries the fast render, later ones go straight to prometheus_client
        text = process.render()[0].decode()
        assert text == _prometheus_client_text(folder)
        assert "contract_summary_count 1.0" in text and "contract_recent 7.0" in text


FIFTY = textwrap.dedent("""
    from flask_immutant.metrics import definitions as m, process
    process.enable()
    for i in range(50):
        destination = f"/queue/bench-{i:02d}"
        for metric in (m.PUBLISHED, m.DELIVERED, m.FAILED, m.RETRIED, m.DEAD_LETTERED, m.REDELIVERED):
            metric.inc(destination)
        m.HANDLER_SECONDS.observe(0.01, destination)
        m.IN_FLIGHT.inc(destination)
""")


def test_a_warm_scrape_of_fifty_destinations_starts_no_garbage_collection(
        metrics_off: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scrape that keeps thousands of objects alive at once starts young collections, and every
    few scrapes a full one of the whole runtime: that was a scrape's p99 (bench/metrics_scrape.py)."""
    import gc

    # Given a node's folder with what a runtime listening on 50 destinations records
    node_folder(tmp_path, monkeypatch)
    subprocess.run([sys.executable, "-c", FIFTY], env={**os.environ}, check=True)
    # When this process has rendered it once (the first scrape builds what later ones keep)
    assert process.render()[0].count(b"\n") > 800
    collections: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(info["generation"])

    gc.collect()
    gc.callbacks.append(count)
    try:
        # And renders it 20 times more
        for _ in range(20):
            process.render()
    finally:
        gc.callbacks.remove(count)
    # Then no collection started: a scrape holds few objects at a time
    assert collections == []


HOLDER = textwrap.dedent("""
    import sys
    from flask_immutant.metrics import definitions, process
    process.enable()
    definitions.LEASE_HOLDER.set(1, "scheduler")
    print("holding", flush=True)
    sys.stdin.readline()
""")


def test_a_reused_pid_does_not_keep_a_dead_processs_lease_holder_gauge(
        metrics_off: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a process that held a lease, recorded it, and was SIGKILLed
    folder = node_folder(tmp_path, monkeypatch)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={**os.environ})
    assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
    assert _value(process.render()[0].decode(), 'immutant_lease_holder{lease="scheduler"}') == 1.0
    holder.kill()
    holder.communicate()
    # And its pid now belongs to another, unrelated living process (pids are reused): the dead
    # holder's files, start time record included, renamed to a living process's pid stand for that
    stranger = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()"], stdin=subprocess.PIPE)
    try:
        for path in list(folder.iterdir()):
            if path.name.endswith((f"_{holder.pid}.db", f"_{holder.pid}")):
                path.rename(folder / path.name.replace(str(holder.pid), str(stranger.pid)))
        # When a scrape renders, Then the stranger is not taken for the holder: the gauge is gone
        text = process.render()[0].decode()
        assert "immutant_lease_holder{" not in text
        assert not list(folder.glob(f"*_{stranger.pid}*"))
    finally:
        stranger.kill()
        stranger.communicate()


def test_prepare_folder_empties_a_previous_runs_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(process.MULTIPROC_ENV, "")  # recorded before prepare_folder sets it: unset again after
    stale = tmp_path / "metrics" / "counter_4242.db"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    folder = process.prepare_folder(tmp_path)
    assert folder == stale.parent and not stale.exists() and os.environ[process.MULTIPROC_ENV] == str(folder)


# --- flask immutant metrics -------------------------------------------------------------------

NODE_APP = """
from flask import Flask
from flask_immutant import ImmutantExtension

immutant = ImmutantExtension()

@immutant.listen("/queue/cli-metrics")
def received(n):
    pass

app = Flask(__name__)
app.config.update(IMMUTANT_METRICS=True)
immutant.init_app(app)

@app.post("/publish")
def publish():
    immutant.publish("/queue/cli-metrics", 1)
    return "published"
"""


def test_metrics_command_prints_a_real_nodes_metrics(start_node, node_env: dict[str, str], tmp_path: Path) -> None:
    # Given a node serving an app with metrics on, and a message published through it
    (tmp_path / "metrics_app.py").write_text(NODE_APP)
    node = start_node(app="metrics_app.py")
    node.wait_for(r"serves on http://")
    base = f"http://127.0.0.1:{node_env['IMMUTANT_HTTP_PORT']}"
    with urllib.request.urlopen(urllib.request.Request(f"{base}/publish", method="POST"), timeout=10) as response:
        assert response.read() == b"published"

    # When `flask immutant metrics` asks it
    def scrape() -> str | None:
        result = run_flask(["immutant", "metrics"], node_env, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        delivered = 'immutant_messages_delivered_total{destination="/queue/cli-metrics"} 1.0'
        return result.stdout if delivered in result.stdout else None

    text = wait_until(scrape, 30, interval=0.5)
    # Then it prints the node's exposition text: its own counters and what it read from the store
    assert "immutant_cluster_members 1.0" in text
    assert 'immutant_queue_depth{destination="/queue/cli-metrics"}' in text
    # And the same text is at the node's metrics path
    with urllib.request.urlopen(f"{base}{METRICS_PATH}", timeout=10) as response:
        assert "immutant_cluster_members" in response.read().decode()


def test_metrics_command_says_in_one_line_when_no_node_answers(node_env: dict[str, str]) -> None:
    result = invoke_flask(["immutant", "metrics", "--url", "http://127.0.0.1:9"], node_env)
    assert result.returncode == 1
    assert result.stderr.startswith("Error: no node answers at http://127.0.0.1:9/-/immutant/metrics")
    assert len(result.stderr.strip().splitlines()) == 1


def test_metrics_command_refuses_a_url_that_is_not_http(node_env: dict[str, str]) -> None:
    result = invoke_flask(["immutant", "metrics", "--url", "file:///etc/passwd"], node_env)
    assert result.returncode == 1 and "expected http://host:port" in result.stderr


# --- messaging counters across a SIGKILL ------------------------------------------------------

FAILOVER_APP = """
import os, threading
from flask import Flask, request
from flask_immutant import ImmutantExtension

immutant = ImmutantExtension()
NODE = os.environ.get("IMMUTANT_NODE_NAME")  # set in the runtime; not in the supervisor

@immutant.listen("/queue/hold")
def hold(body):
    if body == "fail":
        raise RuntimeError("failing on purpose")
    if NODE == "victim":
        print("holding", flush=True)
        threading.Event().wait(60)

app = Flask(__name__)
app.config.update(IMMUTANT_METRICS=True, IMMUTANT_CLUSTERED=True, IMMUTANT_MESSAGING_MAX_RETRIES=1,
                  IMMUTANT_MESSAGING_MIN_BACKOFF=0.05, IMMUTANT_MESSAGING_MAX_BACKOFF=0.1)
immutant.init_app(app)

@app.post("/publish/<body>")
def publish(body):
    immutant.publish("/queue/hold", body)
    return "published"
"""


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{METRICS_PATH}", timeout=10) as response:
        return str(response.read().decode())


def _value(text: str, sample: str) -> float | None:
    found = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else None


def test_a_dead_consumers_messages_count_as_redelivered_and_failures_as_retried_then_dead(
        start_node, node_env: dict[str, str], tmp_path: Path) -> None:
    # Given a victim node holding three messages in its handlers
    (tmp_path / "hold_app.py").write_text(FAILOVER_APP)
    victim = start_node("--node-name", "victim", app="hold_app.py")
    victim.wait_for(r"serves on http://")
    port = int(node_env["IMMUTANT_HTTP_PORT"])
    for _ in range(3):
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/publish/hold", method="POST"),
                               timeout=10).close()
    wait_until(lambda: victim.output.count("holding") == 3, 30)
    survivor = start_node("--node-name", "survivor", "--port-offset", "100", app="hold_app.py")
    survivor.wait_for(r"serves on http://")
    # When the victim is killed with SIGKILL
    victim.signal(signal.SIGKILL)
    # Then the survivor's metrics count its three messages as redelivered after a dead consumer
    hold = 'destination="/queue/hold"'
    wait_until(lambda: _value(_scrape(port + 100), f"immutant_messages_redelivered_total{{{hold}}}") == 3.0, 30)
    # And delivered there, once each
    wait_until(lambda: _value(_scrape(port + 100), f"immutant_messages_delivered_total{{{hold}}}") == 3.0, 30)
    # When a message fails every attempt
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port + 100}/publish/fail", method="POST"),
                           timeout=10).close()
    # Then it counts two failures, one retry and one dead letter, and the dead-letter store shows it
    wait_until(lambda: _value(_scrape(port + 100), f"immutant_messages_dead_lettered_total{{{hold}}}") == 1.0, 30)
    text = _scrape(port + 100)
    assert _value(text, f"immutant_messages_failed_total{{{hold}}}") == 2.0
    assert _value(text, f"immutant_messages_retried_total{{{hold}}}") == 1.0
    wait_until(lambda: _value(_scrape(port + 100), f"immutant_queue_dead{{{hold}}}") == 1.0, 10)


# --- the embedded balancer --------------------------------------------------------------------


def test_the_embedded_balancer_counts_requests_and_retries_and_never_forwards_the_metrics_path(
        node_env: dict[str, str], store_client, cluster_name: str, tmp_path: Path) -> None:
    from balancer_support import Backend, free_port, start_embedded

    from flask_immutant.contexts import registry
    from flask_immutant.keys import Keys

    # Given a backend x and a context whose node refuses connections, behind balancers with and without metrics
    keys, backend, dead = Keys(cluster_name), Backend("x"), free_port()
    for node, port in (("x", backend.port), ("dead", dead)):
        registry.publish(store_client, keys, registry.Context(node, "/", "app", "127.0.0.1", port, 100, os.getpid(),
                                                              time.time()), 60)
        registry.announce(store_client, keys, f"{node}|/")
    on, on_url = start_embedded({**node_env, "IMMUTANT_METRICS": "1"}, tmp_path)
    off, off_url = start_embedded(node_env, tmp_path)
    try:
        wait_until(lambda: _status(f"{on_url}/who", {"IMMUTANT_ROUTE": "x"}) == 200, 10)
        # When a client bound to the dead node asks
        assert _status(f"{on_url}/who", {"IMMUTANT_ROUTE": "dead"}) == 200
        # Then the balancer's metrics count the retry on the dead node and the request x answered
        hits = backend.hits
        text = _scrape_url(on_url)
        assert (_value(text, 'immutant_balancer_retries_total{backend="dead",context="/"}') or 0) >= 1
        assert (_value(text, 'immutant_balancer_requests_total{backend="x",context="/",status="2xx"}') or 0) >= 2
        assert (_value(text, 'immutant_balancer_request_seconds_count{backend="x",context="/"}') or 0) >= 2
        # And a proxy on loopback in front of the balancer (a TLS terminator) does not lend it its address
        assert requests.get(f"{on_url}{METRICS_PATH}", headers={"X-Forwarded-For": "203.0.113.9"},
                            timeout=10).status_code == 403
        # And a balancer with metrics off answers the path 404 itself; neither forwards it
        assert _status(f"{off_url}{METRICS_PATH}") == 404
        assert backend.hits == hits
    finally:
        on.cleanup()
        off.cleanup()
        backend.close()


def _status(url: str, cookies: dict[str, str] | None = None) -> int:
    import requests

    return int(requests.get(url, cookies=cookies, timeout=10).status_code)


def _scrape_url(base: str) -> str:
    with urllib.request.urlopen(f"{base}{METRICS_PATH}", timeout=10) as response:
        return str(response.read().decode())


# --- the reserved prefix is never forwarded, and a node does not lend trust to a proxy ---------

RESERVED_APP = """
from flask import Flask
from flask_immutant import ImmutantExtension
immutant = ImmutantExtension()
app = Flask(__name__)
app.config.update(IMMUTANT_METRICS=True)
immutant.init_app(app)

@app.get("/")
def index():
    return "hello"
"""
#: The metrics path as a client may spell it to slip past a prefix check: encoded slashes and
#: letters (once and twice), repeated slashes, dot segments, another case.
SPELLINGS = (METRICS_PATH, "/-/immutant%2Fmetrics", "/-/immutant%2fmetrics", "/-%2Fimmutant%2Fmetrics",
             "/-/%69mmutant/metrics", "/-/immutant%252Fmetrics", "//-/immutant/metrics", "/-//immutant/metrics",
             "/-/./immutant/metrics", "/x/../-/immutant/metrics", "/x/%2e%2e/-/immutant/metrics",
             "/-/IMMUTANT/metrics", f"{METRICS_PATH}?x=1")


def raw_get(base: str, target: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    """GET ``target`` byte for byte as given (no client-side normalisation)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode("utf-8", "replace")
    finally:
        connection.close()


def start_metrics_node(start_node, tmp_path: Path, **env: str) -> str:
    (tmp_path / "app.py").write_text(RESERVED_APP)
    node = start_node(app="app.py", env=env)
    return node.wait_for(r"serves on (http://[\d.]+:\d+)", timeout=60).group(1)


def test_the_reserved_prefix_is_recognised_however_it_is_spelt() -> None:
    from flask_immutant.metrics.http import reserved

    assert all(reserved(target) for target in SPELLINGS)
    assert not any(reserved(target) for target in ("/", "/-/immutantly", "/immutant/metrics", "/shop/-/x",
                                                   "/static/immutant/app.js"))


def test_a_node_refuses_its_metrics_to_a_request_forwarded_by_an_untrusted_proxy(start_node, tmp_path: Path) -> None:
    # Given a node with metrics on and no IMMUTANT_TRUSTED_PROXIES
    url = start_metrics_node(start_node, tmp_path)
    wait_until(lambda: raw_get(url, "/")[0] == 200, 30)
    # When a loopback peer asks directly, Then it reads the metrics
    status, body = raw_get(url, METRICS_PATH)
    assert status == 200 and "immutant_cluster_members" in body
    # When a loopback peer asks with a header a proxy adds (a proxy on this machine nobody listed),
    # Then the node refuses: the proxy's loopback address is not the client's
    for header in ("X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto", "Forwarded"):
        status, body = raw_get(url, METRICS_PATH, {header: "for=203.0.113.9" if header == "Forwarded" else "x"})
        assert status == 403 and "IMMUTANT_TRUSTED_PROXIES" in body, (header, status, body)
    # And the app's own paths still answer such requests
    assert raw_get(url, "/", {"X-Forwarded-For": "203.0.113.9"})[0] == 200


def test_the_embedded_balancer_never_forwards_the_reserved_prefix_however_spelt(
        start_node, node_env: dict[str, str], tmp_path: Path) -> None:
    from balancer_support import start_embedded

    # Given a node with metrics on, behind the embedded balancer, and a client that is not loopback
    start_metrics_node(start_node, tmp_path)
    balancer, url = start_embedded(node_env, tmp_path, "--host", "0.0.0.0", "--no-console")
    public = url.replace("0.0.0.0", _public_address())
    try:
        wait_until(lambda: raw_get(public, "/")[0] == 200, 30)
        # When the client asks for the metrics path, spelt every way
        for target in SPELLINGS:
            status, body = raw_get(public, target)
            # Then the balancer answers itself (its own metrics refuse a public client); the node is never asked
            assert status in (403, 404) and body.startswith("flask-immutant balancer:"), (target, status, body[:200])
    finally:
        balancer.cleanup()


def _public_address() -> str:
    """This machine's address that is not loopback, as the internet side of a balancer sees it."""
    import socket

    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # nothing is sent: picks the interface a route would use
        address = str(probe.getsockname()[0])
    finally:
        probe.close()
    if address.startswith("127."):
        pytest.skip("this machine has no address besides loopback")
    return address


# --- an unreachable broker -----------------------------------------------------------------------

RABBITMQ_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
#: A node's scrape reading, in its own process (pika leaves a refused connection's sockets behind).
READING = textwrap.dedent("""
    import json, sys
    from flask import Flask
    from flask_immutant import ImmutantExtension
    from flask_immutant.metrics.cluster import ClusterCollector
    app = Flask(__name__)
    app.config.update(IMMUTANT_METRICS=True, IMMUTANT_BROKER_URL=sys.argv[1])
    immutant = ImmutantExtension(app)
    if len(sys.argv) > 2:
        with app.app_context():
            immutant.publish(sys.argv[2], 1)
    reading = {found.name: {s.labels.get("destination", ""): s.value for s in found.samples}
               for found in ClusterCollector(app.extensions["immutant"]).collect()}
    print(json.dumps(reading))
""")


def _reading(env: dict[str, str], broker: str, *publish: str) -> dict[str, dict[str, float]]:
    import json

    done = subprocess.run([sys.executable, "-c", READING, broker, *publish], env=env, capture_output=True, text=True,
                          timeout=120, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_an_unreachable_broker_leaves_queue_depths_out_and_says_so(node_env: dict[str, str], cluster_name: str) -> None:
    from balancer_support import free_port

    # Given a message waiting on RabbitMQ, counted by a node that reaches it
    destination = f"/queue/up-{cluster_name}"
    up = _reading(node_env, RABBITMQ_URL, destination)
    assert up["immutant_queue_depth"][destination] == 1.0 and up["immutant_broker_up"] == {"": 1.0}
    # When a node of the same cluster reads while its broker does not answer (nothing listens there)
    down = _reading(node_env, f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F")
    # Then the depth is not reported as 0 but left out, and immutant_broker_up is 0
    assert destination not in down["immutant_queue_depth"] and destination not in down["immutant_queue_dead"]
    assert down["immutant_broker_up"] == {"": 0.0}


def test_the_embedded_balancer_forgets_a_backends_series_when_it_leaves_the_routing_table(
        node_env: dict[str, str], store_client, cluster_name: str, tmp_path: Path) -> None:
    from balancer_support import Backend, start_embedded

    from flask_immutant.contexts import registry
    from flask_immutant.keys import Keys

    # Given two backends of one context behind a balancer with metrics on, each having answered
    keys, backends = Keys(cluster_name), {name: Backend(name) for name in ("x", "y")}
    for name, backend in backends.items():
        registry.publish(store_client, keys, registry.Context(name, "/", "app", "127.0.0.1", backend.port, 100,
                                                              os.getpid(), time.time()), 60)
        registry.announce(store_client, keys, f"{name}|/")
    balancer, url = start_embedded({**node_env, "IMMUTANT_METRICS": "1"}, tmp_path)
    series = 'immutant_balancer_requests_total{{backend="{}",context="/",status="2xx"}}'
    try:
        for name in backends:
            wait_until(lambda name=name: _status(f"{url}/who", {"IMMUTANT_ROUTE": name}) == 200
                       and _value(_scrape_url(url), series.format(name)) is not None, 10)
        # When y leaves the routing table (its node undeployed, or a pod that is gone for good)
        registry.withdraw(store_client, keys, "y", "/", os.getpid())
        registry.announce(store_client, keys, "y|/")
        # Then the balancer's metrics drop y's series and keep x's
        wait_until(lambda: 'backend="y"' not in _scrape_url(url), 10, message="y's series dropped")
        assert _value(_scrape_url(url), series.format("x")) is not None
    finally:
        balancer.cleanup()
        for backend in backends.values():
            backend.close()


HANDLED_APP = """
import os
from flask import Flask
from flask_immutant import ImmutantExtension

immutant = ImmutantExtension()

@immutant.listen("/queue/handled")
def received(n):
    with open(os.environ["HANDLED_LOG"], "a") as log:
        log.write(f"{n}\\n")

app = Flask(__name__)
app.config.update(IMMUTANT_METRICS=True, IMMUTANT_MESSAGING_MAX_RETRIES=2)
immutant.init_app(app)

@app.post("/publish/<int:n>")
def publish(n):
    immutant.publish("/queue/handled", n)
    return "published"
"""


def test_a_message_is_handled_once_when_its_metrics_cannot_be_written(
        start_node, node_env: dict[str, str], tmp_path: Path) -> None:
    # Given a real node with metrics on whose metrics folder is removed before any message
    # (the handler histogram's file cannot be opened: the first observe fails)
    (tmp_path / "handled_app.py").write_text(HANDLED_APP)
    handled = tmp_path / "handled.log"
    name = f"handled-{node_env['IMMUTANT_CLUSTER']}"
    node = start_node(app="handled_app.py", env={"IMMUTANT_NODE_NAME": name, "HANDLED_LOG": str(handled)})
    node.wait_for(r"serves on http://")
    shutil.rmtree(Path(node_env["IMMUTANT_HOME"]) / "nodes" / name / "metrics")
    base = f"http://127.0.0.1:{node_env['IMMUTANT_HTTP_PORT']}"

    def publish(n: int) -> None:
        with urllib.request.urlopen(urllib.request.Request(f"{base}/publish/{n}", method="POST"), timeout=10) as r:
            assert r.read() == b"published"

    # When a message is published and handled without raising
    publish(1)
    # Then the node says once that the metric stopped recording; the handler's success stands
    node.wait_for(r"immutant_message_handler_seconds stopped recording", timeout=30)
    # And later messages are handled, each once, with no failure reaching the engine
    publish(2)
    publish(3)
    wait_until(lambda: handled.exists() and sorted(handled.read_text().split()) == ["1", "2", "3"], 30)
    # (each metric that failed logged one warning with its traceback, and there is no other)
    output = node.output
    failed = re.findall(r"metrics: (\w+) stopped recording", output)
    assert len(failed) == len(set(failed)) and output.count("Traceback") == len(failed), output[-3000:]
