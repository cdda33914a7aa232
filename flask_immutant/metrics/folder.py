"""The exposition text of a node's multi-process folder, rendered without prometheus_client's
per-sample objects.

prometheus_client's ``MultiProcessCollector`` builds a ``Metric``, a ``Sample`` namedtuple and
two label dicts for every value of every file at every scrape (about 3,000 container objects for
50 destinations), and ``generate_latest`` escapes and formats each label again. In a runtime with
a large heap those objects survive a few young collections while the scrape runs, and every few
scrapes they trigger a full collection of the whole runtime: that, not the parsing, made a
scrape's p99 (bench/metrics_scrape.py). Here a file's key (its metric, sample name and labels,
JSON) is parsed once per process and kept with its ready-made line prefix; a scrape re-reads
every file, adds the values into those kept series and joins strings.

It reads the files with prometheus_client's own reader (``MmapedDict.read_all_values_from_file``,
not its public API) and merges them as ``MultiProcessCollector`` does, kind by kind and gauge
mode by mode. ``tests/test_metrics.py::test_the_folder_render_matches_prometheus_client_contract``
pins both to the installed version: real processes write every kind and mode, and the two texts
must hold the same families, samples and values. A file or key this module does not know (a
summary, a ``mostrecent`` gauge, an unexpected sample name) raises :class:`Unsupported`, and the
caller renders that scrape with prometheus_client instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from ..errors import ImmutantError

#: Gauge modes merged here, and how (prometheus_client's ``multiprocess_mode`` values).
_SUM_MODES = frozenset({"sum", "livesum"})
_MAX_MODES = frozenset({"max", "livemax"})
_MIN_MODES = frozenset({"min", "livemin"})
_ALL_MODES = frozenset({"all", "liveall"})
_GAUGE_MODES = _SUM_MODES | _MAX_MODES | _MIN_MODES | _ALL_MODES
#: How many series not seen in the last scrape the cache keeps before it drops them (each
#: ``liveall`` gauge of a dead pid is one; other series come back with their labels).
_SPARE = 512


class Unsupported(ImmutantError):
    """A file or key the fast render does not handle; render the scrape with prometheus_client."""


class _Series:
    """One line of the text: its prefix (``name{labels} ``) and the value merged this scrape."""

    __slots__ = ("le", "prefix", "seen", "value")

    def __init__(self, prefix: str, le: float = 0.0) -> None:
        self.prefix = prefix
        self.le = le
        self.value = 0.0
        self.seen = 0


class _Group:
    """The series of one label set of a family (a histogram's ``_sum``, buckets and ``_count``)."""

    __slots__ = ("buckets", "count_prefix", "series")

    def __init__(self) -> None:
        self.series: dict[str, _Series] = {}
        self.buckets: dict[float, _Series] = {}
        self.count_prefix = ""


class _Family:
    __slots__ = ("groups", "header", "histogram", "kind", "mode", "name")

    def __init__(self, name: str, header: str, kind: str, mode: str) -> None:
        self.name = name
        self.header = header
        self.kind = kind
        self.histogram = kind == "histogram"
        self.mode = mode
        self.groups: dict[tuple[tuple[str, str], ...], _Group] = {}


class FolderRender:
    """Renders one multi-process folder, scrape after scrape, keeping what does not change
    between them: families, label sets, line prefixes. Not thread-safe: the caller holds the
    folder's lock (:func:`.process.render`)."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}
        #: (file kind, key as written) -> the series its value goes to; for ``liveall`` gauges the
        #: file kind includes the pid.
        self._keys: dict[tuple[str, str], _Series] = {}
        self._file_kinds: dict[str, tuple[str, str, str]] = {}
        self._scrape = 0

    def render(self, folder: str) -> bytes:
        """The text prometheus_client's ``generate_latest`` gives for the folder's files."""
        from prometheus_client.mmap_dict import MmapedDict
        from prometheus_client.utils import floatToGoString

        self._scrape += 1
        scrape = self._scrape
        seen = 0
        for filename in os.listdir(folder):
            if not filename.endswith(".db"):
                continue
            if not written(os.path.join(folder, filename)):
                continue
            kind, mode, pid = self._file_kind(filename)
            file_kind = f"{kind}_{mode}_{pid}" if mode in _ALL_MODES else f"{kind}_{mode}"
            try:
                values = MmapedDict.read_all_values_from_file(os.path.join(folder, filename))
            except FileNotFoundError:  # a live gauge's file of a process folded meanwhile
                if kind == "gauge" and mode.startswith("live"):
                    continue
                raise
            keys, combine = self._keys, _COMBINE[mode if kind == "gauge" else "sum"]
            for key, value, _timestamp, _pos in values:
                series = keys.get((file_kind, key))
                if series is None:
                    series = keys[(file_kind, key)] = self._new_series(kind, mode, pid, key)
                if series.seen == scrape:
                    series.value = combine(series.value, value)
                else:
                    series.value, series.seen = value, scrape
                    seen += 1
        output: list[str] = []
        for family in self._families.values():
            start = len(output)
            output.append(family.header)
            for group in family.groups.values():
                for series in group.series.values():
                    if series.seen == scrape:
                        output.append(f"{series.prefix}{floatToGoString(series.value)}\n")
                if family.histogram:
                    total, counted = 0.0, False
                    for series in group.buckets.values():
                        if series.seen == scrape:
                            total += series.value
                            counted = True
                            output.append(f"{series.prefix}{floatToGoString(total)}\n")
                    if counted:
                        output.append(f"{group.count_prefix}{floatToGoString(total)}\n")
            if len(output) == start + 1:  # none of its series is in a file any more
                output.pop()
        if len(self._keys) > seen + _SPARE:
            self._forget_unseen()
        return "".join(output).encode("utf-8")

    def _file_kind(self, filename: str) -> tuple[str, str, str]:
        """``counter_123.db`` -> ("counter", "", "123"); ``gauge_livesum_123.db`` -> ("gauge", "livesum", "123")."""
        known = self._file_kinds.get(filename)
        if known is None:
            parts = filename[:-3].split("_")
            if parts[0] in ("counter", "histogram") and len(parts) == 2:
                known = (parts[0], "", parts[1])
            elif parts[0] == "gauge" and len(parts) == 3 and parts[1] in _GAUGE_MODES:
                known = (parts[0], parts[1], parts[2])
            else:
                raise Unsupported(filename)
            if len(self._file_kinds) > 4 * _SPARE:
                self._file_kinds.clear()
            self._file_kinds[filename] = known
        return known

    def _new_series(self, kind: str, mode: str, pid: str, key: str) -> _Series:
        """The series ``key`` of a ``kind`` file adds to, created with its family and label set
        when first seen; prefixes and headers come from prometheus_client's own exposition."""
        try:
            metric_name, name, labels, help_text = json.loads(key)
            pairs = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
        except (ValueError, TypeError, AttributeError) as exc:
            raise Unsupported(key) from exc
        family = self._families.get(metric_name)
        if family is None:
            family = self._families[metric_name] = _Family(
                metric_name, _exposition(metric_name, help_text, kind, []), kind, mode)
        elif (family.kind, family.mode) != (kind, mode):
            raise Unsupported(f"{metric_name} is in files of two kinds or modes")
        le: float | None = None
        if kind == "histogram" and name == metric_name + "_bucket":
            le_text = dict(pairs).get("le")
            if le_text is None:
                raise Unsupported(key)
            le = float(le_text)
            pairs = tuple(pair for pair in pairs if pair[0] != "le")
        elif name != metric_name + {"counter": "_total", "histogram": "_sum"}.get(kind, ""):
            raise Unsupported(key)  # a _created, _gsum... sample: prometheus_client moves those
        if mode in _ALL_MODES:
            pairs = tuple(sorted((*pairs, ("pid", pid))))
        group = family.groups.get(pairs)
        if group is None:
            group = family.groups[pairs] = _Group()
            if kind == "histogram":
                group.count_prefix = _prefix(metric_name, help_text, kind, metric_name + "_count", pairs)
        if le is None:
            series = group.series.get(name)
            if series is None:
                series = group.series[name] = _Series(_prefix(metric_name, help_text, kind, name, pairs))
            return series
        series = group.buckets.get(le)
        if series is None:
            from prometheus_client.utils import floatToGoString

            labelled = tuple(sorted((*pairs, ("le", floatToGoString(le)))))
            series = group.buckets[le] = _Series(_prefix(metric_name, help_text, kind, name, labelled), le)
            group.buckets = dict(sorted(group.buckets.items()))
        return series

    def _forget_unseen(self) -> None:
        """Drop the series, label sets and families the last scrape did not see (the files that
        held them are gone), so that a node that ran many processes keeps a cache its size."""
        scrape = self._scrape
        self._keys = {key: series for key, series in self._keys.items() if series.seen == scrape}
        for family in self._families.values():
            for group in family.groups.values():
                group.series = {name: s for name, s in group.series.items() if s.seen == scrape}
                group.buckets = {le: s for le, s in group.buckets.items() if s.seen == scrape}
            family.groups = {labels: group for labels, group in family.groups.items()
                             if group.series or group.buckets}
        self._families = {name: family for name, family in self._families.items() if family.groups}

def written(path: str) -> bool:
    """Whether the metrics file at ``path`` is past its creation. A process creates its file of a
    kind on its first value of that kind (``open``, then ``truncate`` to size): in between it is
    empty, and prometheus_client's reader fails on it (``unpack_from requires a buffer of at least
    4 bytes``), which failed the whole scrape. A runtime's first request or message creates one
    while other threads and processes scrape; it holds no value yet, and never shrinks back."""
    try:
        return os.stat(path).st_size > 0
    except FileNotFoundError:
        return False


def _sum(total: float, value: float) -> float:
    return total + value


def _last(_: float, value: float) -> float:
    return value


#: How a value joins the value another file gave the same series this scrape, by gauge mode
#: ("sum" also for counters and histograms), as ``MultiProcessCollector`` merges them.
_COMBINE: dict[str, Callable[[float, float], float]] = {
    **dict.fromkeys(_SUM_MODES | {"sum", ""}, _sum), **dict.fromkeys(_MAX_MODES, max),
    **dict.fromkeys(_MIN_MODES, min), **dict.fromkeys(_ALL_MODES, _last)}


def _exposition(metric_name: str, help_text: str, kind: str, samples: list[tuple[str, dict[str, str]]]) -> str:
    """prometheus_client's text for one family holding ``samples`` (each valued 0)."""
    from prometheus_client import generate_latest
    from prometheus_client.core import Metric

    metric = Metric(metric_name, help_text, kind)
    for name, labels in samples:
        metric.add_sample(name, labels, 0.0)

    class One:
        def collect(self) -> list[Any]:
            return [metric]

    return generate_latest(One()).decode("utf-8")


def _prefix(metric_name: str, help_text: str, kind: str, name: str, pairs: tuple[tuple[str, str], ...]) -> str:
    """A sample's line up to its value (``name{label="value"} ``), as prometheus_client writes it."""
    line = _exposition(metric_name, help_text, kind, [(name, dict(pairs))]).splitlines()[-1]
    prefix, space, value = line.rpartition(" ")
    if value != "0.0" or not space:
        raise Unsupported(line)
    return prefix + space
