"""Code domain: the candidate program followed by the record's tests must run to completion, exit 0, in the sandbox.

Record: {"tests": "assert f(2) == 4\\n...", "entry_point": "f" (optional)}. With an entry point and HumanEval-style
tests that define `check(candidate)`, `check(<entry_point>)` is appended, as that harness does.

"Run to completion" is checked with a random marker printed after the tests: a candidate that calls sys.exit(0)
or os._exit(0) before the tests run exits 0 but never prints it. (Code that reads its own constants through frame
introspection could still find the marker; that takes deliberate effort, not a lucky shortcut.)
"""

from __future__ import annotations

import re
import secrets

from trainer.sandbox import run_python

# A fence opener (``` optionally tagged python/py/python3) up to the closing fence, or to the end of a truncated reply.
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_DEFINES_CHECK = re.compile(r"^def check\(", re.MULTILINE)
_SANDBOX_ERROR = re.compile(r"sandbox: (?:refused [\w.]+|cannot [^\n]*)")  # a refused call, a failed set-up


def extract_code(completion: str) -> str:
    """The last fenced block, else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def program(completion: str, record: dict, marker: str) -> str:
    tests = record["tests"]
    entry_point = record.get("entry_point")
    if entry_point and _DEFINES_CHECK.search(tests):
        tests += f"\n\ncheck({entry_point})\n"
    return f"{extract_code(completion)}\n\n{tests}\n\nprint({marker!r}, flush=True)\n"


def check(completion: str, record: dict, timeout_s: float) -> bool:
    marker = f"uniopd-tests-done-{secrets.token_hex(16)}"
    result = run_python(program(completion, record, marker), timeout_s=timeout_s)
    if result.timed_out:
        raise TimeoutError(f"timeout: code did not finish within {timeout_s:g}s")
    sandbox_error = _SANDBOX_ERROR.search(result.stderr)
    if not result.ok and sandbox_error:
        raise PermissionError(sandbox_error.group(0))
    return result.ok and marker in result.stdout
