"""How long a scrape takes once many app runtimes have come and gone on a node.

A benchmark, not a test: it prints figures and asserts nothing. In a fresh metrics folder it
forks ``--dead`` short-lived processes (as a zygote's runtimes are), each recording 20
destinations' counters, handler histograms and in-flight gauges, then exiting. Then it copies
the folder and scrapes each copy ``--scrapes`` times:

- the peer: prometheus_client's multi-process collector over every file, as a scrape read them
  before dead processes were folded (one counter and one histogram file per dead process stay);
- flask-immutant's render: the first scrape folds the dead processes into one archive file per
  kind, every later one reads the archives.

    python bench/metrics_dead_processes.py [--dead 200] [--scrapes 20]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path


def record_and_exit() -> None:
    from flask_immutant.metrics import definitions as m

    for d in range(20):
        m.PUBLISHED.inc(f"/queue/q{d}")
        m.HANDLER_SECONDS.observe(0.01, f"/queue/q{d}")
        m.IN_FLIGHT.inc(f"/queue/q{d}")
    os._exit(0)


def folder_size(folder: Path) -> tuple[int, float]:
    files = [f for f in folder.iterdir() if f.suffix == ".db"]
    return len(files), sum(f.stat().st_size for f in files) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dead", type=int, default=200)
    parser.add_argument("--scrapes", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="imt-dead-"))
    try:
        source = work / "source"
        source.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(source)
        from flask_immutant.metrics import process

        process.enable()
        for _ in range(args.dead):
            pid = os.fork()
            if pid == 0:
                record_and_exit()
            os.waitpid(pid, 0)
        process.disable()
        files, mib = folder_size(source)
        print(f"{args.dead} dead processes: {files} files, {mib:.1f} MiB apparent")

        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        peer_folder, ours = work / "peer", work / "ours"
        shutil.copytree(source, peer_folder)
        shutil.copytree(source, ours)
        peer: list[float] = []
        for _ in range(args.scrapes):
            started = time.perf_counter()
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(peer_folder))
            peer_body = generate_latest(registry)
            peer.append(time.perf_counter() - started)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(ours)
        mine: list[float] = []
        for _ in range(args.scrapes):
            started = time.perf_counter()
            body, _ = process.render()
            mine.append(time.perf_counter() - started)
        files, mib = folder_size(ours)
        def kept(text: bytes) -> list[bytes]:  # counters and histograms (a dead process's gauges go)
            return sorted(line for line in text.splitlines() if not line.startswith((b"#", b"immutant_messages_in_")))

        same = kept(peer_body) == kept(body)
        print(f"after folding: {files} files, {mib:.1f} MiB apparent; same counters and histograms as the peer: {same}")
        ms = [t * 1000 for t in mine[1:]] or [mine[0] * 1000]
        pm = [t * 1000 for t in peer]
        print(f"peer (every file)   : median {statistics.median(pm):7.1f} ms, max {max(pm):7.1f} ms")
        print(f"first scrape (folds): {mine[0] * 1000:7.1f} ms")
        print(f"later scrapes       : median {statistics.median(ms):7.1f} ms, max {max(ms):7.1f} ms")
        print(f"ratio later/peer    : {statistics.median(ms) / statistics.median(pm):.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
