"""A child that calls exit_with_parent ends when its parent is killed; without it, it outlives the parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lsdm_aug.lifetime import exit_with_parent

GRANDCHILD = """
import sys, time
if sys.argv[1] == "watch":
    from lsdm_aug.lifetime import exit_with_parent
    exit_with_parent(poll_seconds=0.1)
print("ready", flush=True)
time.sleep(120)
"""

MIDDLE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
child.stdout.readline()
print(child.pid, flush=True)
time.sleep(120)
"""


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie that nobody reaped counts as ended)."""
    status = Path(f"/proc/{pid}/status")
    try:
        return "\nState:\tZ" not in status.read_text()
    except FileNotFoundError:
        return False


def _orphan_after_parent_killed(mode: str, wait_seconds: float = 30.0) -> tuple[int, bool]:
    """Start parent -> child (``mode`` "watch": the child calls exit_with_parent), kill the parent with SIGKILL and
    return the child's pid and whether it still runs once it had ``wait_seconds`` to end."""
    middle = subprocess.Popen([sys.executable, "-c", MIDDLE, GRANDCHILD, mode], stdout=subprocess.PIPE, text=True)
    pid = int(middle.stdout.readline())
    middle.kill()
    middle.wait()
    deadline = time.monotonic() + wait_seconds
    while _running(pid) and time.monotonic() < deadline and mode == "watch":
        time.sleep(0.1)
    return pid, _running(pid)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads process states from /proc (Linux)")
def test_a_watching_child_ends_with_its_killed_parent():
    _, still_running = _orphan_after_parent_killed("watch")
    assert not still_running


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads process states from /proc (Linux)")
def test_without_the_watch_the_child_outlives_its_parent():
    pid, still_running = _orphan_after_parent_killed("plain")
    try:
        assert still_running
    finally:
        os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("poll", [0, -1.0, True, "2"])
def test_poll_seconds_must_be_a_positive_number(poll):
    with pytest.raises(ValueError, match="poll_seconds must be a number > 0"):
        exit_with_parent(poll_seconds=poll)
