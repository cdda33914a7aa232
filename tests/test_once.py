"""Attributes made once per instance however many threads ask first (Python 3.12 dropped
``functools.cached_property``'s lock: racing threads each made one and all but one were dropped)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from flask_immutant import ImmutantExtension
from flask_immutant.jobs.store import JobStore
from flask_immutant.messaging import messaging_for
from flask_immutant.once import computed_once

from support import track


def race(first_use: Callable[[], Any], threads: int = 8) -> list[Any]:
    """What ``first_use`` returned in each of ``threads`` threads started together."""
    barrier = threading.Barrier(threads)
    seen: list[Any] = []

    def run() -> None:
        barrier.wait(10)
        seen.append(first_use())

    started = [threading.Thread(target=run) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join(30)
    assert len(seen) == threads
    return seen


def test_a_slow_value_is_made_once_and_shared() -> None:
    made: list[object] = []

    class Holder:
        @computed_once
        def value(self) -> object:
            time.sleep(0.05)  # long enough for every thread to arrive while the first computes
            made.append(object())
            return made[-1]

    holder = Holder()
    seen = race(lambda: holder.value)
    assert len(made) == 1 and all(value is made[0] for value in seen)
    holder.__dict__["value"] = "preset"  # like cached_property: a value set first wins
    assert holder.value == "preset"


@pytest.mark.parametrize("attribute", ["backend", "publisher"])
def test_threads_publishing_first_share_one_broker(clean_env, immutant_home: Path, embedded_store: Any,
                                                   cluster_name: str, attribute: str) -> None:
    # Given an app whose first publishes come from several request threads at once
    app = Flask("racing")
    track(app)
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name)
    ImmutantExtension(app)
    messaging = messaging_for(app)
    # Then they share one backend and one publishing broker (no connection made and dropped)
    seen = race(lambda: getattr(messaging, attribute))
    assert all(value is seen[0] for value in seen)


def test_threads_scheduling_first_share_one_scheduler(clean_env, immutant_home: Path, embedded_store: Any,
                                                      cluster_name: str) -> None:
    app = Flask("racing_jobs")
    track(app)
    app.config.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name)
    ImmutantExtension(app)
    from flask_immutant import get_state

    state = get_state(app)
    jobs = JobStore(state.store, state.keys, "racing_jobs")
    seen = race(lambda: jobs.scheduler)
    assert all(value is seen[0] for value in seen)
