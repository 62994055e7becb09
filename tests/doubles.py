"""Protocol test doubles: a `Scorer` (services/teacher_server/scorer.py) and a `Generator`
(services/rollout_server/generator.py) that the real teacher and rollout apps serve in-process.

Why doubles and not the tiny model: the route, limit, quota, auth and scheduling tests need a backend that answers in
microseconds, can be held mid-call (a `gate`) to make queueing and in-flight states deterministic, and records what
reached it. Each double is a bigram "model": a seeded table of next-token log-probs given the previous token, so its
answers depend on the input ids and positions, and `span()` gives the value any correct route must return. The value
checks against real transformers log-probs use the real HF backends on the tiny model instead.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence

import numpy as np
import torch

from modeling.logprobs import candidate_logprobs
from proto.codec import ScoredSpan
from proto.rollout import Sample
from proto.schemas import ScoreItem
from services.rollout_server.generator import GeneratorInfo, SamplingOptions, TransferUnavailable
from services.teacher_server.scorer import ScorerInfo

GATE_TIMEOUT_S = 30.0  # a test that forgets to open a gate fails instead of hanging


def bigram_table(seed: int, vocab_size: int) -> np.ndarray:
    """Row `prev`: float32 log-probs of every next token (each row sums to 1 in probability)."""
    logits = np.random.default_rng(seed).standard_normal((vocab_size, vocab_size)) * 2.0
    logits -= logits.max(axis=1, keepdims=True)
    return (logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))).astype(np.float32)


class _Gate:
    """Holds every backend call until opened; `entered` tells a test that a call is in progress."""

    def __init__(self, closed: bool) -> None:
        self.open_event = threading.Event()
        self.entered = threading.Event()
        if not closed:
            self.open_event.set()

    def pass_through(self) -> None:
        self.entered.set()
        if not self.open_event.wait(GATE_TIMEOUT_S):
            raise TimeoutError("the test never opened the backend gate")

    def open(self) -> None:
        self.open_event.set()


class ScorerDouble:
    """Scorer protocol double: scores from a bigram table; records each call's items and images."""

    def __init__(self, seed: int = 0, *, vocab_size: int = 512, max_length: int = 1024, max_top_k: int = 20,
                 tokenizer: str = "tok-double", image_token_id: int | None = None, held: bool = False) -> None:
        self.table = bigram_table(seed, vocab_size)
        self._info = ScorerInfo(model=f"scorer-double-{seed}", revision=f"rev-{seed}", tokenizer_fingerprint=tokenizer,
                                vocab_size=vocab_size, max_length=max_length, dtype="float32", backend="double",
                                image_token_id=image_token_id, max_top_k=max_top_k)
        self.gate = _Gate(closed=held)
        self.calls: list[list[ScoreItem]] = []
        self.images: list[Sequence[Sequence] | None] = []

    def info(self) -> ScorerInfo:
        return self._info

    def image_positions(self, size: tuple[int, int]) -> int:
        return 1  # the double scores a placeholder as it is sent

    def score(self, items: Sequence[ScoreItem], images: Sequence[Sequence] | None = None) -> list[ScoredSpan]:
        self.calls.append(list(items))
        self.images.append(images)
        self.gate.pass_through()
        return [self.span(it.input_ids, it.response_start, it.top_k, it.distribution, it.candidates, it.ranks)
                for it in items]

    def span(self, ids: Sequence[int], start: int, top_k: int = 0, distribution: bool = False,
             candidates: list[list[int]] | None = None, ranks: bool = False) -> ScoredSpan:
        """What a correct server returns for this item: log p(ids[p] | ids[p-1]) for p in [start, len(ids))."""
        rows = self.table[np.asarray(ids[start - 1 : -1])]
        span = ScoredSpan(rows[np.arange(len(rows)), np.asarray(ids[start:])])
        if top_k:
            idx = np.argsort(-rows, axis=-1, kind="stable")[:, :top_k]
            span.top_k_ids, span.top_k_logprobs = idx.astype(np.int32), np.take_along_axis(rows, idx, -1)
        if distribution:
            span.distribution = rows.copy()
        if ranks:
            span.ranks = ((rows > span.logprobs[:, None]).sum(-1) + 1).astype(np.int32)
        if candidates is not None:
            cand, tail = candidate_logprobs(torch.from_numpy(rows), torch.tensor(candidates))
            span.candidate_logprobs, span.tail_logprobs = cand.numpy(), tail.numpy()
        return span


class GeneratorDouble:
    """Generator protocol double: samples a bigram table (greedy at temperature 0, seeded when asked); a weight update
    re-seeds the table from the tensors' bytes, so the same weights always give the same outputs."""

    def __init__(self, *, vocab_size: int = 512, max_length: int = 1024, eos_token_ids: tuple[int, ...] = (0, 2),
                 held: bool = False, transfer: TransferDouble | None = None) -> None:
        self.vocab_size = vocab_size
        self.transfer = transfer
        self.table = bigram_table(0, vocab_size)
        self._info = GeneratorInfo(model="generator-double", revision="rev-0", tokenizer_fingerprint="tok-double",
                                   vocab_size=vocab_size, max_length=max_length, dtype="float32", backend="double",
                                   eos_token_ids=eos_token_ids)
        self.gate = _Gate(closed=held)
        self.calls: list[tuple[list[list[int]], SamplingOptions]] = []
        self.loaded: list[dict[str, tuple[int, ...]]] = []  # names and shapes of each weight update, in order

    def info(self) -> GeneratorInfo:
        return self._info

    def generate(self, prompts: list[list[int]], options: SamplingOptions,
                 images: list[tuple] | None = None) -> list[list[Sample]]:
        self.calls.append((prompts, options))
        self.gate.pass_through()
        rng = np.random.default_rng(options.seed)
        return [[self._sample(p, options, rng) for _ in range(options.n)] for p in prompts]

    def _sample(self, prompt: list[int], options: SamplingOptions, rng: np.random.Generator) -> Sample:
        stops = set(self._info.eos_token_ids) | set(options.stop_token_ids)
        prev, tokens, logprobs = prompt[-1], [], []
        for _ in range(options.max_tokens):
            row = self.table[prev]
            if options.temperature == 0:
                tok = int(row.argmax())
            else:
                p = np.exp(row.astype(np.float64))
                tok = int(rng.choice(self.vocab_size, p=p / p.sum()))
            tokens.append(tok)
            logprobs.append(row[tok])
            prev = tok
            if tok in stops:
                break
        reason = "stop" if tokens[-1] in stops else "length"
        return Sample(np.asarray(tokens, np.int32), np.asarray(logprobs, np.float32), reason)

    def load_weights(self, tensors: dict) -> None:
        digest = hashlib.sha256()
        for name in sorted(tensors):
            digest.update(name.encode())
            digest.update(tensors[name].float().numpy().tobytes())
        self.table = bigram_table(int(digest.hexdigest()[:8], 16), self.vocab_size)
        self.loaded.append({name: tuple(t.shape) for name, t in tensors.items()})

    def weight_transfer(self) -> TransferDouble:
        if self.transfer is None:
            raise TransferUnavailable("the double was made without a transfer engine")
        return self.transfer


class TransferDouble:
    """WeightTransfer protocol double: records each call in `calls`; a receive fails with `fail_receive`, and is held
    by a closed `gate` (a round in progress). No data moves: the gloo engines are tested on their own."""

    backend = "double"
    workers = 1

    def __init__(self, *, fail_receive: bool = False, held: bool = False) -> None:
        self.joined = False
        self.fail_receive = fail_receive
        self.gate = _Gate(closed=held)
        self.calls: list[tuple[str, object]] = []

    def init(self, init_info: dict) -> None:
        if "packed" in init_info:  # as vLLM's engines check their own init info
            raise ValueError("unexpected keyword argument 'packed'")
        self.calls.append(("init", init_info))
        self.joined = True

    def start(self) -> None:
        self.calls.append(("start", None))

    def receive(self, update_info: dict) -> None:
        self.calls.append(("receive", update_info))
        self.gate.pass_through()
        if self.fail_receive:
            raise RuntimeError("the trainer's broadcast broke off")

    def finish(self) -> None:
        self.calls.append(("finish", None))

    def abort(self) -> None:
        self.calls.append(("abort", None))
