"""``IMMUTANT_LOG_FORMAT=json`` (issue 15, part 5): every line a node prints, supervisor and app
runtime alike, is one JSON object with its node and deployment, and a message handled under a
trace carries that trace's id; the text format stays the default."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from flask_immutant import ImmutantState
from flask_immutant.errors import ImmutantConfigError
from flask_immutant.logs import JsonFormatter

from support import NodeProcess, wait_until

APP = Path(__file__).parent / "apps" / "traced_app.py"


def records(process: NodeProcess) -> list[dict[str, Any]]:
    """Every line of the node's output as JSON (a line that is not fails the test)."""
    parsed = []
    for line in list(process.lines):
        try:
            parsed.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON line: {line!r}\n{process.output[-3000:]}")
    return parsed


def test_json_lines_carry_node_deployment_and_the_trace_of_the_message_handled(start_node, node_env):
    # Given two nodes logging JSON: web publishes, consumer handles
    env = {"IMMUTANT_LOG_FORMAT": "json", "IMMUTANT_FAILURE_TIMEOUT": "1"}
    web = start_node("--clustered", "--node-name", "web", app=str(APP), env=env)
    consumer = start_node("--clustered", "--node-name", "consumer", "--port-offset", "100", app=str(APP), env=env)
    consumer.wait_for(r'"message": "messaging: consuming /queue/traced', timeout=40)
    for process, name in ((web, "web"), (consumer, "consumer")):
        process.wait_for(rf'"message": "node {name} joined cluster', timeout=40)
    # When a request to web publishes 5
    published = requests.get(f"http://127.0.0.1:{node_env['IMMUTANT_HTTP_PORT']}/publish/5", timeout=30).json()
    handled = wait_until(lambda: next((r for r in records(consumer) if r["message"] == "handled 5 on consumer"),
                                      None), timeout=30)
    # Then the handler's line carries the request's trace id, and the handler's span id
    assert handled["trace_id"] == published["trace_id"]
    assert re.fullmatch(r"[0-9a-f]{16}", handled["span_id"]) and handled["span_id"] != published["span_id"]
    assert handled["deployment"] == "traced" and handled["node"] == "consumer" and handled["logger"] == "traced"
    # And every line of both nodes is JSON with time, level, logger, message, node and deployment
    for process, name in ((web, "web"), (consumer, "consumer")):
        lines = records(process)
        assert len(lines) > 5
        for record in lines:
            assert {"time", "level", "logger", "message", "node", "deployment"} <= record.keys(), record
            assert record["node"] == name, record
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
        # the supervisor's lines belong to no deployment; the runtime's to the app it serves
        assert {r["deployment"] for r in lines} == {None, "traced"}, {r["deployment"] for r in lines}
        assert any(r["message"].startswith(f"node {name} joined cluster") for r in lines)


FAILING_APP = """
import os
from flask import Flask
from flask_immutant import ImmutantExtension
app = Flask(__name__)
ImmutantExtension(app)
if os.environ.get("IMMUTANT_NODE_NAME"):  # in the app runtime only, as a bad setting read there would
    raise RuntimeError('bad setting\\n{"level": "INFO", "logger": "flask_immutant.node", "message": "forged line"}')
"""


def test_an_app_that_fails_to_start_is_one_json_line_even_with_a_newline_in_its_error(start_node, tmp_path):
    # Given a node logging JSON whose app runtime fails to start, with a newline and a JSON object in the error
    (tmp_path / "failing.py").write_text(FAILING_APP)
    node = start_node("--node-name", "failing", app="failing.py", env={"IMMUTANT_LOG_FORMAT": "json"})
    # When the node has seen it fail
    node.wait_for(r'"message": "app runtime failing.py failed to start; restarting', timeout=60)
    # Then every line it printed is JSON, none is the forged one, and the runtime's own words are one line
    lines = records(node)
    assert not [r for r in lines if r["message"] == "forged line"]
    said = [r for r in lines if r["message"].startswith("flask-immutant: app failed to start: RuntimeError")]
    assert said and said[0]["message"].endswith('"message": "forged line"}') and said[0]["deployment"] is not None


def test_an_exception_is_a_field_of_its_line():
    # Given a record with an exception
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed %s", ("here",), exc_info=sys.exc_info())
    # When it is formatted as JSON
    line = JsonFormatter().format(record)
    # Then it is one line, and the traceback is a field
    assert "\n" not in line
    data = json.loads(line)
    assert data["message"] == "failed here" and data["level"] == "ERROR"
    assert "ZeroDivisionError" in data["exception"] and "Traceback" in data["exception"]


def test_text_stays_the_default_and_a_bad_format_names_what_is_allowed():
    assert ImmutantState.build({}, environ={}).settings["IMMUTANT_LOG_FORMAT"] == "text"
    with pytest.raises(ImmutantConfigError, match=r"IMMUTANT_LOG_FORMAT='xml' .* text or json"):
        ImmutantState.build({}, environ={"IMMUTANT_LOG_FORMAT": "xml"})


def test_the_default_node_output_is_text(start_node: Callable[..., NodeProcess]):
    node = start_node("--node-name", "plain", app=str(APP))
    line = node.wait_for(r"^\S+ \S+ INFO \[flask_immutant\.\w+\] .*", timeout=40)
    assert not line.group(0).startswith("{")


def test_a_line_logged_under_a_span_carries_its_ids_and_one_outside_none():
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "inside", (), None)
    with tracer.start_as_current_span("work") as span:
        inside = json.loads(JsonFormatter().format(record))
    outside = json.loads(JsonFormatter().format(record))
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["span_id"] == format(span.get_span_context().span_id, "016x")
    assert "trace_id" not in outside and "span_id" not in outside
