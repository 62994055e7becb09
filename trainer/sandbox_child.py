"""The sandbox's child side (see trainer/sandbox.py for the layers): run as `python -I -B -S <this file> CONFIG`.

A file of its own, importing only what it needs from the standard library, because it runs once per check: with
site processing skipped and nothing else imported, a check costs about half the interpreter start-up it did. The
parent passes its site-packages directories in CONFIG, so candidates can still import installed packages (without
.pth processing)."""

from __future__ import annotations

import os
import resource
import signal
import stat
import sys
import types
from collections.abc import Callable

NOBODY = 65534
FILE_SIZE_LIMIT = 16 << 20
OPEN_FILES_LIMIT = 64
PROCESS_LIMIT = 256  # per uid (shared by concurrent sandboxes), a backstop; only binds once we are not root
SCRATCH_TMPFS = "size=64m"
MASK_TMPFS = "size=16m"
TMP_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_BIND, MS_REC, MS_PRIVATE = 2, 4, 8, 4096, 16384, 1 << 18
PR_SET_NO_NEW_PRIVS = 38


def _child_main(scratch: str, cpu_s: str, memory_bytes: str, *site_dirs: str) -> None:
    """Arguments as the parent's argv gives them (no json: parsing it would double this module's import time)."""
    sys.path.extend(d for d in site_dirs if os.path.isdir(d) and d not in sys.path)  # before the masks keep sys.path
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    _isolate(scratch)
    os.chdir(scratch)  # after the mounts, so cwd is the tmpfs and not the directory under it
    _set_limits(int(cpu_s), int(memory_bytes))
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
        try:  # noqa: SIM105 (contextlib's import would cost more than a tenth of a check)
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

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
    """_posixsubprocess.fork_exec spawns processes without an audit event of its own; replace it with a refusal (a
    fresh import of the module is refused by the hook). Replaced, not deleted: `subprocess` (which asyncio imports)
    binds it at import time, and this lean child has not imported `subprocess` yet."""
    import _posixsubprocess

    def refused(*_: object) -> None:
        raise PermissionError("sandbox: refused _posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = refused


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
    _child_main(*sys.argv[1:])
