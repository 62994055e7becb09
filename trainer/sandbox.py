"""Run untrusted Python (a model's code answer plus its tests) in a sandboxed subprocess.

The parent side (`run_python`) starts `python -I -B <this file> <config>` in a fresh session, with a scrubbed
environment and a private scratch directory as cwd, feeds the candidate code on stdin, keeps at most
`max_output_bytes` of each output stream, and SIGKILLs the whole process group at the wall-clock deadline.

The child side (`_child_main`, the same file run as a script) then layers, in this order:

1. Kernel namespaces, best effort (each step the kernel refuses is skipped, the later layers still apply):
   - network: a new net namespace has no interfaces except a loopback that is down, so nothing is reachable;
   - mount (root only): /tmp, /var/tmp, /dev/shm and every directory on the way to the interpreter that
     `nobody` cannot enter (e.g. /root when Python lives under /root/.pyenv) are covered by fresh tmpfs, with the
     interpreter's own directories bound back in; the scratch dir becomes a small noexec tmpfs owned by `nobody`;
   - pid (root only): the candidate is pid 1 of a new pid namespace with its own /proc, so it cannot see host
     processes, and when it dies the kernel kills everything it started (even processes that left its group).
2. Resource limits (setrlimit, soft = hard): CPU seconds, address space, file size, open files, no core dumps.
3. As root: drop to nobody/nogroup (65534) with RLIMIT_NPROC and no supplementary groups; no_new_privs is set so
   setuid binaries cannot hand privileges back. This is the layer that holds when the hook below is bypassed: no
   writes to anything not world-writable (and the world-writable tmp dirs are private tmpfs when the mount layer
   works), no signals to other users' processes, a bounded process count. It is skipped, with a warning on stderr,
   if the interpreter would not be readable by nobody (imports would break), e.g. when the mount layer is
   unavailable and Python lives under /root.
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
import json
import math
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import types
from collections.abc import Callable
from dataclasses import dataclass

NOBODY = 65534
FILE_SIZE_LIMIT = 16 << 20
OPEN_FILES_LIMIT = 64
PROCESS_LIMIT = 256  # per uid (shared by concurrent sandboxes), a backstop; only binds once we are not root
SCRATCH_TMPFS = "size=64m"
MASK_TMPFS = "size=16m"
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
TRUNCATED = "\n[... truncated by sandbox ...]\n"
CHILD_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8",
             "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38


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
            os.chown(scratch, NOBODY, NOBODY)  # the candidate runs as nobody when the mount layer is unavailable
        config = {"scratch": scratch, "cpu_s": math.ceil(timeout_s) + 1, "memory_bytes": memory_mb << 20}
        return _run_child(code, config, timeout_s, max_output_bytes)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _run_child(code: str, config: dict, timeout_s: float, cap: int) -> SandboxResult:
    deadline = time.monotonic() + timeout_s
    env = {**CHILD_ENV, "HOME": config["scratch"], "TMPDIR": config["scratch"]}
    proc = subprocess.Popen([sys.executable, "-I", "-B", os.path.abspath(__file__), json.dumps(config)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=config["scratch"], env=env, start_new_session=True)
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


# ---------------------------------------------------------------------------------------------------------------
# Child side: runs as `python -I -B sandbox.py CONFIG`, as root when the parent is root.


def _child_main(config_json: str) -> None:
    config = json.loads(config_json)
    scratch = config["scratch"]
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    _isolate(scratch)
    os.chdir(scratch)  # after the mounts, so cwd is the tmpfs and not the directory under it
    _set_limits(config["cpu_s"], config["memory_bytes"])
    _drop_privileges()
    _disarm_fork_exec()
    sys.addaudithook(_make_audit_hook(scratch))
    _run_candidate(code)


def _isolate(scratch: str) -> None:
    """Kernel isolation, best effort; see the module docstring. Only the candidate process returns from here."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    root = os.geteuid() == 0
    libc.unshare(CLONE_NEWNET if root else CLONE_NEWUSER | CLONE_NEWNET)  # non-root: a user ns grants this one
    mounts = root and libc.unshare(CLONE_NEWNS) == 0 and _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    if mounts:
        _mask_filesystem(libc, scratch)
    if root and libc.unshare(CLONE_NEWPID) == 0:
        _become_init()
        if mounts:
            _mount(libc, "proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    return libc.mount(_c_string(source), _c_string(target), _c_string(fstype), flags, _c_string(data)) == 0


def _c_string(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _mask_filesystem(libc, scratch: str) -> None:
    """Hide shared tmp dirs and unreadable homes behind tmpfs; bind the interpreter back; make scratch a tmpfs."""
    keep = _outermost(sorted({os.path.realpath(p) for p in sys.path if os.path.isdir(p)}))
    tmp_dirs = {os.path.realpath(d) for d in TMP_DIRS if os.path.isdir(d)}
    masks = _outermost(sorted(tmp_dirs | {d for p in [*keep, scratch] if (d := _closed_dir(p))}))
    handles = {p: os.open(p, os.O_PATH) for p in keep}  # still reachable through /proc/self/fd once covered
    for mask in masks:
        mode = "1777" if mask in tmp_dirs else "755"
        if not _mount(libc, "tmpfs", mask, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, f"{MASK_TMPFS},mode={mode}"):
            sys.exit(f"sandbox: cannot mount tmpfs on {mask}")  # half-masked is worse than failing loudly
    for path, fd in handles.items():
        if any(path == mask or path.startswith(mask + "/") for mask in masks):
            os.makedirs(path, exist_ok=True)
            if not _mount(libc, f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC):
                sys.exit(f"sandbox: cannot bind {path}")
        os.close(fd)
    os.makedirs(scratch, exist_ok=True)
    scratch_opts = f"{SCRATCH_TMPFS},mode=700,uid={NOBODY},gid={NOBODY}"
    if not _mount(libc, "tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, scratch_opts):
        sys.exit("sandbox: cannot mount the scratch tmpfs")


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths nested in another one (a recursive bind of the outer one already brings them)."""
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


def _closed_dir(path: str) -> str | None:
    """The outermost proper ancestor of `path` that other users cannot enter, if any."""
    parts = os.path.abspath(path).split("/")[1:-1]
    for depth in range(1, len(parts) + 1):
        ancestor = "/" + "/".join(parts[:depth])
        if not os.stat(ancestor).st_mode & stat.S_IXOTH:
            return ancestor
    return None


def _become_init() -> None:
    """Fork: the child is pid 1 of the new pid namespace; this process waits and exits the same way it did."""
    pid = os.fork()
    if pid == 0:
        return
    _kill_on_sigterm(pid)
    code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    if code < 0:
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code if code >= 0 else 128 - code)


def _kill_on_sigterm(pid: int) -> None:
    """run_python's timeout sends SIGTERM here: SIGKILL the candidate (which ends its whole pid namespace), then
    the waitpid above reaps it. A pidfd cannot hit a reused pid; without one (kernel < 5.3) the group kill remains."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return

    def kill_candidate(*_: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)

    signal.signal(signal.SIGTERM, kill_candidate)


def _set_limits(cpu_s: int, memory_bytes: int) -> None:
    """soft = hard, so the candidate cannot raise any of them again."""
    limits = {resource.RLIMIT_CPU: cpu_s, resource.RLIMIT_AS: memory_bytes, resource.RLIMIT_FSIZE: FILE_SIZE_LIMIT,
              resource.RLIMIT_NOFILE: OPEN_FILES_LIMIT, resource.RLIMIT_CORE: 0}
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))


def _drop_privileges() -> None:
    """As root, become nobody; RLIMIT_NPROC only binds non-root users, so it is set here."""
    if os.geteuid() != 0:
        return
    resource.setrlimit(resource.RLIMIT_NPROC, (PROCESS_LIMIT, PROCESS_LIMIT))
    if not _usable_by_nobody([p for p in sys.path if os.path.isdir(p)] + [os.getcwd()]):
        print("sandbox: warning: staying root, the interpreter is not readable by nobody", file=sys.stderr)
        return
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


def _usable_by_nobody(paths: list[str]) -> bool:
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        return all(os.access(p, os.R_OK | os.X_OK, effective_ids=True) for p in paths)
    finally:
        os.seteuid(0)
        os.setegid(0)


def _disarm_fork_exec() -> None:
    """_posixsubprocess.fork_exec spawns processes without an audit event of its own; remove it (a fresh import of
    the module is refused by the hook)."""
    import _posixsubprocess

    del _posixsubprocess.fork_exec


def _make_audit_hook(scratch: str) -> Callable[[str, tuple], None]:
    """Build the audit hook. Everything it uses is bound here (closure cells, no globals, no builtins lookups) so
    that the candidate rebinding os.*, builtins.* or this module's globals cannot change its decisions."""
    refused = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "subprocess.Popen",
        "os.kill", "os.killpg", "signal.pthread_kill", "os.symlink", "os.link",
        "socket.connect", "socket.bind", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
        "socket.sendto", "socket.sendmsg", "resource.setrlimit", "resource.prlimit",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",
    })
    refused_imports = frozenset({"cffi", "_cffi_backend", "_posixsubprocess"})
    # numpy imports ctypes, so ctypes itself is allowed (its import opens the main program: dlopen(None)); loading
    # libraries, looking up symbols and raw pointer reads are refused. ctypes.memmove/cast/CFUNCTYPE calls raise no
    # audit event in 3.11, so ctypes still gives raw memory access: another reason the hook is not the boundary.
    ctypes_allowed = frozenset({"ctypes.create_string_buffer", "ctypes.create_unicode_buffer", "ctypes.get_errno",
                                "ctypes.set_errno", "ctypes.addressof"})
    path_events = {"os.mkdir": (0,), "os.rmdir": (0,), "os.remove": (0,), "os.rename": (0, 1), "os.chmod": (0,),
                   "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,)}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    prefix = scratch.rstrip("/") + "/"
    getcwd, stat_, fspath, is_dir = os.getcwd, os.stat, os.fspath, stat.S_ISDIR
    isinstance_, int_, str_, bytes_, oserror, refuse_error = isinstance, int, str, bytes, OSError, PermissionError

    def text(path: object) -> str:
        path = fspath(path)
        return bytes_.decode(path, "utf-8", "surrogateescape") if isinstance_(path, bytes_) else str_.__str__(path)

    def inside(path: str) -> bool:
        path = path if path.startswith("/") else getcwd() + "/" + path
        return ".." not in path.split("/") and (path.startswith(prefix) or path + "/" == prefix)

    def directory(path: str) -> bool:
        try:
            return is_dir(stat_(path).st_mode)
        except oserror:
            return False

    def check_open(path: object, flags: int) -> bool:
        if isinstance_(path, int_):
            return True  # an already-open descriptor
        path = text(path)
        if flags & write_flags and not (inside(path) or path == "/dev/null"):
            return False
        return inside(path) or not directory(path)  # a directory fd would allow *at() calls outside

    def hook(event: str, args: tuple) -> None:
        if event in refused:
            ok = False
        elif event.startswith("ctypes."):
            ok = event in ctypes_allowed or (event == "ctypes.dlopen" and args[0] is None)
        elif event == "import":
            ok = str_.__str__(args[0]) not in refused_imports
        elif event == "open":
            ok = check_open(args[0], args[2] or 0)
        elif event in path_events:
            ok = True
            for i in path_events[event]:
                ok = ok and not isinstance_(args[i], int_) and inside(text(args[i]))
        else:
            return
        if not ok:
            raise refuse_error(f"sandbox: refused {event}")

    return hook


def _run_candidate(code: str) -> None:
    main = types.ModuleType("__main__")
    sys.modules["__main__"] = main
    sys.argv = ["<candidate>"]
    exec(compile(code, "<candidate>", "exec", dont_inherit=True), main.__dict__)  # no __future__ flags from here


if __name__ == "__main__":
    _child_main(sys.argv[1])
