"""The sandbox against hostile candidates, with real subprocesses: each attack must fail inside the sandbox and
leave the test process and the machine as they were."""

from __future__ import annotations

import dis
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainer.sandbox import TRUNCATED, run_python
from trainer.sandbox_child import NOBODY, _closed_dir, _make_audit_hook

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


def kernel_allows(flag: int) -> bool:
    probe = f"import ctypes, sys; sys.exit(ctypes.CDLL(None, use_errno=True).unshare({flag}) != 0)"
    return subprocess.run([sys.executable, "-c", probe]).returncode == 0


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
@pytest.mark.skipif(not IS_ROOT, reason="privilege drop and mount/pid namespaces are for root")
def test_kernel_layers_when_root():
    import tempfile

    with tempfile.NamedTemporaryFile(dir="/tmp", prefix="uniopd-host-secret-") as host_file:
        result = run(f"""
            import os
            print(os.getuid(), os.getgid(), os.getpid(), os.readlink("/proc/self/ns/net"))
            print(os.path.exists({host_file.name!r}))
        """)
    assert result.ok, result.stderr
    ids, host_tmp_visible = result.stdout.splitlines()
    uid, gid, pid, netns = ids.split()
    # nobody must be able to read the interpreter: directly, or through the mount layer's re-binding
    interpreter_open = all(_closed_dir(p) is None for p in sys.path if os.path.isdir(p))
    if interpreter_open or kernel_allows(0x00020000):
        assert (int(uid), int(gid)) == (NOBODY, NOBODY)
    if kernel_allows(0x40000000):  # CLONE_NEWNET
        assert netns != os.readlink("/proc/self/ns/net")
    if kernel_allows(0x20000000):  # CLONE_NEWPID
        assert pid == "1"
    if kernel_allows(0x00020000):  # CLONE_NEWNS: the host's /tmp is replaced by a private tmpfs
        assert host_tmp_visible == "False"


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
