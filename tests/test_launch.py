"""Children started by uniopd.launch die with the process that started them, even when it is SIGKILLed (a killed
demo or experiment used to leave its teachers and redis-server running)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

PARENT_WITH_SLEEP = """
    import subprocess, sys
    from uniopd.launch import die_with_parent
    child = subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent())
    print(child.pid, flush=True)
    sys.stdin.read()
"""
PARENT_WITH_REDIS = """
    import sys
    from uniopd.launch import RedisServer
    server = RedisServer().start()
    print(server.proc.pid, flush=True)
    sys.stdin.read()
"""


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped by init."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def child_outlives_killed_parent(parent_code: str) -> bool:
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent(parent_code)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = alive(child)
    if survived:
        os.kill(child, signal.SIGKILL)
    return survived


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_child_dies_with_its_sigkilled_parent():
    assert not child_outlives_killed_parent(PARENT_WITH_SLEEP)


def test_a_child_started_from_a_worker_thread_outlives_that_thread():
    """PR_SET_PDEATHSIG fires when the forking *thread* exits: from a worker thread it is not armed (servers started
    by a thread pool must outlive the pool)."""
    from concurrent.futures import ThreadPoolExecutor

    from uniopd.launch import die_with_parent

    with ThreadPoolExecutor(1) as pool:
        child = pool.submit(lambda: subprocess.Popen(["sleep", "60"], preexec_fn=die_with_parent())).result()
    time.sleep(0.5)
    try:
        assert alive(child.pid)
    finally:
        child.kill()
        child.wait()


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_redis_started_by_launch_dies_with_its_sigkilled_parent():
    assert not child_outlives_killed_parent(PARENT_WITH_REDIS)
