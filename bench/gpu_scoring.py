"""Teacher scoring on a GPU: the transformers backend on CUDA, bf16, a generated model of realistic shape.

    python bench/gpu_scoring.py [--hidden 2048] [--layers 24] [--vocab 151936] [--json out.json]

The model is random (nothing can be downloaded), Qwen3-shaped: `--hidden` wide, `--layers` deep, 128-wide heads,
GQA with half as many KV heads, an MLP 3x as wide, tied embeddings. vLLM cannot be carried to the GPU machine these
figures come from, so stock `vllm serve` is not run beside it here; its published prompt-scoring figure is quoted in
the README instead. Three parts, one run:

- whole sequences: `--long` tokens each, every position scored, which is what `prompt_logprobs` returns;
- a prompt's samples, in-process (bench/shared_prompts.py's workload): n = 1, 4, 16 samples per prompt at
  prompt:response 512:512 and 2048:512, the shared prompt computed once vs every sequence scored whole;
  with the largest difference between the two paths' log-probs on one request;
- HTTP: `uniopd teacher serve --backend hf --device cuda --dtype bfloat16`, msgpack, float32 and float16 responses,
  8 sequences a request sharing their prompt (the first `--prompts` length, 512:512 by default), concurrency
  1/8/32 (bench/peer_scoring.py's measurement): tokens/s, p50/p99 latency and response bytes per scored token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from peer_scoring import Uniopd, bench_server
from shared_prompts import fmt, make_requests, rate

from proto.schemas import ScoreItem
from services.teacher_server.backends.hf import HFScorer
from uniopd.launch import start_teacher
from uniopd.tiny_models import build_tokenizer


def build_model(out: Path, hidden: int, layers: int, vocab: int, max_length: int, device: str) -> Path:
    """A random bf16 Qwen3 model of the given shape, initialised on `device` (fast on a GPU) and saved to `out`."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    tokenizer = build_tokenizer()
    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 256), head_dim=128,
                         max_position_embeddings=max_length, tie_word_embeddings=True, initializer_range=0.02,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def whole_sequences(scorer: HFScorer, length: int, rows: int, vocab: int, repeats: int) -> list[float]:
    """Scored tokens/s for `rows` sequences of `length` tokens, every position after the first scored."""
    gen = torch.Generator().manual_seed(0)
    scorer.score([ScoreItem(input_ids=torch.randint(vocab, (length,), generator=gen).tolist(), response_start=1)])
    rates = []
    for _ in range(repeats):
        items = [ScoreItem(input_ids=torch.randint(vocab, (length,), generator=gen).tolist(), response_start=1)
                 for _ in range(rows)]
        start = time.perf_counter()
        scorer.score(items)
        rates.append(rows * (length - 1) / (time.perf_counter() - start))
    return rates


def max_difference(scorer: HFScorer, items: list[ScoreItem]) -> float:
    """The largest gap between the log-probs of the shared-prompt path and of scoring every sequence whole."""
    scorer.share_prompts = True
    shared = scorer.score(items)
    scorer.share_prompts = False
    whole = scorer.score(items)
    return max(float(abs(a.logprobs - b.logprobs).max()) for a, b in zip(shared, whole, strict=True))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--long", type=int, default=8192, help="tokens of each whole sequence")
    ap.add_argument("--prompts", type=int, nargs="+", default=[512, 2048], help="prompt tokens (responses are 512)")
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--requests", type=int, default=64, help="HTTP requests per timed pass")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path, help="also write the measurements here")
    args = ap.parse_args()
    if args.hidden % 256:
        ap.error("--hidden must be a multiple of 256 (128-wide heads, half as many KV heads)")
    longest = max(args.long, max(args.prompts) + args.response)
    model = build_model(Path(tempfile.mkdtemp()) / "model", args.hidden, args.layers, args.vocab, longest, args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    print(f"{name}, torch {torch.__version__}; model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, "
          f"bf16; repeats={args.repeats}\n")
    results: dict = {"device": name, "hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}

    scorer = HFScorer(model, "bfloat16", args.device)
    whole = whole_sequences(scorer, args.long, 16, args.vocab, args.repeats)
    results["whole"] = {"length": args.long, "rates": whole}
    print(f"whole sequences, 16 x {args.long} tokens, every position scored: {fmt(whole)} tokens/s\n")

    print("| prompt:response | samples per prompt | shared prompt, tokens/s | whole sequences, tokens/s | ratio "
          "| ideal | max abs difference |\n|---|---|---|---|---|---|---|")
    results["shared"] = []
    for prompt in args.prompts:
        for n in (1, 4, 16):
            runs = {}
            for share in (True, False):
                scorer.share_prompts = share
                runs[share] = rate(scorer, 2, n, prompt, args.repeats, args.response, 64, args.vocab)
            ideal = n * (prompt + args.response) / (prompt + n * args.response)
            gap = max_difference(scorer, make_requests(1, n, prompt, args.response, 99, 64, args.vocab)[0])
            ratio = statistics.mean(runs[True]) / statistics.mean(runs[False])
            results["shared"].append({"prompt": prompt, "samples": n, "shared": runs[True], "whole": runs[False],
                                      "max_difference": gap})
            print(f"| {prompt}:{args.response} | {n} | {fmt(runs[True])} | {fmt(runs[False])} | {ratio:.2f} | "
                  f"{ideal:.2f} | {gap:.3f} |", flush=True)
    if args.device.startswith("cuda"):
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        print(f"\npeak GPU memory in-process: {results['peak_gib']:.1f} GiB")
    del scorer
    torch.cuda.empty_cache()

    batches = make_requests(args.requests, 8, args.prompts[0], args.response, seed=7, rows=8, vocab=args.vocab)
    print("\n| response floats | concurrency | scored tokens/s | p50 / p99 ms | response bytes/token |\n"
          "|---|---|---|---|---|")
    results["http"] = []
    with start_teacher(model, "hf", ["--device", args.device, "--dtype", "bfloat16", "--batch-wait-ms", "2"],
                       timeout=300) as server:
        for floats in ("float32", "float16"):
            measured = asyncio.run(bench_server(Uniopd(server.url, floats), batches, args.concurrency, args.repeats,
                                                server.proc.pid))
            for conc, r in measured.items():
                results["http"].append({"floats": floats, "concurrency": conc, **r})
                print(f"| {floats} | {conc} | {r['rate']:,.0f} ± {r['rate_sd']:,.0f} | {1e3 * r['p50']:,.0f} / "
                      f"{1e3 * r['p99']:,.0f} | {r['bytes']:.2f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
