"""The README's fresh-machine commands stay true: CI runs exactly its test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.strip().splitlines()]


def test_ci_runs_the_readme_test_command():
    """Verbatim, in order: the README's test command, then its e2e command, as one `&&` chain of .ci/run."""
    demo, tests, e2e = readme_commands()
    assert "uniopd demo" in demo and tests.endswith("python -m pytest") and e2e.endswith("pytest -m e2e")
    chains = [[c.strip() for c in line.split("&&")] for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    readme = [c.strip() for c in tests.split("&&")] + [e2e]
    assert any(chain[: len(readme)] == readme for chain in chains)


def test_readme_commands_use_real_entry_points():
    from uniopd.cli import build_parser

    assert build_parser().parse_args(["demo"]).command == "demo"
    assert (ROOT / "scripts" / "setup.sh").stat().st_mode & 0o111


def readme_uniopd_invocations() -> list[list[str]]:
    """The arguments of every `uniopd ...` command in the README's bash blocks (continuations joined)."""
    import shlex

    calls = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                if Path(word).name == "uniopd" and (i == 0 or words[i - 1] in ("-m", "&&") or "/" in word):
                    rest = words[i + 1:]
                    end = next((j for j, w in enumerate(rest) if w in ("&&", "&", "|", ";")), len(rest))
                    calls.append(rest[:end])
    return calls


def test_every_readme_uniopd_command_parses():
    from uniopd.cli import build_parser

    calls = readme_uniopd_invocations()
    assert len(calls) >= 10 and ["demo"] in calls
    parser = build_parser()
    for args in calls:
        try:
            parser.parse_args(args)
        except SystemExit:
            raise AssertionError(f"README command does not parse: uniopd {' '.join(args)}") from None
