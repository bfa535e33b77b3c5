"""``speechllama export CKPT``: write the fp16 shipping copy of a checkpoint (trained parts only,
no CTC head, no training state) into the package's bundled default model, or ``--out DIR``."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from speechllama.export import MAX_BUNDLED_MB

    p = sub.add_parser(
        "export",
        help="write a small shipping copy of a checkpoint (the bundled default model)",
        description="Copy a checkpoint's trained parts (adapter, decoder, heads, tokenizer, "
        "config; a packaged frozen encoder is never stored) in fp16 into the bundled default "
        "model directory that `transcribe` and friends load without --model.",
    )
    p.add_argument("checkpoint", type=Path, metavar="CKPT", help="checkpoint directory")
    p.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="target directory (default: the package's models/default)",
    )
    p.add_argument(
        "--dtype",
        default="float16",
        choices=("float16", "bfloat16", "float32"),
        help="storage type of the weights (default: float16)",
    )
    p.add_argument("--keep-ctc", action="store_true", help="keep the CTC head (training only)")
    p.add_argument(
        "--max-mb",
        type=float,
        default=MAX_BUNDLED_MB,
        metavar="MB",
        help=f"refuse a larger copy (default: {MAX_BUNDLED_MB:g})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from speechllama.export import dir_megabytes, export_model

    out = export_model(args.checkpoint, args.out, args.dtype, args.keep_ctc, args.max_mb)
    print(f"{out}: {dir_megabytes(out):.1f} MB ({args.dtype})")
    return 0
