"""Shared fixtures: tiny models built offline, teacher servers as real processes (the e2e tier), a direct transformers
reference, and the CLI run in-process."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from uniopd.launch import RedisServer, free_port, start_teacher  # noqa: F401 (RedisServer: shared by tests)
from uniopd.tiny_models import build_tiny_model, build_tiny_vlm

HAS_VLLM = importlib.util.find_spec("vllm") is not None
# where the transformers scorer runs in the log-prob kernel tests: UNIOPD_TEST_DEVICE=cuda checks them on a GPU
TEST_DEVICE = os.environ.get("UNIOPD_TEST_DEVICE", "cpu")
BACKENDS = ["hf", pytest.param("vllm", marks=pytest.mark.skipif(not HAS_VLLM, reason="vllm not installed"))]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", "qwen3", seed=0)


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("models") / "tiny-vlm", seed=0)


@pytest.fixture(scope="session", params=BACKENDS)
def teacher(request, tiny_model, tmp_path_factory):
    """One server per backend for the whole session; a long batch wait makes coalescing observable."""
    server = start_teacher(tiny_model, request.param, ["--domain", "math", "--batch-wait-ms", "30"],
                           log_dir=tmp_path_factory.mktemp(f"log-{request.param}"))
    server.backend = request.param
    yield server
    server.stop()


class Reference:
    """Log-probs from a plain transformers forward pass, one sequence at a time, in fp32."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def logprobs(self, ids: list[int]) -> np.ndarray:
        with self.torch.inference_mode():
            logits = self.model(self.torch.tensor([ids])).logits[0]
            return self.torch.log_softmax(logits.float(), -1).numpy()

    def span(self, ids: list[int], start: int) -> np.ndarray:
        lp = self.logprobs(ids)
        return np.array([lp[p - 1, ids[p]] for p in range(start, len(ids))], dtype=np.float32)


@pytest.fixture(scope="session")
def reference(tiny_model) -> Reference:
    return Reference(tiny_model)


def random_items(rng: np.random.Generator, n: int, vocab: int = 512, lo: int = 8, hi: int = 96, top_k: int = 0):
    from proto.schemas import ScoreItem

    items = []
    for _ in range(n):
        length = int(rng.integers(lo, hi))
        ids = rng.integers(0, vocab, size=length).tolist()
        items.append(ScoreItem(input_ids=ids, response_start=int(rng.integers(1, length)), top_k=top_k))
    return items


@pytest.fixture
def redis_server():
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture
def cli_error_in_process(monkeypatch, capsys) -> Callable[[list[str]], str]:
    """`uniopd ARGS` in this process, expected to refuse its arguments: checks exit status 2, returns stderr. A server
    it would start fails the test instead of blocking it."""
    from uniopd import cli

    def never_serve(app, args) -> None:
        raise AssertionError("the CLI accepted the arguments and would serve")

    monkeypatch.setattr(cli, "_run", never_serve)

    def run(args: list[str]) -> str:
        with pytest.raises(SystemExit) as exc:
            cli.main(args)
        assert exc.value.code == 2
        return capsys.readouterr().err

    return run
