"""Multiple-choice domain: the last answer letter mentioned must equal the record's (case-insensitive).

Record: {"choices": ["...", ...], "answer": "B"}. Recognised mentions: "Answer: C", "the answer is (C)",
"(C)", "\\boxed{C}", and a final line holding only the letter ("C", "C.", "**C**"). Only capital letters that
name an existing choice count, so "the answer is a bit unclear" or "(I)" with four choices are ignored.
"""

from __future__ import annotations

import re
import string

_MENTIONS = (
    re.compile(r"(?i:answer)(?:\s+(?i:is))?\s*[:：]?\s*[*(\[{$]*\s*([A-Z])(?![A-Za-z])"),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"\\boxed\{\s*(?:\\text\{)?([A-Z])\}?\s*\}"),
    re.compile(r"^[^\w\n]*([A-Z])[^\w\n]*\s*\Z", re.MULTILINE),
)


def extract_letter(completion: str, valid: str = string.ascii_uppercase) -> str | None:
    """The valid letter whose mention starts last in the text."""
    found = [(m.start(1), m.group(1)) for pattern in _MENTIONS for m in pattern.finditer(completion)]
    found = [(pos, letter) for pos, letter in found if letter in valid]
    return max(found)[1] if found else None


def check(completion: str, record: dict, timeout_s: float) -> bool:
    answer = str(record["answer"]).strip().upper()
    choices = record.get("choices")
    valid = string.ascii_uppercase[: len(choices)] if choices else string.ascii_uppercase
    return extract_letter(completion, valid) == answer
