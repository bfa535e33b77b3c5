#!/usr/bin/env python
"""Peers side by side: faster-whisper (Whisper tiny.en int8) and pocketsphinx (en-us), and
optionally our model, on test manifests: WER and RTF per system per set, one table (+ JSON).

Usage:
  python scripts/peers.py --data data/synthetic                 # real-smoke and fsdd-test
  python scripts/peers.py --data data/synthetic --model exp/x/best --by-source --json peers.json
  python scripts/peers.py my-set=path/to/manifest.jsonl other/manifest.jsonl --systems pocketsphinx

A manifest given as a bare path is named after its folder. Our model's row uses the decoding
flags of ``speechllama evaluate`` (default here: --batch-size 1, as the peers decode one
utterance at a time). Needs ``pip install 'speechllama[peers]'``. What is timed and how the
systems share the machine: ``speechllama/bench_peers.py``; the systems: ``speechllama/peers.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_SETS = ("real-smoke", "fsdd-test")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from speechllama.cli.transcribe import add_decoding_args
    from speechllama.model.precision import DECODE_PRECISIONS, ENCODER_PRECISIONS
    from speechllama.peers import PEERS

    p = argparse.ArgumentParser(
        prog="peers.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "manifests",
        nargs="*",
        metavar="[NAME=]MANIFEST",
        help=f"NeMo JSONL manifests (default: {' and '.join(DEFAULT_SETS)} under --data)",
    )
    p.add_argument(
        "--data",
        type=Path,
        default=Path("data/synthetic"),
        metavar="DIR",
        help="folder holding <set>/manifest.jsonl (default: data/synthetic)",
    )
    p.add_argument(
        "--systems",
        default=",".join(PEERS),
        metavar="LIST",
        help=f"comma-separated peers, empty for none (default: {','.join(PEERS)})",
    )
    p.add_argument("--model", metavar="DIR", help="also our model (checkpoint directory)")
    p.add_argument("--device", default="cpu", help="torch device for --model (default: cpu)")
    p.add_argument("--dtype", choices=DECODE_PRECISIONS, default="float32",
                   help="--model's decoder precision (default: float32)")  # fmt: skip
    p.add_argument("--encoder-dtype", choices=ENCODER_PRECISIONS, default="auto",
                   help="--model's encoder precision: auto is bfloat16 on a CPU with AMX "
                        "(default: auto)")  # fmt: skip
    p.add_argument("--compile", action="store_true",
                   help="--model: decoder calls through torch.compile")  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        metavar="N",
        help="threads for torch and CTranslate2 (default: 2)",
    )
    p.add_argument("--limit", type=int, metavar="N", help="only the first N utterances of each")
    p.add_argument(
        "--chunk",
        type=int,
        default=16,
        metavar="N",
        help="utterances per turn of each system (default: 16)",
    )
    p.add_argument(
        "--by-source",
        action="store_true",
        help="also one row per manifest 'source' (e.g. real-smoke's corpora)",
    )
    p.add_argument("--json", type=Path, metavar="FILE", help="write header, rows and errors")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="run each system alone in a fresh process, one after another, instead of taking "
        "turns in one process (once faster-whisper has run in a process, our decoding there "
        "is about 1.4x slower)",
    )
    add_decoding_args(p)
    p.set_defaults(batch_size=1)
    return p.parse_args(argv)


def named_manifests(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """``NAME=PATH`` or ``PATH`` (named after its folder); none: the default sets in --data."""
    if not args.manifests:
        return [(name, args.data / name / "manifest.jsonl") for name in DEFAULT_SETS]
    out = []
    for spec in args.manifests:
        name, sep, path = spec.partition("=")
        out.append((name, Path(path)) if sep else (Path(spec).parent.name, Path(spec)))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from speechllama.bench_peers import format_table, header, measure, measure_isolated, to_json

    try:
        peers = [s for s in args.systems.split(",") if s]
        if not peers and not args.model:
            raise ValueError("no system to run")
        run = measure_isolated if args.isolate else measure
        rows, errors = run(args, peers, bool(args.model), named_manifests(args))
    except (OSError, ValueError) as err:
        print(f"peers.py: error: {err}", file=sys.stderr)
        return 1
    head = header(args.chunk, args.isolate)
    print(format_table(rows, head), flush=True)
    for error in errors:
        print(f"peers.py: error: {error}", file=sys.stderr)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(rows, head, errors), indent=2) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
