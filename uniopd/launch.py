"""Start uniopd servers as child processes and wait until they are ready (used by the demo, tests and benches)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import redis

PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None  # loaded before any fork


def die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn: the kernel sends the child SIGTERM when its parent dies, even by SIGKILL, so a killed demo
    or experiment leaves no servers, Redis or trainers behind (Linux only). The kernel signals when the *thread* that
    forked exits, so this is armed only from the main thread; a child started from a worker thread (a pool that
    starts servers in parallel) lives as long as its process, as before."""
    if _LIBC is None or threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()

    def arm() -> None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os.kill(os.getpid(), signal.SIGTERM)

    return arm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log_path: Path
    what: str = "server"  # in error messages

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *_) -> None:
        self.stop()


def start_teacher(model_dir: str | Path, backend: str = "hf", args: list[str] | None = None,
                  log_dir: str | Path | None = None, timeout: float = 180.0, env: dict | None = None,
                  wait: bool = True) -> ServerProcess:
    """`uniopd teacher serve` on a free loopback port; returns once /readyz answers 200 (at once with wait=False:
    then `wait_ready` it, after starting the others, so that they load side by side)."""
    return start_server("teacher", model_dir, backend, args, log_dir, timeout, env, wait)


def start_rollout(model_dir: str | Path, backend: str = "hf", args: list[str] | None = None,
                  log_dir: str | Path | None = None, timeout: float = 180.0, env: dict | None = None,
                  wait: bool = True) -> ServerProcess:
    """`uniopd rollout serve` on a free loopback port; returns as start_teacher does."""
    return start_server("rollout", model_dir, backend, args, log_dir, timeout, env, wait)


def start_server(kind: str, model_dir: str | Path, backend: str, args: list[str] | None, log_dir: str | Path | None,
                 timeout: float, env: dict | None, wait: bool = True) -> ServerProcess:
    port = free_port()
    log_path = Path(log_dir or "/tmp") / f"uniopd-{kind}-{backend}-{port}.log"
    cmd = [sys.executable, "-m", "uniopd", kind, "serve", "--model", str(model_dir), "--backend", backend,
           "--host", "127.0.0.1", "--port", str(port), *(args or [])]
    server = spawn(cmd, port, log_path, f"{kind} server", env)
    return wait_ready(server, timeout=timeout) if wait else server


def spawn_server(cmd: list[str], port: int, log_path: Path, what: str, ready_path: str = "/readyz",
                 timeout: float = 180.0, env: dict | None = None) -> ServerProcess:
    """`cmd`, a server that listens on loopback `port`, its output in `log_path`; returns once `ready_path` answers
    200, and fails fast when the process exits or says its model failed to load."""
    return wait_ready(spawn(cmd, port, log_path, what, env), ready_path, timeout)


def spawn(cmd: list[str], port: int, log_path: Path, what: str, env: dict | None = None) -> ServerProcess:
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                preexec_fn=die_with_parent())
    return ServerProcess(proc, f"http://127.0.0.1:{port}", log_path, what)


def wait_ready(server: ServerProcess, ready_path: str = "/readyz", timeout: float = 180.0) -> ServerProcess:
    """Returns the server once `ready_path` answers 200; stops it and raises when its process exits, its model
    fails to load, or the timeout passes."""
    what, proc = server.what, server.proc
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{server.log()[-4000:]}")
        try:
            resp = httpx.get(f"{server.url}{ready_path}", timeout=2)
        except httpx.HTTPError:
            resp = None
        if resp is not None and resp.status_code == 200:
            return server
        if resp is not None and (failure := _load_failure(resp)) is not None:
            server.stop()
            raise RuntimeError(f"{what} failed to load its model: {failure}")
        time.sleep(0.2)
    server.stop()
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{server.log()[-4000:]}")


def _load_failure(resp: httpx.Response) -> str | None:
    """The message of a uniopd server's load_failed error (other servers' bodies need not be JSON)."""
    try:
        error = resp.json().get("error", {})
    except (ValueError, AttributeError):
        return None
    return error.get("message") if error.get("code") == "load_failed" else None


class RedisServer:
    """A throwaway redis-server process without persistence (the demo's cache when none is configured; tests'
    Redis, restartable on the same port to simulate an outage)."""

    def __init__(self, aclfile: str | Path | None = None, admin: tuple[str, str] | None = None) -> None:
        """`aclfile`: Redis users (e.g. deploy/redis/users.acl); `admin`: the (user, password) this object's own
        client logs in as when the file turns the default user off."""
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self._aclfile, self._admin = aclfile, admin

    def client(self) -> redis.Redis:
        user, password = self._admin or (None, None)
        return redis.Redis(port=self.port, socket_timeout=2, username=user, password=password)

    def start(self) -> RedisServer:
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--daemonize", "no", *(["--aclfile", str(Path(self._aclfile).resolve())] if self._aclfile else [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=die_with_parent())
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as c:
                    c.ping()
                return self
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.01)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()
