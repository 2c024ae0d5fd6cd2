"""The run dir lock: one writer; a refusal names the holder's pid and says when that is this
very process or a process no longer running; forked children (DataLoader workers) do not keep
the lock alive after the trainer is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from lightnets.engine.runlock import LOCK_NAME, RunLock
from lightnets.errors import UserError
from tests.conftest import REPO

fcntl = pytest.importorskip("fcntl")


def test_a_second_lock_in_this_process_is_refused_naming_this_process(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(UserError, match=rf"\(pid {os.getpid()}, this very process: a Trainer"):
        RunLock(tmp_path).acquire()
    first.release()
    RunLock(tmp_path).acquire().release()  # free again


def test_a_holder_no_longer_running_is_said_to_be_so(tmp_path):
    """What a kill -9 of a trainer whose child still holds the open lock file looks like."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    fd = os.open(tmp_path / LOCK_NAME, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f"{dead.pid}\n".encode())
        with pytest.raises(UserError, match=rf"pid {dead.pid}, which is no longer running"):
            RunLock(tmp_path).acquire()
    finally:
        os.close(fd)


def test_a_forked_child_does_not_keep_the_lock_of_a_killed_parent(tmp_path):
    """A flock belongs to the open file, which fork shares: a DataLoader worker would hold the
    run dir after its trainer was killed with -9. The child closes its copy at the fork."""
    code = textwrap.dedent(
        f"""
        import multiprocessing, time
        from lightnets.engine.runlock import RunLock
        lock = RunLock({str(tmp_path)!r}).acquire()
        child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(120,))
        child.start()
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    parent = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    child = int(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        RunLock(tmp_path).acquire().release()  # the child lives on, the lock is free
    finally:
        os.kill(child, signal.SIGKILL)
        parent.stdout.close()


def test_release_removes_only_a_lock_file_it_created(tmp_path):
    lock = RunLock(tmp_path).acquire()
    lock.release(remove=True)
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("")
    lock = RunLock(tmp_path).acquire()
    lock.release(remove=True)
    assert (tmp_path / LOCK_NAME).exists()
