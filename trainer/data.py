"""Datasets: jsonl records, rendered with the student's chat template, served in a seeded, resumable order."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np


def derive_seed(*parts) -> int:
    """Independent, reproducible seeds for every (run seed, step, purpose): a resumed run samples the same."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:7], "little")


class DataError(ValueError):
    pass


@dataclass
class Example:
    record: dict
    domain: str
    prompt_ids: list[int]
    images: tuple[bytes, ...] = ()  # PNG/JPEG bytes, one per image placeholder in the prompt, in order

    @cached_property
    def prompt_array(self) -> np.ndarray:
        """`prompt_ids` as int32, built once for all the prompt's samples of every step; read-only, so the score
        items of its samples share it (`ScoreItem.of_arrays`)."""
        ids = np.asarray(self.prompt_ids, dtype=np.int32)
        ids.flags.writeable = False
        return ids


def load_records(paths: list[Path], domains: set[str] | None = None) -> list[dict]:
    """Every record needs a `domain` and a `prompt` (text) or `messages` (chat); errors name file and line."""
    records = []
    for path in paths:
        for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where}: not JSON ({exc})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("domain"), str):
                raise DataError(f"{where}: a record needs a string 'domain'")
            if not isinstance(rec.get("prompt"), str) and not isinstance(rec.get("messages"), list):
                raise DataError(f"{where}: a record needs 'prompt' (text) or 'messages' (chat)")
            if "images" in rec:
                rec["images"] = _image_paths(rec["images"], Path(path).parent, where)
            if domains is not None and rec["domain"] not in domains:
                raise DataError(f"{where}: domain {rec['domain']!r} has no teacher (configured: {sorted(domains)})")
            records.append(rec)
    if not records:
        raise DataError(f"no records in {[str(p) for p in paths]}")
    return records


def _image_paths(images: object, root: Path, where: str) -> list[str]:
    """A record's `images`: files relative to its jsonl file (or absolute), resolved now so errors name the line."""
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise DataError(f"{where}: 'images' must be a list of image file paths")
    paths = [root / p for p in images]
    for p in paths:
        if not p.is_file():
            raise DataError(f"{where}: image {p} does not exist")
    return [str(p) for p in paths]


def render_prompt(tokenizer, record: dict) -> list[int]:
    messages = record.get("messages") or [{"role": "user", "content": record["prompt"]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def record_images(record: dict) -> tuple[bytes, ...]:
    return tuple(Path(p).read_bytes() for p in record.get("images", ()))


def make_examples(tokenizer, records: list[dict]) -> list[Example]:
    """Prompts tokenized once; images read once (they are small next to a model, and read-only from here on)."""
    return [Example(r, r["domain"], render_prompt(tokenizer, r), record_images(r)) for r in records]


class DataStream:
    """Shuffled per epoch from (seed, epoch); its state is two integers, so a resumed run sees the same order."""

    def __init__(self, size: int, seed: int, epoch: int = 0, position: int = 0) -> None:
        self.size, self.seed, self.epoch, self.position = size, seed, epoch, position
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.size)

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation()
            out.append(int(self._order[self.position]))
            self.position += 1
        return out

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}
