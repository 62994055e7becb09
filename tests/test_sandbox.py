"""The sandbox against hostile candidates, with real subprocesses: each attack must fail inside the sandbox and
leave the test process and the machine as they were."""

from __future__ import annotations

import dis
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from trainer import sandbox_child
from trainer.sandbox import SITE_DIRS, TRUNCATED, run_python
from trainer.sandbox_child import ALLOW_UNCONFINED, DEVICES, LIBRARY_DIRS, LOADER_CACHE, NOBODY, _make_audit_hook

IS_ROOT = os.geteuid() == 0


def run(code: str, **kwargs):
    return run_python(textwrap.dedent(code), **kwargs)


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line mentions `marker` (the sandbox's scratch path is in its command line)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_runs_code_and_captures_output():
    result = run("import sys\nprint('hello')\nprint('oops', file=sys.stderr)")
    assert (result.ok, result.returncode, result.timed_out) == (True, 0, False)
    assert result.stdout == "hello\n" and result.stderr.endswith("oops\n")  # after a degraded-sandbox warning


def test_failures_are_reported_not_raised():
    assert run("raise SystemExit(3)").returncode == 3
    syntax = run("def f(:\n  pass")
    assert not syntax.ok and "SyntaxError" in syntax.stderr


def test_scratch_dir_is_cwd_writable_and_removed():
    result = run("""
        import os
        open("out.txt", "w").write("kept")
        os.mkdir("sub")
        print(os.getcwd(), open("out.txt").read(), sorted(os.listdir(".")))
    """)
    assert result.ok, result.stderr
    scratch, content, listing = result.stdout.split(" ", 2)
    assert content == "kept" and listing.strip() == "['out.txt', 'sub']"
    assert not Path(scratch).exists()


def test_common_libraries_still_work():
    result = run("""
        import asyncio, collections, dataclasses, math, tempfile, threading
        import numpy as np
        Point = collections.namedtuple("Point", "x y")
        async def three():
            return 3
        with tempfile.TemporaryDirectory() as d:
            open(d + "/f", "w").write("x")
        t = threading.Thread(target=lambda: None); t.start(); t.join()
        print(Point(1, 2).x, asyncio.run(three()), int(np.arange(4).sum()), math.isqrt(16))
    """)
    assert result.ok, result.stderr
    assert result.stdout == "1 3 6 4\n"


@pytest.mark.parametrize("body", ["while True:\n    pass", "import time\ntime.sleep(60)"], ids=["cpu", "sleep"])
def test_infinite_loop_times_out_and_the_group_dies(body):
    result = run("import os\nprint(os.getcwd(), flush=True)\n" + body, timeout_s=1)
    assert result.timed_out and not result.ok and result.returncode is None
    assert processes_with(result.stdout.strip()) == []


@pytest.mark.parametrize("bomb", [
    "while True:\n    os.fork()",
    "import subprocess\nwhile True:\n    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
    "while True:\n    os.system('sleep 60 &')",
    "import multiprocessing, time\nwhile True:\n    multiprocessing.Process(target=time.sleep, args=(60,)).start()",
    "import subprocess\nwhile True:\n    subprocess._fork_exec([b'/bin/sleep'], [b'/bin/sleep'], True, (), None, None,"
    " -1, -1, -1, -1, -1, -1, -1, -1, False, False, None, None, None, -1, None, False)",
], ids=["fork", "popen", "system", "multiprocessing", "raw-fork-exec"])
def test_fork_bombs_are_refused_and_leave_nothing_behind(bomb):
    result = run("import os, sys\nprint(os.getcwd(), flush=True)\n" + bomb, timeout_s=5)
    assert not result.ok and not result.timed_out
    assert "sandbox: refused" in result.stderr
    assert processes_with(result.stdout.strip()) == []


def test_cannot_write_outside_scratch(tmp_path):
    tmp_path.chmod(0o777)  # a world-writable directory: the uid drop alone would not protect it
    (tmp_path / "keep").write_text("precious")
    target, keep = str(tmp_path / "pwned"), str(tmp_path / "keep")
    result = run(f"""
        import builtins, os, pathlib, shutil
        attempts = {{
            "open": lambda: open({target!r}, "w"),
            "os.open": lambda: os.open({target!r}, os.O_WRONLY | os.O_CREAT),
            "pathlib": lambda: pathlib.Path({target!r}).write_text("x"),
            "dotdot": lambda: open(os.getcwd() + "/../pwned", "w"),
            "mkdir": lambda: os.mkdir({target!r}),
            "rename": lambda: (open("f", "w").close(), os.rename("f", {target!r})),
            "copy": lambda: (open("g", "w").close(), shutil.copy("g", {target!r})),
            "symlink": lambda: os.symlink({target!r}, "link"),
            "dir_fd": lambda: os.open("pwned", os.O_WRONLY | os.O_CREAT, dir_fd=os.open({str(tmp_path)!r}, 0)),
            "remove": lambda: os.remove({keep!r}),
            "patched": lambda: (setattr(os, "getcwd", lambda: "/"), setattr(builtins, "str", bytes),
                                open({target!r}, "w")),
        }}
        for name, attempt in attempts.items():
            try:
                attempt()
                print(name, "succeeded")
            except OSError as exc:  # refused by the hook, or the path is not even visible (mount layer)
                print(name, "failed:", exc)
    """)
    assert result.ok, result.stderr
    assert result.stdout.count("failed:") == 11 and "succeeded" not in result.stdout, result.stdout
    assert [p.name for p in tmp_path.iterdir()] == ["keep"]


def test_no_network():
    with socket.socket() as server, socket.socket(type=socket.SOCK_DGRAM) as udp:
        server.bind(("127.0.0.1", 0))
        server.listen()
        udp.bind(("127.0.0.1", 0))
        tcp_address, udp_address = server.getsockname(), udp.getsockname()
        result = run(f"""
            import socket
            attempts = (lambda: socket.create_connection({tcp_address!r}, timeout=2),
                        lambda: socket.socket().connect({tcp_address!r}),
                        lambda: socket.socket(type=socket.SOCK_DGRAM).sendto(b"x", {udp_address!r}),
                        lambda: socket.getaddrinfo("localhost", 80))
            for attempt in attempts:
                try:
                    attempt()
                    print("connected")
                except OSError as exc:
                    print("blocked", exc)
        """)
        server.setblocking(False)
        udp.setblocking(False)
        with pytest.raises(BlockingIOError):
            server.accept()
        with pytest.raises(BlockingIOError):
            udp.recv(16)
    assert result.ok, result.stderr
    assert result.stdout.count("blocked") == 4 and "connected" not in result.stdout


@pytest.mark.parametrize("bomb", ["x = bytearray(8 << 30)",
                                  "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))"])
def test_memory_bomb(bomb):
    result = run(bomb, memory_mb=256, timeout_s=10)
    assert not result.ok and not result.timed_out
    assert "MemoryError" in result.stderr


def test_huge_output_keeps_head_and_tail():
    result = run("""
        import sys
        print("first")
        for _ in range(64):
            sys.stdout.write("x" * (1 << 20))
        print("last")
        raise ValueError("the end")
    """, max_output_bytes=4096)
    assert not result.ok and not result.timed_out
    assert result.stdout == "first\n" + "x" * 2042 + TRUNCATED + "x" * 2043 + "last\n"
    assert result.stderr.endswith("ValueError: the end\n")


def test_environment_secrets_are_not_visible(monkeypatch):
    secret = "sk-uniopd-test-4f1c2a"
    monkeypatch.setenv("UNIOPD_FAKE_API_KEY", secret)
    monkeypatch.setenv("REDIS_URL", f"redis://:{secret}@localhost:6379/0")
    result = run("""
        import os
        print(sorted(os.environ))
        for path in ("/proc/self/environ", "/proc/1/environ", f"/proc/{os.getppid()}/environ"):
            try:
                print(open(path, "rb").read())
            except OSError as exc:
                print(path, type(exc).__name__)
    """)
    assert result.ok, result.stderr
    assert secret not in result.stdout + result.stderr and "REDIS" not in result.stdout
    names = ["HOME", "LANG", "MKL_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PATH", "TMPDIR"]
    assert result.stdout.startswith(f"{names}\n")


@pytest.mark.e2e
@pytest.mark.skipif(not IS_ROOT, reason="the drop to nobody is for root")
def test_kernel_layers_when_root():
    result = run("""
        import os, socket
        print(os.getuid(), os.getgid(), os.getpid(), socket.if_nameindex())
    """)
    assert result.ok, result.stderr
    assert result.stdout == f"{NOBODY} {NOBODY} 1 [(1, 'lo')]\n"  # nobody, pid 1, a network of loopback only


ROOT = Path(__file__).resolve().parents[1]
SECRETS = ("/etc/passwd", str(ROOT / "README.md"), str(ROOT / "examples/opd-tiny/code_eval.jsonl"),
           "/proc/self/environ", "/home")
LOOK_AROUND = f"""
import json, os, sys
seen = {{}}
for path in {SECRETS!r}:
    try:
        seen[path] = sorted(os.listdir(path)) if os.path.isdir(path) else open(path, "rb").read(64).decode()
    except (OSError, UnicodeDecodeError) as exc:
        seen[path] = type(exc).__name__
interpreter = {{os.path.realpath(p) for p in [*sys.path, *{LIBRARY_DIRS!r}] if os.path.isdir(p)}}
found = []  # everything visible, except inside the interpreter's own directories
for directory, subdirs, files in os.walk("/"):
    found += [os.path.join(directory, name) for name in files + subdirs]
    subdirs[:] = [d for d in subdirs if os.path.join(directory, d) not in interpreter]
print(json.dumps({{"seen": seen, "interpreter": sorted(interpreter), "found": sorted(found)}}))
"""


def in_process(code: str) -> tuple[bool, str, str]:
    result = run_python(code)
    return result.ok, result.stdout, result.stderr


def elsewhere(code: str, before: str = "", prefix: tuple[str, ...] = (), env: dict | None = None):
    """run_python(code) in another process, started by `prefix`, running `before` first: (ok, stdout, stderr)."""
    runner = f"{before}\nimport json, sys\nfrom trainer.sandbox import run_python\nr = run_python(sys.argv[1])\n" \
             "print(json.dumps([r.ok, r.stdout, r.stderr]))"
    done = subprocess.run([*prefix, sys.executable, "-c", runner, code], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(done.stdout))


def as_user_1000(code: str) -> tuple[bool, str, str]:
    """Not root: uid 1000 of a user namespace (mapped to this uid outside, so the interpreter stays readable)."""
    return elsewhere(code, prefix=("unshare", "--user", "--map-user=1000", "--map-group=1000"))


@pytest.mark.parametrize("runner", [in_process, pytest.param(as_user_1000, marks=pytest.mark.skipif(
    not IS_ROOT or shutil.which("unshare") is None, reason="needs root and unshare(1) to play a user"))],
    ids=["this-uid", "non-root"])
def test_sees_only_its_scratch_dir_and_the_interpreter(runner):
    """No dataset, checkout, /etc, /home or /proc: listing, reading and walking everything visible finds the
    interpreter's directories (sys.path and the system libraries), the loader's cache, four devices, the scratch
    dir, and the directories leading to them."""
    ok, stdout, stderr = runner(LOOK_AROUND)
    assert ok, stderr
    view = json.loads(stdout)
    assert view["seen"] == dict.fromkeys(SECRETS, "FileNotFoundError")
    child_path = subprocess.run([sys.executable, "-I", "-S", "-c", "import sys; print('\\n'.join(sys.path))"],
                                capture_output=True, text=True, check=True).stdout.split()
    expected = {os.path.realpath(p) for p in [*child_path, *SITE_DIRS, *LIBRARY_DIRS] if os.path.isdir(p)}
    assert set(view["interpreter"]) == expected
    files = [p for p in (*DEVICES, LOADER_CACHE) if os.path.exists(p)]
    scratch = tempfile.gettempdir() + "/uniopd-sandbox-"
    allowed = {*expected, *files, *(d for d in LIBRARY_DIRS if os.path.islink(d)), scratch}
    allowed |= {str(parent) for p in allowed for parent in Path(p).parents}
    leaks = [p for p in view["found"] if p not in allowed and not p.startswith(scratch)]
    assert leaks == [] and set(files) <= set(view["found"])


REFUSE_UNSHARE = """
import ctypes, struct
# a seccomp filter like a container runtime's default profile: unshare(2) fails with EPERM (272 on x86_64)
program = [(0x20, 0, 0, 0), (0x15, 0, 1, 272), (0x06, 0, 0, 0x00050001), (0x06, 0, 0, 0x7FFF0000)]
code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *op) for op in program))
class Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # no_new_privs
assert libc.prctl(22, 2, ctypes.byref(Program(len(program), ctypes.addressof(code))), 0, 0) == 0  # the filter
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter names unshare by its x86_64 number")
def test_where_namespaces_are_refused_nothing_runs_unless_allowed():
    """The fallback is explicit: by default the candidate does not run and the check says why; allowed, it runs,
    says on stderr that it is unconfined, and sees the host's files (what the setting accepts)."""
    probe = "import os\nprint(os.path.exists('/etc/passwd'))"
    env = {k: v for k, v in os.environ.items() if k != ALLOW_UNCONFINED}
    refusal = "([Errno 1] unshare: Operation not permitted)"
    ok, stdout, stderr = elsewhere(probe, before=REFUSE_UNSHARE, env=env)
    assert (ok, stdout) == (False, "") and f"sandbox: cannot confine the candidate {refusal}" in stderr
    ok, stdout, stderr = elsewhere(probe, before=REFUSE_UNSHARE, env={**env, ALLOW_UNCONFINED: "1"})
    assert (ok, stdout) == (True, "True\n") and f"sandbox: warning: unconfined {refusal}" in stderr


WITHOUT_THE_HOOK = """
import ctypes, importlib.util, os, subprocess, sys
spec = importlib.util.spec_from_file_location("child", sys.argv[1])
child = importlib.util.module_from_spec(spec)
spec.loader.exec_module(child)
scratch, site = sys.argv[2], os.path.realpath(sys.argv[3])
sys.path.append(site)
libc = ctypes.CDLL(None, use_errno=True)
child._isolate(libc, scratch, False)
os.chdir(scratch)
child._drop_privileges(libc)  # as _child_main does, but no audit hook: a candidate that got around it
os.mkdir("d")
attempts = {
    "remount a bind writable": lambda: libc.mount(None, site.encode(), None, child.MS_REMOUNT | child.MS_BIND, None),
    "unmount a bind": lambda: libc.umount2(site.encode(), child.MNT_DETACH),
    "mount proc": lambda: libc.mount(b"proc", b"d", b"proc", 0, None),
    "mount a tmpfs": lambda: libc.mount(b"tmpfs", b"d", b"tmpfs", 0, None),
    "chroot": lambda: os.chroot("d"),
    "become root": lambda: os.setuid(0),
    "write into site-packages": lambda: open(site + "/pwned", "w"),
    "run a shell": lambda: subprocess.run(["/bin/sh", "-c", "true"]),
    "read /etc/passwd": lambda: open("/etc/passwd"),
}
for name, attempt in attempts.items():
    try:
        print(name, "failed" if attempt() == -1 else "succeeded")
    except OSError:
        print(name, "failed")
"""


@pytest.mark.e2e
@pytest.mark.parametrize("prefix", [(), ("unshare", "--user", "--map-user=1000", "--map-group=1000")],
                         ids=["this-uid", "non-root"])
def test_the_kernel_layers_hold_without_the_audit_hook(prefix):
    """The hook is not the boundary: with it bypassed, the candidate still cannot remount, unmount or mount, leave
    its root, regain privileges, write the interpreter's files, run a program or read the host's files."""
    if prefix and (not IS_ROOT or shutil.which("unshare") is None):
        pytest.skip("needs root and unshare(1) to play a user")
    scratch = tempfile.mkdtemp(prefix="uniopd-sandbox-")
    try:
        done = subprocess.run([*prefix, sys.executable, "-I", "-B", "-S", "-c", WITHOUT_THE_HOOK,
                               sandbox_child.__file__, scratch, SITE_DIRS[0]], capture_output=True, text=True,
                              timeout=60)
    finally:
        shutil.rmtree(scratch)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 9 and all(line.endswith(" failed") for line in lines), done.stdout


def closure_functions(function) -> list:
    """`function` and every Python function it reaches through closure cells."""
    found, todo = [], [function]
    while todo:
        current = todo.pop()
        found.append(current)
        cells = [c.cell_contents for c in current.__closure__ or ()]
        todo += [f for f in cells if isinstance(f, type(function)) and f not in found]
    return found


def test_audit_hook_policy_and_isolation_from_globals():
    hook = _make_audit_hook("/scratch")
    allowed = [("open", ("/scratch/a", "w", os.O_WRONLY | os.O_CREAT)), ("open", ("/etc/hostname", "r", 0)),
               ("open", (1, "w", os.O_WRONLY)), ("os.remove", ("/scratch/a", -1)), ("import", ("json", None)),
               ("ctypes.dlopen", (None,))]
    refused = [("open", ("/etc/x", "w", os.O_WRONLY | os.O_CREAT)), ("open", ("/scratch/../etc/x", "a", os.O_APPEND)),
               ("open", ("/etc", "r", os.O_RDONLY)), ("os.rename", ("/scratch/a", "/tmp/b", -1, -1)),
               ("os.fork", ()), ("socket.connect", (None, ("127.0.0.1", 80))), ("ctypes.dlopen", ("libc.so.6",)),
               ("import", ("_posixsubprocess", None)), ("os.chmod", (3, 0o777, None))]
    for event, args in allowed:
        hook(event, args)
    for event, args in refused:
        with pytest.raises(PermissionError, match="sandbox: refused"):
            hook(event, args)
    # Decisions must not depend on anything the candidate could rebind: no global or builtin lookups.
    functions = closure_functions(hook)
    assert len(functions) >= 4
    assert not [i.argval for f in functions for i in dis.get_instructions(f) if i.opname == "LOAD_GLOBAL"]
