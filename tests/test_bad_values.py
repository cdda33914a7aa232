"""Every bad setting or scheduling argument is one `Error:` line naming the key or argument, the
value and what is allowed, and a non-zero exit, never a traceback: the real `flask` command in a
subprocess (issue 10, point 15)."""

from __future__ import annotations

from pathlib import Path

import pytest

from support import run_flask

JOB_APP = '''
from flask import Flask
from flask_immutant import ImmutantExtension, jobs

app = Flask(__name__)
ImmutantExtension(app)
jobs.schedule("tick", lambda: None, {arguments}, app=app)
'''


def one_error_line(result) -> str:
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


@pytest.mark.parametrize(("environ", "args", "expected"), [
    ({"IMMUTANT_REDIS_URL": "redis://localhost:abc/0"}, ["status"], ["IMMUTANT_REDIS_URL=", "localhost:abc",
                                                                       "port 1-65535"]),
    ({"IMMUTANT_REDIS_URL": "redis://localhost:6379/zero"}, ["status"], ["IMMUTANT_REDIS_URL=", "database number"]),
    ({"IMMUTANT_REDIS_URL": "redis+sentinel://s1:26379,s2:port/mymaster"}, ["status"],
     ["IMMUTANT_REDIS_URL=", "s2:port", "port 1-65535"]),
    ({"IMMUTANT_REDIS_URL": "redis+sentinel://s1:99999/mymaster"}, ["status"], ["IMMUTANT_REDIS_URL=", "s1:99999"]),
    ({"IMMUTANT_BROKER_URL": "amqp://guest:guest@rabbit:amqp/"}, ["status"], ["IMMUTANT_BROKER_URL=", "rabbit:amqp"]),
    ({"IMMUTANT_HTTP_PORT": "65000"}, ["run", "--port-offset", "1000"],
     ["IMMUTANT_HTTP_PORT=65000", "IMMUTANT_PORT_OFFSET=1000", "at most 65535"]),
    ({"IMMUTANT_HTTP_PORT": "65535", "IMMUTANT_PORT_OFFSET": "1"}, ["status"], ["IMMUTANT_HTTP_PORT=65535"]),
    ({"IMMUTANT_FAILURE_TIMEOUT": "nan"}, ["status"], ["IMMUTANT_FAILURE_TIMEOUT='nan'", "from 0.5 to 300"]),
])
def test_a_bad_setting_is_one_error_line(node_env, tmp_path: Path, environ, args, expected):
    result = run_flask(["immutant", *args], {**node_env, **environ}, cwd=tmp_path, timeout=30)
    line = one_error_line(result)
    for fragment in expected:
        assert fragment in line, line


@pytest.mark.parametrize(("arguments", "expected"), [
    ("cron='0 0 30 2 *'", "cron='0 0 30 2 *': can never fire"),
    ("every=0", "every=0: expected a finite number of seconds, more than zero"),
    ("every=-5", "every=-5"),
    ("every=float('nan')", "every=nan"),
    ("every=float('inf')", "every=inf"),
    ("every='0s'", "every='0s'"),
    ("in_=float('nan')", "in_=nan"),
    ("every=1, until=float('inf')", "until=inf"),
])
def test_a_schedule_that_cannot_be_is_one_error_line(node_env, tmp_path: Path, arguments, expected):
    (tmp_path / "app.py").write_text(JOB_APP.format(arguments=arguments))
    result = run_flask(["--app", "app", "immutant", "status"], node_env, cwd=tmp_path, timeout=30)
    line = one_error_line(result)
    assert expected in line, line


@pytest.mark.parametrize(("args", "expected"), [
    (["deploy", "--wait", "nan"], ["--wait", "nan", "from 0 to 86400"]),
    (["deploy", "--wait", "inf"], ["--wait", "inf"]),
    (["deploy", "--wait", "-1"], ["--wait", "-1"]),
    (["undeploy", "shop", "--wait", "nan"], ["--wait", "nan"]),
    (["console", "--port", "99999"], ["--port", "99999", "65535"]),
    (["console", "--port", "-1"], ["--port", "-1"]),
    (["balancer", "--port", "70000"], ["--port", "70000"]),
    (["ctl", "weight", "x"], ["x"]),
    (["ctl", "weight", "101"], ["101"]),
    (["undeploy", "shop\udcff"], ["not valid UTF-8"]),
    (["queues", "requeue-dead", "/queue/\udcff"], ["not valid UTF-8"]),
])
def test_a_nonsense_command_argument_is_one_error_line(node_env, tmp_path: Path, args, expected):
    # Given no node runs, so a command that accepted the value would start working with it
    result = run_flask(["immutant", *args], node_env, cwd=tmp_path, timeout=30)
    line = one_error_line(result)
    for fragment in expected:
        assert fragment in line, line
