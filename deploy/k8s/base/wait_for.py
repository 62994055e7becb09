"""Kubernetes has no compose `depends_on`: init containers run this (from the ConfigMap uniopd-wait) and it returns
once everything named is there. A target is a URL that answers 200 (a server's /readyz), redis://HOST:PORT (answers
PING) or a file path (a model's config.json, a dataset). `--config RUN.yaml` adds what a `uniopd train` config needs:
its teachers' and rollout server's /readyz, its Redis and its data files. Standard library and PyYAML only."""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit


def config_targets(path: Path) -> list[str]:
    """Teachers given by URL (a registry teacher, `teacher: NAME`, is not waited for), the rollout server, a Redis
    cache, the data files. Read as plain YAML: uniopd's loader would refuse data files that are not there yet."""
    import yaml

    run = yaml.safe_load(path.read_text())
    urls = [u for pool in run["teachers"].values() for u in pool.get("urls") or []] + [run["rollout"]["url"]]
    cache = (run.get("cache") or {}).get("url") or ""
    data = run["data"]
    return ([u.rstrip("/") + "/readyz" for u in urls] + ([cache] if cache.startswith("redis://") else [])
            + [*data["train"], *(data.get("eval") or [])])


def ready(target: str) -> bool:
    try:
        if target.startswith(("http://", "https://")):
            with urllib.request.urlopen(target, timeout=4) as response:
                return response.status == 200
        if target.startswith("redis://"):
            where = urlsplit(target)
            with socket.create_connection((where.hostname, where.port or 6379), timeout=4) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))  # up (a password is the client's business)
    except (OSError, http.client.HTTPException):  # refused, unresolvable (no ready pod yet), timed out, not 200
        return False
    return Path(target).exists()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("targets", nargs="*")
    parser.add_argument("--config", type=Path, help="a uniopd run config: wait for what it names")
    parser.add_argument("--interval", type=float, default=2.0)
    args = parser.parse_args(argv)
    waiting, said = [*args.targets, *(config_targets(args.config) if args.config else [])], None
    while waiting := [t for t in waiting if not ready(t)]:
        if waiting != said:
            print("waiting for", " ".join(waiting), flush=True)
            said = waiting
        time.sleep(args.interval)
    print("ready", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
