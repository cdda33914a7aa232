"""``startup.py``: start-up collects rarely, and a process that has started collects as usual."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections.abc import Iterator

import pytest

from flask_immutant import startup


@pytest.fixture
def usual() -> Iterator[tuple[int, int, int]]:
    before = gc.get_threshold()
    yield before
    startup.finished()
    gc.unfreeze()
    gc.set_threshold(*before)


def test_start_up_collects_rarely_then_as_usual_with_what_it_made_frozen(usual) -> None:
    # When a process starts (twice: a command that forks a runtime that starts again)
    startup.starting()
    startup.starting()
    # Then the young generation collects far more rarely, but still collects
    assert gc.get_threshold()[0] == startup.START_UP_THRESHOLD and gc.isenabled()
    # And once it has started, the usual thresholds come back, with what start-up made frozen
    startup.started()
    assert gc.get_threshold() == usual
    assert gc.get_freeze_count() > 0


def test_a_command_run_in_process_leaves_the_collector_as_it_found_it(usual) -> None:
    from click.testing import CliRunner

    from flask_immutant.cli import cli

    # When one of our commands runs inside a longer-lived process (a test, a script)
    frozen = gc.get_freeze_count()
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0, result.output
    # Then that process collects as before, with nothing of its heap frozen
    assert gc.get_threshold() == usual and gc.get_freeze_count() == frozen


def test_a_process_that_never_says_it_started_still_collects(usual) -> None:
    startup.starting()
    garbage = [[] for _ in range(10)]
    for item in garbage:
        item.append(item)  # cycles only a collection frees
    del garbage, item
    assert gc.collect() >= 10


def test_the_heap_is_frozen_before_the_interpreter_tears_it_down() -> None:
    # (atexit calls the last registered first: this check runs after startup's freeze)
    code = ("import atexit, gc; atexit.register(lambda: print(gc.get_freeze_count() > 0)); "
            "from flask_immutant import startup; startup.starting()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"
