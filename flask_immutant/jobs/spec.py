"""When a job fires: parsing ``cron``/``every``/``at``/``in_``/``until``/``limit`` and computing
due times. Pure logic (no store), so it is unit-tested on its own.

Cron takes 5 fields (minute first) or 6/7 with seconds first, as Immutant's Quartz form
(``"*/5 * * * * ?"``); ``?`` means "any" and a 7th (year) field is not supported.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

MISFIRE_POLICIES = ("fire_once", "skip")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def seconds(value: Any, what: str) -> float:
    """A duration: a number of seconds, a ``timedelta`` or a string such as ``"500ms"``, ``"5m"``."""
    if isinstance(value, dt.timedelta):
        result = value.total_seconds()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        result = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        result = float(match.group(1)) * _UNITS[match.group(2)]
    else:
        raise ValueError(f"{what}={value!r}: expected seconds, a timedelta or a string like '500ms', '5s', '2m'")
    if not math.isfinite(result) or result < 0 or (result == 0 and what == "every"):
        bound = "more than zero" if what == "every" else "zero or more"
        raise ValueError(f"{what}={value!r}: expected a finite number of seconds, {bound}")
    return result


def epoch(value: Any, what: str) -> float:
    """A point in time: a ``datetime`` (naive means local time) or epoch seconds."""
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise ValueError(f"{what}={value!r}: expected a datetime or finite epoch seconds")


def normalise_cron(expression: str) -> tuple[str, bool]:
    """(croniter expression, seconds first?) for a 5- or 6-field cron string."""
    if not isinstance(expression, str):
        raise ValueError(f"cron={expression!r}: expected a string")
    fields = expression.split()
    if len(fields) not in (5, 6):
        raise ValueError(f"cron={expression!r}: expected 5 fields (minute first) or 6 (seconds first, as Quartz)")
    from croniter import croniter  # here: a CLI command that reads no cron never loads it

    fields = ["*" if f == "?" else f for f in fields]
    normalised = " ".join(fields)
    if not croniter.is_valid(normalised, second_at_beginning=len(fields) == 6):
        raise ValueError(f"cron={expression!r}: not a valid cron expression")
    return normalised, len(fields) == 6


def check_cron_fires(expression: str) -> None:
    """A valid expression may still never match a date (``0 0 30 2 *``): refuse it up front
    rather than have the scheduler find out on every tick."""
    from croniter import CroniterError, croniter

    normalised, seconds_first = normalise_cron(expression)
    try:
        croniter(normalised, dt.datetime.now().astimezone(), second_at_beginning=seconds_first).get_next(float)
    except CroniterError:
        raise ValueError(f"cron={expression!r}: can never fire (no date in the next 50 years matches it)") from None


@dataclass(frozen=True)
class JobSpec:
    """A job's schedule, as stored (JSON) in the job's meta."""

    name: str
    cron: str | None = None
    every: float | None = None
    at: float | None = None
    in_: float | None = None
    until: float | None = None
    limit: int | None = None
    singleton: bool = True
    misfire: str = "fire_once"

    @classmethod
    def build(cls, name: str, *, cron: Any = None, every: Any = None, at: Any = None, in_: Any = None,
              until: Any = None, limit: Any = None, singleton: bool = True, misfire: str = "fire_once") -> JobSpec:
        """Validate the arguments of ``jobs.schedule``; raises ``ValueError`` saying what is wrong."""
        if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9_-]{1,200}$", name):
            raise ValueError(f"job name {name!r}: 1-200 letters, digits, '_' or '-'")
        if cron is not None and (every is not None or at is not None or in_ is not None):
            raise ValueError("cron= cannot be combined with every=, at= or in_=")
        if cron is None and every is None and at is None and in_ is None:
            raise ValueError("a job needs one of cron=, every=, at= or in_=")
        if at is not None and in_ is not None:
            raise ValueError("at= and in_= both set the first fire: give one")
        if misfire not in MISFIRE_POLICIES:
            raise ValueError(f"misfire={misfire!r}: expected one of {', '.join(MISFIRE_POLICIES)}")
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"limit={limit!r}: expected a positive integer")
        if cron is not None:
            check_cron_fires(cron)
        return cls(
            name=name, cron=cron,
            every=seconds(every, "every") if every is not None else None,
            at=epoch(at, "at") if at is not None else None,
            in_=seconds(in_, "in_") if in_ is not None else None,
            until=epoch(until, "until") if until is not None else None,
            limit=limit, singleton=bool(singleton), misfire=misfire,
        )

    def to_meta(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> JobSpec:
        known = {k: meta[k] for k in cls.__dataclass_fields__ if k in meta}
        return cls(**known)

    def describe(self) -> str:
        parts = [f"cron {self.cron!r}" if self.cron else "", f"every {self.every:g}s" if self.every else "",
                 f"at {self.at:.3f}" if self.at else "", f"in {self.in_:g}s" if self.in_ else "",
                 f"until {self.until:.3f}" if self.until else "", f"limit {self.limit}" if self.limit else ""]
        return ", ".join(p for p in parts if p)

    # --- due times (epoch seconds) ---

    def first_due(self, now: float) -> float | None:
        if self.cron:
            first = self._cron_after(now)
        elif self.at is not None:
            first = self.at
        elif self.in_ is not None:
            first = now + self.in_
        else:
            assert self.every is not None
            first = now + self.every
        return self._bounded(first)

    def next_due(self, due: float) -> float | None:
        """The due time after ``due`` (``None`` when the schedule has ended)."""
        if self.cron:
            return self._bounded(self._cron_after(due))
        if self.every:
            return self._bounded(due + self.every)
        return None  # a one-shot at=/in_= job

    def next_due_after_now(self, due: float, now: float) -> float | None:
        """The first due time after ``now`` (for a misfire: skip what was missed)."""
        if self.cron:
            return self._bounded(self._cron_after(now))
        if self.every:
            missed = int((now - due) // self.every) + 1
            return self._bounded(due + missed * self.every)
        return None

    def _cron_after(self, moment: float) -> float:
        from croniter import croniter

        assert self.cron is not None
        expression, seconds_first = normalise_cron(self.cron)
        start = dt.datetime.fromtimestamp(moment).astimezone()
        return float(croniter(expression, start, second_at_beginning=seconds_first).get_next(float))

    def _bounded(self, due: float | None) -> float | None:
        if due is None or (self.until is not None and due > self.until):
            return None
        return due
