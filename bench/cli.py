"""How fast the CLI starts: ``flask immutant status`` against ``flask --version`` (a benchmark,
not a test).

    python bench/cli.py [--runs 10] [--before /path/to/other/venv/bin/python] [--importtime]

Starts a private embedded store under a temporary ``IMMUTANT_HOME`` (so ``status`` has a cluster
to read, with no node in it; bytecode caching on, as in an installed package), then times each
command from spawn to exit, interleaved, and prints the medians and their ratio (target <= 1.3x).
The commands are the ``flask`` script beside this interpreter, as a user types them, run in that
temporary folder (so no package in the current folder shadows the installed one).

The target is judged in a plain install (``pip install flask-immutant``, or ``pip install -e .``
in a fresh virtualenv): the ``test`` extra installs OpenTelemetry's SDK, which redis-py 8 then
imports with ``import redis`` (``redis.observability``), 60 ms and more that a user's install
does not pay. So the benchmark says whether the SDK is importable here, and also times the
floor, ``python -c "import flask.cli, redis"``: what any command using redis-py starts with.
``--before PYTHON`` also times ``status`` with another interpreter (a virtualenv with the code
to compare against installed), interleaved with the rest. ``--importtime`` prints the ten
slowest imports of ``status`` (``python -X importtime``, which does not list the modules loaded
by ``importlib.import_module``: the CLI group and the plugin modules themselves).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: What every command using redis-py starts with, Flask's CLI and redis-py imported.
FLOOR = "import flask.cli, redis"


def timed(command: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """Seconds from spawn to exit, and the CPU seconds (user + system) the command used: on a
    shared machine the second moves less with the others' load."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return elapsed, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--before", metavar="PYTHON", help="also time status with this interpreter")
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()

    import redis  # first: what it imports by itself is what every command pays

    installed = importlib.util.find_spec("opentelemetry") is not None and \
        importlib.util.find_spec("opentelemetry.sdk") is not None
    imported = "opentelemetry.sdk" in sys.modules
    print(f"{sys.executable}: redis-py {redis.__version__}; OpenTelemetry SDK "
          + ("not installed (a plain install: the figure the target is judged on)" if not installed else
             f"installed (not a plain install), {'imported' if imported else 'not imported'} by `import redis`"))

    from flask_immutant.store import EmbeddedStore
    home = Path(tempfile.mkdtemp(prefix="imt-bench-cli-"))
    store = EmbeddedStore(home)
    try:
        store.ensure_running()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
        env["IMMUTANT_HOME"] = str(home)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode cached, not compiled per run
        flask = str(Path(sys.executable).with_name("flask"))
        commands = {"flask immutant status": [flask, "immutant", "status"], "flask --version": [flask, "--version"],
                    "floor": [sys.executable, "-c", FLOOR]}
        if args.before:
            commands["status, --before"] = [str(Path(args.before).with_name("flask")), "immutant", "status"]
        for command in commands.values():
            timed(command, env, home)  # warm the file cache, write the bytecode
        wall: dict[str, list[float]] = {name: [] for name in commands}
        cpu: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                seconds, used = timed(command, env, home)
                wall[name].append(seconds)
                cpu[name].append(used)
        print(f"{'':<24} {'wall median':>11} {'min':>6} {'max':>6} {'CPU median':>11}   (n={args.runs})")
        for name in commands:
            print(f"{name:<24} {statistics.median(wall[name]) * 1000:8.0f} ms {min(wall[name]) * 1000:6.0f} "
                  f"{max(wall[name]) * 1000:6.0f} {statistics.median(cpu[name]) * 1000:8.0f} ms")

        def ratio(a: str, b: str) -> str:
            return (f"{statistics.median(wall[a]) / statistics.median(wall[b]):5.2f}x "
                    f"{statistics.median(cpu[a]) / statistics.median(cpu[b]):6.2f}x")

        print(f"{'ratios of the medians':<28} {'wall':>5} {'CPU':>7}")
        print(f"{'status / --version':<28} {ratio('flask immutant status', 'flask --version')}   (target <= 1.3x)")
        if args.before:
            print(f"{'status --before / --version':<28} {ratio('status, --before', 'flask --version')}")
        print(f"{'floor / --version':<28} {ratio('floor', 'flask --version')}   (floor: {FLOOR})")
        print(f"{'status / floor':<28} {ratio('flask immutant status', 'floor')}")
        if args.importtime:
            # the flask script itself (not ``-m flask``, whose sys.path starts with the current folder)
            result = subprocess.run([sys.executable, "-X", "importtime", flask, "immutant", "status"],
                                    env=env, cwd=home, capture_output=True, text=True, check=False)
            rows = [line.split("|") for line in result.stderr.splitlines() if line.startswith("import time:")][1:]
            slowest = sorted(rows, key=lambda row: -int(row[1]))[:10]
            print("slowest imports of status (cumulative us):")
            for row in slowest:
                print(f"  {int(row[1]):>9}  {row[2].rstrip()}")
    finally:
        store.stop()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
