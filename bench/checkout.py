"""A bench's `--server-repo`: run the server under test from another checkout (e.g. a `git worktree` of an earlier
commit), so before and after are measured by the same client on the same machine."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_server_repo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-repo", type=Path, help="run the server from this checkout")


def server_env(repo: Path | None) -> dict[str, str] | None:
    """The environment that makes a server started from here import `repo`'s code; None for this checkout. `python -m`
    puts the working directory first on the path, so this also moves there."""
    if repo is None:
        return None
    os.chdir(repo)
    return {"PYTHONPATH": str(repo.resolve())}
