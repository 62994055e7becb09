"""Run untrusted Python (a model's code answer plus its tests) in a sandboxed subprocess.

The parent side (`run_python`) starts `python -I -B -S sandbox_child.py <args>` in a fresh session, with a scrubbed
environment and a private scratch directory as cwd, feeds the candidate code on stdin, keeps at most
`max_output_bytes` of each output stream, and SIGKILLs the whole process group at the wall-clock deadline.

The child side (`_child_main` in trainer/sandbox_child.py) then layers, in this order:

1. Kernel namespaces (root, or any user through a user namespace of its own that maps only its own ids):
   - network: a new net namespace has no interfaces except a loopback that is down, so nothing is reachable;
   - mount: the child pivots into a fresh root, a read-only tmpfs that holds only what the interpreter needs, bound
     read-only (the sys.path directories, the system library directories, the loader's cache, /dev/null, zero,
     random, urandom), and the scratch dir as a small noexec tmpfs; the old root is detached, so the rest of the
     host's filesystem (datasets, the checkout, /etc, /home, /tmp, /proc) is not there to be read or listed;
   - pid: the candidate is pid 1 of a new pid namespace (no /proc is mounted), so it cannot see or signal other
     processes, and when it dies the kernel kills everything it started (even processes that left its group).
   Where the kernel refuses the namespaces (e.g. a container's seccomp profile), the candidate does not run and the
   check fails with "sandbox: cannot confine ...", unless UNIOPD_SANDBOX_ALLOW_UNCONFINED=1 in the parent's
   environment: then it runs with the layers below only, says so on stderr, and can read whatever its uid can.
2. Resource limits (setrlimit, soft = hard): CPU seconds, address space, file size, open files, no core dumps.
3. As root: drop to nobody/nogroup (65534) with RLIMIT_NPROC and no supplementary groups; not root: drop every
   capability (those the user namespace gave). no_new_privs is set so setuid binaries cannot hand privileges back.
   With the namespaces, this is what holds when the hook below is bypassed: the binds stay read-only, the old root
   stays out of reach. Unconfined, it bounds what the hook's bypass gives to what nobody may do: no writes to
   anything not world-writable, no signals to other users' processes, a bounded process count. The drop to nobody is
   skipped, with a warning on stderr, if the interpreter would not be readable by nobody (imports would break), e.g.
   unconfined with Python under /root.
4. An audit hook (sys.addaudithook; it cannot be removed) refusing process creation, signals, network use, most
   of ctypes, writes and directory opens outside the scratch dir, rlimit changes and gc introspection. It is
   defence in depth, not a boundary: a pure-Python hook can be bypassed by a determined candidate (ctypes, which
   numpy needs, still gives raw memory access without audit events in 3.11), so the layers above contain it. The
   hook is built from values captured before the candidate runs and no Python reference to it remains, so
   monkeypatching os/builtins or this module's globals does not change its decisions.

The candidate runs via exec(compile(code, "<candidate>", "exec")) in a fresh __main__ module.
"""

from __future__ import annotations

import contextlib
import math
import os
import selectors
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass

from trainer import sandbox_child
from trainer.sandbox_child import ALLOW_UNCONFINED, NOBODY

TRUNCATED = "\n[... truncated by sandbox ...]\n"
CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# installed packages stay importable for candidates though the child skips site processing (-S)
SITE_DIRS = sorted({sysconfig.get_path("purelib"), sysconfig.get_path("platlib")})


@dataclass(frozen=True)
class SandboxResult:
    ok: bool  # exited 0 within limits
    returncode: int | None  # None when killed at the wall-clock deadline
    timed_out: bool
    stdout: str  # at most max_output_bytes: the head and the tail, with TRUNCATED between them if cut
    stderr: str  # the same; the tail keeps the traceback


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 512,
               max_output_bytes: int = 65536) -> SandboxResult:
    """Run `code` as a sandboxed script; never raises for anything the code does."""
    scratch = os.path.realpath(tempfile.mkdtemp(prefix="uniopd-sandbox-"))  # getcwd() in the child is real too
    try:
        if os.geteuid() == 0:
            os.chown(scratch, NOBODY, NOBODY)  # the candidate runs as nobody here when unconfined
        limits = [str(math.ceil(timeout_s) + 1), str(memory_mb << 20)]  # CPU seconds, address space bytes
        unconfined_ok = "1" if os.environ.get(ALLOW_UNCONFINED) == "1" else "0"
        return _run_child(code, [scratch, *limits, unconfined_ok, *SITE_DIRS], timeout_s, max_output_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_child(code: str, args: list[str], timeout_s: float, cap: int) -> SandboxResult:
    """`args`: the child's argv, scratch directory first."""
    deadline = time.monotonic() + timeout_s
    scratch = args[0]
    env = {**CHILD_ENV, "HOME": scratch, "TMPDIR": scratch}
    proc = subprocess.Popen([sys.executable, "-I", "-B", "-S", sandbox_child.__file__, *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=scratch, env=env, start_new_session=True)
    try:
        _feed(proc, code)
        out, err = _collect(proc, deadline, cap)
        exited = _wait_exited(proc.pid, deadline)
        if not exited:
            _terminate(proc.pid)
    finally:
        _kill_group(proc)  # the leader is not reaped yet, so its pid (= the group id) cannot have been reused
    returncode = proc.wait() if exited else None
    return SandboxResult(ok=returncode == 0, returncode=returncode, timed_out=not exited,
                         stdout=out.text(), stderr=err.text())


def _feed(proc: subprocess.Popen, code: str) -> None:
    """Hand over the code on stdin: the child reads it before anything else, so this cannot block for long."""
    with contextlib.suppress(BrokenPipeError):  # the child died before reading; its exit status says so
        proc.stdin.write(code.encode("utf-8", "surrogatepass"))
    with contextlib.suppress(BrokenPipeError):  # closes the pipe even when the final flush fails
        proc.stdin.close()


class _Capture:
    """Bounded copy of a stream: its head and its tail (where tracebacks and end-of-run markers are)."""

    def __init__(self, cap: int) -> None:
        self.head_cap, self.tail_cap = cap - cap // 2, cap // 2
        self.head, self.tail, self.cut = bytearray(), bytearray(), False

    def add(self, chunk: bytes) -> None:
        room = max(0, self.head_cap - len(self.head))
        self.head += chunk[:room]
        self.tail += chunk[room:]
        if len(self.tail) > self.tail_cap:
            self.cut = True
            del self.tail[: len(self.tail) - self.tail_cap]

    def text(self) -> str:
        head, tail = (bytes(b).decode("utf-8", "replace") for b in (self.head, self.tail))
        return head + TRUNCATED + tail if self.cut else head + tail


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[_Capture, _Capture]:
    """Drain stdout/stderr until both close or the deadline; memory stays bounded whatever the child prints."""
    captures = {proc.stdout.fileno(): _Capture(cap), proc.stderr.fileno(): _Capture(cap)}
    with selectors.DefaultSelector() as selector:
        for fd in captures:
            selector.register(fd, selectors.EVENT_READ)
        while selector.get_map() and (remaining := deadline - time.monotonic()) > 0:
            for key, _ in selector.select(remaining):
                chunk = os.read(key.fd, 1 << 16)
                if chunk:
                    captures[key.fd].add(chunk)
                else:
                    selector.unregister(key.fd)
    proc.stdout.close()
    proc.stderr.close()
    return tuple(captures.values())


def _wait_exited(pid: int, deadline: float) -> bool:
    """Wait for the leader to exit without reaping it (WNOWAIT), so killpg afterwards cannot hit a reused pid."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _terminate(pid: int) -> None:
    """Ask the leader first: in a pid namespace it is the candidate's parent and kills and reaps it, so nothing is
    orphaned to an init that might never reap it (e.g. a trainer running as pid 1 of its container)."""
    os.kill(pid, signal.SIGTERM)  # not reaped yet, so the pid is still this process
    _wait_exited(pid, time.monotonic() + 0.5)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the whole group, reap the leader, and wait (briefly) until no member is still running, so that the
    caller never sees a sandbox process outlive run_python."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    give_up = time.monotonic() + 1.0
    while _group_running(proc.pid) and time.monotonic() < give_up:
        time.sleep(0.005)


def _group_running(pgid: int) -> bool:
    """Whether a group member is alive. Zombies do not count: the candidate orphaned by its killed pid-namespace
    parent is reaped by init, whenever init gets to it."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    for entry in os.scandir("/proc"):
        try:
            with open(f"/proc/{entry.name}/stat") as stat_file:
                state, _, group = stat_file.read().rsplit(")", 1)[1].split()[:3]
        except (OSError, ValueError):
            continue  # not a process, or gone meanwhile
        if int(group) == pgid and state != "Z":
            return True
    return False
