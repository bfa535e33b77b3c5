"""``speechllama bench --manifest M``: every decoding method and the ``transformers`` peers on
the same utterances, in one table (WER, decoder calls, tokens per call, decoder seconds,
speed-up against greedy, RTF), optionally as JSON and a WER-against-calls plot.

Threads are fixed before anything runs (``--threads``, default 2, intra- and inter-op) so the
numbers describe a known machine share. Utterances whose audio fails print one error line each,
are left out of every row, and make the exit code 1.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

_PROG = "speechllama bench"


def register(sub: argparse._SubParsersAction) -> None:
    from speechllama.bench_methods import DEFAULT_METHODS, METHODS
    from speechllama.model.precision import DECODE_PRECISIONS, ENCODER_PRECISIONS

    p = sub.add_parser(
        "bench",
        help="compare decoding methods and transformers peers on a manifest",
        description="Decode a NeMo JSONL manifest with several methods in one process "
        "(audio encoded once and shared; warm-up; median of interleaved repeats; fixed "
        "threads) and print WER, decoder calls, tokens per call, decoder seconds, speed-up "
        "against greedy and RTF.",
    )
    p.add_argument("--manifest", type=Path, required=True, metavar="M", help="NeMo JSONL manifest")
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="checkpoint directory or bundled model name (default: the bundled 'default' model)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--threads", type=int, default=2, metavar="N",
                   help="torch intra- and inter-op threads (default: 2)")  # fmt: skip
    p.add_argument("--limit", type=int, metavar="N", help="only the first N utterances")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="utterances per batch for our methods; the hf-* peers run at batch 1 "
                   "(default: 1)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, metavar="R",
                   help="timed passes per method, median reported (default: 1)")  # fmt: skip
    p.add_argument(
        "--methods",
        default=DEFAULT_METHODS,
        metavar="LIST",
        help=f"comma-separated methods; families: {'; '.join(u for _, u in METHODS.values())}."
        " greedy always runs (it is the reference). Methods that cannot run here are skipped "
        f"with a note (default: {DEFAULT_METHODS})",
    )
    p.add_argument(
        "--num-heads", type=int, metavar="K", help="prediction heads used (default: all)"
    )
    p.add_argument("--dtype", choices=DECODE_PRECISIONS, default="float32",
                   help="decoder and heads weights at decode time; bfloat16 halves the bytes a "
                        "call reads (CPUs with avx512_bf16), int8 quarters them (int8 weights "
                        "and per-row int8 activations, CPU)")  # fmt: skip
    p.add_argument("--encoder-dtype", choices=ENCODER_PRECISIONS, default="auto",
                   help="encoder precision: auto is bfloat16 on a CPU with AMX and float32 "
                        "elsewhere (default: auto)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="every method's decoder calls through torch.compile, compiled in the "
                        "warm-up; or +compiled on one method (greedy+compiled)")  # fmt: skip
    p.add_argument("--max-tokens-per-second", type=float, metavar="R",
                   help="transcript length limit per second of audio (default: 12)")  # fmt: skip
    p.add_argument("--json", type=Path, metavar="FILE", help="write the rows as a JSON list")
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="plot WER against calls")
    p.set_defaults(func=run)


def set_threads(threads: int) -> None:
    """Fix intra- and inter-op threads. Inter-op threads can only be set before torch's first
    parallel work; when that has happened (a second run in one process) they stay as they are,
    and the header shows the value in force."""
    import torch

    if threads < 1:
        raise ValueError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        with contextlib.suppress(RuntimeError):  # already started: the header shows it
            torch.set_num_interop_threads(threads)


def run(args: argparse.Namespace) -> int:
    from speechllama.bench import format_table, plot_wer_vs_calls, run_bench, write_json
    from speechllama.bench_methods import parse_methods
    from speechllama.data.manifest import load_manifest
    from speechllama.decoding import DecodingOptions
    from speechllama.transcribe import load_model

    checks = (("--batch-size", args.batch_size), ("--repeats", args.repeats),
              ("--limit", 1 if args.limit is None else args.limit))  # fmt: skip
    for flag, value in checks:
        if value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    set_threads(args.threads)
    fields: dict = {"batch_size": args.batch_size}
    if args.num_heads is not None:
        fields["num_heads"] = args.num_heads
    if args.max_tokens_per_second is not None:
        fields["max_tokens_per_second"] = args.max_tokens_per_second
    options = DecodingOptions(**fields)
    methods = parse_methods(args.methods, options)
    utts = load_manifest(args.manifest, check_audio=False)
    if args.limit is not None:
        utts = utts[: args.limit]
    model = load_model(args.model, device=args.device, precision=args.dtype, compile=args.compile,
                       encoder_precision=args.encoder_dtype)  # fmt: skip
    report = run_bench(model, utts, methods, options, repeats=args.repeats)
    for error in report.errors:
        print(f"{_PROG}: error: {error}", file=sys.stderr)
    print(format_table(report), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(report, args.json)
    if args.plot is not None:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_wer_vs_calls(report, args.plot)
    if report.errors:
        print(f"{_PROG}: {len(report.errors)} utterance(s) failed", file=sys.stderr)
        return 1
    return 0
