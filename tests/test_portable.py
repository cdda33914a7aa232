"""The portable path: with the Linux-only calls off (``IMMUTANT_PORTABLE=1``, as on macOS), an app
runtime still dies with its supervisor, through the lifeline pipe alone."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from flask_immutant import portable

from support import pid_alive, wait_until

SUPERVISOR = textwrap.dedent("""
    import socket, sys, time
    from flask_immutant.server.node import AppTarget, RuntimeProcess
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    runtime = RuntimeProcess(AppTarget("app", root=sys.argv[1]), listener, {})
    runtime.spawn()
    print(runtime.process.pid, runtime.wait_ready(60), flush=True)
    time.sleep(600)
""")


def test_portable_mode_turns_every_linux_only_call_off(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv(portable.PORTABLE_ENV, "1")
    assert not portable.linux_extras()
    assert portable.process_state(os.getpid()) is None
    assert portable.process_cmdline(os.getpid()) is None
    assert portable.own_lock(object()) is None and portable.abandoned_locks() == []
    portable.set_parent_death_signal()  # a no-op, not an error
    monkeypatch.delenv(portable.PORTABLE_ENV)
    assert portable.linux_extras() == sys.platform.startswith("linux")


def test_a_runtime_dies_with_its_supervisor_through_the_lifeline_alone(
    embedded_store, immutant_home: Path, cluster_name: str, tmp_path: Path
):
    # Given a supervisor running an app runtime, with no parent-death signal (portable mode)
    (tmp_path / "app.py").write_text("from flask import Flask\napp = Flask(__name__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMMUTANT_", "FLASK_"))}
    env.update(IMMUTANT_HOME=str(immutant_home), IMMUTANT_CLUSTER=cluster_name, IMMUTANT_PORTABLE="1")
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as output:
        supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, str(tmp_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=output, stdin=subprocess.DEVNULL)
    try:
        assert supervisor.stdout is not None
        pid, ready = supervisor.stdout.readline().split()
        assert ready == b"True", log.read_text()
        runtime_pid = int(pid)
        # When the supervisor is SIGKILLed (no code of it runs)
        supervisor.kill()
        supervisor.wait(10)
        # Then the runtime notices the lifeline's EOF and exits on its own
        wait_until(lambda: not pid_alive(runtime_pid), timeout=10, message="the runtime to exit")
        assert "the node supervisor is gone; app runtime exits" in log.read_text()
    finally:
        if supervisor.poll() is None:
            supervisor.kill()
            supervisor.wait(10)
        if "runtime_pid" in locals() and pid_alive(runtime_pid):
            os.kill(runtime_pid, signal.SIGKILL)
        if supervisor.stdout is not None:
            supervisor.stdout.close()



linux_only = pytest.mark.skipif(not portable.linux_extras(), reason="the lock files live in Linux's /dev/shm")

HOLDER = textwrap.dedent("""
    import os, sys, time
    from flask_immutant import portable
    name = portable.own_lock("holder")
    if sys.argv[1] == "close":  # as os.closerange or a daemonizing library would: the flock goes
        os.close(portable._own_lock[1])
    child = os.fork() if sys.argv[1] == "fork" else 0  # multiprocessing's fork: the child inherits it
    if child == 0 and sys.argv[1] == "fork":
        time.sleep(60)
        os._exit(0)
    print(name, child, flush=True)
    time.sleep(60)
""")


class Holder:
    """A process holding its lock file, as a lease holder does (and, with ``fork``, a forked child)."""

    def __init__(self, mode: str = "plain") -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, mode], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        name, child = self.proc.stdout.readline().decode().split()
        self.lock, self.child = name, int(child)

    def close(self) -> None:
        for pid in (self.proc.pid, self.child):
            with contextlib.suppress(ProcessLookupError):
                if pid:
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        portable.remove_abandoned_lock(self.lock)


@pytest.fixture
def holder() -> Iterator[Holder]:
    made = Holder()
    try:
        yield made
    finally:
        made.close()


@linux_only
def test_a_live_holder_is_not_proven_dead(holder):
    assert portable.LOCK_NAME.fullmatch(holder.lock)
    info = (portable.LOCK_DIR / holder.lock).stat()
    assert info.st_mode & 0o777 == 0o600 and info.st_uid == os.geteuid()
    assert not portable.lock_abandoned(holder.lock)
    assert not portable.remove_abandoned_lock(holder.lock)
    assert holder.lock not in portable.abandoned_locks()


@linux_only
def test_a_sigkilled_holder_is_proven_dead_and_its_file_removed(holder):
    holder.proc.kill()
    holder.proc.wait()
    assert portable.lock_abandoned(holder.lock)
    assert portable.lock_abandoned(holder.lock)  # a proof leaves the file for the next prover
    assert holder.lock in portable.abandoned_locks()
    assert portable.remove_abandoned_lock(holder.lock)
    assert not (portable.LOCK_DIR / holder.lock).exists()
    assert not portable.lock_abandoned(holder.lock)  # gone: nothing is proven any more


@linux_only
def test_a_stopped_holder_is_not_proven_dead(holder):
    os.kill(holder.proc.pid, signal.SIGSTOP)
    wait_until(lambda: portable.process_state(holder.proc.pid) == "T", timeout=5)
    assert not portable.lock_abandoned(holder.lock)


@linux_only
def test_a_zombie_holder_is_proven_dead(holder):
    holder.proc.kill()  # not waited for: a zombie until the fixture reaps it
    wait_until(lambda: portable.process_state(holder.proc.pid) == "Z", timeout=5)
    assert portable.lock_abandoned(holder.lock)


@linux_only
def test_a_holder_is_not_proven_dead_while_a_child_it_forked_lives():
    # Given a holder that forked a child (it inherited the lock), and the holder SIGKILLed
    made = Holder("fork")
    try:
        made.proc.kill()
        made.proc.wait()
        # Then the holder is not proven dead while the child lives
        assert pid_alive(made.child)
        assert not portable.lock_abandoned(made.lock)
        # And it is once the child is gone too
        os.kill(made.child, signal.SIGKILL)
        wait_until(lambda: portable.lock_abandoned(made.lock), timeout=10)
    finally:
        made.close()


@linux_only
def test_nothing_but_a_private_regular_lock_file_is_opened_or_proven(tmp_path):
    # A malformed or hostile name from the store is never opened
    for name in ("../etc/passwd", "flask-immutant-../../etc/passwd.lock", "/etc/passwd", None, 7,
                 "flask-immutant-" + "A" * 32 + ".lock", "flask-immutant-" + "0" * 31 + ".lock",
                 "flask-immutant-" + "0" * 32 + ".lock\n", ["flask-immutant-" + "0" * 32 + ".lock"]):
        assert not portable.lock_abandoned(name) and not portable.remove_abandoned_lock(name)
    unused = [f"flask-immutant-{os.urandom(16).hex()}.lock" for _ in range(4)]
    paths = [portable.LOCK_DIR / name for name in unused]
    try:
        # A missing file (another host, a clone of this machine)
        assert not portable.lock_abandoned(unused[0])
        # A FIFO at a valid name: not opened for long (it would block a reader), not a proof
        os.mkfifo(paths[0], 0o600)
        assert not portable.lock_abandoned(unused[0]) and not portable.remove_abandoned_lock(unused[0])
        # A symlink to a file nobody holds
        target = tmp_path / "target.lock"
        target.write_bytes(b"")
        target.chmod(0o600)
        paths[1].symlink_to(target)
        assert not portable.lock_abandoned(unused[1])
        # A file others may read, nobody holding it
        paths[2].write_bytes(b"")
        paths[2].chmod(0o644)
        assert not portable.lock_abandoned(unused[2])
        paths[2].chmod(0o600)
        assert portable.lock_abandoned(unused[2])  # the same file, private: nobody holds it
        # Another user's private file, nobody holding it
        if os.geteuid() == 0:
            paths[3].write_bytes(b"")
            paths[3].chmod(0o600)
            os.chown(paths[3], 65534, 65534)
            assert not portable.lock_abandoned(unused[3]) and not portable.remove_abandoned_lock(unused[3])
        assert set(portable.abandoned_locks()) & set(unused) == {unused[2]}
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


@linux_only
def test_nothing_is_proven_in_portable_mode(holder, monkeypatch):
    holder.proc.kill()
    holder.proc.wait()
    monkeypatch.setenv(portable.PORTABLE_ENV, "1")
    assert not portable.lock_abandoned(holder.lock) and not portable.remove_abandoned_lock(holder.lock)
    assert portable.abandoned_locks() == []
    monkeypatch.delenv(portable.PORTABLE_ENV)
    assert portable.lock_abandoned(holder.lock)


ONE_LOCK_FILE = textwrap.dedent("""
    from flask_immutant import portable
    # Given two users of this process's lock file (two lease managers, or one and the membership)
    first, second = object(), object()
    name = portable.own_lock(first)
    assert name is not None and portable.own_lock(second) == name
    assert not portable.lock_abandoned(name)
    # When one stops, the file stays for the other; when both have, it is gone
    portable.drop_own_lock(first)
    assert (portable.LOCK_DIR / name).exists()
    portable.drop_own_lock(second)
    assert not (portable.LOCK_DIR / name).exists()
    later = portable.own_lock(first)
    assert later not in (None, name)  # a later lease gets a new one
    portable.drop_own_lock(first)
    assert not (portable.LOCK_DIR / later).exists()
    # And a lock file someone removed (a /dev/shm cleaner) still has its descriptor closed
    import os
    gone = portable.own_lock(first)
    fd = portable._own_lock[1]
    os.unlink(portable.LOCK_DIR / gone)
    portable.drop_own_lock(first)
    try:
        os.fstat(fd)
    except OSError:
        print("ok", flush=True)
""")


@linux_only
def test_a_process_has_one_lock_file_until_it_drops_it():
    # In a process of its own: this one's lock file may have users that other tests left
    run = subprocess.run([sys.executable, "-c", ONE_LOCK_FILE], capture_output=True, timeout=120)
    assert run.stdout.strip() == b"ok", run.stderr.decode()


@linux_only
def test_a_sweep_unlinks_later_the_lock_files_of_holders_already_dead():
    # Given the lock files of a crashed holder and of a live one
    dead, live = Holder(), Holder()
    try:
        dead.proc.kill()
        dead.proc.wait()
        # When a node starts (it sweeps), and a holder dies after that
        timer = portable.sweep_abandoned_locks(0.5)
        assert timer is not None
        live.proc.kill()
        live.proc.wait()
        timer.join(10)
        # Then only the file of the holder dead at the start is gone: the other may still prove a death
        assert not (portable.LOCK_DIR / dead.lock).exists()
        assert (portable.LOCK_DIR / live.lock).exists()
    finally:
        dead.close()
        live.close()


@linux_only
def test_a_holder_is_gone_only_if_its_lock_is_abandoned_and_its_pid_free_here():
    # Given a live holder whose own code closed its lock file's descriptor
    made = Holder("close")
    here = portable.pid_namespace()
    try:
        assert here is not None and portable.lock_abandoned(made.lock)
        # Then it is not proven gone: its pid lives
        assert not portable.holder_gone(made.lock, made.proc.pid, here)
        # When it is SIGKILLed: a zombie, then reaped
        made.proc.kill()
        wait_until(lambda: portable.process_state(made.proc.pid) == "Z", timeout=5)
        assert portable.holder_gone(made.lock, made.proc.pid, here)
        made.proc.wait()
        assert portable.holder_gone(made.lock, made.proc.pid, here)
        # But never from a record of another (or an unknown) pid namespace, or with no valid pid
        for pidns in ("0:1", None, "", 7):
            assert not portable.holder_gone(made.lock, made.proc.pid, pidns)
        for pid in (None, "123", 0, -1, True):
            assert not portable.holder_gone(made.lock, pid, here)
    finally:
        made.close()


@linux_only
def test_a_lock_file_unlinked_while_being_taken_proves_nothing(monkeypatch):
    # Given a lock file nobody holds, unlinked and replaced between a prover's open and its flock
    name = f"flask-immutant-{os.urandom(16).hex()}.lock"
    path = portable.LOCK_DIR / name
    path.write_bytes(b"")
    path.chmod(0o600)
    real_flock = portable.fcntl.flock

    def flock_after_a_replacement(fd: int, operation: int) -> None:
        path.unlink()
        path.write_bytes(b"")
        path.chmod(0o600)
        real_flock(fd, operation)

    try:
        monkeypatch.setattr(portable.fcntl, "flock", flock_after_a_replacement)
        # Then the lock taken (on the unlinked file) proves nothing about the name
        assert not portable.lock_abandoned(name)
    finally:
        monkeypatch.undo()
        path.unlink(missing_ok=True)


FORK_WHILE_GUARDED = textwrap.dedent("""
    import os, signal, threading, time
    from flask_immutant import portable
    parent = portable.own_lock("parent")
    held = threading.Event()
    def hold():
        with portable._own_lock_guard:
            held.set()
            time.sleep(60)
    threading.Thread(target=hold, daemon=True).start()
    held.wait()
    child = os.fork()  # while another thread holds the guard
    if child == 0:
        signal.alarm(20)  # a deadlock ends here (SIGALRM), not in a hung test
        name = portable.own_lock("child")
        portable.drop_own_lock("child")
        gone = name is not None and not os.path.exists(portable.LOCK_DIR / name)
        os._exit(0 if gone and name != parent and os.path.exists(portable.LOCK_DIR / parent) else 1)
    print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]), flush=True)
    os.unlink(portable.LOCK_DIR / parent)
""")


@linux_only
def test_a_child_forked_while_a_thread_held_the_lock_guard_gets_its_own_lock_file():
    # Given a process forked while one of its threads held the guard of its lock file
    run = subprocess.run([sys.executable, "-c", FORK_WHILE_GUARDED], capture_output=True, timeout=120)
    # Then the child takes (and drops) a lock file of its own, leaving its parent's alone
    assert run.stdout.strip() == b"0", run.stderr
