"""Domain verifiers: answer extraction and equivalence, code run in the real sandbox, the batch API."""

from __future__ import annotations

import json
import random
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from trainer import verifiers
from trainer.sandbox import run_python
from trainer.verifiers import Verdict, code, verifier_kinds, verify, verify_batch
from trainer.verifiers import math as math_verifier
from trainer.verifiers.code import Case
from uniopd.synthetic import code_tasks

SQUARE_TESTS = {"domain": "code", "prompt": "square", "tests": "assert f(2) == 4\nassert f(0) == 0"}


def math_record(answer: str) -> dict:
    return {"domain": "math", "prompt": "?", "answer": answer}


def mcq_record(answer: str, n_choices: int = 4) -> dict:
    return {"domain": "mcq", "prompt": "?", "choices": [f"option {i}" for i in range(n_choices)], "answer": answer}


def test_kinds_and_config_errors():
    assert verifier_kinds() == ["choice", "code", "math"]
    with pytest.raises(ValueError, match="unknown verifier kind"):
        verify("poetry", "x", {})
    with pytest.raises(ValueError, match="unknown verifier kind"):
        verify_batch(["math", "poetry"], ["1", "2"], [math_record("1")] * 2)
    with pytest.raises(ValueError, match="same length"):
        verify_batch(["math"], ["1", "2"], [math_record("1")])
    with pytest.raises(ValueError, match="already registered"):
        verifiers.register("math", math_verifier.check)
    assert verify_batch([], [], []) == []


@pytest.mark.parametrize(("completion", "answer", "correct"), [
    # extraction: the last balanced \boxed{}, else the "answer is" phrase, else the last number
    ("First \\boxed{3}, then finally \\boxed{\\frac{1}{2}}.", "1/2", True),
    ("So the result is \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{7} and a truncated \\boxed{\\frac{1}{", "7", True),
    ("We get 12 apples, so the answer is 15. Let me double check: 15.", "15", True),
    ("Answer: $\\frac{3}{4}$", "0.75", True),
    ("**Answer:** 1,000", "1000", True),
    ("3 + 4 = 7, times 6 is 42", "42", True),
    ("3 + 4 = 7, times 6 is 42", "7", False),
    ("5-3 leaves 2", "2", True),
    ("so x = -3", "-3", True),
    # plain numeric literals compare exactly as decimals
    ("The answer is 042", "42", True),
    ("The answer is 42.0", "42", True),
    ("The answer is 42.5", "42", False),
    ("The answer is 42.0000001", "42", False),
    ("\\boxed{-3}", "-3", True),
    ("\\boxed{3}", "-3", False),
    # anything else is math-verify's equivalence
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{1/2}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac12}", "1/2", True),
    ("\\boxed{\\sqrt{12}}", "2\\sqrt{3}", True),
    ("\\boxed{\\frac{84}{2}}", "42", True),
    ("\\boxed{1+x^2}", "x^2+1", True),
    ("\\boxed{0.51}", "\\frac{1}{2}", False),
    # garbage
    ("I have no idea.", "1/2", False),
    ("", "3", False),
    ("\\boxed{}", "3", False),
])
def test_math(completion, answer, correct):
    assert verify("math", completion, math_record(answer)) == Verdict(correct)


def test_math_answer_may_be_a_json_number():
    assert verify("math", "\\boxed{42}", {"answer": 42}).correct


def test_math_bad_record_is_an_error_not_an_exception():
    verdict = verify("math", "\\boxed{3}", {"domain": "math", "prompt": "no answer key"})
    assert not verdict.correct and "KeyError" in verdict.error


def test_math_pathological_input_stays_within_budget():
    # sympy would try to evaluate a tower of powers; math-verify's own timeout (in the worker) gives up.
    assert not verify("math", "\\boxed{9^{9^{9^{9}}}}", math_record("1/3"), timeout_s=2).correct
    # below one second the worker cannot time itself, so the pool kills it and reports the timeout ...
    verdict = verify("math", "\\boxed{9^{9^{9^{9}}}}", math_record("1/3"), timeout_s=0.5)
    assert not verdict.correct and "timeout" in verdict.error
    # ... and a fresh worker serves the next request
    assert verify("math", "\\boxed{0.5}", math_record("\\frac{1}{2}")).correct


def test_math_fallback_without_math_verify(monkeypatch):
    monkeypatch.setattr(math_verifier, "HAS_MATH_VERIFY", False)
    assert verify("math", "\\boxed{\\dfrac{1}{2}}", math_record("\\frac{1}{2}")).correct
    assert verify("math", "\\boxed{ \\frac{1}{2} }", math_record("$\\frac{1}{2}$")).correct
    assert not verify("math", "\\boxed{0.5}", math_record("\\frac{1}{2}")).correct
    assert verify("math", "\\boxed{042}", math_record("42")).correct


@pytest.mark.parametrize(("completion", "correct"), [
    ("```python\ndef f(x):\n    return x * x\n```", True),
    ("Try:\n```python\ndef f(x):\n    return x + 2\n```\nFixed:\n```py\ndef f(x):\n    return x ** 2\n```\n", True),
    ("```python\ndef f(x):\n    return x * x\n```\nOops:\n```python\ndef f(x):\n    return x + 2\n```", False),
    ("def f(x):\n    return x * x\n", True),
    ("Here it is:\n```\ndef f(x):\n    return x * x\n", True),  # truncated reply, no closing fence
    ("```python\ndef f(x):\n    return x + 2\n```", False),
    ("```python\ndef f(x) return x\n```", False),
    ("I cannot solve this.", False),
])
def test_code(completion, correct):
    assert verify("code", completion, SQUARE_TESTS) == Verdict(correct)


def test_code_humaneval_style_check_with_entry_point():
    record = {"tests": "def check(candidate):\n    assert candidate(3) == 9\n", "entry_point": "square"}
    assert verify("code", "def square(x):\n    return x * x", record).correct
    assert not verify("code", "def square(x):\n    return x", record).correct


@pytest.mark.parametrize("exit_call", ["import sys\nsys.exit(0)", "import os\nos._exit(0)"])
def test_code_that_exits_before_the_tests_is_wrong(exit_call):
    assert verify("code", f"def f(x):\n    return x\n{exit_call}", SQUARE_TESTS) == Verdict(False)


SQUARE_CASES = {"domain": "code", "prompt": "square", "entry_point": "f", "cases": [[[2], 4], [[0], 0], [[-3], 9]]}


@pytest.mark.parametrize(("completion", "correct"), [
    ("def f(x):\n    return x * x", True),
    ("f = lambda x: float(x * x)", True),  # 4.0 is 4, as `assert f(2) == 4` has it
    ("def f(x):\n    return x + 2", False),
    ("def f(x):\n    return x * x == x * x", False),  # a bool is not a number
    ("def f(x):\n    return str(x * x)", False),
    ("import os\ndef f(x):\n    return x * x\nprint('uniopd-case-results:[4, 0, 9]', flush=True)\nos._exit(0)", True),
    ("import os\ndef f(x):\n    return x\nprint('uniopd-case-results:[4, 4, 4]', flush=True)\nos._exit(0)", False),
])
def test_code_cases_are_judged_outside_the_sandbox(completion, correct):
    """A fake results line must hold the right values, which only the verifier knows (the case with [4, 0, 9] has
    computed them: it is a lookup of the hidden cases, which the prompt never shows)."""
    assert verify("code", completion, SQUARE_CASES) == Verdict(correct)


# Programs that passed assert tests run in their own process (the tests form before its asserts were judged
# outside the sandbox); each is wrong. `f` should square: SQUARE_TESTS, FLOAT_TESTS and CHECK_TESTS say so.
_PRINT_MARKER_AND_EXIT = """
import os, sys
PROGRAM = sys._getframe().f_code
def f(x):
    return x + 1
def print_marker_and_exit(*_):
    for const in PROGRAM.co_consts:  # the end-of-tests marker was a constant of the program it ended
        if isinstance(const, str) and const.startswith("uniopd-tests-done-") and len(const) > 18:
            print(const, flush=True)
    os._exit(0)
"""
ATTACKS = {
    "marker_from_frame_constants": """
import os, sys
def f(x):
    return x
for const in sys._getframe().f_code.co_consts:
    if isinstance(const, str) and const.startswith("uniopd-tests-done-") and len(const) > 18:
        print(const, flush=True)
        os._exit(0)
""",
    "inspect_walk_to_the_callers_constants": """
import dis, inspect
def f(x):  # the expected value: the constant the calling assert loads right after this call
    caller = inspect.currentframe().f_back
    ops = dis.get_instructions(caller.f_code)
    return next(op.argval for op in ops if op.offset > caller.f_lasti and op.opname == "LOAD_CONST")
""",
    "atexit_after_failing_asserts": _PRINT_MARKER_AND_EXIT + "import atexit\natexit.register(print_marker_and_exit)\n",
    "excepthook_after_failing_asserts": _PRINT_MARKER_AND_EXIT + "sys.excepthook = print_marker_and_exit\n",
    "always_equal_object": "class Yes:\n    def __eq__(self, other):\n        return True\n"
                           "def f(x):\n    return Yes()\n",
    "int_subclass_overriding_eq": "class Yes(int):\n    def __eq__(self, other):\n        return True\n"
                                  "    __hash__ = int.__hash__\ndef f(x):\n    return Yes(0)\n",
    "str_subclass_overriding_eq": "class Yes(str):\n    def __eq__(self, other):\n        return True\n"
                                  "    __hash__ = str.__hash__\ndef f(x):\n    return Yes('no')\n",
    "patched_builtins": "import builtins\nbuiltins.abs = lambda value: 0\ndef f(x):\n    return x\n",
    "rewritten_test_globals": """
import sys
def f(x):
    return 0
def skip(candidate):
    pass
def rebind_check(frame, event, arg):  # before each line: the tests' check() becomes skip() once defined
    if frame.f_globals.get("check", skip) is not skip:
        frame.f_globals["check"] = skip
    return rebind_check
sys._getframe().f_trace = rebind_check
sys.settrace(rebind_check)
""",
}
FLOAT_TESTS = {"tests": "assert abs(f(0.5) - 0.25) < 1e-9\nassert abs(f(3) - 9) <= 1e-9"}
CHECK_TESTS = {"tests": "def check(candidate):\n    assert candidate(3) == 9\n    assert candidate(-2) == 4\n",
               "entry_point": "f"}
ATTACK_RECORDS = {"patched_builtins": FLOAT_TESTS, "rewritten_test_globals": CHECK_TESTS}


def asserts_in_process(completion: str, record: dict) -> bool:
    """The tests form as it was judged before: the asserts run after the program in its process, then a marker is
    printed; correct iff the run exits 0 having printed the marker."""
    marker = f"uniopd-tests-done-{secrets.token_hex(16)}"
    tests = record["tests"] + (f"\n\ncheck({record['entry_point']})\n" if "entry_point" in record else "")
    result = run_python(f"{code.extract_code(completion)}\n\n{tests}\n\nprint({marker!r}, flush=True)\n")
    return result.ok and marker in result.stdout


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_cheating_programs_are_judged_incorrect(attack):
    """Each attack passes its tests when they run in its own process, and fails them judged here, in both forms."""
    completion, record = ATTACKS[attack], ATTACK_RECORDS.get(attack, SQUARE_TESTS)
    assert asserts_in_process(completion, record), "the attack no longer reproduces"
    assert verify("code", completion, record) == Verdict(False)
    cases = [[list(case.args), case.expected] for case in code.record_cases(record)]
    assert verify("code", completion, {"entry_point": "f", "cases": cases}) == Verdict(False)
    assert verify("code", "def f(x):\n    return x * x", record) == Verdict(True)


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "opd-tiny" / "code_eval.jsonl"
DATASET_LOOKUP = f"""
import json, re
TABLE = {{}}
try:  # the hidden tests of this prompt, read from the dataset on disk
    for line in open({str(EXAMPLES)!r}):
        record = json.loads(line)
        if record["prompt"] == PROMPT:
            TABLE = {{int(x): int(y) for x, y in re.findall(r"f\\((-?\\d+)\\) == (-?\\d+)", record["tests"])}}
except OSError:
    pass
def f(x):
    return TABLE.get(x)
"""


def test_a_program_that_looks_its_answers_up_on_disk_is_judged_incorrect():
    """The dataset is world-readable where the trainer runs; the sandbox does not show it."""
    record = json.loads(EXAMPLES.read_text().splitlines()[0])
    completion = f"PROMPT = {record['prompt']!r}\n{DATASET_LOOKUP}"
    unsandboxed = subprocess.run([sys.executable, "-I", "-c", f"{completion}\n{record['tests']}"])
    assert unsandboxed.returncode == 0, "the lookup no longer finds its answers where the file is readable"
    cases = [[list(case.args), case.expected] for case in code.record_cases(record)]
    assert verify("code", completion, record) == Verdict(False)
    assert verify("code", completion, {"entry_point": "f", "cases": cases}) == Verdict(False)


@pytest.mark.parametrize(("tests", "cases"), [
    ("assert f(2) == 4\nassert 9 == f(-3), 'message'", [Case("f", (2,), expected=4), Case("f", (-3,), expected=9)]),
    ("METADATA = {'author': 'x'}\n'''docstring'''\nassert g(1, 'a', k=[1, (2,)]) == {'a': None}",
     [Case("g", (1, "a"), {"k": [1, (2,)]}, {"a": None})]),
    ("assert abs(f(0.5) - 0.25) < 1e-9\nassert abs(f(-1) - 1) <= 0",
     [Case("f", (0.5,), expected=0.25, tolerance=1e-9), Case("f", (-1,), expected=1, tolerance=0, inclusive=True)]),
    ("def check(candidate):\n    '''doc'''\n    assert candidate(3) == (9, -1.5)\n    assert True, 'no-op'\n",
     [Case("sq", (3,), expected=(9, -1.5))]),
])
def test_assert_tests_are_parsed_into_cases(tests, cases):
    assert code.parse_tests(tests, "sq") == cases


@pytest.mark.parametrize(("tests", "entry_point", "why"), [
    ("assert f(2) > 3", None, "line 1: an assert must be CALL == LITERAL"),
    ("assert f(2) == 4\nassert len(f(3)) == 3", None, "line 2: .*'f\\(3\\)' is not a literal"),
    ("assert f(2) == g(2)", None, "'g\\(2\\)' is not a literal"),
    ("assert f(2) == float('inf')", None, "is not a literal"),
    ("assert f(2) == 1e999", None, "is not a plain value"),  # inf
    ("assert f(*[2]) == 4", None, "is not a literal"),
    ("assert f(2)", None, "must compare a call with a literal"),
    ("for x in range(3):\n    assert f(x) == x * x", None, "line 1: not an assert"),
    ("import math\nassert f(2) == 4", None, "line 1: not an assert"),
    ("expected = f(2)\nassert expected == 4", None, "line 1: not an assert"),
    ("def check(candidate):\n    assert candidate(3) == 9", None, "needs one parameter and the record an entry_point"),
    ("def check(candidate):\n    for x in [1]:\n        assert candidate(x) == 1", "f", "line 2: not an assert"),
    ("def helper():\n    pass", None, "line 1: not an assert"),
    ("x = 1", None, "tests hold no asserts"),
    ("assert f(2) ==", None, "tests do not parse"),
])
def test_unsupported_tests_are_refused_with_a_reason(tests, entry_point, why):
    """Refused, not run: a line the judge cannot evaluate would have to run in the candidate's process."""
    record = {"tests": tests} | ({"entry_point": entry_point} if entry_point else {})
    verdict = verify("code", "def f(x):\n    return x * x", record)
    assert not verdict.correct and verdict.error.startswith("UnsupportedTests: ")
    assert re.search(why, verdict.error), verdict.error


@pytest.mark.parametrize(("tests", "completion", "correct"), [
    ("assert f(2) == (2, 4)", "def f(x):\n    return (x, x * x)", True),
    ("assert f(2) == (2, 4)", "def f(x):\n    return [x, x * x]", False),  # a list is not a tuple
    ("assert f(1) == 1", "def f(x):\n    return True", False),  # a bool is not a number
    ("assert f(1) == True", "def f(x):\n    return 1", False),
    ("assert f(2) == 'ab'", "def f(x):\n    return 'ab'", True),
    ("assert f(2) == b'ab'", "def f(x):\n    return 'ab'", False),
    ("assert f(2) == {1: [None]}", "def f(x):\n    return {1: [None]}", True),
    ("assert f(2) == {2}", "def f(x):\n    return {x}", True),
    ("assert abs(f(0.1) - 0.3) < 1e-9", "def f(x):\n    return 3 * x", True),
    ("assert abs(f(0.1) - 0.3) < 1e-9", "def f(x):\n    return '0.3'", False),
    ("assert abs(f(1) - 1) < 1", "def f(x):\n    return 10 ** 400", False),
    ("assert f(2) == 4", "def f(x):\n    return float('nan')", False),  # its repr is not a literal
    ("assert f(x=2) == 4", "def f(x):\n    return x * x", True),
])
def test_results_are_compared_with_exact_types(tests, completion, correct):
    assert verify("code", completion, {"tests": tests}) == Verdict(correct)


def test_synthetic_code_records_judge_alike_by_cases_and_by_tests():
    task = code_tasks.CodeTask(5, 3, 2)
    record, by_tests = task.record(), {k: v for k, v in task.record().items() if k != "cases"}
    for completion in (task.solution("def"), task.solution("lambda"), task.solution("def", slip=True,
                                                                                   rng=random.Random(1))):
        assert verify("code", completion, record) == verify("code", completion, by_tests)
    assert verify("code", task.solution("lambda"), record).correct


def test_code_timeout_is_an_error():
    verdict = verify("code", "def f(x):\n    while True:\n        pass", SQUARE_TESTS, timeout_s=1)
    assert not verdict.correct and "timeout" in verdict.error


def test_code_sandbox_refusal_is_an_error():
    verdict = verify("code", "import os\nos.fork()\ndef f(x):\n    return x * x", SQUARE_TESTS)
    assert verdict == Verdict(False, "PermissionError: sandbox: refused os.fork")


def test_code_bad_record_is_an_error():
    verdict = verify("code", "def f(x):\n    return x * x", {"domain": "code", "prompt": "no tests"})
    assert not verdict.correct and "KeyError" in verdict.error


@pytest.mark.parametrize(("completion", "answer", "correct"), [
    ("Answer: C", "C", True),
    ("The answer is (B).", "B", True),
    ("the answer is d", "D", False),  # lower-case letters after "answer is" are too often words
    ("I think (A) is tempting, but the answer is B", "B", True),
    ("The answer is B. On reflection, (C) fits better.", "C", True),
    ("Final answer: \\boxed{A}", "A", True),
    ("After eliminating the others:\n**D**", "D", True),
    ("Options (A) and (B) are wrong, leaving\nC.", "C", True),
    ("The answer is a tricky one: (E) is out of range, so (B)", "B", True),
    ("Answer: C", "c", True),  # the record's letter is compared case-insensitively
    ("I cannot decide.", "A", False),
    ("Answer: A", "B", False),
])
def test_choice(completion, answer, correct):
    assert verify("choice", completion, mcq_record(answer)) == Verdict(correct)


def test_choice_bad_record_is_an_error():
    verdict = verify("choice", "Answer: A", {"domain": "mcq", "prompt": "?"})
    assert not verdict.correct and "KeyError" in verdict.error


def test_verify_batch_preserves_order():
    items = [
        ("math", "\\boxed{4}", math_record("4"), Verdict(True)),
        ("code", "def f(x):\n    return x", SQUARE_TESTS, Verdict(False)),
        ("choice", "Answer: B", mcq_record("B"), Verdict(True)),
        ("math", "\\boxed{5}", math_record("4"), Verdict(False)),
        ("code", "def f(x):\n    return x * x", SQUARE_TESTS, Verdict(True)),
        ("choice", "Answer: B", mcq_record("A"), Verdict(False)),
        ("math", "\\boxed{1}", {}, Verdict(False, "KeyError: 'answer'")),
    ]
    kinds, completions, records, expected = map(list, zip(*items, strict=True))
    assert verify_batch(kinds, completions, records, max_workers=3) == expected


def test_verify_batch_runs_items_concurrently(monkeypatch):
    """Each item is a sandboxed child that records its own [start, end] wall-clock interval while sleeping 1 s."""
    intervals = []

    def timed_run(completion: str, record: dict, timeout_s: float) -> bool:
        result = run_python(completion, timeout_s=timeout_s)
        intervals.append(tuple(map(float, result.stdout.split())))
        return result.ok

    monkeypatch.setattr(verifiers, "_VERIFIERS", dict(verifiers._VERIFIERS))
    verifiers.register("timed", timed_run)
    child = "import time\nstart = time.time()\ntime.sleep(1)\nprint(start, time.time())"
    verdicts = verify_batch(["timed"] * 4, [child] * 4, [{} for _ in range(4)], max_workers=4)  # 4 distinct records
    assert verdicts == [Verdict(True)] * 4 and len(intervals) == 4
    starts, ends = zip(*intervals, strict=True)
    assert max(starts) < min(ends)  # one moment when all four children were sleeping at once


def test_verify_batch_checks_each_distinct_completion_of_a_record_once(monkeypatch):
    """A group's repeated samples cost one check; the same text for another record (even an equal one) is checked
    again, since only the same record object is known to be the same record."""
    checked = []

    def counting(completion: str, record: dict, timeout_s: float) -> bool:
        checked.append((completion, id(record)))
        return completion == record["answer"]

    monkeypatch.setattr(verifiers, "_VERIFIERS", dict(verifiers._VERIFIERS))
    verifiers.register("counting", counting)
    a, b = {"answer": "4"}, {"answer": "4"}
    verdicts = verify_batch(["counting"] * 6, ["4", "5", "4", "4", "5", "4"], [a, a, a, b, a, a])
    assert [v.correct for v in verdicts] == [True, False, True, True, False, True]
    assert sorted(checked) == sorted([("4", id(a)), ("5", id(a)), ("4", id(b))])
