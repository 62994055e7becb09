"""Math domain: the completion's final answer must be equivalent to the record's "answer".

Extraction: the last balanced \\boxed{...}, else what follows the last "answer is" / "Answer:" (to the end of that
sentence), else the last number in the text.

Comparison: when both sides are plain numeric literals (sign, digits, optional decimals, thousands commas), they
compare exactly as decimals: "042" == "42" == "42.0", "42.5" != "42", "0.3333" != "1/3" (not a literal, see below).
Anything else goes to math-verify (fractions, LaTeX, symbolic equivalence, e.g. "\\frac{1}{2}" == "0.5" == "1/2").
math-verify runs in a small pool of worker processes: its timeouts use SIGALRM, which only works in a main thread,
and a worker stuck in sympy can be killed, where a thread could not. Without math-verify installed, the fallback is
an exact match of normalized strings.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import os
import queue
import re
import resource
import select
import subprocess
import sys
import threading
from decimal import Decimal, InvalidOperation

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None
WORKERS = 4
WORKER_MEMORY_BYTES = 4 << 30  # sympy on adversarial input (huge powers) must hit MemoryError, not the host
WORKER_START_TIMEOUT_S = 120.0  # importing sympy once; not counted against a verification's timeout

_ANSWER_PHRASE = re.compile(r"answer is|answer:", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.)])-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")
_LITERAL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_NOISE = re.compile(r"\\[,!;: ]|\\left|\\right|\{,\}|\$|\s")


def check(completion: str, record: dict, timeout_s: float) -> bool:
    gold = str(record["answer"])
    predicted = extract_answer(completion)
    return predicted is not None and equivalent(gold, predicted, timeout_s)


def extract_answer(text: str) -> str | None:
    return _last_boxed(text) or _after_answer_phrase(text) or _last_number(text)


def _last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} whose braces balance (a truncated one is skipped).

    Each box is scanned only up to the next one: a box still open there contains that later box, which did not
    close, so it cannot close either. That keeps degenerate "\\boxed{\\boxed{..." loops linear."""
    starts = [m.end() for m in re.finditer(r"\\boxed\s*\{", text)]
    limits = [*starts[1:], len(text)]
    for start, limit in reversed(list(zip(starts, limits[: len(starts)], strict=True))):
        depth = 1
        for end in range(start, limit):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[start:end].strip() or None
    return None


def _after_answer_phrase(text: str) -> str | None:
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if not phrases:
        return None
    rest = text[phrases[-1].end():].split("\n", 1)[0]
    rest = re.split(r"\.\s", rest, maxsplit=1)[0]
    return rest.strip().strip("*:").strip().rstrip(".").strip() or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def equivalent(gold: str, predicted: str, timeout_s: float) -> bool:
    exact = _as_decimal(gold), _as_decimal(predicted)
    if None not in exact:
        return exact[0] == exact[1]
    if HAS_MATH_VERIFY:
        return _POOL.equal(gold, predicted, timeout_s)
    return _normalize(gold) == _normalize(predicted)


def _normalize(answer: str) -> str:
    answer = _LATEX_NOISE.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return _THOUSANDS.sub("", answer).rstrip(".")


def _as_decimal(answer: str) -> Decimal | None:
    text = _normalize(answer)
    if not _LITERAL.fullmatch(text):
        return None
    try:
        return Decimal(text)
    except InvalidOperation:
        return None


class _Worker:
    """One math-verify process speaking JSON lines on stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-I", os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={"PATH": os.environ.get("PATH", os.defpath)})
        if self._read_line(WORKER_START_TIMEOUT_S) != "ready":
            self.kill()
            raise RuntimeError("math-verify worker failed to start")

    def equal(self, gold: str, predicted: str, timeout_s: float) -> bool:
        self.proc.stdin.write(json.dumps({"gold": gold, "pred": predicted, "timeout_s": timeout_s}) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._read_line(timeout_s))
        if "error" in reply:
            raise RuntimeError(f"math-verify: {reply['error']}")
        return reply["equal"]

    def _read_line(self, timeout_s: float) -> str:
        if not select.select([self.proc.stdout], [], [], timeout_s)[0]:
            raise TimeoutError(f"timeout: math-verify did not finish within {timeout_s:g}s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("math-verify worker died")
        return line.strip()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


class _WorkerPool:
    """Up to WORKERS workers, started on demand; one that timed out or failed is killed, not reused."""

    def __init__(self, size: int) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._idle: queue.SimpleQueue[_Worker] = queue.SimpleQueue()

    def equal(self, gold: str, predicted: str, timeout_s: float) -> bool:
        with self._slots:
            worker = self._take()
            try:
                result = worker.equal(gold, predicted, timeout_s)
            except BaseException:
                worker.kill()
                raise
            self._idle.put(worker)
            return result

    def _take(self) -> _Worker:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return _Worker()

    def close(self) -> None:
        while not self._idle.empty():
            self._idle.get_nowait().kill()


_POOL = _WorkerPool(WORKERS)
atexit.register(_POOL.close)


def _parse(answer: str, op_timeout: int) -> list:
    """math-verify extracts from prose; wrapping in $...$ makes bare LaTeX like \\frac{1}{2} parse too."""
    from math_verify import parse

    wrapped = f"${answer.strip().strip('$')}$"
    return parse(wrapped, parsing_timeout=op_timeout) or parse(answer, parsing_timeout=op_timeout)


def _reply(request: dict) -> dict:
    from math_verify import verify

    # math-verify times each parse/compare step in whole seconds; at most five steps must fit the budget.
    op_timeout = max(1, int(request["timeout_s"] / 5))
    try:
        gold, predicted = _parse(request["gold"], op_timeout), _parse(request["pred"], op_timeout)
        return {"equal": bool(verify(gold, predicted, timeout_seconds=op_timeout))}
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}


def _serve() -> None:
    """Worker loop. Replies go to the real stdout; library prints are sent to stderr so they cannot corrupt it."""
    import math_verify  # noqa: F401  (imported before "ready", so start-up cost is not charged to a request)

    resource.setrlimit(resource.RLIMIT_AS, (WORKER_MEMORY_BYTES, WORKER_MEMORY_BYTES))
    replies, sys.stdout = sys.stdout, sys.stderr
    print("ready", file=replies, flush=True)
    for line in sys.stdin:
        print(json.dumps(_reply(json.loads(line))), file=replies, flush=True)


if __name__ == "__main__":
    _serve()
