"""Scheduled jobs: spec parsing (pure), the driver on a real store, and jobs on real nodes."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from flask import Flask

from flask_immutant.cluster.lease import LeaseManager
from flask_immutant.jobs.driver import JobDriver, current
from flask_immutant.jobs.spec import JobSpec
from flask_immutant.jobs.store import JobStore
from flask_immutant.keys import Keys

from support import run_flask, wait_until

# --- the spec (pure logic) ---


def test_five_field_cron_fires_on_minutes():
    spec = JobSpec.build("j", cron="*/15 * * * *")
    start = dt.datetime(2026, 1, 1, 10, 7, 30).timestamp()
    assert dt.datetime.fromtimestamp(spec.first_due(start)) == dt.datetime(2026, 1, 1, 10, 15)  # type: ignore[arg-type]


def test_six_field_quartz_cron_has_seconds_first_and_question_marks():
    spec = JobSpec.build("j", cron="*/10 * * * * ?")
    start = dt.datetime(2026, 1, 1, 10, 0, 3).timestamp()
    first = spec.first_due(start)
    assert first is not None and dt.datetime.fromtimestamp(first) == dt.datetime(2026, 1, 1, 10, 0, 10)
    assert spec.next_due(first) == first + 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cron": "* * *"}, "expected 5 fields"),
        ({"cron": "99 * * * *"}, "not a valid cron"),
        ({"every": "soon"}, "every='soon'"),
        ({"every": 0}, "more than zero"),
        ({"at": 5, "in_": 5}, "give one"),
        ({"cron": "* * * * *", "every": 1}, "cannot be combined"),
        ({}, "needs one of"),
        ({"every": 1, "misfire": "later"}, "misfire='later'"),
        ({"every": 1, "limit": 0}, "limit=0"),
        ({"every": 1, "until": "tomorrow"}, "until='tomorrow'"),
    ],
)
def test_a_bad_schedule_says_what_is_wrong(kwargs: dict[str, Any], message: str):
    with pytest.raises(ValueError, match=message):
        JobSpec.build("j", **kwargs)


def test_durations_and_bounds():
    assert JobSpec.build("j", every="500ms").every == 0.5
    assert JobSpec.build("j", every=dt.timedelta(minutes=2)).every == 120
    spec = JobSpec.build("j", every=10, until=1000.0)
    assert spec.next_due(985.0) == 995.0
    assert spec.next_due(995.0) is None
    assert spec.next_due_after_now(100.0, 131.0) == 140.0
    assert JobSpec.build("j", at=50.0).next_due(50.0) is None
    with pytest.raises(ValueError, match="job name"):
        JobSpec.build("bad name", every=1)


# --- the driver on a real store, in process ---


class Harness:
    def __init__(self, store: redis.Redis, url: str, cluster: str) -> None:
        self.app = Flask("harness")
        self.keys = Keys(cluster)
        self.jobs = JobStore(store, self.keys, "harness")
        self.leases = LeaseManager(url, self.keys, "here", 1.0)
        self.fired: list[float] = []
        self.lock = threading.Lock()

    def record(self) -> None:
        fire = current()
        assert fire is not None
        with self.lock:
            self.fired.append(fire.due)

    def driver(self, spec: JobSpec) -> JobDriver:
        driver = JobDriver(self.app, self.jobs, "here", 1.0, {spec.name: self.record}, {spec.name: spec})
        driver.start(self.leases, "scheduler:harness")
        return driver


@pytest.fixture
def harness(store_client, embedded_store, cluster_name):
    made = Harness(store_client, embedded_store.url, cluster_name)
    try:
        yield made
    finally:
        made.leases.close()


@pytest.mark.parametrize("policy", ["fire_once", "skip"])
def test_a_misfire_follows_the_jobs_policy(harness, store_client, policy):
    # Given a 1 s job whose stored next due time is long past (no scheduler ran for 30 s)
    spec = JobSpec.build("late", every=1, misfire=policy)
    harness.jobs.upsert(spec)
    overdue = time.time() - 30
    store_client.zadd(harness.keys.jobs_schedule("harness"), {harness.jobs.job_id("late"): overdue})
    # When a scheduler starts
    driver = harness.driver(spec)
    try:
        wait_until(lambda: [d for d in harness.fired if d > overdue + 1], timeout=5)
    finally:
        driver.stop()
    # Then the missed due times were fired once (fire_once) or not at all (skip), never 30 times
    missed = [d for d in harness.fired if d == overdue]
    assert len(missed) == (1 if policy == "fire_once" else 0)
    assert all(d > time.time() - 5 for d in harness.fired if d != overdue)


def test_limit_counts_in_the_store(harness, store_client):
    spec = JobSpec.build("thrice", every=0.1, limit=3)
    harness.jobs.upsert(spec)
    driver = harness.driver(spec)
    try:
        wait_until(lambda: len(harness.fired) >= 3, timeout=5)
        time.sleep(0.5)  # more due times would have come by now
    finally:
        driver.stop()
    assert len(harness.fired) == 3
    assert store_client.zscore(harness.keys.jobs_schedule("harness"), harness.jobs.job_id("thrice")) is None


def test_scheduling_the_same_job_again_changes_nothing(harness):
    spec = JobSpec.build("same", every=60)
    assert harness.jobs.upsert(spec) is True
    first = harness.jobs.next_due()
    assert harness.jobs.upsert(JobSpec.build("same", every=60)) is False
    assert harness.jobs.next_due() == first
    assert harness.jobs.upsert(JobSpec.build("same", every=30)) is True  # a changed spec updates
    assert len(harness.jobs.listing()) == 1


def test_stored_schedules_are_json_not_pickle(harness, store_client):
    harness.jobs.upsert(JobSpec.build("plain", every=60))
    raw = store_client.hget(harness.keys.rq_job_prefix + harness.jobs.job_id("plain"), "meta")
    assert json.loads(raw)["immutant"]["every"] == 60


# --- jobs on real nodes ---

APP = '''
import json, os, time
from flask import Flask
from flask_immutant import ImmutantExtension, get_state, jobs

app = Flask(__name__)
app.config["IMMUTANT_CLUSTERED"] = True
ImmutantExtension(app)
NODE = get_state(app).node_name
LOG = get_state(app).keys.prefix + "test:fired"

def record():
    fire = jobs.current()
    get_state().store.rpush(LOG, json.dumps([NODE, fire.name, fire.due]))
    if fire.name == "flaky":
        raise RuntimeError("flaky job failed")

jobs.schedule("tick", record, every=os.environ.get("EVERY", "1s"), app=app)
jobs.schedule("flaky", record, every="1s", app=app)
jobs.schedule("local", record, every="1s", singleton=False, app=app)
'''


@pytest.fixture
def app_file(tmp_path: Path) -> Path:
    path = tmp_path / "jobs_app.py"
    path.write_text(APP)
    return path


def fired(store: redis.Redis, keys: Keys, name: str) -> list[tuple[str, float]]:
    entries = [json.loads(raw) for raw in store.lrange(keys.prefix + "test:fired", 0, -1)]
    return [(node, due) for node, job, due in entries if job == name]


def test_every_due_time_fires_once_across_a_scheduler_failover(start_node, app_file, store_client, cluster_name,
                                                                node_env):
    keys = Keys(cluster_name)
    a = start_node("--clustered", "--node-name", "a", app=str(app_file))
    b = start_node("--clustered", "--node-name", "b", "--port-offset", "100", app=str(app_file))
    nodes = {"a": a, "b": b}
    a.wait_for("joined cluster")
    b.wait_for("joined cluster")
    wait_until(lambda: len(fired(store_client, keys, "tick")) >= 5, timeout=15)
    # When the node driving the scheduler is killed mid-run
    holder = json.loads(store_client.get(keys.lease("scheduler:jobs_app")))["node"]
    nodes[holder].signal(signal.SIGKILL)
    survivor = "b" if holder == "a" else "a"
    wait_until(lambda: fired(store_client, keys, "tick")[-1][0] == survivor, timeout=10)
    count = len(fired(store_client, keys, "tick"))
    wait_until(lambda: len(fired(store_client, keys, "tick")) >= count + 5, timeout=15)
    # Then the due times form an unbroken 1 s series: none skipped, none fired twice
    dues = sorted(due for _node, due in fired(store_client, keys, "tick"))
    gaps = [round(later - earlier, 3) for earlier, later in itertools.pairwise(dues)]
    assert gaps and all(gap == 1.0 for gap in gaps), gaps
    # And the job exists once, though both nodes scheduled it
    listing = json.loads(run_flask(["immutant", "jobs", "--json"], node_env).stdout)
    assert [row["name"] for row in listing].count("tick") == 1
    # And a job that raises keeps its schedule, with its error shown
    flaky = next(row for row in listing if row["name"] == "flaky")
    assert flaky["fired"] >= 2 and "flaky job failed" in flaky["last_error"]
    # And a non-singleton job fires on every node
    assert {node for node, _due in fired(store_client, keys, "local")} == {"a", "b"}
    # And status --json carries the jobs section
    document = json.loads(run_flask(["immutant", "status", "--json"], node_env).stdout)
    assert {row["name"] for row in document["jobs"]} == {"tick", "flaky"}


def _zlib_bomb(size: int) -> bytes:
    """``size`` zero bytes, zlib-compressed to about a thousandth of that."""
    import zlib

    packer = zlib.compressobj(9)
    chunk = bytes(1 << 24)
    return b"".join(packer.compress(chunk) for _ in range(size >> 24)) + packer.flush()


def _limited_memory() -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_DATA, (400 << 20, 400 << 20))


def test_a_compressed_bomb_in_a_stored_job_is_never_inflated(start_node, app_file, store_client, cluster_name,
                                                             node_env):
    import subprocess
    import sys

    keys = Keys(cluster_name)
    node = start_node("--clustered", "--node-name", "a", app=str(app_file))
    node.wait_for("joined cluster")
    listed = wait_until(lambda: json.loads(run_flask(["immutant", "jobs", "--json"], node_env).stdout), timeout=15)
    tick = next(row for row in listed if row["name"] == "tick")
    # When a store writer puts a zlib bomb (1 GiB inflated) into the fields of a stored job that
    # RQ inflates when it loads a job
    job_key = keys.rq_job_prefix + f"{tick['app']}-tick"
    bomb = _zlib_bomb(1 << 30)
    store_client.hset(job_key, mapping={"data": bomb, "exc_info": bomb})
    # Then listing the jobs, within 400 MiB of heap, still lists it
    result = subprocess.run([sys.executable, "-m", "flask", "immutant", "jobs", "--json"], env=node_env,
                            capture_output=True, text=True, timeout=60, preexec_fn=_limited_memory, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "tick" in {row["name"] for row in json.loads(result.stdout)}, result.stderr[-2000:]
