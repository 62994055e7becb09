"""Code domain: the candidate program computes outputs in the sandbox; the verdict is taken here, on those outputs.

Either form of record becomes a list of cases, each a call (a function's name, literal arguments) and a check of what
it returns; only the calls enter the sandbox, the expected values never do:

- `{"entry_point": "f", "cases": [[[4], 19], ...]}`: arguments and expected value (JSON values);
- `{"tests": "assert f(2) == 4\\n...", "entry_point": "f" (optional)}` (HumanEval style): the tests are parsed here,
  never run. Supported lines: `assert CALL == LITERAL` (either side), `assert abs(CALL - LITERAL) < LITERAL` (or
  `<=`), an optional assert message; ignored: `assert True`, literal assignments (METADATA) and docstrings; `def
  check(candidate):` holding such lines, its parameter standing for the entry point. CALL is `name(literal
  arguments)`. Anything else makes the record unsupported (an error, so incorrect), rather than run with the
  candidate, where it could be fooled.

The sandboxed program is the candidate followed by one line that prints the repr of the calls' results. That line's
last copy on stdout is parsed here as literals (never run), so only plain values of exact builtin types arrive, and
each must equal the expected one (`same`). Whatever the candidate does in its own process (an always-equal object or
an int/str subclass, patched builtins, atexit or excepthook handlers, frame introspection, a forged results line)
can only make the line hold other values or none; to pass, a program must produce the right values, which it can
only compute, since the sandbox shows it neither the expected values nor any file they could be read from.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
from dataclasses import dataclass, field

from trainer.sandbox import SandboxResult, run_python

# A fence opener (``` optionally tagged python/py/python3) up to the closing fence, or to the end of a truncated reply.
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_SANDBOX_ERROR = re.compile(r"sandbox: (?:refused [\w.]+|cannot [^\n]*)")  # a refused call, a failed set-up
RESULTS = "uniopd-case-results:"  # not a secret: printing a fake line needs the expected values, which stay here
_PLAIN = (type(None), bool, int, float, str, bytes, list, tuple, dict, set)


@dataclass(frozen=True)
class Case:
    """One call of the candidate's program and what its result must be."""

    function: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    expected: object = None
    tolerance: float | None = None  # set: abs(result - expected) must be below it (or not above, when inclusive)
    inclusive: bool = False

    def call(self) -> str:
        return f"{self.function}(*{self.args!r}, **{self.kwargs!r})"

    def accepts(self, result: object) -> bool:
        if self.tolerance is None:
            return same(result, self.expected)
        if not _number(result):
            return False
        try:
            gap = abs(result - self.expected)
        except OverflowError:  # an int too large for a float
            return False
        return gap <= self.tolerance if self.inclusive else gap < self.tolerance


class UnsupportedTests(ValueError):
    """A record's tests have a shape the judge does not evaluate: the record is at fault, not the candidate."""


def extract_code(completion: str) -> str:
    """The last fenced block, else the whole completion."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


def check(completion: str, record: dict, timeout_s: float) -> bool:
    cases = record_cases(record)
    harness = f"print({RESULTS!r} + repr([{', '.join(case.call() for case in cases)}]), flush=True)\n"
    result = _run(f"{extract_code(completion)}\n\n{harness}", timeout_s)
    lines = [line for line in result.stdout.splitlines() if line.startswith(RESULTS)]
    if not result.ok or not lines:
        return False
    try:
        got = ast.literal_eval(lines[-1].removeprefix(RESULTS))
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):  # not a literal: nan, an object, garbage
        return False
    return type(got) is list and len(got) == len(cases) and all(
        case.accepts(value) for case, value in zip(cases, got, strict=True))


def record_cases(record: dict) -> list[Case]:
    """The record's cases; its tests parsed into cases when it has no `cases`."""
    if "cases" not in record:
        return parse_tests(record["tests"], record.get("entry_point"))
    function = _function_name(record["entry_point"])
    cases = [Case(function, tuple(args), expected=expected) for args, expected in record["cases"]]
    if not all(_plain(case.args) and _plain(case.expected) for case in cases):
        raise UnsupportedTests("cases must hold plain values (finite numbers, strings, lists, dicts, ...)")
    return cases


def parse_tests(tests: str, entry_point: str | None) -> list[Case]:
    """Assert tests as cases (see the module docstring); UnsupportedTests names the first line of another shape."""
    try:
        module = ast.parse(tests)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        raise UnsupportedTests(f"tests do not parse: {exc}") from None
    cases = []
    for node in module.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            cases += _check_function(node, entry_point)
        elif not _ignorable(node):
            cases.append(_assert_case(node, {}))
    if not cases:
        raise UnsupportedTests("tests hold no asserts")
    return cases


def _check_function(node: ast.FunctionDef, entry_point: str | None) -> list[Case]:
    args = node.args
    if entry_point is None or node.decorator_list or len(args.args) != 1 or args.vararg or args.kwarg or \
            args.kwonlyargs or args.posonlyargs or args.defaults:
        raise _unsupported(node, "check() needs one parameter and the record an entry_point")
    names = {args.args[0].arg: _function_name(entry_point)}
    return [_assert_case(statement, names) for statement in node.body if not _ignorable(statement)]


def _assert_case(node: ast.stmt, names: dict[str, str]) -> Case:
    """`CALL == LITERAL`, `LITERAL == CALL` or `abs(CALL - LITERAL) < LITERAL`; `names` renames callees."""
    if not isinstance(node, ast.Assert):
        raise _unsupported(node, "not an assert, a check(candidate) function or a literal assignment")
    test = node.test
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1):
        raise _unsupported(node, "an assert must compare a call with a literal")
    left, op, right = test.left, test.ops[0], test.comparators[0]
    if isinstance(op, ast.Eq):
        call, expected = (left, right) if isinstance(left, ast.Call) else (right, left)
        return _case(node, call, names, expected=_literal(node, expected))
    inner = left.args[0] if _is_call(left, "abs") and len(left.args) == 1 and not left.keywords else None
    if isinstance(op, (ast.Lt, ast.LtE)) and isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Sub):
        expected, tolerance = _literal(node, inner.right), _literal(node, right)
        if _number(expected) and _number(tolerance):
            return _case(node, inner.left, names, expected=expected, tolerance=tolerance,
                         inclusive=isinstance(op, ast.LtE))
    raise _unsupported(node, "an assert must be CALL == LITERAL or abs(CALL - LITERAL) < LITERAL")


def _case(node: ast.stmt, call: ast.expr, names: dict[str, str], **check: object) -> Case:
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise _unsupported(node, "the compared call must be name(literal arguments)")
    if any(k.arg is None for k in call.keywords):
        raise _unsupported(node, "no ** in calls")
    args = tuple(_literal(node, a) for a in call.args)
    kwargs = {k.arg: _literal(node, k.value) for k in call.keywords}
    return Case(names.get(call.func.id, call.func.id), args, kwargs, **check)


def _literal(node: ast.stmt, expression: ast.expr) -> object:
    try:
        value = ast.literal_eval(expression)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise _unsupported(node, f"{ast.unparse(expression)!r} is not a literal") from None
    if not _plain(value):
        raise _unsupported(node, f"{ast.unparse(expression)!r} is not a plain value")
    return value


def _is_call(node: ast.expr, name: str) -> bool:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == name


def _ignorable(node: ast.stmt) -> bool:
    """A docstring, `assert True` or a literal assigned to a name (HumanEval's METADATA): none changes a verdict."""
    if _docstring(node) or (isinstance(node, ast.Assert) and _constant(node.test, True)):
        return True
    if not (isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets)):
        return False
    try:
        ast.literal_eval(node.value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return False
    return True


def _docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and type(node.value.value) is str


def _constant(node: ast.expr, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _unsupported(node: ast.stmt, why: str) -> UnsupportedTests:
    return UnsupportedTests(f"unsupported test at line {node.lineno}: {why}")


def _function_name(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise ValueError(f"entry_point {name!r} is not a Python name")
    return name


def _plain(value: object) -> bool:
    """Of exact builtin types whose repr reads back as the same value (so it can cross into the sandbox)."""
    kind = type(value)
    if kind not in _PLAIN:
        return False
    if kind is float:
        return math.isfinite(value)
    if kind is dict:
        return all(_plain(k) and _plain(v) for k, v in value.items())
    if kind in (list, tuple, set):
        return all(_plain(v) for v in value)
    return True


def same(value: object, expected: object) -> bool:
    """Equal with exact types all the way down, as a JSON value would be: numbers by value (19.0 is 19, as `assert
    f(x) == 19` has it), but a bool is not a number, a string is not either, and a tuple is not a list."""
    if _number(value) and _number(expected):
        return value == expected
    if type(value) is not type(expected):
        return False
    if type(expected) in (list, tuple):
        return len(value) == len(expected) and all(same(v, e) for v, e in zip(value, expected, strict=True))
    if type(expected) is dict:
        return value.keys() == expected.keys() and all(same(value[k], expected[k]) for k in expected)
    return value == expected


def _number(value: object) -> bool:
    return type(value) in (int, float)


def _run(source: str, timeout_s: float) -> SandboxResult:
    """The sandbox's result; a timeout or a refused call is not a verdict, so it raises."""
    result = run_python(source, timeout_s=timeout_s)
    if result.timed_out:
        raise TimeoutError(f"timeout: code did not finish within {timeout_s:g}s")
    sandbox_error = _SANDBOX_ERROR.search(result.stderr)
    if not result.ok and sandbox_error:
        raise PermissionError(sandbox_error.group(0))
    return result
