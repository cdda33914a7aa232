"""``startup.py``: start-up collects rarely, and a process that has started collects as usual."""

from __future__ import annotations

import gc
import os
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
    frozen = gc.get_freeze_count()
    # When a process starts (twice: a command that forks a runtime that starts again)
    startup.starting()
    startup.starting()
    # Then the young generation collects far more rarely, but still collects
    assert gc.get_threshold()[0] == startup.START_UP_THRESHOLD and gc.isenabled()
    # And once it has started, the usual thresholds come back, with what start-up made frozen
    startup.started()
    assert gc.get_threshold() == usual
    assert gc.get_freeze_count() > frozen


def test_a_command_run_in_process_leaves_the_collector_as_it_found_it(usual, tmp_path, monkeypatch) -> None:
    from click.testing import CliRunner

    from flask_immutant.cli import cli

    # When one of our commands runs inside a longer-lived process (a test, a script)
    monkeypatch.setenv("IMMUTANT_HOME", str(tmp_path))
    frozen = gc.get_freeze_count()
    result = CliRunner().invoke(cli, ["config"])
    assert result.exit_code == 0, result.output
    # Then that process collects as before, with nothing of its heap frozen
    assert gc.get_threshold() == usual and gc.get_freeze_count() == frozen


def test_an_app_s_own_thresholds_survive_start_up(usual) -> None:
    startup.starting()
    gc.set_threshold(50_000, 20, 20)  # what an app may do at import
    startup.started()
    assert gc.get_threshold() == (50_000, 20, 20)


def test_a_process_that_never_says_it_started_still_collects(usual) -> None:
    startup.starting()
    garbage = [[] for _ in range(10)]
    for item in garbage:
        item.append(item)  # cycles only a collection frees
    del garbage, item
    assert gc.collect() >= 10


#: A process that prints, as it exits, whether more of its heap was frozen by then than when the
#: command began (atexit calls the last registered first: this check runs after the command's own;
#: Python 3.12 starts with some objects frozen already).
AT_EXIT = ("import atexit, gc, sys; base = []; "
           "atexit.register(lambda: print('frozen', gc.get_freeze_count() > base[0])); ")


@pytest.mark.parametrize(("program", "frozen"), [
    ("sys.argv = ['flask', 'immutant', 'config']; from flask.cli import main; "
     "base.append(gc.get_freeze_count()); main()", True),
    ("from click.testing import CliRunner; from flask_immutant.cli import cli; "
     "base.append(gc.get_freeze_count()); CliRunner().invoke(cli, ['config'])", False),
], ids=["the flask command", "a script running it in process"])
def test_only_a_flask_command_s_own_process_freezes_its_heap_at_exit(program: str, frozen: bool, tmp_path) -> None:
    env = {**os.environ, "IMMUTANT_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", AT_EXIT + program], capture_output=True, text=True, env=env,
                            check=False)
    assert result.stdout.strip().splitlines()[-1] == f"frozen {frozen}", result.stdout + result.stderr


def test_a_flask_command_ends_without_a_young_collection_of_all_it_made(tmp_path) -> None:
    # Given a flask command's own process, whose young collections are logged as they start
    program = ("import gc, sys; starts = []; "
               "gc.callbacks.append(lambda phase, info: phase == 'start' and starts.append("
               "(gc.get_threshold()[0], gc.get_count()[0]))); "
               "sys.argv = ['flask', 'immutant', 'config']; from flask.cli import main\n"
               "try:\n    main()\n"
               "finally:\n    print('backlog', max((count - threshold for threshold, count in starts), default=0))")
    env = {**os.environ, "IMMUTANT_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=env, check=False)
    # Then no collection started far past its threshold: the usual thresholds came back only
    # after what the command made was frozen, not with it all waiting in the young generation
    # (before: 29,000 to 40,000 objects; now about 3 on Python 3.11 and 1,700 on 3.12 and 3.13,
    # whose collectors count allocations differently)
    backlog = int(result.stdout.strip().splitlines()[-1].split()[-1])
    assert backlog < 10_000, result.stdout + result.stderr
