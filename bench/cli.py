"""How fast the CLI starts: ``flask immutant status`` against ``flask --version`` (a benchmark,
not a test).

    python bench/cli.py [--runs 10]

Starts a private embedded store under a temporary ``IMMUTANT_HOME`` (so ``status`` has a cluster
to read, with no node in it; bytecode caching on, as in an installed package), then times each
command from spawn to exit, the two interleaved, and prints the medians and their ratio (target
<= 1.3x). ``--importtime`` also prints the ten slowest imports of ``status``
(``python -X importtime``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(command: list[str], env: dict[str, str]) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--importtime", action="store_true")
    args = parser.parse_args()

    from flask_immutant.store import EmbeddedStore

    home = Path(tempfile.mkdtemp(prefix="imt-bench-cli-"))
    store = EmbeddedStore(home)
    try:
        store.ensure_running()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
        env["IMMUTANT_HOME"] = str(home)
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: bytecode cached, not compiled per run
        flask = [sys.executable, "-m", "flask"]
        commands = {"flask immutant status": [*flask, "immutant", "status"], "flask --version": [*flask, "--version"]}
        for command in commands.values():
            timed(command, env)  # warm the file cache
        times: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(args.runs):
            for name, command in commands.items():
                times[name].append(timed(command, env))
        medians = {name: statistics.median(values) for name, values in times.items()}
        for name, values in times.items():
            print(f"{name:<24} median {medians[name] * 1000:6.0f} ms   min {min(values) * 1000:6.0f} ms   "
                  f"max {max(values) * 1000:6.0f} ms   (n={len(values)})")
        ratio = medians["flask immutant status"] / medians["flask --version"]
        print(f"status / --version, medians: {ratio:.2f}x  (target <= 1.3x)")
        if args.importtime:
            result = subprocess.run([sys.executable, "-X", "importtime", *commands["flask immutant status"][1:]],
                                    env=env, capture_output=True, text=True, check=False)
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
