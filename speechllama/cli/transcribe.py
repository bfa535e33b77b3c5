"""``speechllama transcribe FILE...``: print ``path<TAB>text`` per file as each batch finishes.

With ``--output out.jsonl`` every transcript is also appended as one JSON line, synced to disk
before the next (``speechllama.resultlog``), and a re-run with the same output skips the files
already in it, so a job killed at any moment resumes where it stopped and loses nothing.
Bad files print one error line naming the file; the rest are still transcribed; the exit code
is 1 if any file failed. Also home of the decoding flags that ``evaluate`` shares.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from speechllama.decoding.options import DecodingResult

_PROG = "speechllama transcribe"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    from speechllama.model.precision import DECODE_PRECISIONS, ENCODER_PRECISIONS

    parser.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="checkpoint directory or bundled model name (default: the bundled 'default' model)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument(
        "--dtype",
        choices=DECODE_PRECISIONS,
        default="float32",
        help="decoder precision at decode time: bfloat16 halves the bytes a decoder call "
        "reads (CPUs with avx512_bf16), int8 quarters them (int8 weights and per-row int8 "
        "activations, CPU); both approximate the trained fp32 model (default: float32)",
    )
    parser.add_argument(
        "--encoder-dtype",
        choices=ENCODER_PRECISIONS,
        default="auto",
        help="encoder precision: auto is bfloat16 on a CPU with AMX (about 2x faster encoder, "
        "WER unchanged within noise) and float32 elsewhere (default: auto)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="decoder calls through torch.compile: faster calls after a one-off compile of "
        "seconds to a minute per call shape (needs a C++ compiler on CPU; float32 or bfloat16)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch CPU threads",
    )


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    """Flags that map onto ``DecodingOptions`` fields (unset flags keep the defaults)."""
    from speechllama.decoding import available_strategies

    g = parser.add_argument_group("decoding")
    g.add_argument("--decoding", default="greedy", choices=available_strategies(),
                   help="decoding strategy (default: greedy)")  # fmt: skip
    g.add_argument("--batch-size", type=int, default=8, metavar="N",
                   help="utterances per batch, formed in duration order (default: 8)")  # fmt: skip
    g.add_argument(
        "--num-heads", type=int, metavar="K", help="prediction heads used (default: all)"
    )
    g.add_argument("--threshold", type=float, help="probability threshold (threshold strategy)")
    g.add_argument("--verify", choices=("exact", "topk"), help="agreement test (verify strategy)")
    g.add_argument("--topk", type=int, help="top-k for relaxed verification")
    g.add_argument("--draft-threshold", type=_draft_threshold, metavar="P|auto",
                   help="verify, tree: feed only the proposals whose chained head confidence is at "
                   "least P, so unlikely ones do not widen the call; auto: P from how much a "
                   "wider call costs on this machine, measured at load (default: 0, feed all; "
                   "exact verification stays greedy's output)")  # fmt: skip
    g.add_argument(
        "--tree",
        type=_tree_shape,
        metavar="N-N-..",
        help="candidates per depth, e.g. 3-2-1 (tree strategy; default: 3-2-1)",
    )
    g.add_argument(
        "--tree-max-nodes",
        type=int,
        metavar="N",
        help="cap on tree candidates per call (tree strategy; default: 64)",
    )
    g.add_argument("--beam-size", type=int, metavar="B", help="beam size (beam strategies)")
    g.add_argument("--length-penalty", type=float, metavar="A",
                   help="beam strategies rank finished hypotheses by log-prob / length**A "
                   "(default: 1; 0 ranks by log-prob)")  # fmt: skip
    g.add_argument("--prefix-rescore", action=argparse.BooleanOptionalAction, default=None,
                   help="prefix-beam: rescore each block with head 1 when the next call feeds "
                   "it, so scores are the next-token log-probs (default: off)")  # fmt: skip
    g.add_argument("--max-tokens-per-second", type=float, metavar="R",
                   help="transcript length limit per second of audio (default: 12)")  # fmt: skip


def _draft_threshold(text: str) -> float | str:
    """``auto`` or a probability in [0, 1]."""
    if text == "auto":
        return text
    try:
        p = float(text)
    except ValueError:
        p = -1.0
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1] or auto, got {text!r}")
    return p


def _tree_shape(text: str) -> tuple[int, ...]:
    """``3-2-1`` (the bench's ``tree@3-2-1``) or ``3,2,1`` -> (3, 2, 1)."""
    try:
        shape = tuple(int(x) for x in text.replace(",", "-").split("-"))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected candidates per depth like 3-2-1, got {text!r}")
    return shape


def decoding_options(args: argparse.Namespace):
    """``DecodingOptions`` from the parsed ``add_decoding_args`` flags."""
    from speechllama.decoding import DecodingOptions

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    fields: dict[str, Any] = {"strategy": args.decoding, "batch_size": args.batch_size}
    names = ("num_heads", "threshold", "verify", "topk", "draft_threshold", "tree",
             "tree_max_nodes", "beam_size", "length_penalty", "prefix_rescore",
             "max_tokens_per_second")  # fmt: skip
    for name in names:
        value = getattr(args, name)
        if value is not None:
            fields[name] = value
    return DecodingOptions(**fields)


def setup_torch(args: argparse.Namespace) -> None:
    if args.threads is not None:
        import torch

        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "transcribe",
        help="transcribe audio files",
        description="Transcribe audio files; prints PATH<TAB>TEXT per file as batches finish.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, ...)")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        metavar="OUT.jsonl",
        help="append one JSON object per file; files already in it are skipped",
    )
    p.add_argument(
        "--stats",
        action="store_true",
        help="also print each file's decoder calls, tokens per call and RTF, and a summary "
        "(to stderr, so stdout stays PATH<TAB>TEXT)",
    )
    add_model_args(p)
    add_decoding_args(p)
    p.set_defaults(func=run)


def _key(path: str) -> str:
    return os.path.abspath(path)


def _done(output: Path) -> tuple[set[str], bool]:
    """Files already transcribed into ``output``, and whether it ends mid-line (a write cut
    short by a kill: that row is dropped and its file redone; see ``resultlog``)."""
    from speechllama.resultlog import read_rows

    rows, torn = read_rows(output)
    done = {_key(r["audio_filepath"]) for r in rows if isinstance(r.get("audio_filepath"), str)}
    return done, torn


def run(args: argparse.Namespace) -> int:
    """Transcribe ``args.files``; under torchrun each rank takes its share (distributed_eval)."""
    from speechllama.distributed_eval import transcribe_sharded

    return transcribe_sharded(args, _run_files, _done)


def _run_files(args: argparse.Namespace) -> int:
    from speechllama.resultlog import ResultLog
    from speechllama.transcribe import load_model

    setup_torch(args)
    options = decoding_options(args)
    files = list(dict.fromkeys(args.files))  # each file once, in the order given
    done, _ = _done(args.output) if args.output else (set(), False)
    todo = [f for f in files if _key(f) not in done]
    if len(todo) < len(files):
        print(
            f"{_PROG}: skipping {len(files) - len(todo)} file(s) already in {args.output}",
            file=sys.stderr,
        )
    if not todo:
        return 0
    model = load_model(args.model, device=args.device, precision=args.dtype, compile=args.compile,
                       encoder_precision=args.encoder_dtype)  # fmt: skip
    failed = 0
    stats = _Stats() if getattr(args, "stats", False) else None
    out = ResultLog(args.output) if args.output else None  # one durable line per result
    if out is not None:
        out.open()
    try:
        for index, result in model.transcribe_iter(todo, options):
            if result.error is not None:
                failed += 1
                print(f"{_PROG}: error: {result.error}", file=sys.stderr, flush=True)
                continue
            print(f"{todo[index]}\t{result.text}", flush=True)
            if stats is not None:
                stats.add(todo[index], result)
            if out is not None:
                row = {
                    "audio_filepath": todo[index],
                    "text": result.text,
                    "decoder_calls": result.decoder_calls,
                    "tokens": len(result.tokens),
                    "seconds": round(result.encoder_seconds + result.decoder_seconds, 6),
                    "audio_seconds": round(result.audio_seconds, 6),
                }
                out.append(row)
    finally:
        if out is not None:
            out.close()
    if stats is not None:
        stats.summary()
    if failed:
        print(f"{_PROG}: {failed} of {len(todo)} file(s) failed", file=sys.stderr)
        return 1
    return 0


class _Stats:
    """Decoding statistics for ``--stats``: what the multi-token decoder saved, per file."""

    def __init__(self) -> None:
        self.calls = self.tokens = 0
        self.seconds = self.audio = self.encoder = 0.0

    def add(self, path: str, result: DecodingResult) -> None:
        self.calls += result.decoder_calls
        self.tokens += len(result.tokens)
        self.encoder += result.encoder_seconds
        self.seconds += result.encoder_seconds + result.decoder_seconds
        self.audio += result.audio_seconds
        print(
            f"  {path}: {result.decoder_calls} decoder calls, {len(result.tokens)} tokens "
            f"({result.tokens_per_call:.2f} per call), RTF {result.rtf:.3f}",
            file=sys.stderr,
            flush=True,
        )

    def summary(self) -> None:
        per_call = self.tokens / self.calls if self.calls else 0.0
        rtf = self.seconds / self.audio if self.audio else 0.0
        print(
            f"{_PROG}: {self.calls} decoder calls for {self.tokens} tokens ({per_call:.2f} per "
            f"call); {self.seconds:.2f} s for {self.audio:.1f} s of audio, RTF {rtf:.3f} "
            f"(encoder {self.encoder:.2f} s)",
            file=sys.stderr,
        )
