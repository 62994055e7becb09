"""Code domain: the candidate program is run in the sandbox against the record's cases or tests.

Records with input/output cases, {"entry_point": "f", "cases": [[[4], 19], [[5], 23], ...]} (arguments, expected
value; JSON values): the sandboxed program prints the repr of what the entry point returns for each case's
arguments, and the verdict is taken here, outside the candidate's reach, on those reprs parsed as Python literals
(never run): every value must equal the expected one as a JSON value (so an object whose __eq__ always says True, a
bool for a number, or an early exit all fail). The expected values
never enter the sandbox, so a program can only print the right ones by computing them.

Records with assert tests, {"tests": "assert f(2) == 4\\n...", "entry_point": "f" (optional)} (HumanEval style; with an
entry point and tests that define `check(candidate)`, `check(<entry_point>)` is appended, as that harness does): the
program followed by the tests must exit 0 and print a random marker placed after them, so a sys.exit(0) before the
tests fails. This form trusts the candidate's process: a program that reads its own constants (frame introspection)
can print the marker, and an object with an always-true __eq__ passes `assert f(x) == y`. Give cases where you can.
"""

from __future__ import annotations

import ast
import re
import secrets

from trainer.sandbox import run_python

# A fence opener (``` optionally tagged python/py/python3) up to the closing fence, or to the end of a truncated reply.
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_DEFINES_CHECK = re.compile(r"^def check\(", re.MULTILINE)
_SANDBOX_ERROR = re.compile(r"sandbox: (?:refused [\w.]+|cannot [^\n]*)")  # a refused call, a failed set-up
RESULTS = "uniopd-case-results:"  # not a secret: printing a fake line needs the expected values, which stay here


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
    if "cases" in record:
        return _check_cases(completion, record, timeout_s)
    marker = f"uniopd-tests-done-{secrets.token_hex(16)}"
    result = _run(program(completion, record, marker), timeout_s)
    return result.ok and marker in result.stdout


def _check_cases(completion: str, record: dict, timeout_s: float) -> bool:
    cases, entry_point = record["cases"], record["entry_point"]
    if not entry_point.isidentifier():
        raise ValueError(f"entry_point {entry_point!r} is not a Python name")
    args = [list(a) for a, _ in cases]
    # repr, not json: no import inside the sandbox (json cost 4 ms of a ~25 ms check); the results are parsed here as
    # literals only, so whatever a __repr__ prints is never run, and only the right values can match
    harness = f"print({RESULTS!r} + repr([{entry_point}(*_a) for _a in {args!r}]), flush=True)\n"
    result = _run(f"{extract_code(completion)}\n\n{harness}", timeout_s)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULTS)]
    if not result.ok or not lines:
        return False
    try:
        got = ast.literal_eval(lines[-1].removeprefix(RESULTS))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # not a literal: nan, an object, garbage
        return False
    return isinstance(got, list) and len(got) == len(cases) and all(
        same(value, expected) for value, (_, expected) in zip(got, cases, strict=True))


def same(value: object, expected: object) -> bool:
    """Equal as JSON values, all the way down: numbers by value (19.0 is 19, as `assert f(x) == 19` has it), but
    a bool is not a number and a string is not either."""
    if _number(value) and _number(expected):
        return value == expected
    if type(value) is not type(expected):
        return False
    if isinstance(expected, list):
        return len(value) == len(expected) and all(same(v, e) for v, e in zip(value, expected, strict=True))
    if isinstance(expected, dict):
        return value.keys() == expected.keys() and all(same(value[k], expected[k]) for k in expected)
    return value == expected


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _run(source: str, timeout_s: float):
    """The sandbox's result; a timeout or a refused call is not a verdict, so it raises."""
    result = run_python(source, timeout_s=timeout_s)
    if result.timed_out:
        raise TimeoutError(f"timeout: code did not finish within {timeout_s:g}s")
    sandbox_error = _SANDBOX_ERROR.search(result.stderr)
    if not result.ok and sandbox_error:
        raise PermissionError(sandbox_error.group(0))
    return result
