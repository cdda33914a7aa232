"""The peers' own suites against the cluster cache, in every mode, on the real store.

cachelib's backend-neutral tests and Flask-Caching's whole suite are downloaded as pinned sdists
from the package registry at test time (never copied here) and run in a pytest subprocess per
suite and mode, with ``tests/peer_suites/immutant_peers.py`` pointing them at our backend. All
runs start together (they mostly wait on the store), so the whole module costs about one suite's
time. Tests that cannot apply are listed, with a reason each, in
``tests/peer_suites/not_applicable.txt``; everything else must pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import pytest

from flask_immutant.caching.base import MODES

PEERS = Path(__file__).parent / "peer_suites"
#: The pinned peers: suite name -> (distribution, version, test paths inside the sdist).
SUITES = {
    "cachelib": ("cachelib", "0.17.0", ["tests/test_immutant_cache.py"]),
    "flask-caching": ("flask-caching", "2.5.1", ["tests"]),
}
#: Where sdists are downloaded and unpacked (kept between runs: the download happens once).
CACHE_DIR = Path(os.environ.get("IMMUTANT_PEER_CACHE", Path(tempfile.gettempdir()) / "flask-immutant-peer-suites"))
#: Seconds one suite run may take before it counts as hung.
RUN_TIMEOUT = 600


def unpacked_sdist(distribution: str, pinned: str) -> Path:
    """The unpacked sdist of ``distribution==pinned``, downloaded with pip on first use."""
    folder = CACHE_DIR / f"{distribution}-{pinned}"
    if (folder / "tests").is_dir():
        return folder
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    downloads = Path(tempfile.mkdtemp(prefix="sdist-", dir=CACHE_DIR))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             "--dest", str(downloads), f"{distribution}=={pinned}"],
            capture_output=True, text=True, timeout=300, check=False,
        )
        archives = list(downloads.glob("*.tar.gz"))
        if done.returncode or len(archives) != 1:
            message = f"could not download the sdist of {distribution}=={pinned}: {done.stderr.strip()[-500:]}"
            if os.environ.get("CI"):
                raise AssertionError(message)
            pytest.skip(message)
        staging = Path(tempfile.mkdtemp(prefix="unpack-", dir=CACHE_DIR))
        with tarfile.open(archives[0]) as archive:
            archive.extractall(staging, filter="data")
        (root,) = staging.iterdir()
        if not folder.exists():
            root.rename(folder)
        shutil.rmtree(staging, ignore_errors=True)
        return folder
    finally:
        shutil.rmtree(downloads, ignore_errors=True)


def start_run(suite: str, mode: str, home: Path) -> subprocess.Popen[str]:
    distribution, pinned, paths = SUITES[suite]
    root = unpacked_sdist(distribution, pinned)
    if suite == "cachelib":
        shutil.copyfile(PEERS / "cachelib_generic.py", root / "tests" / "test_immutant_cache.py")
    else:
        shutil.copyfile(PEERS / "flask_caching_generic.py", root / "tests" / "test_immutant_backend.py")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("IMMUTANT_", "FLASK_"))}
    env.update(IMMUTANT_HOME=str(home), IMMUTANT_PEER_MODE=mode, IMMUTANT_PEER_SUITE=suite,
               PYTHONPATH=os.pathsep.join([str(PEERS), str(root / "tests")]), PYTHONDONTWRITEBYTECODE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pytest", "-p", "immutant_peers", "-q", "-rfE", "--no-header",
         "-o", f"cache_dir={CACHE_DIR / 'pytest-cache' / f'{suite}-{mode}'}",
         *paths],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def peer_runs(embedded_store, immutant_home: Path) -> Iterator[dict[tuple[str, str], subprocess.Popen[str]]]:
    """Every (suite, mode) run, started at once."""
    runs = {(suite, mode): start_run(suite, mode, immutant_home) for suite in SUITES for mode in MODES}
    try:
        yield runs
    finally:
        for run in runs.values():
            if run.poll() is None:
                run.kill()
            run.communicate()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("suite", list(SUITES))
def test_the_peer_suite_passes(peer_runs, suite: str, mode: str) -> None:
    # Given the peer's own tests pointed at the cluster cache in this mode
    run = peer_runs[suite, mode]
    # When they run
    output, _ = run.communicate(timeout=RUN_TIMEOUT)
    # Then every applicable test passes
    assert run.returncode == 0, f"{suite} in mode {mode} failed:\n{output[-6000:]}"
    assert " passed" in output and "no tests ran" not in output, output[-2000:]


def test_the_not_applicable_list_gives_a_reason_for_each_test() -> None:
    lines = [line for line in (PEERS / "not_applicable.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines
    for line in lines:
        spec, _, reason = line.partition(" -- ")
        assert spec.split()[0] in {*SUITES, "flask-session"} and len(reason.strip()) > 10, line


def test_the_pins_match_the_installed_peers() -> None:
    """The suites are the installed versions' own (a drift would test one version, ship another)."""
    for distribution, pinned, _ in SUITES.values():
        assert version(distribution) == pinned, distribution
