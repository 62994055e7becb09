"""The README's fresh-machine commands stay true: CI runs exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command():
    demo, tests = readme_commands()
    assert "uniopd demo" in demo and "pytest" in tests
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert tests in ci


def test_readme_commands_use_real_entry_points():
    from uniopd.cli import build_parser

    assert build_parser().parse_args(["demo"]).command == "demo"
    assert (ROOT / "scripts" / "setup.sh").stat().st_mode & 0o111
