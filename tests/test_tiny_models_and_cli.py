"""Tiny models are deterministic and loadable; CLI mistakes are reported naming the option."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from proto.fingerprint import model_revision, tokenizer_fingerprint
from tests.conftest import BACKENDS, start_teacher
from uniopd.cli import main


def test_same_seed_same_model_other_seed_other_weights(tmp_path):
    a = main(["models", "tiny", "--out", str(tmp_path / "a"), "--seed", "3"])
    main(["models", "tiny", "--out", str(tmp_path / "b"), "--seed", "3"])
    main(["models", "tiny", "--out", str(tmp_path / "c"), "--seed", "4"])
    assert a is None
    assert model_revision(tmp_path / "a") == model_revision(tmp_path / "b") != model_revision(tmp_path / "c")


def test_llama_arch_loads_with_chat_template(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    main(["models", "tiny", "--arch", "llama", "--out", str(tmp_path / "l")])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "l")
    tok = AutoTokenizer.from_pretrained(tmp_path / "l")
    assert model.config.model_type == "llama" and model.config.head_dim >= 32
    text = tok.apply_chat_template([{"role": "user", "content": "2 + 2"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text and max(ids) < model.config.vocab_size
    assert model(torch.tensor([ids])).logits.shape == (1, len(ids), model.config.vocab_size)
    assert len(tokenizer_fingerprint(tok)) == 64


CLI_ERRORS = [
    (["teacher", "serve", "--model", "/nonexistent"], "--model"),
    (["teacher", "serve", "--model", ".", "--backend", "tgi"], "--backend"),
    (["teacher", "serve", "--model", ".", "--max-top-k", "0"], "--max-top-k"),
    (["models", "tiny", "--out", "/tmp/x", "--hidden", "100"], "--hidden"),
    (["models", "tiny", "--out", "/tmp/x", "--arch", "gpt2"], "--arch"),
    (["rollout", "serve", "--model", ".", "--threads", "0"], "--threads"),
]


def _cli_error(args: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "uniopd", *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    return done.stderr


@pytest.mark.e2e
@pytest.mark.parametrize(("args", "named"), CLI_ERRORS)
def test_cli_errors_name_the_option(args, named):
    assert named in _cli_error(args)


@pytest.mark.parametrize(("args", "named"), CLI_ERRORS)
def test_cli_errors_name_the_option_in_process(cli_error_in_process, args, named):
    assert named in cli_error_in_process(args)


@pytest.mark.e2e
def test_serve_refuses_missing_key_file(tiny_model):
    assert "--api-keys" in _cli_error(["teacher", "serve", "--model", str(tiny_model), "--api-keys", "/no/such"])


@pytest.mark.parametrize(("server", "option"), [("teacher", "--api-keys"), ("teacher", "--metrics-keys"),
                                                ("rollout", "--metrics-keys"), ("rollout", "--admin-keys")])
def test_serve_refuses_missing_key_file_in_process(cli_error_in_process, tiny_model, server, option):
    assert option in cli_error_in_process([server, "serve", "--model", str(tiny_model), option, "/no/such"])


def test_serve_refuses_a_bad_metrics_key_file_naming_it(cli_error_in_process, tiny_model, tmp_path):
    keys = tmp_path / "metrics-keys.txt"
    keys.write_text("two words\n")
    assert "--metrics-keys" in cli_error_in_process(["teacher", "serve", "--model", str(tiny_model), "--metrics-keys",
                                                     str(keys)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_threads_are_set_before_the_model_loads(cli_error_in_process, tiny_model, backend):
    """Both backends: vLLM's in-process CPU engine computes on torch's threads too."""
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert "--api-keys" in cli_error_in_process(["teacher", "serve", "--model", str(tiny_model), "--backend",
                                                     backend, "--threads", "1", "--api-keys", "/no/such"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (fields 14 and 15, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.e2e
@pytest.mark.skipif(os.cpu_count() < 2, reason="one core cannot tell one thread from two")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_server_started_with_one_thread_computes_on_one_core(tiny_model, backend, tmp_path):
    """Under a steady scoring load the server process uses at most about one core: the engine kept the thread
    count it was given (two threads here use ~1.9 cores while scoring)."""
    body = {"items": [{"input_ids": [(7 * i + j) % 500 for j in range(192)], "response_start": 128}
                      for i in range(64)]}
    with start_teacher(tiny_model, backend, ["--threads", "1", "--max-length", "256"], tmp_path) as server:
        httpx.post(server.url + "/v1/score", json=body, timeout=60).raise_for_status()  # warm-up
        cpu, wall = _cpu_seconds(server.proc.pid), time.monotonic()
        while time.monotonic() - wall < 3:
            httpx.post(server.url + "/v1/score", json=body, timeout=60).raise_for_status()
        busy = (_cpu_seconds(server.proc.pid) - cpu) / (time.monotonic() - wall)
    assert busy < 1.3, f"the server used {busy:.2f} cores with --threads 1"


@pytest.mark.e2e
def test_models_tiny_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("data")
    assert "--out" in _cli_error(["models", "tiny", "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "data"


def test_models_tiny_refuses_to_overwrite_in_process(cli_error_in_process, tmp_path):
    (tmp_path / "keep.txt").write_text("data")
    assert "--out" in cli_error_in_process(["models", "tiny", "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "data"
