"""Tiny models are deterministic and loadable; CLI mistakes are reported naming the option."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from proto.fingerprint import model_revision, tokenizer_fingerprint
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


def test_threads_are_an_hf_option_set_before_the_model_loads(cli_error_in_process, tiny_model):
    import torch

    if importlib.util.find_spec("vllm") is not None:
        assert "--threads" in cli_error_in_process(["teacher", "serve", "--model", str(tiny_model), "--backend",
                                                    "vllm", "--threads", "1"])
    before = torch.get_num_threads()
    try:
        assert "--api-keys" in cli_error_in_process(["teacher", "serve", "--model", str(tiny_model), "--threads", "1",
                                                     "--api-keys", "/no/such"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.e2e
def test_models_tiny_refuses_to_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("data")
    assert "--out" in _cli_error(["models", "tiny", "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "data"


def test_models_tiny_refuses_to_overwrite_in_process(cli_error_in_process, tmp_path):
    (tmp_path / "keep.txt").write_text("data")
    assert "--out" in cli_error_in_process(["models", "tiny", "--out", str(tmp_path)])
    assert (tmp_path / "keep.txt").read_text() == "data"
