"""How node and app runtime processes log: text (the default) or, with
``IMMUTANT_LOG_FORMAT=json``, one JSON object per line for a log shipper.

Every process of a node (supervisor, app runtimes, console, balancer) sets up logging here and
only here. A JSON line carries ``time``, ``level``, ``logger``, ``message``, ``node``,
``deployment`` (the app a runtime serves; null in the supervisor), ``trace_id``/``span_id`` when
an OpenTelemetry span is active, and ``exception`` (the formatted traceback) when there is one.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Any

import click

from .hookspecs import hookimpl
from .settings import Setting

if TYPE_CHECKING:
    from flask import Flask

    from .protocols import StateView

SETTING = "IMMUTANT_LOG_FORMAT"
FORMATS = ("text", "json")
#: The text format (the default), unchanged since the first release.
TEXT_FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"


def log_format(value: Any) -> str:
    if isinstance(value, str) and value.strip().lower() in FORMATS:
        return value.strip().lower()
    raise ValueError("text or json")


ROW = Setting(SETTING, "text", log_format, "Log lines of node and app runtime processes: text, or json (one "
              "object per line with node, deployment and trace ids; docs/tracing.md).", "choice", env=True)

#: What this process is: its node and the deployment it runs (null in the node supervisor).
_where: dict[str, str | None] = {"node": None, "deployment": None}
_runtime = False


@hookimpl(trylast=True)
def immutant_settings() -> list[Setting]:
    return [ROW]


@hookimpl(trylast=True)
def immutant_init_app(app: Flask, state: StateView) -> None:
    """An app runtime learns its app's id once the app is loaded (the node's own ``--app``)."""
    if _runtime and _where["deployment"] is None:
        _where["deployment"] = state.app_id


def setup_logging(verbose: bool = False, log_format: str | None = None, *, node: str | None = None,
                  runtime: bool = False, deployment: str | None = None) -> None:
    """Configure the root logger of this process. ``log_format`` defaults to the environment's
    IMMUTANT_LOG_FORMAT (a node hands its settings to its runtimes there); ``runtime`` says this
    is an app runtime, serving ``deployment`` (or, when that is not given, the app it loads)."""
    global _runtime
    if log_format is None:
        try:
            log_format = ROW.convert(os.environ.get(SETTING, ROW.default))
        except ValueError:
            log_format = ROW.default  # the node validated it; a stray value never stops a process
    _where["node"] = node or os.environ.get("IMMUTANT_NODE_NAME") or None
    _runtime = runtime
    _where["deployment"] = deployment if runtime else None
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    # force: a runtime forked from the node's template inherits the node's handlers; replace them.
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    if log_format == "json":
        # Nothing of ours may print a line that is not JSON: warnings and uncaught exceptions too.
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def json_logs() -> bool:
    """True when this process logs JSON lines."""
    return any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)


def say(text: str, logger: str = "flask_immutant.node", *, err: bool = False) -> None:
    """A line for the person at the terminal (on stderr with ``err``): echoed as is, or logged
    when the output is JSON, where a text of several lines stays one JSON line."""
    if json_logs():
        logging.getLogger(logger).log(logging.WARNING if err else logging.INFO, text)
    else:
        click.echo(text, err=err)


def _log_uncaught(kind: type[BaseException], value: BaseException | None,
                  tb: TracebackType | None) -> None:
    if value is not None and not isinstance(value, SystemExit):
        logging.getLogger("flask_immutant").error("uncaught exception", exc_info=(kind, value, tb))


def _trace_ids() -> dict[str, str]:
    """Hex ``trace_id`` and ``span_id`` of the span active on this thread, if any. Read through
    OpenTelemetry's API only where something already imported it: logging never loads it."""
    api = sys.modules.get("opentelemetry.trace")
    if api is None:
        return {}
    span_context = api.get_current_span().get_span_context()
    if not span_context.is_valid:
        return {}
    return {"trace_id": format(span_context.trace_id, "032x"), "span_id": format(span_context.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "node": _where["node"],
            "deployment": _where["deployment"],
            "pid": record.process,
            "thread": record.threadName,
        }
        data.update(_trace_ids())
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str)
