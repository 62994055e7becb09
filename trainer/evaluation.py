"""Verifying sampled token ids and measuring held-out accuracy: shared by the trainer, offline balancing and the
experiment (which also measures the teachers, served as samplers, with the same protocol as the student)."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from proto.client import RolloutClient, generate_request
from trainer.data import record_images
from trainer.rollout_session import RolloutSession
from trainer.verifiers import Verdict, verify_batch

log = logging.getLogger("uniopd.train")


def verify_responses(tokenizer, kind_of: Callable[[str], str], responses: Sequence[Sequence[int]],
                     records: Sequence[dict]) -> list[Verdict]:
    """Decode each response (special tokens dropped) and verify it with its record's domain verifier; failed
    verifications count as incorrect (docs/method.md), and are logged with an example of why."""
    texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in responses]
    verdicts = verify_batch([kind_of(r["domain"]) for r in records], texts, list(records))
    errors = [v.error for v in verdicts if v.error is not None]
    if errors:
        log.warning("%d of %d verifications failed (counted incorrect), e.g. %s", len(errors), len(verdicts),
                    errors[0][:200])
    return verdicts


async def heldout_accuracy(client: RolloutSession | RolloutClient, tokenizer, kind_of: Callable[[str], str],
                           prompts: Sequence[list[int]], records: Sequence[dict], k: int, seed: int,
                           max_tokens: int) -> dict[str, float]:
    """Mean accuracy over k samples per prompt, per domain, at temperature 1 and top-p 1 (docs/method.md §6)."""
    out = await client.generate(generate_request(prompts, [record_images(r) for r in records], n=k, temperature=1.0,
                                                 top_p=1.0, max_tokens=max_tokens, seed=seed))
    flat = [(rec, s.token_ids) for rec, group in zip(records, out.samples, strict=True) for s in group]
    verdicts = await asyncio.to_thread(verify_responses, tokenizer, kind_of, [ids for _, ids in flat],
                                       [rec for rec, _ in flat])
    by_domain: dict[str, list[bool]] = defaultdict(list)
    for (rec, _), v in zip(flat, verdicts, strict=True):
        by_domain[rec["domain"]].append(v.correct)
    return {f"{d}/accuracy": float(np.mean(v)) for d, v in sorted(by_domain.items())}
