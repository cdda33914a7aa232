"""Schedules in the cluster store, kept through rq-scheduler.

rq-scheduler stores each schedule as an RQ job (here JSON-serialised, under the cluster prefix)
plus its next due time in a sorted set; that is the format other RQ tools can read. We do not use
its ``run()`` loop, its lock (a 70 s handover, deleted unconditionally) or ``enqueue_job`` (three
separate writes, rescheduled from "now", so it drifts and can double-fire): due times are claimed
by ``store_claim.lua``, one compare-and-set per due time, by the lease-holding scheduler.
"""

from __future__ import annotations

import datetime as dt
import re
import time
from functools import cache
from typing import TYPE_CHECKING, Any, cast

import redis

from .. import lua
from ..keys import Keys
from ..once import computed_once
from ..records import decoded, from_json, hash_of, read_records
from .spec import JobSpec

if TYPE_CHECKING:  # RQ is imported where it is used: `flask immutant status` with no jobs never needs it
    from rq.job import Job
    from rq_scheduler import Scheduler

#: The function an RQ tool would see for our schedules; we fire by name from the app's registry.
FIRE_FUNCTION = "flask_immutant.jobs.fire"


@cache
def _job_class(prefix: str) -> type[Job]:
    """An RQ Job class that lives under ``prefix`` and serialises as JSON, never pickle."""
    from rq.job import Job
    from rq.serializers import JSONSerializer

    class ImmutantJob(Job):
        redis_job_namespace_prefix = prefix

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["serializer"] = JSONSerializer
            super().__init__(*args, **kwargs)

    return ImmutantJob


class JobStore:
    """The stored schedules of one app."""

    def __init__(self, store: redis.Redis, keys: Keys, app: str) -> None:
        self.store = store
        self.keys = keys
        self.app = app_id(app)
        self._app_name = app
        self.job_class = _job_class(keys.rq_job_prefix)
        self._claim = lua.script(store, "jobs/store_claim")

    @computed_once
    def scheduler(self) -> Scheduler:
        from rq_scheduler import Scheduler

        scheduler = Scheduler(queue_name=f"immutant-{self._app_name}", connection=self.store,
                              job_class=self.job_class)
        scheduler.scheduled_jobs_key = self.keys.jobs_schedule(self._app_name)
        return scheduler

    def job_id(self, name: str) -> str:
        return f"{self.app}-{name}"  # RQ ids allow letters, digits, '_' and '-' only

    def name_of(self, job_id: str) -> str:
        return job_id[len(self.app) + 1:]

    def stored_spec(self, name: str) -> JobSpec | None:
        """The spec in the stored job's ``meta`` field, read alone: RQ's ``Job.fetch`` would inflate
        its zlib-compressed fields, which a store writer can make a bomb of."""
        raw = self.store.hget(self.keys.rq_job_prefix + self.job_id(name), "meta")
        try:
            meta = from_json(raw) if raw is not None else None
        except ValueError:
            return None
        spec = meta.get("immutant") if isinstance(meta, dict) else None
        return JobSpec.from_meta(spec) if isinstance(spec, dict) else None

    def upsert(self, spec: JobSpec, now: float | None = None) -> bool:
        """Store ``spec`` unless the same one is stored (every node schedules on start-up: the
        first wins, the others change nothing, so the next due time does not move)."""
        current = self.stored_spec(spec.name)
        scheduled = self.store.zscore(self.keys.jobs_schedule(self.app), self.job_id(spec.name)) is not None
        if current == spec and scheduled:
            return False
        if current == spec and self.store.hget(self.keys.job_state(self.app, spec.name), "fired") is not None:
            return False  # it ran to its end (limit, until, one-shot): do not start it again
        first = spec.first_due(time.time() if now is None else now)
        if current is not None and current != spec:
            self.store.delete(self.keys.job_state(self.app, spec.name))
        if first is None:
            self.remove(spec.name)
            return True
        self.scheduler.schedule(
            dt.datetime.fromtimestamp(first, tz=dt.UTC), FIRE_FUNCTION, args=[self.app, spec.name],
            id=self.job_id(spec.name), meta={"immutant": spec.to_meta()}, result_ttl=-1,
        )
        # rq-scheduler keeps whole seconds; due times here are to the millisecond.
        self.store.zadd(self.keys.jobs_schedule(self.app), {self.job_id(spec.name): first})
        return True

    def remove(self, name: str) -> None:
        self.scheduler.cancel(self.job_id(name))
        self.store.delete(self.keys.rq_job_prefix + self.job_id(name), self.keys.job_state(self.app, name))

    def due(self, now: float) -> list[tuple[str, float]]:
        """(name, due time) of every job due by ``now``, earliest first."""
        entries = cast("list[tuple[bytes, float]]", self.store.zrangebyscore(  # redis-py's untyped reply
            self.keys.jobs_schedule(self.app), "-inf", now, withscores=True
        ))
        found = read_records(dict(entries), f"{self.app} schedule", lambda _name, score: float(score))
        return sorted(((self.name_of(job_id), due) for job_id, due in found.items()), key=lambda item: item[1])

    def next_due(self) -> float | None:
        first = self.store.zrange(self.keys.jobs_schedule(self.app), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def claim(self, spec: JobSpec, due: float, next_due: float | None, node: str, fire: bool) -> int:
        """1: fire it; 2: advanced without firing; 0: not ours (already claimed, gone, at its limit)."""
        result = self._claim(
            keys=[self.keys.jobs_schedule(self.app), self.keys.job_state(self.app, spec.name)],
            args=[self.job_id(spec.name), repr(due), "" if next_due is None else repr(next_due), node,
                  "1" if fire else "0", spec.limit or 0, repr(time.time())],
        )
        return int(result)

    def record_error(self, name: str, error: str | None) -> None:
        self.store.hset(self.keys.job_state(self.app, name), "last_error", error or "")

    def listing(self) -> list[dict[str, Any]]:
        """Every stored job: spec, next due, last fire, fire count, last error (malformed ones
        are skipped with a warning, see ``records.py``)."""
        scored: Any = self.store.zrange(self.keys.jobs_schedule(self.app), 0, -1, withscores=True)
        schedule = read_records(dict(scored), f"{self.app} schedule", lambda _name, score: float(score))
        found = {key: key for key in self.store.scan_iter(match=f"{self.keys.rq_job_prefix}{self.app}-*", count=200)}
        rows = read_records(found, "job", lambda key, _raw: self._row(key, schedule))
        return sorted((row for row in rows.values() if row is not None), key=lambda r: r["name"])

    def _row(self, key: str, schedule: dict[str, float]) -> dict[str, Any] | None:
        job_id = key[len(self.keys.rq_job_prefix):]
        name = self.name_of(job_id)
        spec = self.stored_spec(name)
        if spec is None:
            return None
        state: dict[str, Any] = read_records(hash_of(self.store, self.keys.job_state(self.app, name), "job state"),
                                             f"job {name} state", lambda _field, value: decoded(value))
        return {
            "app": self.app, "name": name, "spec": spec.describe(), "singleton": spec.singleton,
            "next_fire": schedule.get(job_id),
            "last_fire": float(state["last_due"]) if state.get("last_due") else None,
            "last_node": state.get("last_node"), "fired": int(state.get("fired") or 0),
            "last_error": state.get("last_error") or None,
        }


def app_id(app: str) -> str:
    """An app's name as it appears in job ids and keys (``example_app.app`` -> ``example_app_app``)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", app)
