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
ALLOW_UNCONFINED = "UNIOPD_SANDBOX_ALLOW_UNCONFINED"  # =1: run candidates even where the kernel refuses namespaces
FILE_SIZE_LIMIT = 16 << 20
OPEN_FILES_LIMIT = 64
PROCESS_LIMIT = 256  # per uid (shared by concurrent sandboxes), a backstop; only binds once we are not root
ROOT_TMPFS = "size=1m,mode=755"  # the new root: only the directories leading to what is bound into it
SCRATCH_TMPFS = "size=64m"
# besides sys.path, the interpreter needs the shared libraries its extension modules load (and the loader's cache)
LIBRARY_DIRS = ("/lib", "/lib32", "/lib64", "/usr/lib", "/usr/lib32", "/usr/lib64", "/usr/local/lib")
DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")
LOADER_CACHE = "/etc/ld.so.cache"
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}  # glibc has no wrapper
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 4096, 16384, 1 << 18, 2
PR_SET_NO_NEW_PRIVS = 38
CAPABILITY_VERSION_3 = 0x20080522


def _child_main(scratch: str, cpu_s: str, memory_bytes: str, unconfined_ok: str, *site_dirs: str) -> None:
    """Arguments as the parent's argv gives them (no json: parsing it would double this module's import time)."""
    import ctypes

    sys.path.extend(d for d in site_dirs if os.path.isdir(d) and d not in sys.path)  # the new root binds sys.path
    code = sys.stdin.buffer.read().decode("utf-8", "surrogatepass")
    libc = ctypes.CDLL(None, use_errno=True)
    _isolate(libc, scratch, unconfined_ok == "1")
    os.chdir(scratch)  # after the mounts, so cwd is the tmpfs and not the directory under it
    _set_limits(int(cpu_s), int(memory_bytes))
    _drop_privileges(libc)
    _disarm_fork_exec()
    sys.addaudithook(_make_audit_hook(scratch))
    _run_candidate(code)


def _isolate(libc, scratch: str, unconfined_ok: bool) -> None:
    """Kernel isolation; see trainer/sandbox.py. Only the candidate process returns from here. Where the kernel
    refuses the namespaces the candidate does not run, unless ALLOW_UNCONFINED says to run it without them."""
    root = os.geteuid() == 0
    refused = _unshare(libc, root)
    if refused and not unconfined_ok:
        sys.exit(f"sandbox: cannot confine the candidate ({refused}); {ALLOW_UNCONFINED}=1 runs it unconfined")
    if refused:
        print(f"sandbox: warning: unconfined ({refused}): the candidate sees the host's files and network",
              file=sys.stderr)
    else:
        try:
            _enter_new_root(libc, scratch, (NOBODY, NOBODY) if root else (os.geteuid(), os.getegid()))
            _check(libc.unshare(CLONE_NEWPID) == 0, "unshare the pid namespace")
        except OSError as exc:  # half-confined is worse than failing loudly, whatever ALLOW_UNCONFINED says
            sys.exit(f"sandbox: cannot confine the candidate ({exc})")
        _become_init()
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)


def _unshare(libc, root: bool) -> str | None:
    """New mount and network namespaces (in a new user namespace when not root); why not, if refused."""
    machine = os.uname().machine
    if machine not in SYS_PIVOT_ROOT:
        return f"no pivot_root number for {machine}"
    uid, gid = os.geteuid(), os.getegid()
    try:
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | (0 if root else CLONE_NEWUSER)) == 0, "unshare")
        if not root:  # map our own ids only: the candidate stays this uid, with no capabilities outside
            for name, line in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
                with open(f"/proc/self/{name}", "w") as file:
                    file.write(line)
    except OSError as exc:
        return str(exc)
    return None


def _check(ok: bool, what: str) -> None:
    """Raise OSError with errno when a libc call failed."""
    if not ok:
        import ctypes

        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(libc, source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> bool:
    return libc.mount(_c_string(source), _c_string(target), _c_string(fstype), flags, _c_string(data)) == 0


def _c_string(text: str | None) -> bytes | None:
    return None if text is None else text.encode()


def _enter_new_root(libc, scratch: str, owner: tuple[int, int]) -> None:
    """Pivot into a fresh read-only tmpfs root that holds only the interpreter (sys.path, shared libraries, the
    loader's cache, four character devices; all bound read-only) and the scratch tmpfs; the old root is detached,
    so nothing else of the host's filesystem can be reached, not even with the capabilities of this namespace."""
    sys.path[:] = [os.path.realpath(p) for p in sys.path]  # bound at their real paths
    dirs = {p for p in sys.path if os.path.isdir(p) and p != "/"}
    dirs |= {d for d in LIBRARY_DIRS if os.path.isdir(d) and not os.path.islink(d)}
    new = scratch  # an empty directory of ours: the new root's mount point
    os.umask(0o022)
    _check(_mount(libc, None, "/", None, MS_REC | MS_PRIVATE), "make the mounts private")
    _check(_mount(libc, "tmpfs", new, "tmpfs", MS_NOSUID | MS_NODEV, ROOT_TMPFS), "mount the new root")
    for path in _outermost(sorted(dirs)):
        os.makedirs(new + path, exist_ok=True)
        _bind_read_only(libc, path, new + path, device=False)
    for path in (f for f in (*DEVICES, LOADER_CACHE) if os.path.exists(f)):
        os.makedirs(os.path.dirname(new + path), exist_ok=True)
        os.close(os.open(new + path, os.O_CREAT | os.O_WRONLY, 0o644))
        _bind_read_only(libc, path, new + path, device=path in DEVICES)
    for link in (d for d in LIBRARY_DIRS if os.path.islink(d)):  # /lib -> usr/lib on merged-/usr systems
        os.makedirs(os.path.dirname(new + link), exist_ok=True)
        os.symlink(os.readlink(link), new + link)
    os.makedirs(new + scratch)
    scratch_options = f"{SCRATCH_TMPFS},mode=700,uid={owner[0]},gid={owner[1]}"
    _check(_mount(libc, "tmpfs", new + scratch, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, scratch_options),
           "mount the scratch tmpfs")
    os.chdir(new)
    _check(libc.syscall(SYS_PIVOT_ROOT[os.uname().machine], b".", b".") == 0, "pivot_root")
    _check(libc.umount2(b".", MNT_DETACH) == 0, "detach the old root")  # the old root was stacked on top of "."
    os.chdir("/")
    read_only = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    _check(_mount(libc, None, "/", None, read_only), "remount the new root read-only")


def _bind_read_only(libc, source: str, target: str, device: bool) -> None:
    """Bind, then remount read-only: a bind ignores MS_RDONLY. nodev/noexec on the source are kept (in a user
    namespace they are locked and a remount that drops them fails); noexec is never added (shared libraries)."""
    kept = os.statvfs(source).f_flag & (os.ST_NODEV | os.ST_NOEXEC)  # ST_* equal MS_* for these two
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | kept | (0 if device else MS_NODEV)
    _check(_mount(libc, source, target, None, MS_BIND), f"bind {source}")
    _check(_mount(libc, None, target, None, flags), f"remount {source} read-only")


def _outermost(paths: list[str]) -> list[str]:
    """Drop paths nested in another one (binding the outer one already brings them)."""
    return [p for p in paths if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in paths)]


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


def _drop_privileges(libc) -> None:
    """As root, become nobody; RLIMIT_NPROC only binds non-root users, so it is set here. Otherwise drop every
    capability: in a user namespace of its own the candidate would hold them all (to remount its binds writable)."""
    if os.geteuid() != 0:
        import ctypes

        header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
        if libc.capset(header, (ctypes.c_uint32 * 6)()) != 0:  # effective, permitted, inheritable: all empty
            sys.exit("sandbox: cannot drop capabilities")
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
