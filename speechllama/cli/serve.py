"""``speechllama serve``: the OpenAI-style transcription endpoint on uvicorn (loopback by
default), with dynamic batching across requests; see docs/serve.md."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from speechllama.cli.transcribe import add_decoding_args, add_model_args

    p = sub.add_parser(
        "serve",
        help="serve an HTTP transcription API (OpenAI-style) with dynamic batching",
        description="Serve POST /v1/audio/transcriptions, GET /v1/models, GET /health and a "
        "page at / to try it. Requests that arrive within --max-wait-ms of the first one "
        "waiting are decoded in one batch of up to --max-batch (--batch-size is not used).",
    )
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument(
        "--served-name",
        default="speechllama",
        metavar="NAME",
        help="model id in /v1/models and the API (default: speechllama)",
    )
    g = p.add_argument_group("batching and limits")
    g.add_argument(
        "--max-batch",
        type=int,
        default=8,
        metavar="N",
        help="most requests decoded in one batch; 1 turns batching off (default: 8)",
    )
    g.add_argument(
        "--max-wait-ms",
        type=float,
        default=10.0,
        metavar="T",
        help="longest wait for more requests to join a batch (default: 10)",
    )
    g.add_argument(
        "--max-queue",
        type=int,
        default=64,
        metavar="N",
        help="requests waiting beyond this get 503 + Retry-After (default: 64)",
    )
    g.add_argument(
        "--max-upload-mb",
        type=float,
        default=25.0,
        metavar="MB",
        help="largest upload accepted (default: 25)",
    )
    g.add_argument(
        "--max-audio-s",
        type=float,
        default=30.0,
        metavar="S",
        help="longest audio accepted, in seconds (default: 30)",
    )
    g.add_argument(
        "--log-level", default="info", choices=("critical", "error", "warning", "info", "debug")
    )
    add_decoding_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        raise RuntimeError(
            f"serving needs the 'serve' extra ({exc.name} is missing): "
            "pip install 'speechllama[serve]'"
        ) from None
    from speechllama.cli.transcribe import decoding_options, setup_torch
    from speechllama.decoding import get_strategy
    from speechllama.features import FRAMES_PER_SECOND
    from speechllama.model.pack_tuning import call_sizes
    from speechllama.model.precision import warm_up_encoder
    from speechllama.serve import ServeConfig, create_app
    from speechllama.transcribe import load_model

    if args.max_batch < 1 or args.max_queue < 1:
        raise ValueError("--max-batch and --max-queue must be at least 1")
    if args.max_wait_ms < 0 or args.max_upload_mb <= 0 or args.max_audio_s <= 0:
        raise ValueError("--max-wait-ms must be >= 0, --max-upload-mb and --max-audio-s > 0")
    setup_torch(args)
    options = decoding_options(args)
    transcriber = load_model(args.model, device=args.device, precision=args.dtype,
                             compile=args.compile,
                             encoder_precision=args.encoder_dtype)  # fmt: skip
    # Measure the packed-weight choice of every call size now, not in the first requests.
    strategy = get_strategy(options, transcriber.model)
    transcriber.model.tune_packing(call_sizes(args.max_batch, strategy.lookahead))
    # A bf16 encoder's kernels, one per length bucket, are built now too (about 3 s for 30 s).
    warm_up_encoder(transcriber.model, int(min(args.max_audio_s, 30.0) * FRAMES_PER_SECOND))
    if transcriber.model.compiled is not None:  # and compile now, not in the first requests
        transcriber.model.compiled.warm_up(transcriber.model, strategy.num_heads, args.max_batch)
    config = ServeConfig(
        model_id=args.served_name,
        max_batch=args.max_batch,
        max_wait_ms=args.max_wait_ms,
        max_queue=args.max_queue,
        max_upload_mb=args.max_upload_mb,
        max_audio_s=args.max_audio_s,
    )
    app = create_app(transcriber, options, config)
    # uvicorn's own shutdown on SIGINT/SIGTERM stops accepting, waits for the requests in
    # flight, then runs the lifespan's end, which lets the batcher finish its queue.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
