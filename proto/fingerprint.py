"""Hashes that identify a teacher's scores: model revision, tokenizer, and the combined fingerprint digest.

Pure hashing over files and duck-typed tokenizers, so trainers can check compatibility without torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from proto.schemas import SCORING_MODE, Fingerprint

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
_CHUNK = 1 << 20


def model_revision(model_dir: str | Path) -> str:
    """sha256 over config.json and every weight file (name and content), in name order."""
    root = Path(model_dir)
    h = hashlib.sha256()
    files = [root / "config.json", *sorted(p for p in root.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES))]
    for path in files:
        h.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the vocab, the special tokens and the chat template: what must match between student and teacher."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]),
        "special": sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items()),
        "added": sorted((int(i), str(t)) for i, t in tokenizer.added_tokens_decoder.items()),
        "chat_template": tokenizer.chat_template or "",
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def make_fingerprint(model: str, revision: str, tokenizer: str, dtype: str, backend: str,
                     processor: str = "") -> Fingerprint:
    fields = {"model": model, "revision": revision, "tokenizer": tokenizer, "dtype": dtype, "backend": backend,
              "scoring_mode": SCORING_MODE}
    if processor:  # text teachers keep the digests (and cached scores) they had before images existed
        fields["processor"] = processor
    return Fingerprint(**fields, digest=_digest(fields))


def _digest(fields: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def digest_covers_fields(fp: Fingerprint) -> bool:
    """Whether a reported fingerprint's digest is the one its fields give: a trainer keys its cache on the digest,
    so a digest that does not cover the dtype, backend or scoring mode it reports must not be trusted."""
    fields = fp.model_dump(exclude={"digest"})
    if not fields["processor"]:
        del fields["processor"]
    return fp.digest == _digest(fields)
